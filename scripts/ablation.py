"""The recipe ablation of docs/recipe.md: each switch added to a tuned GPT-2 and removed from the full recipe, at
equal wall time, on the CPU Shakespeare setting (block 64, batch 12, 4 x 4 x 128). One command does it all and
prints the table docs/recipe.md shows (its figures go to docs/img/ablation_{gpt2,recipe}.png):

    OMP_NUM_THREADS=1 python scripts/ablation.py [--budget=N] [--seeds=1,2,3] [--rows=full_recipe,recipe_rmsnorm]

or in parts: `time` (ms per step of every variant, into out/ablation/time.json), `run` (the runs not finished yet,
each into out/ablation/runs/VARIANT_sSEED; `--lane=K --lanes=L` in L shells shares them out), `table` (the table
and the figures, from compare.py's pieces, of the runs finished so far).

Equal wall time without timing every run on a shared machine: the step times are measured once, as CPU time of one
thread, round robin in one process, and each variant gets budget * (tuned GPT-2's ms per step / its own)
iterations. The default budget is the headline's: the time of the recipe preset's 600 iterations. The losses of a
run do not depend on the machine's load, so the runs may share the CPU. Val loss: 100 batches, at the middle and the
end."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BASE = "configs/shakespeare_char_cpu.toml"
RECIPE = "configs/shakespeare_char_cpu_modern.toml"
OUT = REPO / "out" / "ablation"  # time.json (ms per step of each variant), runs/VARIANT_sSEED (the runs)
TUNED = {"learning_rate": 3e-3}  # the GPT-2 baseline with a tuned AdamW rate: what the switches must beat
SWITCHES = {  # name: (settings that add it to GPT-2, settings that remove it from the recipe)
    "rope": ({"pos_embedding": "rope"}, {"pos_embedding": "learned"}),
    "rmsnorm": ({"norm": "rmsnorm", "embed_norm": True}, {"norm": "layernorm", "embed_norm": False}),
    "qk_norm": ({"qk_norm": True}, {"qk_norm": False}),
    "relu2": ({"mlp": "relu2"}, {"mlp": "gelu"}),
    "untied head": ({"tie_embeddings": False}, {"tie_embeddings": True}),
    "softcap 15": ({"logit_softcap": 15.0}, {"logit_softcap": None}),
    "zero init": ({"zero_init": True}, {"zero_init": False}),
    "no biases": ({"bias": False}, {"bias": True}),
    "GQA (2 kv heads)": ({"n_kv_head": 2}, None),
    "muon": ({"optimizer": "muon", "beta1": 0.8, "beta2": 0.95, "grad_clip": 0.0, "weight_decay": 0.0},
             {"optimizer": "adamw", "weight_decay": 0.1}),
    "wsd": ({"lr_schedule": "wsd", "warmup_iters": 0, "min_lr": 0.0}, {"lr_schedule": "cosine", "min_lr": 3e-4}),
    "batch 24": ({"batch_size": 24}, {"batch_size": 12}),
}


def variants() -> dict[str, tuple[str, dict]]:
    out = {"GPT-2, AdamW 1e-3 (nanoGPT's)": (BASE, {}), "GPT-2, AdamW 3e-3 (tuned)": (BASE, TUNED)}
    for name, (add, _) in SWITCHES.items():
        out[f"tuned GPT-2 + {name}"] = (BASE, TUNED | add)
    out["full recipe"] = (RECIPE, {})
    for name, (_, remove) in SWITCHES.items():
        if remove is not None:
            out[f"recipe - {name}"] = (RECIPE, remove)
    return out


def argv(config: str, settings: dict) -> list[str]:
    def show(v: object) -> str:
        return "none" if v is None else str(v).lower() if isinstance(v, bool) else str(v)
    return [config, *(f"--{k}={show(v)}" for k, v in settings.items())]


def step_times(rows: str | None, steps: int = 40, warmup: int = 3) -> dict[str, float]:
    """Median CPU ms per training step of every variant (one thread), measured round robin in this process."""
    import torch

    from config import parse_config
    from train import TrainConfig
    from model import GPT

    built = {}
    for name, (config, settings) in chosen(rows).items():
        cfg = parse_config(TrainConfig, argv(config, settings))
        torch.manual_seed(0)
        model = GPT(cfg.gpt_config(65)).train()
        opt = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), "cpu",
                                         cfg.optimizer, cfg.muon_lr, cfg.muon_momentum, cfg.muon_weight_decay)
        built[name] = (cfg, model, opt)
    times: dict[str, list[float]] = {name: [] for name in built}
    batches = {name: torch.randint(0, 65, (cfg.batch_size, cfg.block_size)) for name, (cfg, _, _) in built.items()}
    for i in range(warmup + steps):  # round robin, one step of each variant in turn: all see the same load
        for name, (cfg, model, opt) in built.items():
            t0 = time.process_time()  # this process's CPU time: what other processes do barely moves it
            _, loss = model(batches[name], batches[name])
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= warmup:
                times[name].append(time.process_time() - t0)
    return {name: round(1000 * sorted(t)[len(t) // 2], 2) for name, t in times.items()}


def slug(name: str) -> str:
    """A variant's folder name: "recipe - rmsnorm" -> recipe_rmsnorm."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def chosen(rows: str | None) -> dict[str, tuple[str, dict]]:
    """The variants named by --rows (comma-separated slugs, in the order given), or all of them."""
    every = variants()
    if not rows:
        return every
    by_slug = {slug(name): name for name in every}
    unknown = [r for r in rows.split(",") if r not in by_slug]
    if unknown:
        raise SystemExit(f"--rows: no variant {', '.join(unknown)}; the variants are {', '.join(by_slug)}")
    return {by_slug[r]: every[by_slug[r]] for r in rows.split(",")}


