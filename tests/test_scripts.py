"""scripts/: gpu_check.sh rehearsed on the CPU (--dry-run), its report, and the ablation's variants."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import _data_dir

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import gpu_report  # noqa: E402

STEPS = ["smoke", "tests", "bench_train_gpt2", "bench_train_modern", "bench_decode", "ddp", "fp16", "resume",
         "shakespeare_char", "shakespeare_char_modern"]


def test_gpu_check_dry_run_passes_every_step_and_brings_back_few_files(tmp_path):
    """The GPU check's plumbing on the CPU: every step in order, one summary line each, its last lines printed;
    what comes back from a GPU machine (at most 8 files, 2 folders down) holds the figures and the runs' metrics."""
    out = tmp_path / "out"
    env = os.environ | {"PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--dry-run", str(out)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    lines = (out / "summary.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in lines] == STEPS
    has_data = (_data_dir() or REPO / "missing").joinpath("tinyshakespeare.txt").is_file() or \
        (REPO / "gpu_carry" / "shakespeare_char" / "train.bin").is_file()
    for line in lines:
        assert re.fullmatch(r"\w+: exit 0 after \d+ s", line) or (not has_data and ": skipped, no Shakespeare" in line)
        assert line in proc.stdout
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8 and all(len(p.relative_to(out).parts) <= 3 for p in files)
    figures = [json.loads(line) for line in (out / "figures.jsonl").read_text().splitlines()]
    assert [(r["what"], r.get("batch_size")) for r in figures] == [
        ("smoke", None), ("train", 2), ("train", 2), ("decode", 1), ("decode", 8)]
    assert figures[0]["cuda_graphs"] is False and all(r["cuda_graphs"] is False for r in figures[3:])
    if has_data:
        assert {p.name for p in files} == {"summary.txt", "figures.jsonl", "logs.tar.gz", "report.txt",
                                           "shakespeare_char.metrics.jsonl", "shakespeare_char_modern.metrics.jsonl"}
        assert "shakespeare_char_modern: val 1.47 not reached" in (out / "report.txt").read_text()


def test_gpu_check_stops_at_a_failed_smoke_step(tmp_path):
    """Nothing else is worth running when the smoke step fails: its log's tail is printed, the summary says so."""
    env = os.environ | {"PYTHON": sys.executable, "GPU_CHECK_ONLY": "smoke tests"}
    env["PYTHONPATH"] = str(tmp_path)  # a torch that cannot be imported
    (tmp_path / "torch.py").write_text("raise ImportError('no torch in this test')\n")
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--dry-run", str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert re.fullmatch(r"smoke: exit 1 after \d+ s\n", (tmp_path / "out" / "summary.txt").read_text())
    assert "no torch in this test" in proc.stdout and "smoke failed: stopping" in proc.stdout


@pytest.mark.parametrize("args, env, status, line", [
    (["-x"], {}, 2, "unknown option -x; usage: "),
    (["--dry-run", "-x"], {}, 2, "unknown option -x; usage: "),
    (["--dry-run"], {}, 2, "--dry-run takes one OUT folder"),
    (["--prepare", "more"], {}, 2, "--prepare takes nothing more"),
    (["a", "b"], {}, 2, "one OUT folder at most, got 2"),
    (["--dry-run", "{out}"], {"GPU_CHECK_SECONDS": "8m"}, 2, "GPU_CHECK_SECONDS must be whole seconds, got '8m'"),
    (["--dry-run", "{out}"], {"GPU_CHECK_ONLY": "smoke test"}, 2, "GPU_CHECK_ONLY names no step 'test'"),
    (["--dry-run", "{file}/out"], {}, 1, "OUT {file}/out cannot be written into"),
    (["--dry-run", "{read_only}"], {}, 1, "OUT {read_only} cannot be written into"),
    ([], {"OUT": "{read_only}"}, 1, "OUT {read_only} cannot be written into"),
])
def test_gpu_check_refuses_bad_arguments_and_an_unwritable_out_at_once(tmp_path, args, env, status, line):
    """One line, a non-zero exit, before any step starts (a read-only OUT used to fail the smoke step)."""
    read_only = tmp_path / "ro"
    read_only.mkdir(mode=0o555)
    if os.geteuid() == 0:  # root writes into any folder whatever its mode: a folder no one may create files in
        read_only = Path("/proc")
    (tmp_path / "file").write_text("x")
    names = {"out": tmp_path / "out", "file": tmp_path / "file", "read_only": read_only}
    env = os.environ | {"PYTHON": "false"} | {k: v.format(**names) for k, v in env.items()}  # no step may run
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), *(a.format(**names) for a in args)],
                          env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == status and proc.stdout == ""
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and line.format(**names) in proc.stderr, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "ro"]  # no OUT made, no default gpu_check_out


def test_report_finds_the_first_evaluation_at_the_target(tmp_path):
    rows = [{"iter": 0, "val_loss": 4.2, "elapsed": 1.0, "tokens_per_sec": None},
            {"iter": 50, "val_loss": None, "elapsed": 5.0, "tokens_per_sec": 1000.0},
            {"iter": 100, "val_loss": 1.5, "elapsed": 9.0}, {"iter": 200, "val_loss": 1.46, "elapsed": 17.5},
            {"iter": 300, "val_loss": 1.44, "elapsed": 26.0}]
    metrics = tmp_path / "shakespeare_char_modern.metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"iter": 3')  # cut short by a timeout
    (tmp_path / "figures.jsonl").write_text(json.dumps({"model": "gpt2", "what": "train", "mfu": 0.41}) + "\n")
    assert gpu_report.time_to_target(metrics) == (17.5, 200)
    lines = gpu_report.report(tmp_path)
    assert lines[0] == 'train {"model": "gpt2", "what": "train", "mfu": 0.41}'
    assert lines[1] == ("shakespeare_char_modern: val 1.47 at iteration 200 after 18 s; best val 1.44, 4 evaluations, "
                        "300 iterations in 26.0 s, median 1,000 tokens/s")


def test_every_ablation_variant_is_a_valid_training_config():
    import ablation
    from config import parse_config
    from train import TrainConfig

    variants = ablation.variants()
    assert len(variants) == 2 + 2 * len(ablation.SWITCHES)  # GQA is added only: the recipe does not use it
    recipe = parse_config(TrainConfig, [ablation.RECIPE])
    for name, (config, settings) in variants.items():
        cfg = parse_config(TrainConfig, ablation.argv(config, settings))
        if name.startswith("recipe - "):  # removing a switch changes the recipe, and only where the switch acts
            changed = {k for k in vars(cfg) if getattr(cfg, k) != getattr(recipe, k)}
            assert changed and changed <= set(settings), name


@pytest.mark.parametrize("script", ["ablation.py", "vs_nanogpt.py"])
def test_measuring_scripts_have_help_and_refuse_a_bad_option_in_one_line(script):
    run = lambda *args: subprocess.run([sys.executable, f"scripts/{script}", *args], cwd=REPO,  # noqa: E731
                                       capture_output=True, text=True, timeout=60)
    shown = run("--help")
    assert shown.returncode == 0 and len(shown.stdout.splitlines()) > 3  # the docstring, laid out
    assert max(len(line) for line in shown.stdout.splitlines()) <= 100
    bad = run("--rounds")
    assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [
        f"--rounds: options are --key=value; see python scripts/{script} --help"]
