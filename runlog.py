"""Run-keeping for train.py: the out_dir lock, stop signals, metrics.jsonl, progress lines, the slow-run warning, the
loss plot, the closing summary and the lines that end a stopped, diverged or out-of-memory run. Nothing here changes
what a run computes."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import errors
from checkpoint import find_checkpoint, has_checkpoint
from trackers import Trackers

PLAIN_LOG_EVERY = 30.0  # seconds between progress lines when stderr is not a terminal (a log file: no bar)
EVAL_BAR_DELAY = 3.0  # seconds an evaluation runs before its progress bar appears (on a terminal)
CPU_STEP_OVERHEAD = 2.0  # a CPU training step takes up to ~this times its FLOPs at a bare matmul's rate (the quick
# start's: 1.6x, 4 GFLOP in 35 ms against 180 GFLOP/s, one thread)
METRICS_KEYS = {"iter", "train_loss", "val_loss", "train_bpb", "val_bpb", "lr", "tokens_per_sec", "mfu",
                "elapsed"}  # of every metrics.jsonl line


class OutDirLock:
    """Holds out_dir/.lock (fcntl.flock) for a whole run, so that a second train.py into the same out_dir is refused
    with the holder's pid. The kernel releases it when the process dies, even by kill -9; a leftover file is reused.
    An out_dir this lock created and nobody wrote into is removed again on exit."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir, self.path = out_dir, out_dir / ".lock"
        self.created = [p for p in (out_dir, *out_dir.parents) if not p.exists()]  # what to remove, deepest first

    def __enter__(self) -> OutDirLock:
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.lock = errors.lock(self.path, f"{self.out_dir} is in use by another train.py (pid {{pid}}): wait "
                                    f"for it to end, or pass another --out_dir")
        except OSError as e:
            self._remove_empty()
            raise SystemExit(f"out_dir {self.out_dir} is not writable ({e.strerror}): pass another --out_dir") from None
        return self

    def __exit__(self, *exc: object) -> None:
        errors.unlock(self.lock)
        self._remove_empty()

    def _remove_empty(self) -> None:
        try:
            for folder in self.created:
                folder.rmdir()
        except OSError:  # not empty: the run wrote something
            pass


class StopSignal:
    """Turns SIGINT/SIGTERM into a request to stop after the current optimizer step; a second one exits at once.

    Exiting at once is safe for the files: checkpoint.py writes a checkpoint into a temporary folder and renames it
    into place, so the checkpoints on disk are whole whenever the process dies.

    A SIGTERM that repeats a first SIGTERM within DUPLICATE_S seconds is ignored: when SLURM preempts or cancels a
    job it sends SIGTERM to every process of it, and torchrun forwards the SIGTERM it got to its workers too, so each
    worker receives the same request twice within milliseconds, and honouring the second would lose the graceful
    save. Ctrl-C pressed again (a second SIGINT, which then has its default action) and a later SIGTERM still exit at
    once.
    """

    DUPLICATE_S = 2.0

    def __init__(self, verbose: bool) -> None:
        self.signum = 0  # the first signal received; 0 while none
        self.verbose = verbose
        self._first_at = 0.0  # time.monotonic() of the first signal
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignal:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        # os.write, not print: a handler that prints can interrupt a print and fail with a reentrant-call error
        name = signal.Signals(signum).name
        if self.signum:
            if signum == self.signum == signal.SIGTERM and time.monotonic() - self._first_at < self.DUPLICATE_S:
                return  # the same request delivered twice (SLURM and torchrun), see the docstring
            os.write(2, f"\n{name} again: exiting now; the last saved checkpoint is intact\n".encode())
            os._exit(128 + signum)
        self.signum, self._first_at = signum, time.monotonic()
        # A Python handler runs only between two torch calls, and on a CPU one matmul can take seconds: a second
        # Ctrl-C gets the default action instead, which ends the process at once, wherever it is.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if self.verbose:
            os.write(2, f"\n{name}: finishing this step and saving a checkpoint (send it again to quit at once)\n"
                     .encode())


def resume_command(argv: list[str]) -> str:
    """The command line that continues this run: the same launcher and arguments, with --init_from=resume."""
    keep, i = [], 0
    while i < len(argv):
        if argv[i] == "--init_from":  # the space form: the flag and its value
            i += 2
            continue
        if not argv[i].startswith("--init_from="):
            keep.append(argv[i])
        i += 1
    launcher = "torchrun <your torchrun options>" if "RANK" in os.environ else "python"
    return f"{launcher} {shlex.join(['train.py', *keep, '--init_from=resume'])}"


