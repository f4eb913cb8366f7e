"""Compare training runs: loss against step, tokens, wall time and training FLOPs in one figure, and a table.

    python compare.py out/abl_*                           # out/compare.png and a markdown table
    python compare.py "out/ablation/runs/*" --metric=bpb  # a quoted glob; --metric=val, bpb or train
    python compare.py out/a out/b --json=true             # the table as JSON
    python compare.py out/ablation/runs                   # a folder of run folders

Runs that differ only by seed are one line: the mean, with a band from the lowest to the highest seed, named by the
settings that set it apart (by its folders when more than three do; the table then lists them). Each run's
settings come from its latest checkpoint's config.json, its curve from metrics.jsonl; a run still training is read
as far as it got; a line of metrics.jsonl that train.py would not write (NaN, Infinity, foreign keys) and a run whose
config.json cannot be read are named on stderr and left out. The figure needs matplotlib (pip install -e '.[plot]');
the table does not.
"""

from __future__ import annotations

import glob
import json
import math
import os
import stat
import statistics
import sys
import tempfile
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import errors

errors.install(__name__)  # only the standard library loads at start: torch and matplotlib come when needed

IGNORED = ("seed", "out_dir")  # settings that do not make runs different experiments
METRICS = {"val": ("val_loss", "val loss"), "bpb": ("val_bpb", "val bits per byte"),
           "train": ("train_loss", "train loss (smoothed)")}


@dataclass
class CompareConfig:
    metric: str = "val"  # what the figure plots: val (val loss), bpb (val bits per byte) or train (train loss, smoothed)
    out: str = "out/compare.png"  # the figure's file (its suffix: the format) or a folder for compare.png; empty: none
    json: bool = False  # print the table as JSON instead of markdown
    smooth: float = 0.95  # metric=train: the exponential moving average's decay over log lines (0: none)

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"metric must be val, bpb or train, got {self.metric!r}")
        if not 0.0 <= self.smooth < 1.0:
            raise ValueError(f"smooth must be in [0, 1), got {self.smooth}")


@dataclass
class Run:
    """One out_dir: its metrics.jsonl lines and the settings of its latest checkpoint (None before the first)."""
    path: Path
    rows: list[dict]
    settings: dict | None  # TrainConfig as the checkpoint stores it
    tokens_per_iter: int | None
    flops_per_token: float | None  # the model's training FLOPs per token (GPT.flops_per_token)

    @property
    def finished(self) -> bool:
        return self.settings is not None and self.rows[-1]["iter"] >= self.settings["max_iters"]


@dataclass
class Group:
    """Runs whose settings differ only by seed."""
    label: str
    runs: list[Run]
    settings: dict = field(default_factory=dict)  # the settings that differ between groups, as this group has them
    step_s: float | None = None  # seconds per iteration for the time axis instead of the wall time (measured apart)


def read_run(path: Path) -> Run | str:
    """The run in out_dir `path`, or a one-line reason why it is not one. Lines of metrics.jsonl that train.py
    would not write are left out, each named on stderr (a half-written last line of a run still training is not)."""
    metrics = path / "metrics.jsonl"
    if not path.is_dir():
        return f"{path}: {'not a folder' if path.exists() else 'does not exist'}"
    if not metrics.is_file():
        return f"{path}: not a run (no metrics.jsonl; train.py writes one into its out_dir)"
    try:
        text = metrics.read_text(errors="replace")
    except OSError as e:
        return errors.message(e) or str(e)
    rows, lines = [], text.splitlines()
    for number, line in enumerate(lines, 1):
        row, why = metrics_row(line)
        if row is not None:
            rows.append(row)
        elif line.strip() and not (number == len(lines) and not text.endswith("\n")):  # being written: wait
            print(f"skipped {metrics} line {number}: {why}", file=sys.stderr)
    if not rows:
        return f"{path}: metrics.jsonl holds no metrics line (yet)"
    settings = tokens_per_iter = flops = None
    latest = path / "latest" / "config.json"
    if latest.is_file():
        from hf import config_from_hf  # torch: only once there is a checkpoint to read
        from model import GPT
        import torch

        try:  # a user's file: any shape it has is a reason to leave the run out, not a traceback
            config = json.loads(latest.read_text(), parse_constant=_no_constant)
            settings = config.get("train")
            gpt = config_from_hf(config, str(latest), None)
            if settings is not None:
                block = min(settings["block_size"], gpt.block_size)
                tokens_per_iter = settings["batch_size"] * block * settings["gradient_accumulation_steps"]
                int(settings["max_iters"]), int(settings["seed"])
                with torch.device("meta"):  # the shape alone: no memory, no initialisation cost
                    flops = GPT(gpt).flops_per_token(block)
        except OSError as e:
            return errors.message(e) or str(e)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            what = f"no {e}" if isinstance(e, KeyError) else str(e).splitlines()[0] if str(e) else type(e).__name__
            return f"{latest}: not a checkpoint's config.json ({what}): left out"
    return Run(path, rows, settings, tokens_per_iter, flops)


