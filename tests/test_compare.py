"""compare.py: runs grouped by seed, the tokens and FLOPs axes, a run still training, folders that are not runs.

    python -m pytest tests/test_compare.py

Three tiny real training runs (two seeds of one setting, one of another) and hand-made folders beside them.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

import compare
import errors
import tokens
from hf import config_from_hf
from model import GPT
from test_train import synthetic_text, write_dataset
from train import main as train_main

TINY = ["--device=cpu", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=4",
        "--gradient_accumulation_steps=2", "--warmup_iters=2", "--max_iters=12", "--lr_decay_iters=12",
        "--eval_interval=6", "--eval_iters=2", "--log_interval=2", "--threads=1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """runs/{a_s1, a_s2}: the default learning rate (6e-4), seeds 1 and 2; runs/b_s1: 3e-3."""
    root = tmp_path_factory.mktemp("compare")
    text = synthetic_text(20_000, seed=0)
    data = write_dataset(root / "data", tokens.Tokenizer.char("".join(sorted(set(text)))), text)
    for name, extra in (("a_s1", ["--seed=1"]), ("a_s2", ["--seed=2"]), ("b_s1", ["--seed=1", "--learning_rate=3e-3"])):
        train_main([f"--dataset={data}", f"--out_dir={root / 'runs' / name}", *TINY, *extra])
    return root / "runs"


def test_runs_differing_by_seed_are_one_group(runs: Path) -> None:
    found, skipped = compare.find_runs([str(runs / "*")])
    assert not skipped and [r.path.name for r in found] == ["a_s1", "a_s2", "b_s1"]
    groups = compare.group_runs(found)
    assert [[r.path.name for r in g.runs] for g in groups] == [["a_s1", "a_s2"], ["b_s1"]]
    assert [g.label for g in groups] == ["learning_rate=0.0006", "learning_rate=0.003"]  # what sets them apart
    row = compare.summarize(groups[0])
    finals = [json.loads(line)["val_loss"] for name in ("a_s1", "a_s2")
              for line in (runs / name / "metrics.jsonl").read_text().splitlines()[-1:]]
    assert row["seeds"] == [1, 2] and row["iters"] == [12, 12] and row["in_progress"] is None
    assert row["final_val_loss"]["values"] == finals
    assert row["final_val_loss"]["mean"] == pytest.approx(statistics.mean(finals))
    band = compare.group_curve(groups[0], "val", 0.0)  # (iter, elapsed, mean, lowest, highest)
    assert [p[0] for p in band] == [0, 6, 12]
    assert (band[-1][3], band[-1][4]) == (min(finals), max(finals))
    assert compare.markdown([row]).splitlines()[2].startswith("| learning_rate=0.0006 | 2 | 12 | ")
    # the same folder named twice, or by a folder of runs, is read the same way
    assert [r.path.name for r in compare.find_runs([str(runs)])[0]] == ["a_s1", "a_s2", "b_s1"]


def test_runs_that_differ_in_many_settings_are_named_by_their_folders(runs: Path) -> None:
    """Two configs apart (four settings or more): the legend names the folders, the table lists the settings."""
    found, _ = compare.find_runs([str(runs / "*")])
    other = {"learning_rate": 3e-3, "mlp": "relu2", "norm": "rmsnorm", "optimizer": "muon"}
    for run in found[2:]:
        run.settings = run.settings | other
    groups = compare.group_runs(found)
    assert [g.label for g in groups] == [f"{runs}/a_s{{1,2}}", f"{runs}/b_s1"]
    table = compare.markdown([compare.summarize(g) for g in groups]).splitlines()
    assert table[2].startswith(f"| {runs}/a_s{{1,2}} | 2 | ")
    assert table[-1] == f"- {runs}/b_s1: learning_rate=0.003, mlp=relu2, norm=rmsnorm, optimizer=muon"
    assert compare.folders_text([Path("out/x_s1_lr3"), Path("out/x_s22_lr3")]) == "out/x_s{1,22}_lr3"
    assert compare.folders_text([Path("out/s10"), Path("out/s20")]) == "out/s{10,20}"  # whole numbers
    twice, _ = compare.find_runs([str(runs / "a_s1"), str(runs / "a_s1"), str(runs / "*")])  # each run read once
    assert [r.path.name for r in twice] == ["a_s1", "a_s2", "b_s1"]


def test_flops_axis_is_the_models_flops_per_token_times_tokens(runs: Path) -> None:
    run = compare.read_run(runs / "b_s1")
    config = json.loads((runs / "b_s1" / "latest" / "config.json").read_text())
    model = GPT(config_from_hf(config, "config.json", None))  # a real model, not compare.py's meta one
    assert run.tokens_per_iter == 4 * 16 * 2  # batch_size * block_size * gradient_accumulation_steps
    assert run.flops_per_token == model.flops_per_token() > 0
    iters, elapsed = [0, 6, 12], [0.1, 0.2, 0.3]
    steps, tokens_, time_, flops = compare.x_axes(compare.group_runs([run])[0], iters, elapsed)
    assert steps == iters and time_ == elapsed and tokens_ == [0, 768, 1536]
    assert flops == [t * model.flops_per_token() for t in tokens_]
    clocked = compare.Group("b", [run], step_s=0.5)  # a time per iteration measured apart (scripts/ablation.py)
    assert compare.x_axes(clocked, iters, elapsed)[2] == [0.0, 3.0, 6.0]


def test_a_run_in_progress_is_read_as_far_as_it_got(runs: Path, tmp_path: Path) -> None:
    # before its first checkpoint: its curve, no settings (so no tokens or FLOPs), and a half-written last line
    early = tmp_path / "early"
    early.mkdir()
    lines = (runs / "a_s1" / "metrics.jsonl").read_text().splitlines()
    (early / "metrics.jsonl").write_text("\n".join(lines[:4]) + "\n" + lines[4][:20])
    run = compare.read_run(early)
    assert [r["iter"] for r in run.rows] == [json.loads(line)["iter"] for line in lines[:4]]
    assert run.settings is None and not run.finished
    assert compare.x_axes(compare.group_runs([run])[0], [0], [0.0])[1::2] == [None, None]
    # after a checkpoint, before max_iters: in progress, grouped with its finished seeds
    mid = tmp_path / "mid"
    shutil.copytree(runs / "a_s2", mid, symlinks=True)
    (mid / "metrics.jsonl").write_text("\n".join(lines[:6]) + "\n")
    config = json.loads((mid / "latest" / "config.json").read_text())
    config["train"]["seed"] = 3  # the same settings as a_s1's but for the seed
    (mid / "latest" / "config.json").write_text(json.dumps(config))
    found, _ = compare.find_runs([str(runs / "a_s1"), str(mid), str(early)])
    groups = compare.group_runs(found)
    assert [len(g.runs) for g in groups] == [2, 1] and groups[1].label.endswith("(no checkpoint yet)")
    row = compare.summarize(groups[0])
    assert row["in_progress"] == [str(mid)] and row["iters"] == [12, json.loads(lines[5])["iter"]]
    assert "(1 still running)" in compare.markdown([row])


def test_folders_that_are_not_runs(runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "metrics.jsonl").write_text("not json\n[1, 2]\n")
    bad = [str(tmp_path / n) for n in ("empty", "a_file", "garbage", "missing")] + [str(tmp_path / "zz*")]
    found, skipped = compare.find_runs(bad)
    assert found == [] and len(skipped) == 5 and all("\n" not in line for line in skipped)
    with pytest.raises(SystemExit) as e:
        compare.main([*bad, "--out="])
    assert "no run among" in str(e.value)
    capsys.readouterr()
    rows = compare.main([*bad, str(runs / "b_s1"), "--out=", "--json=true"])  # a run among them: the table
    out, err = capsys.readouterr()
    assert [r["runs"] for r in rows] == [[str(runs / "b_s1")]] and json.loads(out) == rows
    assert err.count("skipped ") == 5 + 2 and "empty: not a run" in err  # 5 folders, garbage's 2 lines


def test_the_table_without_matplotlib(runs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "c.png"
    compare.main([str(runs), f"--out={png}", "--metric=train"])
    compare.plot_losses(runs / "b_s1" / "metrics.jsonl", tmp_path / "loss.png")  # train.py's loss.png
    assert png.read_bytes()[:4] == (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.png", "loss.png"]  # no temporary file left
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    compare.main([str(runs), f"--out={tmp_path / 'none.png'}"])
    out, err = capsys.readouterr()
    assert "| learning_rate=0.003 | 1 |" in out and not (tmp_path / "none.png").exists()
    assert "the figure needs matplotlib: pip install -e '.[plot]'" in err
    compare.plot_losses(runs / "b_s1" / "metrics.jsonl", tmp_path / "none.png")
    assert "matplotlib is not installed, so no none.png" in capsys.readouterr().out


def test_train_draws_loss_png_after_it_ends_on_a_terminal(runs: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib")
    import io
    import time

    import runlog

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    png = tmp_path / "loss.png"
    monkeypatch.setattr(sys, "stdout", Terminal())
    runlog.plot_losses(runs / "b_s1" / "metrics.jsonl", png)  # returns at once; a child draws it
    for _ in range(1200):
        if png.exists():
            break
        time.sleep(0.1)
    compare.plot_losses(runs / "b_s1" / "metrics.jsonl", tmp_path / "here.png")
    assert png.read_bytes() == (tmp_path / "here.png").read_bytes()  # the same picture as drawn in-process


REPO = Path(__file__).resolve().parents[1]


def handmade(folder: Path, *lines: str) -> Path:
    """A run before its first checkpoint: metrics.jsonl alone (no torch is needed to read it)."""
    folder.mkdir(parents=True)
    good = [json.dumps({"iter": i, "train_loss": 3.0 - i / 10, "val_loss": 3.1 - i / 10, "train_bpb": None,
                        "val_bpb": None, "lr": 1e-3, "tokens_per_sec": 100.0, "mfu": None, "elapsed": i * 1.5})
            for i in range(4)]
    (folder / "metrics.jsonl").write_text("".join(line + "\n" for line in [*good[:2], *lines, *good[2:]]))
    return folder


def compare_process(*args: object, stdout: object = subprocess.PIPE, cwd: Path = REPO) -> tuple[int, list[str]]:
    """(exit status, non-empty stderr lines) of `python compare.py args`."""
    r = subprocess.run([sys.executable, str(REPO / "compare.py"), *map(str, args)], stdout=stdout,
                       stderr=subprocess.PIPE, text=True, timeout=120, cwd=cwd)
    return r.returncode, [line for line in r.stderr.splitlines() if line.strip()]


def test_lines_train_py_would_not_write_and_a_broken_config_are_named_and_left_out(
        runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    odd = handmade(tmp_path / "odd", '{"iter": 7, "val_loss": NaN, "elapsed": 1.0}',
                   '{"iter": 8, "val_loss": Infinity, "elapsed": 1.0}', '{"iter": 9, "val_loss": 1e999, "elapsed": 1}',
                   '{"iter": 9, "val_loss": "low", "elapsed": 1.0}', '{"step": 9}', "[1, 2]", "\x00\x01")
    broken = tmp_path / "broken"
    shutil.copytree(runs / "b_s1", broken, symlinks=True)
    config = broken / "latest" / "config.json"
    config.unlink() if config.is_symlink() else None
    for text in ("{", '{"train": 3}', json.dumps({**json.loads((runs / "b_s1" / "latest" / "config.json")
                                                              .read_text()), "train": {"seed": 1}})):
        config.write_text(text)
        capsys.readouterr()
        rows = compare.main([str(odd), str(broken), str(runs / "a_s1"), "--out=", "--json=true"])
        err = capsys.readouterr().err.splitlines()
        assert [r["runs"] for r in rows] == [[str(odd)], [str(runs / "a_s1")]]
        assert rows[0]["iters"] == [3] and rows[0]["final_val_loss"]["mean"] == pytest.approx(2.8)
        assert [line.split(": ")[0] for line in err] == \
            [f"skipped {odd / 'metrics.jsonl'} line {n}" for n in range(3, 10)] + [f"skipped {config}"]
        assert "NaN is not JSON" in err[0] and "Infinity is not JSON" in err[1] and "inf, not a finite" in err[2]
        assert "left out" in err[-1]


def test_out_is_a_file_or_a_folder_and_the_default_is_under_out(runs: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("matplotlib")
    run = handmade(tmp_path / "runs" / "r")
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    compare.main([str(run)])  # no --out: out/compare.png, nothing else in the current folder
    assert [str(p.relative_to(here)) for p in sorted(here.rglob("*"))] == ["out", "out/compare.png"]
    assert capsys.readouterr().err.strip() == "figure: out/compare.png"
    (here / "figs").mkdir()
    for out, written in (("figs", "figs/compare.png"), ("new/", "new/compare.png"), ("c.svg", "c.svg")):
        compare.main([str(run), f"--out={out}"])
        assert capsys.readouterr().err.strip() == f"figure: {written}" and (here / written).stat().st_size > 1000
    assert (here / "c.svg").read_text().lstrip().startswith("<?xml")  # the suffix picks the format
    with pytest.raises(SystemExit, match="--out=figure has no suffix to say the figure's format"):
        compare.main([str(run), "--out=figure"])
    assert sorted(p.name for p in here.iterdir()) == ["c.svg", "figs", "new", "out"]


def test_a_full_disk_keeps_the_figure_that_was_there(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    run = handmade(tmp_path / "r")
    png = tmp_path / "figs" / "compare.png"
    compare.main([str(run), f"--out={png}"])
    before = png.read_bytes()

    def full_disk(self, f, **options) -> None:  # half a PNG, then the disk is full
        f.write(before[:len(before) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Figure, "savefig", full_disk)
    with pytest.raises(OSError) as e:
        compare.main([str(handmade(tmp_path / "r2"))] + [f"--out={png}"])
    assert errors.message(e.value) == f"{png}: no space left on the device: free some space or write elsewhere, " \
                                      f"then run again"
    assert png.read_bytes() == before and os.listdir(png.parent) == ["compare.png"]  # no temporary file left


def test_unwritable_figures_and_a_full_stdout_are_one_line(tmp_path: Path) -> None:
    run = handmade(tmp_path / "r")
    (tmp_path / "a_file").write_text("x")
    for out, expected in (("/dev/full", "--out=/dev/full is not a regular file"),
                          (tmp_path / "a_file" / "c.png", f"{tmp_path / 'a_file'}: already exists, as something")):
        status, lines = compare_process(run, f"--out={out}", cwd=tmp_path)
        assert status == 1 and len(lines) == 1 and re.search(expected, lines[0]), lines
    with open("/dev/full", "w") as full:
        status, lines = compare_process(run, "--out=", stdout=full)
    assert status == 1 and lines == ["standard output: no space left on the device: free some space or write "
                                     "elsewhere, then run again"]
