"""Every number of every script is bounded: 0, -1, NaN, inf, 1e308 and 10**30 for each numeric field of each script's
config, given on the command line to the script's own main, end in one line and a non-zero exit, or parse to a value
that works. Scripts and fields are found, not listed: a new script (a top-level .py with a main that calls
parse_config) or a new field is walked without editing this file. Plus real runs of accepted edge values, a few
commands in a fresh interpreter, and a checkpoint whose config.json holds absurd sizes."""

import dataclasses
import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import checkpoint
import config
import prepare_data
import tokens
from checkpoint import save_checkpoint
from conftest import CHARS, exit_message, tiny_model
from model import GPTConfig

REPO = Path(__file__).resolve().parents[1]
PROBES = ("0", "-1", "nan", "inf", "1e308", str(10**30))
ACCEPTABLE = ("0", "-1")  # the only probes a sane range may hold: no range reaches 1e308 or 10**30
SCRIPTS = sorted(p.stem for p in REPO.glob("*.py")
                 if "parse_config(" in (text := p.read_text()) and "\ndef main(" in text)
BASE = {"eval": ["--input=README.md"]}  # settings a script needs before any other value can be valid
HANG_GUARD_S = 300  # a subprocess that runs this long is stuck (the bugs below hung until killed)


class Parsed(Exception):
    """Raised in place of the work main() would do next: the parsed config, which passed every check."""


@pytest.fixture
def parse_only(monkeypatch):
    """main() parses with the real parse_config and stops there, raising Parsed(cfg)."""
    real = config.parse_config
    modules = {script: importlib.import_module(script) for script in SCRIPTS}  # before `from config import` sees parse

    def parse(cls, argv=None, description=""):
        raise Parsed(real(cls, argv, description))

    def main_of(script):
        module = modules[script]
        monkeypatch.setattr(config, "parse_config", parse)  # compare.py imports it inside main
        if hasattr(module, "parse_config"):
            monkeypatch.setattr(module, "parse_config", parse)
        return module.main
    return main_of


def number_fields(cls: type) -> list[dataclasses.Field]:
    """The settings of cls that are numbers: int, float, and either | None."""
    settings = config._settings(cls)  # name -> (type, default) of each setting
    return [f for f in dataclasses.fields(cls) if f.name in settings
            and config._unwrap(settings[f.name][0])[0] in (int, float)]


def config_class(main, script: str) -> type:
    """The dataclass main() parses, found by running it up to its parse with the defaults (and BASE)."""
    try:
        main(BASE.get(script, []))
    except Parsed as parsed:
        return type(parsed.args[0])
    except SystemExit as e:  # so a refusal in the walk is the probe's doing, not a missing setting's
        pytest.fail(f"{script}.py refuses its defaults ({e.code}): give it valid settings in BASE")
    pytest.fail(f"{script}.main returned without calling config.parse_config")


NUMBERED = {"train", "sample", "eval", "serve", "bench", "compare", "attention"}  # scripts that take numbers