def metrics_row(line: str) -> tuple[dict | None, str]:
    """(a metrics.jsonl line as train.py writes it: an object with an integer iter and numbers or null, all
    finite, else None; why not)."""
    try:
        row = json.loads(line, parse_constant=_no_constant)
    except ValueError as e:
        return None, f"not JSON ({e})"
    if not isinstance(row, dict) or type(row.get("iter")) is not int or type(row.get("elapsed")) not in (int, float):
        return None, "not a metrics line (an object with an integer iter and the seconds elapsed)"
    bad = [k for k, v in row.items() if not (v is None or type(v) is int or type(v) is float and math.isfinite(v))]
    if bad:
        return None, f"{bad[0]} is {row[bad[0]]!r}, not a finite number or null"
    return row, ""


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON (train.py writes a non-finite number as null)")


def find_runs(patterns: list[str]) -> tuple[list[Run], list[str]]:
    """The runs that folders or globs name (a folder of run folders stands for them), and a line per non-run."""
    runs, skipped = [], []
    for pattern in patterns:
        paths = sorted(Path(p) for p in glob.glob(pattern)) if glob.has_magic(pattern) else [Path(pattern)]
        if not paths:
            skipped.append(f"{pattern}: matches nothing")
        for path in paths:
            inner = sorted(p.parent for p in path.glob("*/metrics.jsonl")) if path.is_dir() else []
            if not (path / "metrics.jsonl").exists() and inner:
                paths_here = inner
            else:
                paths_here = [path]
            for p in paths_here:
                if any(p.resolve() == r.path.resolve() for r in runs):  # named twice: read once
                    continue
                run = read_run(p)
                (runs if isinstance(run, Run) else skipped).append(run)
    return runs, skipped


def group_runs(runs: list[Run], labels: dict[Path, str] | None = None) -> list[Group]:
    """Runs that differ only by seed (and out_dir) grouped, in the order first seen, each labelled by the settings
    that set it apart (or labels[path] of its first run); a run without a checkpoint yet is a group of its own."""
    groups: dict[object, Group] = {}
    for run in runs:
        key = run.path if run.settings is None else json.dumps(
            {k: v for k, v in run.settings.items() if k not in IGNORED}, sort_keys=True)
        groups.setdefault(key, Group("", [])).runs.append(run)
    known = [g for g in groups.values() if g.runs[0].settings is not None]
    names = sorted({k for g in known for k in g.runs[0].settings} - set(IGNORED))
    differ = [k for k in names if len({json.dumps(g.runs[0].settings.get(k)) for g in known}) > 1]
    for g in groups.values():
        s = g.runs[0].settings
        g.settings = {k: s.get(k) for k in differ} if s is not None else {}
        shown = settings_text(g.settings) if len(differ) <= 3 else folders_text([r.path for r in g.runs])
        g.label = (labels or {}).get(g.runs[0].path) or shown or str(g.runs[0].path)
        if s is None:
            g.label += " (no checkpoint yet)"
    return list(groups.values())


def settings_text(settings: dict) -> str:
    show = lambda v: "none" if v is None else str(v).lower() if isinstance(v, bool) else str(v)  # noqa: E731
    return ", ".join(f"{k}={show(v)}" for k, v in settings.items())


