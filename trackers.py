"""Experiment trackers for train.py's `--log_to`: each metrics.jsonl line also goes to TensorBoard or Weights & Biases.

    python train.py configs/shakespeare_char_cpu.toml --log_to=tensorboard     # then: tensorboard --logdir=out/...
    WANDB_MODE=offline python train.py configs/shakespeare_char_cpu.toml --log_to=wandb,tensorboard

Each is an optional extra (pip install -e '.[tensorboard]' or '.[wandb]'), imported only when asked for. A tracker
gets exactly what metrics.jsonl gets: every key of each line but `iter`, which is the step, nulls left out. One that
fails to start or to log says so in one line and the run goes on without it. wandb honours its own environment
(WANDB_MODE=offline, WANDB_PROJECT, WANDB_DIR, ...); its default project is "smallgpt", its run name the out_dir's.
"""

from __future__ import annotations

from pathlib import Path

TRACKERS = ("tensorboard", "wandb")


def check_log_to(log_to: str) -> None:
    """ValueError naming any tracker of the comma-separated log_to that is not one of TRACKERS."""
    unknown = [name for name in parse(log_to) if name not in TRACKERS]
    if unknown:
        raise ValueError(f"log_to: unknown tracker {', '.join(unknown)}; choose from {', '.join(TRACKERS)} "
                         f"(comma-separated), or leave it empty")


def parse(log_to: str) -> list[str]:
    return [name.strip() for name in log_to.split(",") if name.strip()]


class Trackers:
    """The trackers named by log_to, started for the run in out_dir with its settings (config)."""

    def __init__(self, log_to: str, out_dir: Path, config: dict) -> None:
        self.live: dict[str, object] = {}
        for name in parse(log_to):
            try:
                self.live[name] = getattr(self, f"_start_{name}")(Path(out_dir), config)
            except ImportError:
                print(f"--log_to={name}: {name} is not installed (pip install -e '.[{name}]'); the run goes on "
                      f"without it", flush=True)
            except Exception as e:  # a tracker's own failure (no login, no network) must not stop the training
                self._drop(name, f"could not start ({type(e).__name__}: {e})")

    @staticmethod
    def _start_tensorboard(out_dir: Path, config: dict) -> object:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        return SummaryWriter(log_dir=str(out_dir / "tensorboard"))

    @staticmethod
    def _start_wandb(out_dir: Path, config: dict) -> object:
        import os

        import wandb

        return wandb.init(project=os.environ.get("WANDB_PROJECT", "smallgpt"), name=out_dir.name, config=config,
                          dir=os.environ.get("WANDB_DIR", str(out_dir)), reinit="create_new")

    def log(self, row: dict) -> None:
        """One metrics.jsonl line: its values at step row["iter"]."""
        values = {k: v for k, v in row.items() if k != "iter" and v is not None}
        for name, tracker in list(self.live.items()):
            try:
                if name == "tensorboard":
                    for key, value in values.items():
                        tracker.add_scalar(key, value, row["iter"])
                else:
                    tracker.log(values, step=row["iter"])
            except Exception as e:
                self._drop(name, f"failed ({type(e).__name__}: {e})")

    def close(self) -> None:
        for name, tracker in list(self.live.items()):
            try:
                tracker.close() if name == "tensorboard" else tracker.finish()
            except Exception as e:
                self._drop(name, f"did not close cleanly ({type(e).__name__}: {e})")
        self.live.clear()

    def _drop(self, name: str, why: str) -> None:
        self.live.pop(name, None)
        print(f"--log_to={name}: {why}; the run goes on without it", flush=True)