def run(budget: int, seeds: list[int], lane: int, lanes: int, rows: str | None) -> None:
    """Train every (variant, seed) not yet finished into OUT/runs/SLUG_sSEED, lane of lanes sharing the list."""
    ms = json.loads((OUT / "time.json").read_text())
    reference = ms["GPT-2, AdamW 3e-3 (tuned)"]
    jobs = [(name, seed) for name in chosen(rows) for seed in seeds]
    for k, (name, seed) in enumerate(jobs):
        iters = max(50, round(budget * reference / ms[name] / 10) * 10)
        out = OUT / "runs" / f"{slug(name)}_s{seed}"
        if k % lanes != lane or (out / f"ckpt_{iters:06d}").is_dir():
            continue
        subprocess.run(["rm", "-rf", str(out)], check=True)
        config, settings = variants()[name]
        cmd = [sys.executable, "train.py", *argv(config, settings), f"--seed={seed}", f"--max_iters={iters}",
               f"--lr_decay_iters={iters}", f"--eval_interval={iters // 2}", "--eval_iters=100", "--threads=1",
               f"--out_dir={out}"]
        result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        print(f"{name}, seed {seed}: {iters} iterations, exit {result.returncode}", flush=True)


def report(rows: str | None, figures: Path) -> str:
    """The markdown table of the runs in OUT/runs, and the figures (compare.py's, one for the GPT-2 rows and one for
    the recipe's) written into figures/ablation_{gpt2,recipe}.png."""
    import compare

    ms = json.loads((OUT / "time.json").read_text())
    runs, _ = compare.find_runs([str(OUT / "runs")])
    groups = []
    for name in chosen(rows):
        mine = [r for r in runs if r.path.name.rsplit("_s", 1)[0] == slug(name) and r.finished]
        if mine:
            groups.append(compare.Group(name, sorted(mine, key=lambda r: r.settings["seed"]),
                                        step_s=ms[name] / 1000))  # the budget's clock, not the shared machine's
    lines = ["| variant | ms/step | iterations | val loss (mean ± std, seeds) |", "| --- | --- | --- | --- |"]
    for g in groups:
        row = compare.summarize(g)
        val = row["final_val_loss"]
        shown = f"{val['mean']:.3f} ± {val['std']:.3f} ({len(val['values'])})" if val else "-"
        lines.append(f"| {g.label} | {ms.get(g.label, '-')} | {row['iters'][0]} | {shown} |")
    every = variants()
    for part, config, other, title in (("gpt2", BASE, "full recipe", "GPT-2 and one switch added"),
                                       ("recipe", RECIPE, "GPT-2, AdamW 3e-3 (tuned)", "the recipe less one part")):
        mine = [g for g in groups if every[g.label][0] == config or g.label == other]
        why_not = compare.plot(mine, "train", figures / f"ablation_{part}.png", smooth=0.98,
                               title=f"{title}: train loss (smoothed) at equal one-thread CPU time; mean of the "
                                     f"seeds, band from the lowest to the highest",
                               time_label="one thread's CPU time of the training steps (s)")
        if why_not:
            print(why_not, file=sys.stderr)
    return "\n".join(lines)


def headline_budget() -> int:
    """Tuned GPT-2's iterations in the time of the recipe preset's max_iters (its headline run)."""
    from config import load_toml

    ms = json.loads((OUT / "time.json").read_text())
    return round(load_toml(REPO / RECIPE)["max_iters"] * ms["full recipe"] / ms["GPT-2, AdamW 3e-3 (tuned)"])


if __name__ == "__main__":
    if {"-h", "--help"} & set(sys.argv[1:]):
        from config import fit_text  # the repository's help layout: within 100 columns

        print(fit_text(__doc__))
        sys.exit(0)
    if bad := [a for a in sys.argv[1:] if a.startswith("-") and "=" not in a]:
        raise SystemExit(f"{bad[0]}: options are --key=value; see python scripts/ablation.py --help")
    what = sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith("--") else "all"
    opts = dict(a.removeprefix("--").split("=", 1) for a in sys.argv[1:] if a.startswith("--"))
    rows, seeds = opts.get("rows"), [int(s) for s in opts.get("seeds", "1,2,3").split(",")]
    OUT.mkdir(parents=True, exist_ok=True)
    if what == "time" or what == "all" and not (OUT / "time.json").exists():
        old = json.loads((OUT / "time.json").read_text()) if (OUT / "time.json").exists() else {}
        (OUT / "time.json").write_text(json.dumps(old | step_times(rows), indent=1))
        print((OUT / "time.json").read_text())
    if what in ("run", "all"):
        run(int(opts.get("budget") or headline_budget()), seeds, int(opts.get("lane", 0)), int(opts.get("lanes", 1)),
            rows)
    if what in ("table", "all"):
        print(report(rows, Path(opts.get("figures", REPO / "docs" / "img"))))