def folders_text(paths: list[Path]) -> str:
    """A group's folders in one short name, its label when more than three settings differ: out/a_s{1,2,3}."""
    names = list(dict.fromkeys(str(p) for p in paths))
    if len(names) == 1:
        return names[0]
    head = os.path.commonprefix(names).rstrip("0123456789")  # whole numbers in the braces: s{10,20}, not s{1,2}0
    tail = os.path.commonprefix([n[len(head):][::-1] for n in names])[::-1].lstrip("0123456789")
    return head + "{" + ",".join(n[len(head):len(n) - len(tail)] for n in names) + "}" + tail


# ------------------------------------------------------------------------------------------------------ the table


def _stats(values: list[float]) -> dict | None:
    if not values:
        return None
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def summarize(group: Group) -> dict:
    """A group's row: final and best val loss, final val bpb, wall time, tokens/s and MFU over its seeds."""
    def last_eval(run: Run) -> dict | None:
        return next((r for r in reversed(run.rows) if r.get("val_loss") is not None), None)

    def median(run: Run, key: str) -> float | None:
        values = [r[key] for r in run.rows if r.get(key) is not None]
        return statistics.median(values) if values else None

    evals = [e for e in map(last_eval, group.runs) if e is not None]
    runs = group.runs
    unfinished = [r for r in runs if not r.finished]
    return {
        "label": group.label,
        "runs": [str(r.path) for r in runs],
        "seeds": [r.settings["seed"] if r.settings else None for r in runs],
        "iters": [r.rows[-1]["iter"] for r in runs],
        "in_progress": [str(r.path) for r in unfinished if r.settings is not None] or None,
        "final_val_loss": _stats([e["val_loss"] for e in evals]),
        "best_val_loss": _stats([min(x["val_loss"] for x in r.rows if x.get("val_loss") is not None)
                                 for r in runs if last_eval(r) is not None]),
        "final_val_bpb": _stats([e["val_bpb"] for e in evals if e.get("val_bpb") is not None]),
        "time_s": _stats([r.rows[-1]["elapsed"] for r in runs if r.rows[-1].get("elapsed") is not None]),
        "tokens_per_sec": _stats([v for v in (median(r, "tokens_per_sec") for r in runs) if v is not None]),
        "mfu": _stats([v for v in (median(r, "mfu") for r in runs) if v is not None]),
        "settings": group.settings,
    }


def _cell(stats: dict | None, fmt: str) -> str:
    if stats is None:
        return "-"
    if len(stats["values"]) == 1:
        return format(stats["mean"], fmt)
    return f"{format(stats['mean'], fmt)} ± {format(stats['std'], fmt)}"


