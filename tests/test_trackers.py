"""trackers.py and train.py's --log_to: what reaches TensorBoard and wandb (offline) is what metrics.jsonl holds.

    python -m pytest tests/test_trackers.py

Each library's test skips when it is not installed; wandb runs offline (WANDB_MODE=offline): no account, no network.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import tokens
import trackers
from test_train import synthetic_text, write_dataset
from train import main as train_main

TINY = ["--device=cpu", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=4",
        "--warmup_iters=2", "--max_iters=6", "--lr_decay_iters=6", "--eval_interval=3", "--eval_iters=2",
        "--log_interval=1", "--threads=1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    text = synthetic_text(10_000, seed=0)
    return write_dataset(tmp_path_factory.mktemp("data"), tokens.Tokenizer.char("".join(sorted(set(text)))), text)


def expected(out_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{key: [(step, value), ...]} of metrics.jsonl, nulls left out, as the trackers should have it."""
    series: dict[str, list[tuple[int, float]]] = {}
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for k, v in row.items():
            if k != "iter" and v is not None:
                series.setdefault(k, []).append((row["iter"], v))
    return series


def test_tensorboard_gets_what_metrics_jsonl_gets(data: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train_main([f"--dataset={data}", f"--out_dir={tmp_path}", "--log_to=tensorboard", *TINY])
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    got = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    want = expected(tmp_path)
    assert got.keys() == want.keys() and {"train_loss", "val_loss", "lr", "elapsed"} <= got.keys()
    for key, points in want.items():  # TensorBoard stores float32
        assert [s for s, _ in got[key]] == [s for s, _ in points], key
        assert [v for _, v in got[key]] == pytest.approx([v for _, v in points], rel=1e-6), key


def test_wandb_offline_gets_what_metrics_jsonl_gets(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture) -> None:
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logged: list[tuple[int, dict]] = []
    real_init = wandb.init

    def init(**kwargs: object) -> object:  # the real offline run, its log calls recorded on the way
        run = real_init(**kwargs)
        real_log = run.log
        run.log = lambda values, step: (logged.append((step, dict(values))), real_log(values, step=step))[1]
        return run

    monkeypatch.setattr(wandb, "init", init)
    out = tmp_path / "run"
    train_main([f"--dataset={data}", f"--out_dir={out}", "--log_to=wandb", *TINY])
    assert "--log_to" not in capsys.readouterr().out  # started, logged and closed without a complaint
    got: dict[str, list[tuple[int, float]]] = {}
    for step, values in logged:
        for k, v in values.items():
            got.setdefault(k, []).append((step, v))
    assert got == expected(out)
    offline = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1 and offline[0].stat().st_size > 0  # written where WANDB_MODE=offline puts it


def test_a_tracker_that_fails_is_one_line_and_the_run_goes_on(data: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed

    def broken(out_dir: Path, config: dict) -> object:
        raise RuntimeError("no logdir for you")

    monkeypatch.setattr(trackers.Trackers, "_start_tensorboard", staticmethod(broken))
    result = train_main([f"--dataset={data}", f"--out_dir={tmp_path}", "--log_to=wandb,tensorboard", *TINY])
    assert result["iter_num"] == 6
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("--log_to=")]
    assert lines == ["--log_to=wandb: wandb is not installed (pip install -e '.[wandb]'); the run goes on without it",
                     "--log_to=tensorboard: could not start (RuntimeError: no logdir for you); the run goes on "
                     "without it"]
    # a tracker that fails mid-run is dropped after saying so, once
    t = trackers.Trackers("", tmp_path, {})
    t.live["wandb"] = object()  # has no .log
    t.log({"iter": 1, "train_loss": 1.0})
    t.log({"iter": 2, "train_loss": 1.0})
    assert capsys.readouterr().out.count("--log_to=wandb: failed") == 1 and not t.live


def test_unknown_tracker_is_refused_by_name() -> None:
    with pytest.raises(SystemExit, match="log_to: unknown tracker mlflow; choose from tensorboard, wandb"):
        train_main(["--log_to=tensorboard,mlflow"])
