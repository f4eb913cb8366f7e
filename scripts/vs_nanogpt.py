"""Whole-process time of nanoGPT's CPU Shakespeare command against ours, interleaved, and sampling's start-up.

    git clone https://github.com/karpathy/nanoGPT /tmp/nanogpt   # then its data/shakespeare_char/prepare.py
    OMP_NUM_THREADS=1 flock /work/measure.lock python scripts/vs_nanogpt.py --nanogpt=/tmp/nanogpt --rounds=3 \
        [--also=/path/to/another/checkout]   # a third contender: another version of this repository

Each round runs nanoGPT's train.py and ours for --iters iterations, then each sample.py for one token, each on a
pseudo-terminal as a person would; each contender goes first in turn. Per process it reports the wall time, the
time to the line printed right after the evaluation at iteration 0 (the start of the first iteration: imports, data,
model, that evaluation), and for sample.py the time to its exit (one token).
Ours draws loss.png in a child that outlives it: the next process starts once that child is done.
"""

from __future__ import annotations

import json
import os
import pty
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NANOGPT_ARGS = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
                "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128",
                "--dropout=0.0"]  # its README's CPU command


def timed(cmd: list[str], cwd: Path, first_iter: str | None) -> dict:
    """Wall time of cmd run on a terminal (a pseudo-terminal: what a person sees), and of its first output line
    matching first_iter."""
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    master, slave = pty.openpty()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    seen: dict[str, object] = {"first": None, "text": ""}

    def read() -> None:  # until every holder of the terminal is gone (ours' loss.png child may outlive it)
        pending = ""
        while True:
            try:
                chunk = os.read(master, 65536).decode(errors="replace")
            except OSError:
                return
            if not chunk:
                return
            pending += chunk
            *lines, pending = re.split(r"[\r\n]", pending)
            for line in lines:
                if seen["first"] is None and first_iter and re.search(first_iter, line):
                    seen["first"] = time.perf_counter() - t0
                seen["text"] = line.strip() or seen["text"]

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    proc.wait()
    total = time.perf_counter() - t0
    reader.join(timeout=60)
    os.close(master)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {seen['text']}")
    first = seen["first"]
    return {"wall_s": round(total, 2), "first_iter_s": None if first is None else round(first, 2),
            "last": seen["text"]}


def main() -> None:
    if {"-h", "--help"} & set(sys.argv[1:]):
        sys.path.insert(0, str(REPO))
        from config import fit_text  # the repository's help layout: within 100 columns

        print(fit_text(__doc__))
        sys.exit(0)
    if bad := [a for a in sys.argv[1:] if not a.startswith("--") or "=" not in a]:
        raise SystemExit(f"{bad[0]}: options are --key=value; see python scripts/vs_nanogpt.py --help")
    opts = dict(a.removeprefix("--").split("=", 1) for a in sys.argv[1:])
    if "nanogpt" not in opts:
        raise SystemExit("--nanogpt=PATH of a nanoGPT clone is required; see python scripts/vs_nanogpt.py --help")
    nanogpt, rounds, iters = Path(opts["nanogpt"]), int(opts.get("rounds", 3)), int(opts.get("iters", 800))
    ours = {"ours": REPO} | ({"also": Path(opts["also"])} if "also" in opts else {})
    results: dict[str, list[dict]] = {f"{who} {what}": [] for what in ("train", "sample") for who in ("nanogpt", *ours)}
    for r in range(rounds):
        def train(who: str, repo: Path) -> None:
            out = f"/tmp/vs_nanogpt/{who}_{r}"
            subprocess.run(["rm", "-rf", out], check=True)
            if who == "nanogpt":
                results["nanogpt train"].append(timed(
                    [sys.executable, "train.py", *NANOGPT_ARGS, f"--max_iters={iters}", f"--lr_decay_iters={iters}",
                     f"--out_dir={out}"], repo, r"step 0: train loss"))
                return
            results[f"{who} train"].append(timed(
                [sys.executable, "train.py", "configs/shakespeare_char_cpu.toml", f"--max_iters={iters}",
                 f"--lr_decay_iters={iters}", f"--out_dir={out}"], repo, r"iter 0: train loss"))
            for _ in range(600):  # loss.png's child: let it finish before the next process is timed
                if Path(out, "loss.png").exists():
                    break
                time.sleep(0.1)

        def sample(who: str, repo: Path) -> None:
            cpu = ["--device=cpu"] if who == "nanogpt" else []
            results[f"{who} sample"].append(timed(
                [sys.executable, "sample.py", f"--out_dir=/tmp/vs_nanogpt/{who}_{r}", *cpu, "--num_samples=1",
                 "--max_new_tokens=1"], repo, None))

        order = [("nanogpt", nanogpt), *ours.items()]
        order = order[r % len(order):] + order[:r % len(order)]  # each goes first in turn: no one's advantage
        for who, repo in order:
            train(who, repo)
        for who, repo in order:
            sample(who, repo)
        print(json.dumps({k: v[-1] for k, v in results.items()}), flush=True)
    for k, v in results.items():
        walls = [x["wall_s"] for x in v]
        firsts = [x["first_iter_s"] for x in v if x["first_iter_s"] is not None]
        print(f"{k}: wall best {min(walls):.2f} s, median {statistics.median(walls):.2f} s"
              + (f"; to the first iteration best {min(firsts):.2f} s, median {statistics.median(firsts):.2f} s"
                 if firsts else ""))


if __name__ == "__main__":
    main()