def markdown(rows: list[dict]) -> str:
    """The table: one line per group, values as mean ± std over its seeds (n = how many)."""
    lines = ["| run | n | iterations | final val loss | best val loss | val bpb | time (s) | tokens/s | MFU |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        iters = "/".join(sorted({str(i) for i in r["iters"]}))
        if r["in_progress"]:
            iters += f" ({len(r['in_progress'])} still running)"
        mfu = None if r["mfu"] is None else r["mfu"] | {"mean": 100 * r["mfu"]["mean"], "std": 100 * r["mfu"]["std"]}
        lines.append(f"| {r['label']} | {len(r['runs'])} | {iters} | {_cell(r['final_val_loss'], '.4f')} | "
                     f"{_cell(r['best_val_loss'], '.4f')} | {_cell(r['final_val_bpb'], '.4f')} | "
                     f"{_cell(r['time_s'], '.1f')} | {_cell(r['tokens_per_sec'], ',.0f')} | "
                     f"{_cell(mfu, '.1f') + ' %' if mfu else '-'} |")
    # labels that are folders (more than three settings differ): the settings under the table
    notes = [f"- {r['label']}: {settings_text(r['settings'])}" for r in rows
             if r["settings"] and settings_text(r["settings"]) != r["label"]]
    return "\n".join(lines + ([""] + notes if notes else []))


# ----------------------------------------------------------------------------------------------------- the figure


def curve(run: Run, metric: str, smooth: float) -> list[tuple[int, float, float]]:
    """(iteration, elapsed seconds, value) of every line that has the metric; train loss from log lines, smoothed."""
    key = METRICS[metric][0]
    if metric != "train":
        return [(r["iter"], r["elapsed"], r[key]) for r in run.rows if r.get(key) is not None]
    points, ema = [], None
    for r in run.rows:
        if r.get("val_loss") is None and r.get(key) is not None and math.isfinite(r[key]):
            ema = r[key] if ema is None else smooth * ema + (1 - smooth) * r[key]
            points.append((r["iter"], r["elapsed"], ema))
    return points


def group_curve(group: Group, metric: str, smooth: float) -> list[tuple[int, float, float, float, float]]:
    """(iteration, mean elapsed, mean, lowest, highest) over the group's runs, at every iteration any run has."""
    by_iter: dict[int, list[tuple[float, float]]] = {}
    for run in group.runs:
        for it, t, v in curve(run, metric, smooth):
            by_iter.setdefault(it, []).append((t, v))
    return [(it, statistics.mean(t for t, _ in pts), statistics.mean(v for _, v in pts), min(v for _, v in pts),
             max(v for _, v in pts)) for it, pts in sorted(by_iter.items())]


AXES = ("iteration", "tokens", "wall time (s)", "training FLOPs")


def x_axes(group: Group, iters: list[int], elapsed: list[float]) -> list[list[float] | None]:
    """The x values of each of AXES at these iterations; tokens and FLOPs are None before a run's first checkpoint
    (its settings are not known yet). FLOPs: the model's training FLOPs per token times the tokens trained."""
    run = group.runs[0]  # a group's runs share their settings
    if group.step_s is not None:
        elapsed = [i * group.step_s for i in iters]
    if run.tokens_per_iter is None:
        return [iters, None, elapsed, None]
    return [iters, [i * run.tokens_per_iter for i in iters], elapsed,
            [i * run.tokens_per_iter * run.flops_per_token for i in iters]]


def plot(groups: list[Group], metric: str, png: Path, smooth: float = 0.95, title: str = "",
         time_label: str = "wall time (s)") -> str | None:
    """Draw the figure into png: the metric against step, tokens, wall time and training FLOPs. Returns None, or
    the one line that says why there is no figure."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "the figure needs matplotlib: pip install -e '.[plot]' (the table above does not)"
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharey=True)
    axes = axes.ravel()
    curves = [group_curve(g, metric, smooth) for g in groups]
    for i, (g, points) in enumerate(zip(groups, curves)):
        if not points:
            continue
        # ten colours, then the same ten dashed, dotted...: every group its own look however many there are
        style = dict(color=f"C{i % 10}", ls=["-", "--", ":", "-."][i // 10 % 4])
        it, t, mean, low, high = map(list, zip(*points))
        xs = x_axes(g, it, t)
        marker = "o" if metric != "train" and len(it) < 30 else None
        for ax, x in zip(axes, xs):
            if x is None:
                continue
            ax.plot(x, mean, marker=marker, ms=3, lw=1.2, label=g.label if ax is axes[0] else None, **style)
            if len(g.runs) > 1:
                ax.fill_between(x, low, high, color=style["color"], alpha=0.2, lw=0)
    # the top of the y axis: the highest value once a fifth of a run is done (the start, at ~ln(vocab) for every
    # run, would flatten the differences that matter)
    tops = [next(v for it, _, v, _, _ in pts if it >= 0.2 * pts[-1][0]) for pts in curves if pts]
    lows = [min(p[3] for p in pts) for pts in curves if pts]
    if tops:
        margin = 0.05 * (max(tops) - min(lows))
        axes[0].set_ylim(min(lows) - margin, max(tops) + margin)
    for ax, name in zip(axes, AXES):
        ax.set_xlabel(time_label if name == AXES[2] else name)
        ax.grid(alpha=0.3)
        if name in ("tokens", "training FLOPs"):
            ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
    for ax in axes[::2]:
        ax.set_ylabel(METRICS[metric][1])
    fig.legend(loc="lower center", ncol=min(3, len(groups)), fontsize=8, frameon=False)
    fig.suptitle(title or f"{METRICS[metric][1]}: mean over seeds, band from the lowest to the highest seed")
    rows = math.ceil(len(groups) / 3)
    fig.tight_layout(rect=(0, min(0.4, 0.035 * rows + 0.01), 1, 1))
    try:
        save_figure(fig, png, dpi=100)
    finally:
        plt.close(fig)
    return None


def save_figure(fig: object, path: Path, **options: object) -> None:
    """fig.savefig into a temporary file beside path, then renamed onto it: a full disk or a kill midway leaves the
    figure that was there before, whole, and no temporary file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with errors.writing(path), os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), stat.S_IMODE(os.stat(path).st_mode) if path.is_file() else 0o666 & ~_umask())
            fig.savefig(f, format=path.suffix[1:].lower() or "png", **options)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def figure_path(out: str) -> Path:
    """Where --out puts the figure: the file it names, or compare.png in the folder it names (an existing one, or a
    path ending in /). SystemExit for what cannot take a figure."""
    path = Path(out)
    if path.is_dir():
        return path / "compare.png"
    if out.endswith(("/", os.sep)):
        return path / "compare.png"
    if path.exists() and not path.is_file():
        raise SystemExit(f"--out={out} is not a regular file: name a figure's file (e.g. out/compare.png) or a folder")
    if not path.suffix:
        raise SystemExit(f"--out={out} has no suffix to say the figure's format: name a file such as {out}.png, or "
                         f"a folder (an existing one, or end it with /) to write compare.png into")
    return path