class Metrics:
    """metrics.jsonl: one JSON object per log line or evaluation, every key of METRICS_KEYS in each. A NaN or an
    infinity is written as null (bare NaN is not JSON). write(row) is the one place rows go out."""

    def __init__(self, path: Path, resuming: bool, iter_num: int, trackers: Trackers | None = None) -> None:
        """A fresh run starts a new file; a resumed one keeps the lines up to its checkpoint, dropping those the
        interrupted run wrote past it (their steps are done again) and any line that does not parse: the last one,
        half-written when a kill -9 or a power cut stopped that run."""
        self.path, self.trackers = path, trackers  # trackers: --log_to's, each row goes there too
        kept = []
        if resuming and path.exists():
            for line in path.read_text(errors="replace").splitlines():
                try:  # a line that is not one of write()'s (its keys, numbers or null) is dropped too
                    row = json.loads(line)
                    old = METRICS_KEYS - {"train_bpb", "val_bpb"}  # the lines of runs from before bpb was logged
                    numbers = all(v is None or type(v) in (int, float) for v in row.values())
                    if old <= row.keys() <= METRICS_KEYS and numbers and type(row["iter"]) is int and \
                            row["iter"] <= iter_num:
                        kept.append(line)
                except (ValueError, AttributeError):
                    pass
        if kept:
            with errors.writing(path):
                path.write_text("".join(line + "\n" for line in kept))
        else:  # the first write() makes it: a run stopped before that leaves no empty file
            path.unlink(missing_ok=True)

    def write(self, row: dict[str, float | None]) -> None:
        assert row.keys() == METRICS_KEYS, row.keys() ^ METRICS_KEYS
        row = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
        with errors.writing(self.path), open(self.path, "a") as f:
            f.write(json.dumps(row, allow_nan=False) + "\n")
        if self.trackers is not None:
            self.trackers.log(row)

    def close(self) -> None:
        if self.trackers is not None:
            self.trackers.close()


class ProgressBar:
    """A bar on a terminal; in a log file, a plain line every PLAIN_LOG_EVERY seconds instead (a bar there is one
    endless line of carriage returns). Also the tokens/s: over each log interval, and smoothed over ~10 iterations."""

    def __init__(self, max_iters: int, iter_num: int, tokens_per_iter: int, enabled: bool) -> None:
        self.terminal = sys.stderr.isatty()
        self.bar = tqdm(total=max_iters, initial=iter_num, disable=not enabled or not self.terminal,
                        dynamic_ncols=True, unit="it")
        self.max_iters, self.tokens_per_iter, self.enabled = max_iters, tokens_per_iter, enabled
        self.window_time, self.window_iters = 0.0, 0  # for tokens/s over the current log interval
        self.step_time: float | None = None  # seconds per iteration, an exponential moving average
        self.steps = 0  # iterations this process has run
        self.last_line = time.perf_counter()  # when the last plain progress line was printed

    def step(self, seconds: float) -> None:
        self.bar.update(1)
        self.steps += 1
        if self.steps == 1:  # a process's first iteration compiles and warms up: untimed
            return
        self.window_time += seconds
        self.window_iters += 1
        self.step_time = seconds if self.step_time is None else 0.9 * self.step_time + 0.1 * seconds

    def rates(self) -> tuple[float | None, float | None]:
        """(tokens/s over the log interval now ending, smoothed tokens/s), None before a timed iteration; starts
        the next interval."""
        rate = self.tokens_per_iter * self.window_iters / self.window_time if self.window_iters else None
        self.window_time, self.window_iters = 0.0, 0
        return rate, self.tokens_per_iter / self.step_time if self.step_time else None

    def show(self, iter_num: int, elapsed: float, loss: float, tokens_per_sec: float | None,
             mfu: float | None) -> None:
        shown = {"loss": f"{loss:.4f}"} | ({"tok/s": f"{tokens_per_sec:,.0f}"} if tokens_per_sec else {})
        if mfu is not None:
            shown["mfu"] = f"{mfu:.1%}"
        self.bar.set_postfix(shown, refresh=False)
        if self.enabled and not self.terminal and time.perf_counter() - self.last_line >= PLAIN_LOG_EVERY:
            self.last_line = time.perf_counter()
            print(f"iter {iter_num}/{self.max_iters} ({format_duration(elapsed)}): "
                  + ", ".join(f"{k} {v}" for k, v in shown.items()), flush=True)

    def write(self, line: str) -> None:
        if self.enabled:
            tqdm.write(line)

    def close(self) -> None:
        self.bar.close()


def eval_bar(total: int, enabled: bool) -> tqdm:
    """An evaluation's bar of `total` batches: on a terminal, once it has run EVAL_BAR_DELAY seconds."""
    return tqdm(total=total, desc="evaluating", unit="batch", leave=False, delay=EVAL_BAR_DELAY,
                disable=not enabled or not sys.stderr.isatty())


def loss_text(losses: dict[str, float | None]) -> str:
    """An evaluation's progress line: train and val loss, and val bits per byte when known."""
    bpb = "" if losses["val_bpb"] is None else f" (val bpb {losses['val_bpb']:.4f})"
    return f"train loss {losses['train_loss']:.4f}, val loss {losses['val_loss']:.4f}{bpb}"


