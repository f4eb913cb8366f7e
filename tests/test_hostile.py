"""Hostile inputs and faults against every entry point: each ends as one line on stderr with a non-zero exit status,
and nothing that existed before changes (issue 12: bad files and values, a full disk, Ctrl-C, kill -9, bad weights).

    python -m pytest -q tests/test_hostile.py

The preparers run as real processes (they import no torch, so they start fast), through a harness that can inject a
fault first; train.py, sample.py and attention.py run in-process, their exceptions passed through errors.report,
which is what their boundary does with them.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import attention
import checkpoint
import errors
import runlog
import sample
import tokens
import train
from conftest import gpt2_bpe

REPO = Path(__file__).resolve().parents[1]
TINY = ["--device=cpu", "--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16", "--batch_size=2",
        "--gradient_accumulation_steps=1", "--eval_interval=2", "--eval_iters=1", "--compile=false"]
# Runs a script as __main__ (so that it installs its boundary) after `pre`, the fault to inject.
HARNESS = "import sys, runpy\nsys.path.insert(0, {repo!r})\n{pre}\nsys.argv = sys.argv[1:]\n" \
          "runpy.run_path(sys.argv[0], run_name='__main__')\n"


def run(script: str, *args: object, pre: str = "", env: dict | None = None) -> tuple[int, list[str]]:
    """(exit status, non-empty stderr lines) of `python script args` with the fault `pre` injected."""
    r = subprocess.run([sys.executable, "-c", HARNESS.format(repo=str(REPO), pre=pre), str(REPO / script),
                        *map(str, args)], capture_output=True, text=True, timeout=120,
                       env=os.environ | {"TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"} | (env or {}))
    return r.returncode, [line for line in r.stderr.splitlines() if line.strip()]


def outcome(main, argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, list[str]]:
    """(exit status, non-empty stderr lines) of an entry point's main(argv), as its boundary (errors.py) ends it."""
    capsys.readouterr()
    try:
        main(argv)
        status = 0
    except SystemExit as e:  # Python prints a string code as the one line and exits with 1
        status = 1 if isinstance(e.code, str) else e.code or 0
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    except BaseException as e:
        status = errors.report(e)
        if status is None:
            raise  # a bug: the test fails with its traceback
    return status, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def snapshot(root: Path) -> dict[str, bytes | str]:
    """Every file's bytes, link's target and folder under root, by relative path (links are not followed)."""
    found: dict[str, bytes | str] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            rel = str(path.relative_to(root))
            found[rel] = ("-> " + os.readlink(path) if path.is_symlink() else path.read_bytes() if path.is_file()
                          else "folder")
    return found


def assert_one_line(status_and_lines: tuple[int, list[str]], pattern: str, status: int = 1) -> str:
    got_status, lines = status_and_lines
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    assert got_status == status, (got_status, lines)
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = random.Random(0)
    words = ("to be or not to be", "my lord", "what light through yonder window breaks", "o night", "away!")
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("".join(rng.choice(words) + rng.choice(" \n") for _ in range(3000)))
    return path


@pytest.fixture
def prepared(tmp_path: Path, corpus: Path) -> Path:
    """A complete char-level preparation in tmp_path/ds."""
    assert run("data/text/prepare.py", "--input", corpus, "--tokenizer=char", "--out_dir", tmp_path / "ds")[0] == 0
    return tmp_path / "ds"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> tuple[Path, Path]:
    """(dataset, out_dir of a 2-iteration run): copy the out_dir before changing it."""
    root = tmp_path_factory.mktemp("trained")
    assert run("data/text/prepare.py", "--input", corpus, "--tokenizer=char", "--out_dir", root / "ds")[0] == 0
    train.main([f"--dataset={root / 'ds'}", f"--out_dir={root / 'run'}", "--max_iters=2", *TINY])
    return root / "ds", root / "run"


