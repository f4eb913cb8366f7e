"""Summarise a scripts/gpu_check.sh output folder: bench.py's rows and each training run's time to val 1.47.

    python scripts/gpu_report.py gpu_check_out
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TARGET = 1.47  # nanoGPT's baby-GPT validation loss on Tiny Shakespeare (characters)


def time_to_target(metrics: Path, target: float = TARGET) -> tuple[float, int] | None:
    """(elapsed seconds, iteration) of the first evaluation at or below target in a metrics.jsonl, or None."""
    for line in metrics.read_text().splitlines():
        row = json.loads(line)
        if row.get("val_loss") is not None and row["val_loss"] <= target:
            return row["elapsed"], row["iter"]
    return None


def report(out: Path) -> list[str]:
    lines = []
    bench = out / "bench.jsonl"
    for row in (json.loads(line) for line in bench.read_text().splitlines()) if bench.is_file() else ():
        shown = {k: row[k] for k in ("model", "what", "method", "batch_size", "compile", "optimizer", "tokens_per_sec",
                                     "mfu", "ms_per_token", "peak_memory_mb") if row.get(k) is not None}
        lines.append("bench " + json.dumps(shown))
    for metrics in sorted(out.glob("*/metrics.jsonl")):
        evals = [json.loads(line) for line in metrics.read_text().splitlines()]
        evals = [r for r in evals if r.get("val_loss") is not None]
        hit = time_to_target(metrics)
        best = min((r["val_loss"] for r in evals), default=None)
        reached = f"val {TARGET} at iteration {hit[1]} after {hit[0]:.0f} s" if hit else f"val {TARGET} not reached"
        lines.append(f"{metrics.parent.name}: {reached}; best val {best}, {len(evals)} evaluations")
    return lines


if __name__ == "__main__":
    print("\n".join(report(Path(sys.argv[1] if len(sys.argv) > 1 else "gpu_check_out"))))
