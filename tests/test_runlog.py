"""runlog.py: the command that resumes a run, metrics.jsonl and the out_dir lock (two processes, signals, progress
lines and the summary are tested through whole runs in tests/test_train.py).

    python -m pytest tests/test_runlog.py
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
from pathlib import Path

import pytest

from runlog import METRICS_KEYS, Metrics, OutDirLock, resume_command


def test_resume_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    assert resume_command(["run.toml", "--init_from", "gpt2", "--max_iters=5"]) == \
        "python train.py run.toml --max_iters=5 --init_from=resume"
    assert resume_command(["--init_from=gpt2", "--out_dir", "my run"]) == \
        "python train.py --out_dir 'my run' --init_from=resume"


def test_resume_command_under_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "0")
    assert resume_command(["run.toml"]) == "torchrun <your torchrun options> train.py run.toml --init_from=resume"


def test_metrics_write_nonfinite_numbers_as_null(tmp_path: Path) -> None:
    """json.dumps writes NaN and Infinity bare, which is not JSON: jq, JavaScript and strict parsers refuse the file."""
    metrics = Metrics(tmp_path / "metrics.jsonl", resuming=False, iter_num=0)
    row = dict.fromkeys(METRICS_KEYS, 1.5) | {"iter": 3, "train_loss": math.nan, "val_loss": math.inf,
                                              "lr": -math.inf, "mfu": None}
    metrics.write(row)

    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    line = json.loads((tmp_path / "metrics.jsonl").read_text(), parse_constant=refuse)
    assert line == row | {"train_loss": None, "val_loss": None, "lr": None}
    with pytest.raises(AssertionError):
        metrics.write({"iter": 4})  # every line has every key
    # a resumed run keeps the line, nulls and all
    Metrics(tmp_path / "metrics.jsonl", resuming=True, iter_num=3)
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == line


def test_out_dir_without_file_locks_trains_with_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture) -> None:
    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with OutDirLock(tmp_path / "run"):
        assert (tmp_path / "run" / ".lock").is_file()
    assert "cannot be locked (No locks available)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # created for the run, left empty: removed


def test_out_dir_lock_refuses_a_second_holder_and_cleans_up(tmp_path: Path) -> None:
    """Within one process too (flock locks belong to the open file, not the process)."""
    with OutDirLock(tmp_path / "a" / "run"):
        with pytest.raises(SystemExit, match=rf"{tmp_path / 'a' / 'run'} is in use by another train.py \(pid "
                                             rf"{os.getpid()}\)"):
            OutDirLock(tmp_path / "a" / "run").__enter__()
        (tmp_path / "a" / "run" / "metrics.jsonl").write_text("")
    assert sorted(p.name for p in (tmp_path / "a" / "run").iterdir()) == ["metrics.jsonl"]  # written into: kept
    with OutDirLock(tmp_path / "b" / "c"):
        pass
    assert not (tmp_path / "b").exists()  # both folders it made, empty, are gone


@pytest.mark.parametrize("kind", ["symlink", "foreign file", "hard link", "folder"])
def test_out_dir_lock_never_writes_into_a_file_it_does_not_own(tmp_path: Path, kind: str) -> None:
    """A .lock that is a link to a user's file, or a file holding something other than a pid: refused in one line
    naming it; the user's file byte for byte as it was, the link still there."""
    user = tmp_path / "notes.txt"
    user.write_bytes(b"my notes\n" * 3)
    run = tmp_path / "run"
    run.mkdir()
    {"symlink": lambda: (run / ".lock").symlink_to(user), "hard link": lambda: os.link(user, run / ".lock"),
     "foreign file": lambda: (run / ".lock").write_bytes(user.read_bytes()), "folder": (run / ".lock").mkdir}[kind]()
    message = {"symlink": "is a symbolic link", "folder": "is a folder"}.get(kind, "is not a lock file")
    with pytest.raises(SystemExit, match=rf"^{run / '.lock'} {message}"):
        OutDirLock(run).__enter__()
    assert user.read_bytes() == b"my notes\n" * 3
    assert (run / ".lock").is_dir() if kind == "folder" else (run / ".lock").read_bytes() == b"my notes\n" * 3
    assert (run / ".lock").is_symlink() == (kind == "symlink")


def test_out_dir_lock_reuses_a_dead_holders_file(tmp_path: Path) -> None:
    """A killed run's .lock (its pid, or empty) is this lock's own: taken over and removed on exit."""
    for left in (b"4242\n", b""):
        (tmp_path / ".lock").write_bytes(left)
        with OutDirLock(tmp_path):
            assert (tmp_path / ".lock").read_bytes() == f"{os.getpid()}\n".encode()
        assert not (tmp_path / ".lock").exists()
