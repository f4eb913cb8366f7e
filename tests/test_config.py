"""config.py: precedence CLI > TOML > defaults, type parsing, one-line errors, --help from field comments.

The future import makes every annotation below a string, as in modules that use it; make_dataclass covers real
(non-string) annotations and a class without source.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from config import config_to_dict, field_help, format_config, load_toml, parse_config, parse_value
from conftest import exit_message


@dataclass
class Cfg:
    learning_rate: float = field(default=6e-4, metadata={"range": (-1, 1)})  # peak learning rate, reached after warmup_iters
    max_iters: int = 5000  # number of optimizer steps
    compile: bool = True  # wrap the model in torch.compile
    dataset: str = "shakespeare#char"  # corpus name (a '#' inside a string is not the comment)
    seed: int | None = None  # random seed; none picks one from the clock
    dropout: float = 0.0

    def __post_init__(self) -> None:
        note: int = 0  # a local in a method, not a field
        if self.max_iters < 1:
            raise ValueError(f"max_iters must be >= 1, got {self.max_iters}")


config_error = functools.partial(exit_message, parse_config, Cfg)  # config_error(argv): parse_config's one line


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return str(path)


def test_defaults():
    assert parse_config(Cfg, []) == Cfg()


def test_precedence_cli_over_toml_over_defaults(tmp_path):
    path = write(tmp_path, "learning_rate = 1e-3\nmax_iters = 100\n")
    cfg = parse_config(Cfg, [path, "--max_iters=7"])
    assert cfg.max_iters == 7  # CLI beats TOML
    assert cfg.learning_rate == 1e-3  # TOML beats default
    assert cfg.dataset == "shakespeare#char"  # untouched default
    # the order on the command line does not matter: the file is read first
    assert parse_config(Cfg, ["--max_iters=7", path]).max_iters == 7


def test_key_value_with_space_and_later_flag_wins():
    cfg = parse_config(Cfg, ["--max_iters", "12", "--dataset", "kjv", "--max_iters=13", "--learning_rate", "-1e-3"])
    assert (cfg.max_iters, cfg.dataset, cfg.learning_rate) == (13, "kjv", -1e-3)


@pytest.mark.parametrize("text, expected", [("true", True), ("False", False), ("1", True), ("0", False),
                                            ("YES", True), ("no", False)])
def test_bool_from_cli(text, expected):
    assert parse_config(Cfg, [f"--compile={text}"]).compile is expected


def test_bool_rejects_other_text():
    assert config_error(["--compile=maybe"]) == "--compile expects true or false, got 'maybe'"


def test_numbers_from_cli():
    cfg = parse_config(Cfg, ["--max_iters=5_000", "--learning_rate=6e-4", "--dropout=1"])
    assert cfg.max_iters == 5000 and type(cfg.max_iters) is int
    assert cfg.learning_rate == 6e-4 and type(cfg.dropout) is float
    assert config_error(["--max_iters=1e3"]) == "--max_iters expects an integer, got '1e3'"
    assert config_error(["--max_iters=abc"]) == "--max_iters expects an integer, got 'abc'"
    assert config_error(["--learning_rate=fast"]) == "--learning_rate expects a number, got 'fast'"


@pytest.mark.parametrize("text", ["nan", "inf", "-Infinity", "1e999"])
def test_non_finite_numbers_from_cli_are_rejected(text):
    assert config_error([f"--learning_rate={text}"]) == f"--learning_rate expects a finite number, got {text!r}"


@pytest.mark.parametrize("value, shown", [("nan", "nan"), ("inf", "inf"), ("-inf", "-inf"), ("1e999", "inf")])
def test_non_finite_numbers_from_toml_are_rejected(tmp_path, value, shown):
    path = write(tmp_path, f"dropout = {value}\n")
    assert config_error([path]) == f"{path}: dropout expects a finite number, got {shown}"


def test_optional_none_and_value():
    assert parse_config(Cfg, ["--seed=none"]).seed is None
    assert parse_config(Cfg, ["--seed=NULL"]).seed is None
    assert parse_config(Cfg, ["--seed=3"]).seed == 3
    assert parse_config(Cfg, ["--seed=3", "--seed=none"]).seed is None
    assert config_error(["--seed=x"]) == "--seed expects an integer, got 'x'"
    # none is only special for Optional fields
    assert parse_config(Cfg, ["--dataset=none"]).dataset == "none"
    assert config_error(["--max_iters=none"]) == "--max_iters expects an integer, got 'none'"


def test_unknown_key_from_cli_suggests_closest():
    msg = config_error(["--lerning_rate=1e-3"])
    assert msg == "unknown setting 'lerning_rate' (did you mean 'learning_rate'?); run with --help to list them"
    assert "did you mean" not in config_error(["--zzzzzz=1"])


def test_unknown_key_from_toml_names_file(tmp_path):
    path = write(tmp_path, "max_itres = 10\n")
    msg = config_error([path])
    assert msg == f"unknown setting 'max_itres' in {path} (did you mean 'max_iters'?); run with --help to list them"


def test_toml_types(tmp_path):
    cfg = parse_config(Cfg, [write(tmp_path, 'learning_rate = 1\ncompile = false\nseed = 5\ndataset = "kjv"\n')])
    assert cfg.learning_rate == 1.0 and type(cfg.learning_rate) is float  # an int is fine for a float
    assert (cfg.compile, cfg.seed, cfg.dataset) == (False, 5, "kjv")
    assert parse_config(Cfg, [write(tmp_path, 'seed = "none"\n')]).seed is None  # TOML has no null


@pytest.mark.parametrize("line, expected", [
    ("max_iters = 1.5", "max_iters expects an integer, got 1.5"),
    ('max_iters = "10"', "max_iters expects an integer, got '10'"),
    ("max_iters = true", "max_iters expects an integer, got True"),
    ('compile = "yes"', "compile expects true or false, got 'yes'"),
    ("learning_rate = false", "learning_rate expects a number, got False"),
    ("dataset = 3", "dataset expects a string, got 3"),
])
def test_wrong_type_from_toml_names_file_and_key(tmp_path, line, expected):
    path = write(tmp_path, line + "\n")
    assert config_error([path]) == f"{path}: {expected}"


def test_toml_file_errors(tmp_path):
    assert config_error([str(tmp_path / "nope.toml")]) == f"config file not found: {tmp_path / 'nope.toml'}"
    bad = write(tmp_path, "max_iters = = 3\n")
    msg = config_error([bad])
    assert msg.startswith(f"{bad}: invalid TOML: ")
    table = write(tmp_path, "[train]\nmax_iters = 3\n")
    assert "[train] is a table" in config_error([table]) and table in config_error([table])


@pytest.mark.parametrize("name", sorted(p.name for p in (Path(__file__).parents[1] / "configs").glob("*.toml")))
def test_every_shipped_config_resolves(name):
    """configs/*.toml: flat, every key a TrainConfig setting of the right type, every value accepted."""
    from train import TrainConfig
    path = Path(__file__).parents[1] / "configs" / name
    cfg = parse_config(TrainConfig, [str(path)])
    assert all(getattr(cfg, key) == pytest.approx(value) for key, value in load_toml(path).items())


@pytest.mark.parametrize("argv, expected", [
    (["--max_iters"], "--max_iters needs a value: write --max_iters=VALUE"),
    (["--max_iters", "--compile=true"], "--max_iters needs a value: write --max_iters=VALUE"),
    (["-x"], "malformed argument '-x': write settings as --key=value"),
    (["--=3"], "malformed argument '--=3': write settings as --key=value"),
    (["a.toml", "b.toml"], "only one config file may be given, got 'a.toml' and 'b.toml'"),
])
def test_malformed_command_lines(argv, expected):
    assert config_error(argv) == expected


def test_post_init_value_error_becomes_one_line_exit(tmp_path):
    assert config_error(["--max_iters=0"]) == "max_iters must be >= 1, got 0"
    # validation, the ranges' too, sees the final value: a bad TOML value fixed on the command line passes
    assert parse_config(Cfg, [write(tmp_path, "max_iters = -5\n"), "--max_iters=5"]).max_iters == 5


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_every_field_with_its_comment(capsys, flag):
    with pytest.raises(SystemExit) as e:
        parse_config(Cfg, ["--max_iters=3", flag], description="Train a small GPT.")
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("Train a small GPT.")
    lines = {}  # each setting's line, with the lines its help wraps onto joined back
    for line in out.splitlines():
        if line.startswith("  --"):
            key = line.split()[0]
            lines[key] = line
        elif line.startswith("    ") and lines:
            lines[key] += " " + line.strip()
    assert lines["--learning_rate=0.0006"].split(None, 2)[1:] == ["float",
                                                                  "peak learning rate, reached after warmup_iters (-1 to 1)"]
    assert lines["--compile=true"].split(None, 2)[1:] == ["bool", "wrap the model in torch.compile"]
    assert lines["--dataset=shakespeare#char"].endswith("corpus name (a '#' inside a string is not the comment)")
    assert lines["--seed=none"].split(None, 1)[1] == ("int | None  random seed; none picks one from the clock "
                                                      "(0 to 2**63 - 1)")  # a seed's range in every script
    assert lines["--max_iters=5000"].endswith("number of optimizer steps")  # the default range, stated once above:
    assert "(a number is from 0 to 2**31 - 1 where no other range is shown)" in out
    assert lines["--dropout=0.0"].split() == ["--dropout=0.0", "float"]  # no comment, no help
    assert len(lines) == len(dataclasses.fields(Cfg))


def test_dash_h_as_a_value_is_not_help(capsys):
    assert parse_config(Cfg, ["--dataset", "-h"]).dataset == "-h"
    with pytest.raises(SystemExit) as e:
        parse_config(Cfg, ["--dataset", "-h", "-h"])  # the second one is not a value
    assert e.value.code == 0 and "--dataset=" in capsys.readouterr().out


def test_field_help_ignores_method_locals_and_string_hashes():
    helps = field_help(Cfg)
    assert set(helps) == {"learning_rate", "max_iters", "compile", "dataset", "seed"}
    assert helps["dataset"] == "corpus name (a '#' inside a string is not the comment)"


def test_subclass_fields_and_future_annotations():
    @dataclass
    class Local(Cfg):
        temperature: float | None = 0.8  # sampling temperature; none means greedy
        max_iters: int = 10  # fewer steps for this entry point

    assert isinstance(Local.__dataclass_fields__["temperature"].type, str)  # the future import is in effect
    cfg = parse_config(Local, ["--temperature=none", "--compile=no"])
    assert (cfg.temperature, cfg.compile, cfg.max_iters) == (None, False, 10)
    helps = field_help(Local)
    assert helps["temperature"] == "sampling temperature; none means greedy"
    assert helps["max_iters"] == "fewer steps for this entry point"  # the subclass's comment wins
    assert helps["learning_rate"] == "peak learning rate, reached after warmup_iters"


def test_real_annotations_and_no_source(capsys):
    Made = dataclasses.make_dataclass("Made", [("name", str), ("n", int, 1), ("p", float | None, None)])
    assert parse_config(Made, ["--name=x", "--p=0.5"]) == Made(n=1, p=0.5, name="x")
    assert field_help(Made) == {}
    with pytest.raises(SystemExit):
        parse_config(Made, ["--help"])
    assert "--n=1  " in capsys.readouterr().out
    assert (exit_message(parse_config, Made, [])
            == "missing required setting 'name': pass --name=VALUE or set it in the config file")


def test_unsupported_field_type_is_rejected():
    Bad = dataclasses.make_dataclass("Bad", [("xs", list, dataclasses.field(default_factory=list))])
    with pytest.raises(TypeError, match="unsupported config type"):
        parse_config(Bad, [])


def test_parse_value_helper():
    assert parse_value(int, "5_000", "max_iters") == 5000
    assert parse_value(float | None, "null", "p") is None
    assert parse_value(bool, "No", "compile") is False
    with pytest.raises(SystemExit, match="--k expects a number"):
        parse_value(float, "x", "k")


def test_config_to_dict_and_format_config():
    cfg = parse_config(Cfg, ["--seed=none"])
    d = config_to_dict(cfg)
    assert d == {"learning_rate": 6e-4, "max_iters": 5000, "compile": True, "dataset": "shakespeare#char",
                 "seed": None, "dropout": 0.0}
    assert format_config(cfg) == "settings: the defaults (--help lists them)"  # seed=none is its default


def test_format_config_shows_only_what_differs_from_the_defaults(tmp_path: Path):
    cfg = parse_config(Cfg, [write(tmp_path, "compile = true\ndataset = 'x y'\n"), "--max_iters=7", "--dropout=0.1"])
    heading, *lines = format_config(cfg).splitlines()
    assert "differ from the defaults" in heading
    assert lines == ["  max_iters = 7", "  dataset   = 'x y'", "  dropout   = 0.1"]  # compile=true is the default


def test_a_nanogpt_python_config_points_to_the_toml_files():
    line = config_error(["config/train_shakespeare_char.py"])
    assert "TOML" in line and "configs/shakespeare_char.toml" in line


def test_device_and_dtype_resolution_shared_by_the_entry_points():
    import torch

    from config import resolve_device, resolve_dtype

    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
        with pytest.raises(SystemExit, match="sees no CUDA GPU"):
            resolve_device("cuda:1")
    with pytest.raises(SystemExit, match="is not a device"):
        resolve_device("tpu")
    with pytest.raises(SystemExit, match="--dtype=fp8"):
        resolve_dtype("fp8", torch.device("cpu"))
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16


def test_threads_setting(monkeypatch):
    import torch

    import config
    from config import set_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})  # 4 cores
        for busy, expected in ((0.2, 4), (1.1, 3), (2.6, 1), (9.0, 1)):  # the default: the cores that are idle
            monkeypatch.setattr(config, "busy_cores", lambda: busy)
            assert set_threads(None) == expected, busy
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert set_threads(None) == 2
        assert set_threads(1) == 1
        assert set_threads(0) == 4  # one per core, whatever the load
        for threads in (-1, config.MAX_THREADS + 1):  # $OMP_NUM_THREADS or a checkpoint's, which no parser saw
            with pytest.raises(SystemExit, match=f"threads={threads} is out of range: use 0"):
                set_threads(threads)
        monkeypatch.undo()
        assert 0 <= config.busy_cores() <= (os.cpu_count() or 1) + 0.5  # measured from /proc/stat here
    finally:
        torch.set_num_threads(before)


def test_help_examples_name_no_path_of_this_repositorys_ci():
    """--help prints each script's docstring: its examples must work in a user's checkout, which has no ../shared."""
    import ast

    repo = Path(__file__).resolve().parents[1]
    scripts = [*repo.glob("*.py"), *repo.glob("data/*/prepare.py")]
    docs = {p.relative_to(repo): ast.get_docstring(ast.parse(p.read_text(encoding="utf-8"))) or "" for p in scripts}
    assert len(docs) > 10 and [str(p) for p, doc in docs.items() if "../shared" in doc] == []
