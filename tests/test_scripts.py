"""scripts/: gpu_check.sh (run only on a GPU machine; here: it parses, and its report reads what the runs write) and
the ablation's variants."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import gpu_report  # noqa: E402


def test_script_parses_and_names_existing_files():
    subprocess.run(["bash", "-n", str(REPO / "scripts" / "gpu_check.sh")], check=True)
    text = (REPO / "scripts" / "gpu_check.sh").read_text()
    for path in ("configs/gpt2_124m_modern.toml", "tests/test_model.py", "tests/test_sample.py", "bench.py",
                 "train.py", "scripts/gpu_report.py"):
        assert path in text and (REPO / path).exists(), path
    for name in ("shakespeare_char", "shakespeare_char_modern"):
        assert (REPO / "configs" / f"{name}.toml").is_file()


def test_report_finds_the_first_evaluation_at_the_target(tmp_path):
    run = tmp_path / "shakespeare_char_modern"
    run.mkdir()
    rows = [{"iter": 0, "val_loss": 4.2, "elapsed": 1.0}, {"iter": 50, "val_loss": None, "elapsed": 5.0},
            {"iter": 100, "val_loss": 1.5, "elapsed": 9.0}, {"iter": 200, "val_loss": 1.46, "elapsed": 17.5},
            {"iter": 300, "val_loss": 1.44, "elapsed": 26.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "bench.jsonl").write_text(json.dumps({"model": "gpt2", "what": "train", "mfu": 0.41}) + "\n")
    assert gpu_report.time_to_target(run / "metrics.jsonl") == (17.5, 200)
    lines = gpu_report.report(tmp_path)
    assert any('"mfu": 0.41' in line for line in lines)
    assert any("iteration 200 after 18 s" in line and "best val 1.44" in line for line in lines)


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