def format_duration(seconds: float) -> str:
    """1h 02m, 3m 05s, 42.0 s."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes // 60}h {minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m {secs:02d}s"


def matmul_flops_per_sec(n: int = 512, repeats: int = 5) -> float:
    """This CPU's fp32 matmul rate with the current threads, measured on n x n matrices (a few milliseconds)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times)  # the fastest: other processes only ever slow it down


def warn_if_slow(model: torch.nn.Module, tokens_per_iter: int, eval_tokens: int, limit_s: float = 30.0) -> None:
    """Say so before the first iteration when an iteration or an evaluation will plainly take minutes on this CPU.

    The estimate is the model's training FLOPs over a measured matmul rate, times CPU_STEP_OVERHEAD (what the rest
    of a step costs); an evaluation is forward only, a third of the FLOPs.
    """
    rate = matmul_flops_per_sec() / CPU_STEP_OVERHEAD
    step_s = model.flops_per_token() * tokens_per_iter / rate
    eval_s = model.flops_per_token() / 3 * eval_tokens / rate
    if max(step_s, eval_s) > limit_s:
        print(f"warning: on this CPU ({torch.get_num_threads()} thread(s)) one iteration will take about "
              f"{format_duration(step_s)} and each evaluation about {format_duration(eval_s)}: a model of "
              f"{model.num_params() / 1e6:.0f}M parameters at {tokens_per_iter:,} tokens an iteration is a GPU's "
              f"work. On a laptop start from configs/text_cpu.toml, or lower --n_layer, --n_embd, --batch_size, "
              f"--gradient_accumulation_steps and --eval_iters", flush=True)


def plot_losses(metrics_path: Path, png_path: Path) -> None:
    """loss.png (compare.plot_losses). On a terminal, by a child process that outlives this one: the prompt comes
    back without waiting the ~1 s of matplotlib's import and drawing (docs/benchmarks.md, "Start-up"). Elsewhere (a
    job, a pipe) here and now: a script reads the file after the run, and SLURM or docker stop what a job leaves."""
    if not sys.stdout.isatty():
        import compare

        compare.plot_losses(metrics_path, png_path)
    elif importlib.util.find_spec("matplotlib") is None:
        print("matplotlib is not installed, so no loss.png (pip install -e '.[plot]')")
    else:
        code = "import sys; sys.path.insert(0, sys.argv[1]); import compare; compare.plot_losses(*sys.argv[2:])"
        subprocess.Popen([sys.executable, "-c", code, str(Path(__file__).resolve().parent), str(metrics_path),
                          str(png_path)], stdin=subprocess.DEVNULL, start_new_session=True)  # Ctrl-C leaves it be


def summary(out_dir: Path, iters: int, seconds: float, best_val_loss: float) -> str:
    """The closing lines of a finished run: time, best val loss and its checkpoint, and how to sample from it."""
    latest = out_dir / find_checkpoint(out_dir).name
    best = out_dir / find_checkpoint(out_dir, "best").name if (out_dir / "best").is_symlink() else None
    where = f"best val loss {best_val_loss:.4f} in {best}" if best else f"no val loss measured; saved {latest}"
    if best and best != latest:
        where += f" (the latest is {latest})"
    choice = " --checkpoint=best" if best and best != latest else ""
    return (f"done: {iters} iterations in {format_duration(seconds)}; {where}\n"
            f"sample from it:  python sample.py --out_dir={shlex.quote(str(out_dir))}{choice}")


def stopped(signum: int, master: bool, untrained: bool, iter_num: int, argv: list[str]) -> int:
    """Say how the run stopped (on rank 0) and return its exit status; signum: the signal (a rank that got none stops
    because another did: SIGTERM)."""
    name = signal.Signals(signum).name
    if master:
        print(f"stopped by {name} before the first iteration; nothing was saved" if untrained else
              f"stopped by {name} at iteration {iter_num}; continue with:\n  {resume_command(argv)}")
    return 128 + signum


def diverged(what: str, out_dir: Path) -> str:
    """The one line that stops a diverged run, naming the checkpoint to go back to (all saved ones are finite)."""
    fixes = "a lower --learning_rate, a --grad_clip, or --dtype=bfloat16/float32 if this ran in float16"
    if not has_checkpoint(out_dir):
        return f"{what}: stopping; no checkpoint was saved. Start again with {fixes}"
    return (f"{what}: stopping without saving. The last finite checkpoint: {find_checkpoint(out_dir)}. Resume it "
            f"with --init_from=resume and {fixes}")


def out_of_memory(device: torch.device, batch_size: int, block_size: int, accum: int) -> str:
    """The one line that ends a run out of memory: the settings that keep the tokens per step in less memory."""
    return (f"out of memory on {device} with batch_size={batch_size}, block_size={block_size}: lower --batch_size "
            f"and raise --gradient_accumulation_steps to keep the tokens per step (e.g. "
            f"--batch_size={max(1, batch_size // 2)} --gradient_accumulation_steps={accum * 2}), or train a smaller "
            f"model. Nothing was saved by this run after its last checkpoint")