def test_scripts_are_found():
    assert NUMBERED | {"export"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_number_is_refused_in_one_line_or_accepted_in_range(script, parse_only):
    main, base = parse_only(script), BASE.get(script, [])
    cls = config_class(main, script)
    fields = number_fields(cls)
    # A script without numbers has nothing to walk; one of the scripts that has some must never come up empty.
    assert fields or script not in NUMBERED, f"{script}: {cls.__name__} has no number settings?"
    problems = []
    for f in fields:
        lo, hi = config.value_range(f)
        if f.default is not None and not lo <= f.default <= hi:
            problems.append(f"{script} --{f.name}: its default {f.default} is outside its range, {lo} to {hi}")
        for probe in PROBES:
            arg = f"--{f.name}={probe}"
            try:
                main([*base, arg])
            except SystemExit as e:
                if not (isinstance(e.code, str) and e.code and "\n" not in e.code and f.name in e.code):
                    problems.append(f"{script} {arg}: exit {e.code!r}, not one line naming {f.name}")
            except Parsed as p:
                value = getattr(p.args[0], f.name)
                if probe not in ACCEPTABLE or not lo <= value <= hi:
                    problems.append(f"{script} {arg}: accepted as {value!r} (its range: {lo} to {hi})")
    assert not problems, "\n".join(problems)


def test_a_toml_number_out_of_range_is_named_by_its_file(tmp_path):
    from train import TrainConfig

    path = tmp_path / "run.toml"
    path.write_text(f"n_embd = {10**12 + 1}\nthreads = 4096\n")
    assert exit_message(config.parse_config, TrainConfig, [str(path)]) == \
        f"{path}: n_embd = {10**12 + 1} is out of range: use a number from 1 to 65536"
    # the value kept counts: the file's, replaced on the command line, is not checked
    assert exit_message(config.parse_config, TrainConfig, [str(path), "--n_embd=64"]) == \
        f"{path}: threads = 4096 is out of range: use a number from 0 to {config.MAX_THREADS}"


def test_every_range_is_shown_in_help(parse_only, capsys):
    """--help states every number's range: its own, or the one line for NUMBER_RANGE."""
    for script in SCRIPTS:
        cls = config_class(parse_only(script), script)
        screen = config.help_text(cls)
        assert f"(a number is from {config.show_range(*config.NUMBER_RANGE)} where" in " ".join(screen.split())
        for f in number_fields(cls):
            entry = re.search(rf"^  --{f.name}=.*?(?=^  --\w+=|\Z)", screen, re.M | re.S).group()  # may wrap
            entry = " ".join(entry.split())
            if config.value_range(f) != config.NUMBER_RANGE:
                assert f"({config.show_range(*config.value_range(f))})" in entry, (script, entry)


GPT_NUMBERS = [f for f in dataclasses.fields(GPTConfig) if f.type.split(" | ")[0] in ("int", "float")]


@pytest.mark.parametrize("field", GPT_NUMBERS, ids=lambda f: f.name)
def test_gpt_config_refuses_sizes_beyond_its_ranges_when_built_directly(field):
    """Not only the parser: a GPTConfig made from a config.json or a bench TOML checks its ranges first, so that
    no loop (n_head's suggestion) or allocation runs on an absurd number. So each of its numbers states a range."""
    assert "range" in field.metadata, f"GPTConfig.{field.name} has no range: declare it with bounded(default, lo, hi)"
    lo, hi = field.metadata["range"]
    for value in (hi * 2 + 1, 10**30, lo - 1):
        with pytest.raises(ValueError, match=f"^{field.name} must be from {lo} to {hi}, got"):
            GPTConfig(**{field.name: value})


def test_n_head_suggestion_is_bounded():
    """The divisor suggestion for an n_embd that n_head does not divide runs on an n_embd within its range."""
    with pytest.raises(ValueError, match=r"e.g. n_head=\d+"):
        GPTConfig(n_embd=2**16 - 1, n_head=12)
    with pytest.raises(ValueError, match="n_embd must be from 1 to 65536"):
        GPTConfig(n_embd=99999999999999999999, n_head=12)  # it tried every divisor up to n_embd: a hang


# ------------------------------------------------------------------------------------------------ checkpoints


@pytest.fixture(scope="module")
def char_run(tmp_path_factory) -> Path:
    out_dir = tmp_path_factory.mktemp("char") / "out"
    save_checkpoint(out_dir, tiny_model(vocab_size=len(CHARS)), {"tokenizer": tokens.Tokenizer.char(CHARS).to_meta()},
                    {"iter_num": 1}, iter_num=1, is_best=True)
    return out_dir


def absurd_copy(run: Path, dest: Path, key: str, value: int) -> Path:
    """A copy of run's checkpoint folder whose config.json sets `key` (in its "smallgpt" entry) to value."""
    dest.mkdir(parents=True)
    for f in (run / "latest").iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    settings = json.loads((dest / "config.json").read_text())
    settings["smallgpt"][key] = value
    (dest / "config.json").write_text(json.dumps(settings))
    return dest


@pytest.mark.parametrize("field", [f for f in GPT_NUMBERS if f.type.startswith("int")], ids=lambda f: f.name)
def test_a_config_json_with_an_absurd_size_is_refused_before_allocating(field, char_run, tmp_path, monkeypatch):
    folder = absurd_copy(char_run, tmp_path / "absurd", field.name, 10**12 + 1)

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built from an absurd config")

    monkeypatch.setattr(checkpoint, "GPT", no_model)
    with pytest.raises(ValueError, match=f"config.json: {field.name} must be from"):
        checkpoint.load_model(folder)


# ---------------------------------------------------------------------------------- accepted values that work


def test_accepted_zeros_sample(char_run, capsys):
    import sample
    import torch

    threads = torch.get_num_threads()  # --threads=0 takes every core, for the rest of this process
    try:
        assert sample.main([f"--out_dir={char_run}", "--device=cpu", "--start=ab", "--num_samples=2", "--seed=0",
                            "--threads=0", "--max_new_tokens=0", "--temperature=0", "--stream=false"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert capsys.readouterr().out.count("ab") == 2  # the prompts, nothing added


def test_accepted_zeros_train(tmp_path, monkeypatch):
    import train

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    tokenizer, text = tokens.Tokenizer.char(CHARS), (CHARS * 60)
    ids = np.array(tokenizer.encode(text))
    data = tmp_path / "data"
    data.mkdir()
    tokens.write_tokens(data / "train.bin", ids[:3000], tokens.token_dtype(tokenizer.vocab_size))
    tokens.write_tokens(data / "val.bin", ids[3000:], tokens.token_dtype(tokenizer.vocab_size))
    prepare_data.write_meta(data, prepare_data.dataset_meta(tokenizer, 3000, len(ids) - 3000, source="test",
                                                            sha256=None, prepare="tests/test_bounds.py"))
    zeros = ["--seed=0", "--warmup_iters=0", "--dropout=0", "--weight_decay=0", "--grad_clip=0",
             "--min_lr=0", "--beta1=0", "--beta2=0", "--muon_momentum=0", "--muon_momentum_warmup=0",
             "--muon_weight_decay=0", "--lr_decay_iters=0", "--rope_theta=0"]  # rope_theta: unused by learned
    tiny = [f"--dataset={data}", "--device=cpu", "--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=8",
            "--batch_size=2", "--gradient_accumulation_steps=1", "--eval_iters=1", "--compile=false", "--threads=1"]
    result = train.main([*tiny, f"--out_dir={tmp_path / 'out'}", "--optimizer=muon", "--max_iters=2", *zeros])
    assert result["iter_num"] == 2 and np.isfinite(result["val_loss"])
    result = train.main([*tiny, f"--out_dir={tmp_path / 'none'}", "--max_iters=0"])
    assert result["iter_num"] == 0 and np.isfinite(result["val_loss"])  # evaluates the initial model


# ------------------------------------------------------------------------------- in a fresh interpreter


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, timeout=HANG_GUARD_S)


@pytest.mark.parametrize("script, arg, use", [
    ("train", "--n_embd=99999999999999999999", "1 to 65536"),  # hung in n_head's divisor suggestion
    ("sample", "--threads=1000000", f"0 to {config.MAX_THREADS}"),  # segfaulted, after starving the machine
    ("sample", "--max_new_tokens=100000000000000000000", "0 to 2**31 - 1"),  # ran silently until killed
    ("sample", "--seed=100000000000000000000000", "0 to 2**63 - 1"),  # torch's "Overflow when unpacking long long"
])
def test_the_reported_numbers(script, arg, use, parse_only):
    assert exit_message(parse_only(script), [arg]) == f"{arg} is out of range: use a number from {use}"


def test_in_a_fresh_interpreter_one_line_and_a_non_zero_exit(char_run, tmp_path):
    result = run_script("train.py", "--n_embd=99999999999999999999")
    assert result.returncode == 1, result.stderr
    assert result.stderr == "--n_embd=99999999999999999999 is out of range: use a number from 1 to 65536\n"
    folder = absurd_copy(char_run, tmp_path / "absurd", "n_embd", 10**12 + 1)  # sample.py hung before its size guard
    result = run_script("sample.py", f"--init_from={folder}", "--device=cpu")
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines()[-1] == \
        f"{folder / 'config.json'}: n_embd must be from 1 to 65536, got {10**12 + 1}"