@pytest.fixture
def run_copy(trained: tuple[Path, Path], tmp_path: Path) -> Path:
    shutil.copytree(trained[1], tmp_path / "run", symlinks=True)
    return tmp_path / "run"


@pytest.fixture(autouse=True)
def quiet_sample_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sample, "format_config", lambda cfg: "")  # sample.py prints its settings to stderr


# ------------------------------------------------------------------------------------------------ data preparation


@pytest.mark.parametrize("args, pattern", [
    (["--input", "{latin1}"], r"latin1.txt: not UTF-8 text .*iconv"),
    (["--input", "{latin1}", "--tokenizer=char"], r"latin1.txt: not UTF-8 text"),
    (["--input", "{bad_jsonl}"], r"bad.jsonl:2: not JSON"),
    (["--input", "{number_jsonl}"], r"number.jsonl:1: no string field 'text'"),
    (["--input", "{parquet}"], r"needs pyarrow"),
    (["--input", "{corpus}", "--num_threads=-1"], r"--num_threads=-1: expected"),
    (["--input", "{corpus}", "--shard_size=0"], r"--shard_size=0: expected"),
    (["--input", "{corpus}", "--shard_size=1"], r"--shard_size=1 could make up to [\d,]+ files a split .* more than "
                                                r"1,000 .*: use --shard_size=\d+ or more"),  # train.py: too many open files
    (["--input", "{corpus}", "--val_fraction=nan"], r"--val_fraction=nan: expected"),
    (["--input", "{corpus}", "--val_fraction=0"], r"--val_fraction=0.0: expected .*both splits"),
    (["--input", "{corpus}", "--tokenizer=klingon"], r"--tokenizer=klingon: unknown tiktoken encoding .*or char"),
    (["--input", "{tiny}", "--tokenizer=char"], r"the train split is empty .*use more text"),
])
def test_a_failed_rerun_keeps_the_previous_preparation(prepared: Path, corpus: Path, args: list[str],
                                                       pattern: str) -> None:
    src = prepared.parent
    (src / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (src / "bad.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    (src / "number.jsonl").write_text('{"text": 42}\n')
    (src / "x.parquet").write_bytes(b"PAR1")
    (src / "tiny.txt").write_text("x")
    paths = {"latin1": src / "latin1.txt", "bad_jsonl": src / "bad.jsonl", "number_jsonl": src / "number.jsonl",
             "parquet": src / "x.parquet", "corpus": corpus, "tiny": src / "tiny.txt"}
    before = snapshot(src)
    pre = "sys.modules['pyarrow'] = None" if "{parquet}" in args else ""  # as if pyarrow were not installed
    result = run("data/text/prepare.py", *[a.format(**paths) for a in args], "--out_dir", prepared, pre=pre)
    assert_one_line(result, pattern)
    assert snapshot(src) == before
    assert len(tokens.load_split(prepared, "train")[0]) > 0


@pytest.mark.parametrize("content, args, pattern", [
    ("", [], r"empty.txt has 0 characters: too few for a train and a val split"),
    ("x", [], r"has 1 characters: too few"),
    ("hello world", ["--val_fraction=-0.5"], r"--val_fraction=-0.5: expected a fraction"),
    (b"\x89PNG\r\n\x1a\n\x00\xff", [], r"not UTF-8 text"),
])
def test_char_preparer_refuses_before_writing(tmp_path: Path, content: str | bytes, args: list[str],
                                              pattern: str) -> None:
    src = tmp_path / "empty.txt"
    src.write_bytes(content.encode() if isinstance(content, str) else content)
    assert_one_line(run("data/shakespeare_char/prepare.py", "--input", src, "--out_dir", tmp_path / "out", *args),
                    pattern)
    assert not (tmp_path / "out").exists()


def test_out_dir_that_is_a_file(tmp_path: Path, corpus: Path) -> None:
    (tmp_path / "f").write_text("mine")
    assert_one_line(run("data/text/prepare.py", "--input", corpus, "--out_dir", tmp_path / "f"), r"f is a file")
    assert_one_line(run("data/text/prepare.py", "--input", corpus, "--out_dir", tmp_path / "f" / "sub"),
                    r"f/sub: a part of this path is a file")
    assert (tmp_path / "f").read_text() == "mine"


@pytest.mark.parametrize("kind", ["loop", "dangling"])
def test_out_dir_that_is_a_broken_link(tmp_path: Path, corpus: Path, kind: str) -> None:
    (tmp_path / "ds").symlink_to("ds" if kind == "loop" else "nowhere")
    what = "is a loop of symbolic links" if kind == "loop" else "is a symbolic link to nowhere, which does not exist"
    assert_one_line(run("data/text/prepare.py", "--input", corpus, "--out_dir", tmp_path / "ds"),
                    rf"^--out_dir {tmp_path / 'ds'} {what}: pass a folder")
    assert os.readlink(tmp_path / "ds") == ("ds" if kind == "loop" else "nowhere")


KILL_WHILE_WRITING = """
import os, signal, prepare_data
prepare_data.ShardWriter.write = lambda self, ids: os.kill(os.getpid(), signal.SIGKILL)
"""
KILL_WHILE_SWAPPING = """
import os, signal
replace = os.replace
def replace_then_die(src, dst):  # the first token file moved into the dataset folder, then kill -9
    replace(src, dst)
    if '.tmp-prepare-' not in str(dst) and str(dst).endswith('.bin'):
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace_then_die
"""


def test_kill_9_during_a_rerun_never_leaves_a_loadable_mix(prepared: Path, corpus: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    other = tmp_path / "other.txt"
    other.write_text(corpus.read_text()[::-1] + "XYZ")  # a different vocabulary and different tokens
    before = snapshot(prepared)
    status, _ = run("data/shakespeare_char/prepare.py", "--input", other, "--out_dir", prepared, pre=KILL_WHILE_WRITING)
    assert status == -signal.SIGKILL
    after = snapshot(prepared)
    # only the dead run's folder, and its lock file (the kernel released the lock)
    assert {k: v for k, v in after.items() if not k.startswith(".tmp-prepare-") and k != ".lock"} == before
    assert len(tokens.load_split(prepared, "val")[0]) > 0

    status, _ = run("data/shakespeare_char/prepare.py", "--input", other, "--out_dir", prepared, pre=KILL_WHILE_SWAPPING)
    assert status == -signal.SIGKILL
    assert not (prepared / "meta.json").exists()  # between the swaps: unprepared, never the old meta.json with new files
    assert_one_line(outcome(train.main, [f"--dataset={prepared}", f"--out_dir={tmp_path / 'o'}", *TINY], capsys),
                    r"meta.json not found: the dataset is not prepared \(or its preparation was interrupted\)")

    assert run("data/shakespeare_char/prepare.py", "--input", other, "--out_dir", prepared)[0] == 0
    assert not [p for p in os.listdir(prepared) if p.startswith(".tmp")]  # the dead runs' folders are gone


def test_a_file_from_another_preparation_is_refused(prepared: Path, corpus: Path, tmp_path: Path) -> None:
    assert run("data/text/prepare.py", "--input", corpus, "--tokenizer=char", "--out_dir", tmp_path / "b")[0] == 0
    shutil.copy(tmp_path / "b" / "val.bin", prepared / "val.bin")  # the same tokens, another preparation
    with pytest.raises(ValueError, match=r"val.bin is not from the preparation that .*meta.json describes"):
        tokens.load_split(prepared, "val")


FULL_DISK = """
import builtins, errno
real_open = builtins.open
class Full:
    def __init__(self, f): self.f = f
    def write(self, data): raise OSError(errno.ENOSPC, "No space left on device")  # as the kernel says it: no path
    def __enter__(self): return self
    def __exit__(self, *exc): self.f.close()
def open_on_a_full_disk(file, mode="r", *args, **kwargs):
    f = real_open(file, mode, *args, **kwargs)
    return Full(f) if str(file).endswith(".bin.tmp") else f
builtins.open = open_on_a_full_disk
"""


def test_disk_full_during_preparation(prepared: Path, corpus: Path) -> None:
    gpt2_bpe()  # the preparer's default tokenizer
    before = snapshot(prepared)
    line = assert_one_line(run("data/text/prepare.py", "--input", corpus, "--out_dir", prepared, pre=FULL_DISK),
                           r"\.tmp-prepare-\d+/\.train\.bin\.tmp: no space left on the device: free some space")
    assert str(prepared) in line
    assert snapshot(prepared) == before  # no .tmp file or folder left behind


def test_ctrl_c_during_preparation_and_during_imports(prepared: Path, corpus: Path) -> None:
    gpt2_bpe()  # the preparer's default tokenizer
    before = snapshot(prepared)
    slow = ("import time, prepare_data\nprepare_data.ShardWriter.write = lambda self, ids: "
            "(print('writing', flush=True), time.sleep(60))")
    proc = subprocess.Popen([sys.executable, "-c", HARNESS.format(repo=str(REPO), pre=slow),
                             str(REPO / "data/text/prepare.py"), "--input", str(corpus), "--out_dir", str(prepared)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ | {"TQDM_DISABLE": "1"},
                            # a shell's background job (`cmd &`) ignores SIGINT, and children inherit that
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stdout.readline() == "writing\n"
    proc.send_signal(signal.SIGINT)  # a real Ctrl-C, in the middle of writing the token files
    _, err = proc.communicate(timeout=60)
    assert_one_line((proc.returncode, err.split("\n")[:-1]), rf"^interrupted: {prepared} was left as it was$", 130)
    assert snapshot(prepared) == before

    # Ctrl-C while numpy or torch is being imported, before any code of the script has run
    for script, module in (("data/text/prepare.py", "numpy"), ("train.py", "torch")):
        interrupt = f"class Interrupt:\n    def find_spec(self, name, *args):\n        if name == {module!r}: " \
                    f"raise KeyboardInterrupt\nsys.meta_path.insert(0, Interrupt())"
        assert_one_line(run(script, "--help", pre=interrupt), r"^interrupted$", 130)


def test_a_huge_char_table_with_a_duplicate_is_refused_at_once() -> None:
    # 1.1M symbols (every code point but the surrogates) and one of them twice: a quadratic scan takes ~700 s
    code = ("import tokens\nchars = ''.join(chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000) + 'q'\n"
            "try:\n    tokens.Tokenizer.from_meta({'kind': 'char', 'chars': chars})\nexcept ValueError as e:\n"
            "    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert "char table lists 'q' twice" in r.stdout


# ------------------------------------------------------------------------------------------------------- training


def test_config_files_that_are_not_toml(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "latin1.toml").write_bytes('dataset = "caf\xe9"\n'.encode("latin-1"))
    assert_one_line(outcome(train.main, [str(tmp_path / "latin1.toml")], capsys), r"latin1.toml: not UTF-8 text")
    assert_one_line(outcome(train.main, [str(tmp_path)], capsys), r"is a folder: pass a .toml file")


def test_a_latest_link_that_loops(trained: tuple[Path, Path], run_copy: Path, capsys: pytest.CaptureFixture) -> None:
    (run_copy / "latest").unlink()
    (run_copy / "latest").symlink_to("latest")
    before = snapshot(run_copy)
    argv = [f"--dataset={trained[0]}", f"--out_dir={run_copy}", "--init_from=resume", "--max_iters=4", *TINY]
    assert_one_line(outcome(train.main, argv, capsys), r"latest is a loop of symbolic links")
    assert_one_line(outcome(sample.main, [f"--out_dir={run_copy}"], capsys), r"latest is a loop of symbolic links")
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("state, pattern", [
    ([1, 2], r"not a training state written by train.py \(it holds a list, not a dict\)"),
    ({"optimizer": {}, "iter_num": "2", "best_val_loss": 1.0, "rng": {}}, r"\(iter_num is str, not int\)"),
    ("short rng", r"rng\['torch'\] is not a CPU generator's state"),
    ("random bytes", r"state.pt is refused: the file is damaged \(not a torch archive\)"),
])
def test_a_state_pt_of_the_wrong_structure(trained: tuple[Path, Path], run_copy: Path, state: object, pattern: str,
                                           capsys: pytest.CaptureFixture) -> None:
    path = run_copy / "latest" / "state.pt"
    if state == "random bytes":
        path.write_bytes(random.Random(0).randbytes(2000))
    else:
        if state == "short rng":
            state = torch.load(path, weights_only=True)
            state["rng"]["torch"] = state["rng"]["torch"][:100]
        torch.save(state, path)
    before = snapshot(run_copy)
    argv = [f"--dataset={trained[0]}", f"--out_dir={run_copy}", "--init_from=resume", "--max_iters=4", *TINY]
    line = assert_one_line(outcome(train.main, argv, capsys), pattern)
    assert "weights_only" not in line
    assert snapshot(run_copy) == before


def test_foreign_metrics_lines_are_dropped_on_resume(trained: tuple[Path, Path], run_copy: Path) -> None:
    with open(run_copy / "metrics.jsonl", "ab") as f:
        f.write(b'[1, 2]\n"text"\n{"iter": "one"}\n{"iter": 1}\n\xff\xfe\n{"iter": 1, "val_loss": "x"}\n')
    train.main([f"--dataset={trained[0]}", f"--out_dir={run_copy}", "--init_from=resume", "--max_iters=4", *TINY])
    rows = [json.loads(line) for line in (run_copy / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows] == [0, 1, 2, 2, 3, 4, 4] and all(r.keys() == runlog.METRICS_KEYS for r in rows)


def test_disk_full_writing_metrics(trained: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture) -> None:
    real_open = open

    def full(file, mode="r", *args, **kwargs):
        if str(file).endswith("metrics.jsonl") and "a" in mode:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", full)
    argv = [f"--dataset={trained[0]}", f"--out_dir={tmp_path / 'run'}", "--max_iters=2", *TINY]
    assert_one_line(outcome(train.main, argv, capsys), r"run/metrics.jsonl: no space left on the device")


def test_disk_full_inside_torch_save(run_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = snapshot(run_copy)
    model = checkpoint.load_model(run_copy)[0]

    def torch_save_on_a_full_disk(*args, **kwargs):  # what torch.save raises when the disk fills up
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(torch, "save", torch_save_on_a_full_disk)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 << 30, 10 << 30, 0))
    state = {"iter_num": 3, "best_val_loss": 1.0, "rng": {"torch": torch.get_rng_state()}, "optimizer": {}}
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.save_checkpoint(run_copy, model, {"tokenizer": {"kind": "char", "chars": "ab"}}, state,
                                   iter_num=3, is_best=False)
    assert "\n" not in str(info.value) and "the disk is full" in str(info.value)
    assert "previous checkpoint" in str(info.value) and "state.pt" in str(info.value)
    assert snapshot(run_copy) == before


# ------------------------------------------------------------------------------------- sampling and loading weights


@pytest.mark.parametrize("key, own_key, value, pattern", [  # key: GPT-2's; own_key: the "smallgpt" entry's
    ("n_embd", None, "16", r"config.json: n_embd='16' is not of type int"),
    ("n_positions", None, 2 ** 24, r"config.json: its sizes make ~.* weights, more than the .* bytes of .*model"),
    (None, "block_size", 2 ** 24, r"config.json: its sizes make ~.* weights, more than the .* bytes of .*model"),
    ("n_positions", None, 10 ** 12, r"config.json: block_size must be from 1 to 16777216, got 1000000000000"),
    ("n_layer", "n_layer", True, r"config.json: n_layer=True is not of type int"),
    ("n_head", "n_head", 3, r"config.json: n_embd \(16\) must be divisible by n_head \(3\)"),
    (None, "bias", "yes", r"config.json: smallgpt.bias='yes' is not of type bool"),
])
def test_config_json_types_and_sizes(run_copy: Path, key: str | None, own_key: str | None, value: object,
                                     pattern: str, capsys: pytest.CaptureFixture) -> None:
    path = run_copy / "latest" / "config.json"
    config = json.loads(path.read_text())
    if own_key is None:
        del config["smallgpt"]  # a Hugging Face GPT-2 folder: its GPT-2 keys are read
    else:
        config["smallgpt"][own_key] = value  # ours: the "smallgpt" entry wins over GPT-2's keys
    config |= {key: value} if key else {}
    path.write_text(json.dumps(config))
    before = snapshot(run_copy)
    assert_one_line(outcome(sample.main, [f"--out_dir={run_copy}", "--max_new_tokens=2"], capsys), pattern)
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("kind", ["int8", "nan"])
def test_weights_that_are_not_finite_floats(run_copy: Path, kind: str, capsys: pytest.CaptureFixture) -> None:
    path = run_copy / "latest" / "model.safetensors"
    weights = load_file(path)
    weights["h.0.mlp.c_fc.weight"] = (weights["h.0.mlp.c_fc.weight"].to(torch.int8) if kind == "int8"
                                      else torch.full_like(weights["h.0.mlp.c_fc.weight"], float("nan")))
    save_file(weights, path)
    what = "torch.int8 values" if kind == "int8" else "NaN or Inf"
    assert_one_line(outcome(sample.main, [f"--out_dir={run_copy}", "--max_new_tokens=2"], capsys),
                    rf"model.safetensors: h.0.mlp.c_fc.weight holds {what}: weights must be finite floating-point")


def test_sample_and_attention_refuse_before_working(run_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(checkpoint, "load_model", lambda *a, **k: pytest.fail("loaded a model before refusing"))
    assert_one_line(outcome(sample.main, [f"--out_dir={run_copy}", f"--out_file={tmp_path}"], capsys),
                    r"out_file=.* is a folder: pass a file path")
    (tmp_path / "file").write_text("mine")
    assert_one_line(outcome(attention.main, [f"--out_dir={run_copy}", f"--out={tmp_path / 'file' / 'maps'}"], capsys),
                    r"file is a file, where the PNGs need a folder")
    assert (tmp_path / "file").read_text() == "mine"


@pytest.mark.parametrize("name", checkpoint.FILES)
@pytest.mark.parametrize("kind", ["folder", "loop", "fifo"])
def test_a_checkpoint_file_that_is_not_a_file_is_named(trained: tuple[Path, Path], run_copy: Path, name: str,
                                                       kind: str, capsys: pytest.CaptureFixture) -> None:
    """Named with what it is, not taken for a deleted checkpoint, by whichever reads it: sample.py, a resume."""
    path = (run_copy / "latest").resolve() / name
    path.unlink()
    {"folder": path.mkdir, "loop": lambda: path.symlink_to(name), "fifo": lambda: os.mkfifo(path)}[kind]()
    what = {"folder": "a folder, where a file belongs", "loop": "a loop of symbolic links",
            "fifo": r"a pipe \(FIFO\), not a regular file"}[kind]
    before = snapshot(run_copy)
    argv = [f"--dataset={trained[0]}", f"--out_dir={run_copy}", "--init_from=resume", "--max_iters=4", *TINY]
    for main, args in ((sample.main, [f"--out_dir={run_copy}", "--max_new_tokens=2"]), (train.main, argv)):
        line = assert_one_line(outcome(main, args, capsys), rf"{re.escape(str(path))}: {what}")
        assert "deleted?" not in line
        assert snapshot(run_copy) == before


def test_an_empty_model_safetensors_is_blamed_on_itself(run_copy: Path, capsys: pytest.CaptureFixture) -> None:
    weights = run_copy / "latest" / "model.safetensors"
    for data, what in ((b"", r"is damaged \(empty\)"), (weights.read_bytes()[:200], r"is damaged \(cut short")):
        weights.write_bytes(data)
        line = assert_one_line(outcome(sample.main, [f"--out_dir={run_copy}", "--max_new_tokens=2"], capsys),
                               rf"model.safetensors {what}")
        assert "config.json" not in line


def test_a_prompt_outside_a_char_vocabulary(run_copy: Path, capsys: pytest.CaptureFixture) -> None:
    line = assert_one_line(outcome(sample.main, [f"--out_dir={run_copy}", "--start=to bé", "--max_new_tokens=2"],
                                   capsys), r"character 'é' \(U\+00E9\) at position 4 is not in this char vocabulary")
    assert "--tokenizer" not in line  # sample.py has no such option


# ------------------------------------------------------------------------------------------------ the boundary


def test_a_bug_keeps_its_traceback_and_smallgpt_debug_shows_everything(corpus: Path, tmp_path: Path) -> None:
    bug = "import prepare_data\nprepare_data.find_inputs = lambda inputs: None + 1"
    status, lines = run("data/text/prepare.py", "--input", corpus, "--out_dir", tmp_path / "o", pre=bug)
    assert status == 1 and lines[0] == "Traceback (most recent call last):" and lines[-1].startswith("TypeError")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    status, lines = run("data/text/prepare.py", "--input", tmp_path / "latin1.txt", "--out_dir", tmp_path / "o",
                        env={"SMALLGPT_DEBUG": "1"})
    assert status == 1 and lines[0] == "Traceback (most recent call last):" and "not UTF-8 text" in lines[-1]
    # a failure turned into a SystemExit (Python prints those without a traceback): where it came from too
    missing = tmp_path / "missing.txt"
    assert_one_line(run("data/text/prepare.py", "--input", missing, "--out_dir", tmp_path / "o"), "no such file")
    status, lines = run("data/text/prepare.py", "--input", missing, "--out_dir", tmp_path / "o",
                        env={"SMALLGPT_DEBUG": "1"})
    assert status == 1 and lines[0] == "Traceback (most recent call last):", lines
    assert any("in find_inputs" in line for line in lines) and lines[-1].startswith("SystemExit: --input")


def test_messages_of_the_boundary() -> None:
    full = OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(OSError), errors.writing("out/metrics.jsonl"):
        raise full
    assert errors.message(full) == "out/metrics.jsonl: no space left on the device: free some space or write " \
                                   "elsewhere, then run again"
    assert errors.message(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 10 bytes")) \
        .startswith("out of memory (DefaultCPUAllocator")
    assert errors.message(ValueError("two\nlines")) == "two lines"
    assert errors.message(KeyboardInterrupt()) == "interrupted"
    assert errors.message(TypeError("a bug")) is None and errors.message(RuntimeError("a bug")) is None


@pytest.mark.parametrize("moved", [0, 1, 2])
def test_a_swap_killed_half_way_is_undone_by_the_next_run(prepared: Path, corpus: Path, tmp_path: Path,
                                                          moved: int) -> None:
    """kill -9 during the swap's renames: `moved` of the old files are in .old-prepare/ (the old meta.json is there
    first), then, with all moved, one new file already in place. The next run restores the old preparation first;
    one that then fails leaves exactly the old files."""
    import prepare_data

    before = snapshot(prepared)
    backup = prepared / ".old-prepare"
    backup.mkdir()
    os.replace(prepared / "meta.json", backup / "meta.json")
    old = sorted(p for p in prepared.glob("*.bin"))
    for path in old[:moved]:
        os.replace(path, backup / path.name)
    if moved == len(old):  # a new train.bin from the killed run, with another preparation id
        (prepared / old[0].name).write_bytes((backup / old[0].name).read_bytes()[:20] + b"\x07" * 8 +
                                             (backup / old[0].name).read_bytes()[28:])
    with pytest.raises(ValueError):  # a run that fails after its checks: the old preparation is back, unchanged
        with prepare_data.Preparation(prepared):
            raise ValueError("a failing run")
    assert snapshot(prepared) == before and not backup.exists()


# Stops the preparation (SIGSTOP, as Ctrl-Z does) inside its swap, once the first old token file is set aside.
PAUSE_IN_SWAP = """import os, signal
_replace, _paused = os.replace, []
def _pausing(src, dst):
    _replace(src, dst)
    if os.path.basename(os.path.dirname(dst)) == ".old-prepare" and str(dst).endswith(".bin") and not _paused:
        _paused.append(os.kill(os.getpid(), signal.SIGSTOP))
os.replace = _pausing"""


def test_a_preparation_refuses_a_lock_link_and_leaves_its_target(prepared: Path, corpus: Path,
                                                                  tmp_path: Path) -> None:
    user = tmp_path / "notes.txt"
    user.write_bytes(b"my notes\n")
    (prepared / ".lock").symlink_to(user)
    before = snapshot(prepared)
    assert_one_line(run("data/text/prepare.py", "--input", corpus, "--tokenizer=char", "--out_dir", prepared),
                    rf"^{prepared / '.lock'} is a symbolic link")
    assert user.read_bytes() == b"my notes\n" and snapshot(prepared) == before


@pytest.mark.parametrize("then", ["continued", "killed"])
def test_two_preparations_into_one_folder(prepared: Path, corpus: Path, tmp_path: Path, then: str) -> None:
    """The second one refuses, naming the first, while the first is paused half-way through its swap (it used to
    take that for a killed run's and "restore" it, and the two destroyed both preparations). The lock goes with
    the process: after kill -9 the next run may start, and puts the previous preparation back."""
    before = snapshot(prepared)
    (tmp_path / "more.txt").write_text(corpus.read_text() + "\nzebra quiz\n")  # a preparation that differs
    args = ["--input", str(tmp_path / "more.txt"), "--tokenizer=char", "--out_dir", str(prepared)]
    first = subprocess.Popen([sys.executable, "-c", HARNESS.format(repo=str(REPO), pre=PAUSE_IN_SWAP),
                              str(REPO / "data/text/prepare.py"), *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, env=os.environ | {"TQDM_DISABLE": "1"})
    try:
        _, status = os.waitpid(first.pid, os.WUNTRACED)  # returns once it is stopped
        assert os.WIFSTOPPED(status), first.communicate()
        paused = snapshot(prepared)
        assert (prepared / ".old-prepare").is_dir() and not (prepared / "meta.json").exists()
        line = assert_one_line(run("data/text/prepare.py", *args), rf"is being prepared by another process "
                                                                   rf"\(pid {first.pid}\): wait for it")
        assert str(prepared) in line and snapshot(prepared) == paused  # nothing "restored", nothing written
        if then == "continued":
            os.kill(first.pid, signal.SIGCONT)
            assert first.wait(timeout=60) == 0, first.stderr.read()
        else:
            first.kill()
            first.wait(timeout=60)
            assert run("data/text/prepare.py", *args)[0] == 0  # the lock died with it
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    after = snapshot(prepared)
    assert sorted(after) == sorted(before) and after != before  # a complete new preparation, no stray file
    assert "z" in json.loads(after["meta.json"])["tokenizer"]["chars"]
    tokens.load_split(prepared, "train")
