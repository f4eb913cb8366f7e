"""Summarise a scripts/gpu_check.sh output folder: its figures (smoke, bench.py's rows) and each training run's time
to val 1.47 and training speed.

    python scripts/gpu_report.py gpu_check_out
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

TARGET = 1.47  # nanoGPT's baby-GPT validation loss on Tiny Shakespeare (characters)
SHOWN = ("model", "what", "method", "batch_size", "compile", "optimizer", "tokens_per_sec", "mfu", "ms_per_token",
         "peak_memory_mb", "warmup_s", "cuda_graphs", "device_name", "torch", "triton", "capability", "flash_max_err",
         "compile_default_s", "compile_reduce-overhead_s", "smoke_s")


def rows(path: Path) -> list[dict]:
    """The JSON lines of a file; a last line cut short (the check stopped while writing it) is dropped."""
    found = []
    for line in path.read_text().splitlines() if path.is_file() else ():
        try:
            found.append(json.loads(line))
        except ValueError:
            pass
    return found


def time_to_target(metrics: Path, target: float = TARGET) -> tuple[float, int] | None:
    """(elapsed seconds, iteration) of the first evaluation at or below target in a metrics.jsonl, or None."""
    for row in rows(metrics):
        if row.get("val_loss") is not None and row["val_loss"] <= target:
            return row["elapsed"], row["iter"]
    return None


def report(out: Path) -> list[str]:
    lines = []
    for row in rows(out / "figures.jsonl"):
        lines.append(f"{row.get('what')} " + json.dumps({k: row[k] for k in SHOWN if row.get(k) is not None}))
    for metrics in sorted(out.glob("*.metrics.jsonl")):
        records = rows(metrics)
        evals = [r for r in records if r.get("val_loss") is not None]
        speeds = [r["tokens_per_sec"] for r in records if r.get("tokens_per_sec")]
        hit = time_to_target(metrics)
        best = min((r["val_loss"] for r in evals), default=None)
        reached = f"val {TARGET} at iteration {hit[1]} after {hit[0]:.0f} s" if hit else f"val {TARGET} not reached"
        last = records[-1] if records else {}
        speed = f", median {statistics.median(speeds):,.0f} tokens/s" if speeds else ""
        lines.append(f"{metrics.name.removesuffix('.metrics.jsonl')}: {reached}; best val {best}, {len(evals)} "
                     f"evaluations, {last.get('iter')} iterations in {last.get('elapsed')} s{speed}")
    return lines


if __name__ == "__main__":
    print("\n".join(report(Path(sys.argv[1] if len(sys.argv) > 1 else "gpu_check_out"))))