def plot_losses(metrics_path: str | Path, png_path: str | Path) -> None:
    """loss.png from metrics.jsonl: the training loss of each log line, train/val loss and val bpb of each evaluation.
    train.py has it drawn at the end of every run."""
    metrics_path, png_path = Path(metrics_path), Path(png_path)
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed, so no {png_path.name} (pip install -e '.[plot]')")
        return
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    logs = [r for r in records if r["val_loss"] is None]
    evals = [r for r in records if r["val_loss"] is not None]
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot([r["iter"] for r in logs], [r["train_loss"] for r in logs], lw=0.8, alpha=0.5, label="train (batch)")
    ax.plot([r["iter"] for r in evals], [r["train_loss"] for r in evals], "o-", label="train (eval)")
    ax.plot([r["iter"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val (eval)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("cross-entropy loss")
    bpb = [r for r in evals if r.get("val_bpb") is not None]  # runs from before bpb was logged have none
    if bpb:  # bits per byte, comparable across tokenizers, on its own axis
        ax2 = ax.twinx()
        ax2.plot([r["iter"] for r in bpb], [r["val_bpb"] for r in bpb], "s--", color="tab:red", label="val bpb")
        ax2.set_ylabel("val bits per byte")
        ax2.legend(loc="center right")
    ax.legend()
    ax.grid(alpha=0.3)
    try:
        save_figure(fig, png_path, dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------------------------------------- main


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(run folders or globs, the --key=value settings)."""
    paths, options, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("-"):
            options.append(arg)
            if arg.startswith("--") and "=" not in arg and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                options.append(argv[i + 1])  # --key value
                i += 1
        else:
            paths.append(arg)
        i += 1
    return paths, options


def main(argv: list[str] | None = None) -> list[dict]:
    from config import parse_config

    paths, options = split_argv(sys.argv[1:] if argv is None else list(argv))
    cfg = parse_config(CompareConfig, options, description=__doc__)
    if not paths:
        raise SystemExit("name the runs to compare: python compare.py OUT_DIR [OUT_DIR ...] (or a glob: 'out/abl_*')")
    png = figure_path(cfg.out) if cfg.out else None  # before the work: a wrong --out is said at once
    runs, skipped = find_runs(paths)
    for line in skipped:
        print(f"skipped {line}", file=sys.stderr)
    if not runs:
        raise SystemExit(f"no run among {' '.join(paths)}: a run is an out_dir holding train.py's metrics.jsonl")
    rows = [summarize(g) for g in group_runs(runs)]
    write_stdout(json.dumps(rows, indent=1) if cfg.json else markdown(rows))
    if png is not None:
        why_not = plot(group_runs(runs), cfg.metric, png, cfg.smooth)
        print(why_not or f"figure: {png}", file=sys.stderr)
    return rows


def write_stdout(text: str) -> None:
    """print, flushed now, so that a full disk or a closed pipe is reported here as one line (at exit it would be
    Python's "Exception ignored" and exit status 120)."""
    try:
        print(text, flush=True)
    except OSError as e:
        with suppress(OSError, ValueError, AttributeError):  # the flush at exit must not fail again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        if isinstance(e, BrokenPipeError):
            raise SystemExit(141) from None  # `compare.py ... | head`: the reader left, which is fine
        e.filename = e.filename or "standard output"
        raise


if __name__ == "__main__":
    main()
