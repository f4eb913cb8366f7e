"""train.py: configuration, exact resume, one process vs two, checkpoints that Hugging Face loads, fine-tuning, and
every fault the loop must survive (signals, kill -9, NaN, out of memory).

    python -m pytest tests/test_train.py

All runs are tiny (2 layers, 32 wide, 16-token windows, fp32 on the CPU) on a synthetic character corpus made here,
so nothing depends on a download. Faults come from monkeypatching GPT.forward in-process, or from signals sent to a
subprocess (in a session of its own, signalled by pid) that holds at a known step until it has handled them: the
tests wait for events, never for a time, so a loaded machine only makes them slower.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import model as model_module
import prepare_data
import runlog
import tokens
import train
from checkpoint import load_model, load_state
from conftest import assert_same_weights, exit_message, gpt2_bpe
from config import field_help, parse_config
from model import GPT, GPTConfig
from train import TrainConfig, learning_rate, main, muon_momentum

REPO = Path(__file__).resolve().parents[1]
ITERS = 80  # the uninterrupted reference run
TINY = ["--device=cpu", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=4",
        "--gradient_accumulation_steps=2", "--dropout=0.1", "--learning_rate=1e-3", "--warmup_iters=5",
        f"--lr_decay_iters={ITERS}", "--eval_interval=20", "--eval_iters=2", "--log_interval=10"]

# nanochat's architecture (with GQA: 1 key/value head for 2 heads), Muon and the WSD schedule
RECIPE = ["--pos_embedding=rope", "--norm=rmsnorm", "--embed_norm=true", "--qk_norm=true", "--mlp=relu2",
          "--bias=false", "--tie_embeddings=false", "--logit_softcap=15", "--zero_init=true", "--n_kv_head=1",
          "--optimizer=muon", "--muon_lr=0.02", "--muon_momentum_warmup=10", "--lr_schedule=wsd", "--cooldown_frac=0.4"]

# Runs train.main in a fresh interpreter whose training forward passes each sleep DELAY seconds. With HOLD_AT set,
# the HOLD_AT-th training forward pass (counted in this process) says "holding" on stderr and waits there until this
# process has handled HOLD_FOR stop signals: a test signals it at a known step however slow the machine is, and a
# signal it sends next still finds it running. HOLD_FOR=0 holds until the process is killed. HOLD_RANK: under torchrun,
# the one rank that holds. DUPLICATE_S: StopSignal's window for a repeated SIGTERM.
SLOW_TRAIN = """
import os, sys, time
sys.path.insert(0, {repo!r})
if "PID_DIR" in os.environ:  # under torchrun: lets a test signal one rank
    with open(os.path.join(os.environ["PID_DIR"], "pid" + os.environ["RANK"]), "w") as f:
        f.write(str(os.getpid()))
import model, runlog
handled, calls = [], [0]
handle = runlog.StopSignal._handle
def counting_handle(self, signum, frame):
    handled.append(signum)
    handle(self, signum, frame)
runlog.StopSignal._handle = counting_handle
runlog.StopSignal.DUPLICATE_S = float(os.environ.get("DUPLICATE_S", runlog.StopSignal.DUPLICATE_S))
hold_at, hold_for = int(os.environ.get("HOLD_AT", 0)), int(os.environ.get("HOLD_FOR", 1))
if os.environ.get("HOLD_RANK", os.environ.get("RANK", "0")) != os.environ.get("RANK", "0"):
    hold_at = 0
forward = model.GPT.forward
def slow_forward(self, *args, **kwargs):
    if self.training:
        calls[0] += 1
        if calls[0] == hold_at:
            os.write(2, b"holding\\n")
            while not hold_for or len(handled) < hold_for:
                time.sleep(0.01)  # a stop handler runs between two of these
        time.sleep({delay})
    return forward(self, *args, **kwargs)
model.GPT.forward = slow_forward
import train
train.main(sys.argv[1:])
"""
HOLD_AT_21 = 41  # the first training forward pass of iteration 21 in one process (2 micro-steps an iteration)
WAIT_S = 900.0  # a guard against a hang, never a measure: the tests wait for events, however loaded the machine


def synthetic_text(n_chars: int, seed: int) -> str:
    """Words with some structure for a model to learn, from a fixed generator: no corpus file needed."""
    words = ("the king and queen of rome", "to be or not to be", "my lord, what news?", "away, away!", "o night",
             "thou art more lovely", "speak again, bright angel", "what light through yonder window breaks")
    rng, parts = random.Random(seed), []
    while sum(map(len, parts)) < n_chars:
        parts.append(rng.choice(words) + rng.choice((" ", "\n", ". ", ", ")))
    return "".join(parts)[:n_chars]


def write_dataset(folder: Path, tokenizer: tokens.Tokenizer, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    ids = np.array(tokenizer.encode(text))
    n = int(len(ids) * 0.9)
    dtype = tokens.token_dtype(tokenizer.vocab_size)
    tokens.write_tokens(folder / "train.bin", ids[:n], dtype)
    tokens.write_tokens(folder / "val.bin", ids[n:], dtype)
    prepare_data.write_meta(folder, prepare_data.dataset_meta(tokenizer, n, len(ids) - n, source="synthetic",
                                                              sha256=None, prepare="tests/test_train.py"))
    return folder


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, and the 2-core test machine is shared. Subprocesses get
    OMP_NUM_THREADS=1 too: runs compared bit for bit must use the same number of threads."""
    threads, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"  # what train.py's default (the idle cores) reads first
    yield
    torch.set_num_threads(threads)
    if env is None:
        del os.environ["OMP_NUM_THREADS"]
    else:
        os.environ["OMP_NUM_THREADS"] = env


@pytest.fixture(scope="module")
def char_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    text = synthetic_text(40_000, seed=0)
    return write_dataset(tmp_path_factory.mktemp("char_data"), tokens.Tokenizer.char("".join(sorted(set(text)))), text)


def run(data: Path, out_dir: Path, *extra: str) -> dict:
    return main([f"--dataset={data}", f"--out_dir={out_dir}", *TINY, *extra])


def weights(out_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(out_dir / "latest" / "model.safetensors")


def iteration(out_dir: Path) -> int:
    return json.loads((out_dir / "latest" / "config.json").read_text())["iter_num"]


def metrics(out_dir: Path) -> list[dict]:
    """metrics.jsonl without the time columns, which differ from run to run."""
    return [{k: v for k, v in json.loads(line).items() if k not in ("elapsed", "tokens_per_sec")}
            for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(char_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run every interrupted or resumed one must reproduce."""
    out_dir = tmp_path_factory.mktemp("reference")
    run(char_data, out_dir, f"--max_iters={ITERS}")
    return out_dir


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen]]:
    """The processes a test starts: each in a session of its own, so that a signal for a process group (a terminal's
    Ctrl-C, a launcher stopping its workers) never crosses between them and pytest, and signalled by pid only; any
    still running when the test ends, failed or not, is killed."""
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def slow_process(children: list[subprocess.Popen], data: Path, out_dir: Path, *extra: str, delay: float = 0.0,
                 hold_at: int = 0, hold_for: int = 1) -> subprocess.Popen:
    code = SLOW_TRAIN.format(repo=str(REPO), delay=delay)
    argv = [f"--dataset={data}", f"--out_dir={out_dir}", *TINY, f"--max_iters={ITERS}", *extra]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HOLD_AT": str(hold_at),
                        "HOLD_FOR": str(hold_for)}
    proc = subprocess.Popen([sys.executable, "-c", code, *argv], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    children.append(proc)
    return proc


def read_until(proc: subprocess.Popen, text: str) -> str:
    """Read proc's stderr up to the line holding text; what was read. Fails (never hangs) if proc ends first."""
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if text in line:
            return "".join(seen)
    proc.wait()
    raise AssertionError(f"the run ended (rc {proc.returncode}) before printing {text!r}: {''.join(seen)[-2000:]}")


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before the condition held: "
                                 f"{proc.stderr.read()[-2000:]}")
        assert time.monotonic() < deadline, f"nothing happened in {timeout} s: a hang?"
        time.sleep(0.005)


def saved_past(out_dir: Path, start: int) -> bool:
    """Whether out_dir's `latest` checkpoint is past iteration start (read while the run may be swapping it)."""
    try:
        return iteration(out_dir) > start
    except (OSError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------------- configuration


def test_help_lists_every_setting(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    shown = capsys.readouterr().out
    for f in dataclasses.fields(TrainConfig):
        assert (f"--{f.name}=" in shown) == f.init  # vocab_size (init=False) is the dataset's, not a setting


def test_every_model_field_is_a_training_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rule, walked over GPTConfig's fields so that a field added to it later is covered: each is a setting of
    train.py (its type, its default, a line of --help) and reaches the model that gpt_config builds."""
    settings = {f.name: f for f in dataclasses.fields(TrainConfig) if f.init}
    helps = field_help(TrainConfig)
    model_fields = [f for f in dataclasses.fields(GPTConfig) if f.name != "vocab_size"]
    for f in model_fields:
        assert f.name in settings and (settings[f.name].type, settings[f.name].default) == (f.type, f.default), f.name
        assert helps.get(f.name), f"{f.name} has no one-line comment for --help"
    # Every field flows into GPTConfig: a distinct object in each (validation off, so any object passes).
    monkeypatch.setattr(GPTConfig, "__post_init__", lambda self: None)
    cfg, marks = TrainConfig(), {f.name: object() for f in model_fields}
    for name, mark in marks.items():
        object.__setattr__(cfg, name, mark)
    built = cfg.gpt_config(vocab_size=7)
    assert type(built) is GPTConfig and built.vocab_size == 7
    assert all(getattr(built, name) is mark for name, mark in marks.items())
    monkeypatch.undo()
    assert "unknown setting 'vocab_size'" in exit_message(main, ["--vocab_size=7"])
    assert parse_config(TrainConfig, ["--n_layer=3", "--qk_norm=true"]).gpt_config(65) == \
        GPTConfig(n_layer=3, qk_norm=True, vocab_size=65)


def test_precedence_cli_over_toml_and_unknown_keys(char_data: Path, tmp_path: Path) -> None:
    toml = tmp_path / "run.toml"
    toml.write_text("max_iters = 7\nweight_decay = 0.05\nmin_lr = 1e-5\n")
    run(char_data, tmp_path / "out", str(toml), "--max_iters=3")
    saved = json.loads((tmp_path / "out" / "latest" / "config.json").read_text())["train"]
    assert saved["max_iters"] == 3  # the command line beats the file
    assert saved["weight_decay"] == 0.05 and saved["min_lr"] == 1e-5  # the file beats the defaults
    assert saved["eval_interval"] == 20 and saved["beta2"] == TrainConfig.beta2
    assert iteration(tmp_path / "out") == 3

    assert "did you mean 'max_iters'" in exit_message(main, [str(toml), "--max_iter=3"])
    toml.write_text("learning_rat = 1e-3\n")
    assert "learning_rat" in exit_message(main, [str(toml)])
    assert "n_head" in exit_message(main, ["--n_embd=30", "--n_head=4"])
    assert "lr_decay_iters" in exit_message(main, ["--warmup_iters=100", "--lr_decay_iters=50"])


def test_errors_before_any_work(char_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "prepare.py" in exit_message(main, [f"--dataset={empty}", f"--out_dir={tmp_path / 'o1'}", *TINY])
    assert "neither a folder" in exit_message(main, ["--dataset=no_such_corpus", f"--out_dir={tmp_path / 'o2'}", *TINY])

    a_file = tmp_path / "a_file"
    a_file.write_text("")
    assert "out_dir" in exit_message(main, [f"--dataset={char_data}", f"--out_dir={a_file / 'sub'}", *TINY])

    # A token id outside meta.json's vocabulary (a file from another tokenizer) is named before training starts.
    bad = tmp_path / "bad_data"
    bad.mkdir()
    for name in ("meta.json", "val.bin"):
        (bad / name).write_bytes((char_data / name).read_bytes())
    ids = np.array(tokens.open_tokens(char_data / "train.bin"))
    ids[100] = 200
    tokens.write_tokens(bad / "train.bin", ids, np.uint16)
    assert "train.bin" in exit_message(main, [f"--dataset={bad}", f"--out_dir={tmp_path / 'o3'}", *TINY])

    # Under torchrun with 2 processes, 3 micro-steps cannot be shared out: refused before the process group starts.
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    message = exit_message(main, [f"--dataset={char_data}", f"--out_dir={tmp_path / 'o4'}", *TINY,
                            "--gradient_accumulation_steps=3"])
    assert "gradient_accumulation_steps" in message and "--gradient_accumulation_steps=2" in message
    assert not (tmp_path / "o4").exists() or not any((tmp_path / "o4").iterdir())


def test_refuses_a_fresh_run_over_a_checkpoint(reference: Path, char_data: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in reference.rglob("*")}
    message = exit_message(main, [f"--dataset={char_data}", f"--out_dir={reference}", *TINY, "--max_iters=5"])
    assert "--init_from=resume" in message and "--out_dir" in message
    assert {p: p.stat().st_mtime_ns for p in reference.rglob("*")} == before  # nothing touched


# ---------------------------------------------------------------------------------------------------- equivalences


def test_resume_is_bit_exact(reference: Path, char_data: Path, tmp_path: Path,
                             capsys: pytest.CaptureFixture) -> None:
    run(char_data, tmp_path, "--max_iters=40")
    assert iteration(tmp_path) == 40
    capsys.readouterr()
    run(char_data, tmp_path, f"--max_iters={ITERS}", "--init_from=resume")
    out = capsys.readouterr().out
    assert "resuming from iteration 40" in out and "continuing at iteration 41" in out
    assert "max_iters 40 -> 80" in out
    assert_same_weights(weights(tmp_path), weights(reference))
    # The optimizer state too: the moments and the step count continue exactly.
    a, b = load_state(tmp_path / "latest"), load_state(reference / "latest")
    for key, state in a["optimizer"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state[name], b["optimizer"]["state"][key][name])
    # metrics.jsonl reads like the uninterrupted run's, apart from the time columns
    assert metrics(tmp_path) == metrics(reference)


def test_resume_uses_the_new_optimizer_settings(char_data: Path, tmp_path: Path) -> None:
    """load_state_dict restores the saved betas and weight decay; a resumed run must use the command line's."""
    run(char_data, tmp_path, "--max_iters=2")
    run(char_data, tmp_path, "--max_iters=3", "--init_from=resume", "--beta2=0.99", "--weight_decay=0.05")
    groups = load_state(tmp_path / "latest")["optimizer"]["param_groups"]  # as the optimizer held them at the save
    assert [tuple(g["betas"]) for g in groups] == [(0.9, 0.99)] * 2
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]  # [decay group, no-decay group]


def test_resume_drops_a_partial_metrics_line(char_data: Path, tmp_path: Path) -> None:
    """kill -9 or a power cut mid-write leaves half a line at the end of metrics.jsonl."""
    run(char_data, tmp_path, "--max_iters=2")
    whole = (tmp_path / "metrics.jsonl").read_text()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"iter": 3, "train_lo')
    run(char_data, tmp_path, "--max_iters=3", "--init_from=resume")
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert "\n".join(lines[:len(whole.splitlines())]) + "\n" == whole
    assert [json.loads(line)["iter"] for line in lines] == [0, 2, 3]


def test_resume_with_nothing_left_to_train_says_so(char_data: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    run(char_data, tmp_path, "--max_iters=2")
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    capsys.readouterr()
    for max_iters in (2, 1):
        with pytest.raises(SystemExit) as e:
            run(char_data, tmp_path, f"--max_iters={max_iters}", "--init_from=resume")
        assert e.value.code == 0
        assert (f"already at iteration 2 >= max_iters={max_iters}: nothing to train; raise --max_iters to continue"
                in capsys.readouterr().out)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before  # no new checkpoint, metrics untouched


def test_two_processes_equal_one_and_stop_together(reference: Path, char_data: Path, tmp_path: Path,
                                                   children: list[subprocess.Popen]) -> None:
    """torchrun --nproc_per_node=2 (gloo, CPU) vs one process with gradient_accumulation_steps=2: the same global
    batch and dropout masks, so the same weights up to float summation order. One launch checks two things: the
    checkpoint at iteration 20 against a one-process run, then a SIGTERM to rank 1 alone, which both ranks must
    honour at the same step (or their collectives would no longer match and the run would hang)."""
    run(char_data, tmp_path / "one", "--max_iters=20")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "slow_train.py"  # torchrun runs a file, not -c
    script.write_text(SLOW_TRAIN.format(repo=str(REPO), delay=0.0))
    out_dir = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           str(script), f"--dataset={char_data}", f"--out_dir={out_dir}", *TINY, f"--max_iters={ITERS}"]
    # Rank 1 holds in iteration 21 (one micro-step a rank) until its SIGTERM; rank 0 waits for it in the all-reduce.
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PID_DIR": str(tmp_path), "HOLD_AT": "21",
                        "HOLD_RANK": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    children.append(proc)
    read_until(proc, "holding")
    wait_for(lambda: (out_dir / "latest").is_symlink(), proc)  # rank 0 saved iteration 20
    os.kill(int((tmp_path / "pid1").read_text()), signal.SIGTERM)
    out, err = proc.communicate(timeout=WAIT_S)
    assert "2 process(es) x 1 micro-steps" in out, err[-3000:]
    assert iteration(out_dir) == 21, err[-3000:]  # both ranks stopped after the step rank 1 was signalled in
    assert "stopped by SIGTERM at iteration 21" in out

    one = weights(tmp_path / "one")
    two = load_file(out_dir / "best" / "model.safetensors")  # iteration 20: the best val loss, so still kept
    assert json.loads((out_dir / "best" / "config.json").read_text())["iter_num"] == 20
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-5)

    # Resumed in one process (the global batch does not depend on the process count), it ends where the
    # uninterrupted one-process run does.
    run(char_data, out_dir, f"--max_iters={ITERS}", "--init_from=resume")
    ref = weights(reference)
    for key, tensor in weights(out_dir).items():
        torch.testing.assert_close(tensor, ref[key], rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- the recipe


@pytest.fixture(scope="module")
def recipe_reference(char_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run with RECIPE."""
    out_dir = tmp_path_factory.mktemp("recipe_reference")
    run(char_data, out_dir, f"--max_iters={ITERS}", *RECIPE)
    return out_dir


def test_recipe_resume_is_bit_exact(recipe_reference: Path, char_data: Path, tmp_path: Path) -> None:
    """Muon's momentum buffers, the AdamW moments and the WSD schedule continue exactly; the checkpoint keeps every
    switch (the resumed model's shape comes from it, not from the command line)."""
    run(char_data, tmp_path, "--max_iters=40", *RECIPE)
    run(char_data, tmp_path, f"--max_iters={ITERS}", "--init_from=resume", *RECIPE)
    assert_same_weights(weights(tmp_path), weights(recipe_reference))
    a, b = load_state(tmp_path / "latest"), load_state(recipe_reference / "latest")
    kinds = set()
    for key, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            other = b["optimizer"]["state"][key][name]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other, name
            kinds.add(name)
    assert kinds == {"momentum_buffer", "exp_avg", "exp_avg_sq", "step"}  # both halves of Muon have state
    assert metrics(tmp_path) == metrics(recipe_reference)
    model, _, config = load_model(recipe_reference)
    assert config["model_type"] == "nanochat"
    assert model.config == parse_config(TrainConfig, [*TINY, *RECIPE]).gpt_config(model.config.vocab_size)


def test_recipe_two_processes_equal_one(recipe_reference: Path, char_data: Path, tmp_path: Path) -> None:
    """torchrun --nproc_per_node=2 (gloo) with Muon: DDP averages the gradients before Muon orthogonalises them, so
    every rank computes the update of the one-process run (up to float summation order)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out_dir = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           str(REPO / "train.py"), f"--dataset={char_data}", f"--out_dir={out_dir}", *TINY, f"--max_iters={ITERS}",
           *RECIPE]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es) x 1 micro-steps" in proc.stdout
    one, two = weights(recipe_reference), weights(out_dir)
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-5)  # equal bit for bit here


def test_wsd_schedule() -> None:
    """Warmup, constant at learning_rate, then linear to min_lr over the last cooldown_frac of lr_decay_iters."""
    cfg = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, lr_decay_iters=100, lr_schedule="wsd",
                      cooldown_frac=0.2)
    cosine = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, lr_decay_iters=100)
    assert [learning_rate(it, cfg) for it in range(10)] == [learning_rate(it, cosine) for it in range(10)]
    assert all(learning_rate(it, cfg) == 1.0 for it in range(10, 81))  # stable until 80 = 100 * (1 - 0.2)
    for it in range(80, 101):
        assert learning_rate(it, cfg) == pytest.approx(1.0 - 0.9 * (it - 80) / 20)
    assert learning_rate(100, cfg) == learning_rate(250, cfg) == 0.1
    whole = TrainConfig(learning_rate=1.0, min_lr=0.0, warmup_iters=10, lr_decay_iters=100, lr_schedule="wsd",
                        cooldown_frac=1.0)  # a cool-down longer than what follows the warmup starts after it
    assert learning_rate(10, whole) == 1.0 and learning_rate(55, whole) == pytest.approx(0.5)
    assert learning_rate(50, TrainConfig(learning_rate=1.0, decay_lr=False, lr_schedule="wsd")) == 1.0


def test_muon_momentum_warms_up() -> None:
    cfg = TrainConfig(muon_momentum=0.95, muon_momentum_warmup=100)
    assert [muon_momentum(it, cfg) for it in (0, 50, 100, 1000)] == pytest.approx([0.85, 0.9, 0.95, 0.95])
    assert muon_momentum(0, TrainConfig(muon_momentum=0.9, muon_momentum_warmup=0)) == 0.9


def test_train_batches_resume_and_split_over_ranks_as_one_stream() -> None:
    """train_batches from iteration 3 yields what the stream from 0 yields there (a resumed run reads what the
    uninterrupted one would), two ranks' micro-steps together are one process's, and each batch is read one ahead."""
    get_batch = train.batch_sampler([np.arange(1000) % 50], block_size=8, batch_size=2, device=torch.device("cpu"))
    reads = []

    def counted(rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        reads.append(rng)
        return get_batch(rng)

    def same(a: tuple, b: tuple) -> bool:  # x, y and the dropout seed
        return torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]

    def take(iter_num: int, micro_steps: range, n: int) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        batches = train.train_batches(counted, 7, iter_num, micro_steps)
        return [next(batches) for _ in range(n)]

    straight = take(0, range(4), 5 * 4)  # 5 iterations of 4 micro-steps
    assert len(reads) == 5 * 4 + 1  # the next batch is already read when one is handed out
    resumed = take(3, range(4), 2 * 4)
    ranks = [take(0, range(rank, 4, 2), 5 * 2) for rank in (0, 1)]
    assert all(same(a, b) for a, b in zip(straight[3 * 4:], resumed))
    assert all(same(straight[4 * i + m], ranks[m % 2][2 * i + m // 2]) for i in range(5) for m in range(4))
    assert not same(straight[0], straight[1]) and straight[0][2] != straight[4][2]  # every micro-step draws anew


def test_resume_with_another_optimizer_is_one_line(recipe_reference: Path, char_data: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in recipe_reference.rglob("*")}
    message = exit_message(main, [f"--dataset={char_data}", f"--out_dir={recipe_reference}", *TINY, *RECIPE,
                            f"--max_iters={ITERS + 10}", "--init_from=resume", "--optimizer=adamw"])
    assert "optimizer=muon" in message and "--optimizer=muon" in message
    assert {p: p.stat().st_mtime_ns for p in recipe_reference.rglob("*")} == before  # nothing touched


def test_eval_only_reproduces_the_recorded_val_loss(reference: Path, char_data: Path) -> None:
    """Evaluations draw the same batches every time, so they are comparable across runs and checkpoints."""
    result = run(char_data, reference, "--init_from=resume", "--eval_only=true", f"--max_iters={ITERS}")
    recorded = json.loads((reference / "latest" / "config.json").read_text())["val_loss"]
    assert result["val_loss"] == pytest.approx(recorded, rel=1e-6)


# ---------------------------------------------------------------------------------------------------- outputs


def test_metrics_and_loss_plot(reference: Path) -> None:
    rows = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    keys = {"iter", "train_loss", "val_loss", "train_bpb", "val_bpb", "lr", "tokens_per_sec", "mfu", "elapsed"}
    assert all(set(row) == keys for row in rows)
    logs = [r for r in rows if r["val_loss"] is None]
    evals = [r for r in rows if r["val_loss"] is not None]
    assert [r["iter"] for r in logs] == list(range(10, ITERS + 1, 10))  # log_interval=10
    assert [r["iter"] for r in evals] == list(range(0, ITERS + 1, 20))  # eval_interval=20, and the start
    assert all(r["tokens_per_sec"] > 0 and r["mfu"] is None for r in logs)  # no MFU without a known peak
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5  # it learned something
    # an ASCII corpus: one byte a char token, so bits per byte is the loss in bits (tests/test_eval.py: other cases)
    assert all(r["val_bpb"] == pytest.approx(r["val_loss"] / math.log(2), rel=1e-5) for r in evals)
    assert [r["elapsed"] for r in rows] == sorted(r["elapsed"] for r in rows)
    assert (reference / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((reference / "latest" / "config.json").read_text())
    assert config["tokenizer"]["kind"] == "char" and config["train"]["dropout"] == 0.1
    assert config["val_loss"] == evals[-1]["val_loss"] and config["iter_num"] == ITERS


@pytest.mark.parametrize("run, hf_class", [("reference", "GPT2LMHeadModel"),
                                           ("recipe_reference", "NanoChatForCausalLM")])  # the modern recipe's
def test_checkpoint_loads_with_transformers(run: str, hf_class: str, request: pytest.FixtureRequest) -> None:
    transformers = pytest.importorskip("transformers")
    out_dir = request.getfixturevalue(run)
    hf = getattr(transformers, hf_class).from_pretrained(out_dir / "latest").eval()
    ours, _, _ = load_model(out_dir)
    idx = torch.randint(0, ours.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours(idx)[0], rtol=1e-5, atol=1e-5)


def test_finetune_from_a_hugging_face_folder(char_data: Path, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    bpe = gpt2_bpe()
    data = write_dataset(tmp_path / "bpe", bpe, synthetic_text(20_000, seed=1))
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=bpe.vocab_size)
    hf_dir = tmp_path / "hf_gpt2"
    transformers.GPT2LMHeadModel(config).save_pretrained(hf_dir, safe_serialization=True)
    hf_weights = load_file(hf_dir / "model.safetensors")

    # max_iters=0: the checkpoint holds GPT-2's weights, with the context cropped from 64 to block_size=16
    args = [f"--dataset={data}", *TINY, f"--init_from={hf_dir}", "--dropout=0.05"]
    main([*args, f"--out_dir={tmp_path / 'zero'}", "--max_iters=0"])
    saved = weights(tmp_path / "zero")
    for key, tensor in saved.items():
        expected = hf_weights["transformer." + key if "transformer." + key in hf_weights else key]
        assert torch.equal(tensor, expected[:16] if key == "wpe.weight" else expected), key
    assert json.loads((tmp_path / "zero" / "latest" / "config.json").read_text())["n_positions"] == 16

    main([*args, f"--out_dir={tmp_path / 'tuned'}", "--max_iters=20", "--eval_interval=20"])
    evals = [json.loads(l)["val_loss"] for l in (tmp_path / "tuned" / "metrics.jsonl").read_text().splitlines()
             if json.loads(l)["val_loss"] is not None]
    assert evals[-1] < evals[0]
    config = json.loads((tmp_path / "tuned" / "latest" / "config.json").read_text())
    assert config["resid_pdrop"] == 0.05 and config["tokenizer"] == bpe.to_meta()

    assert "--block_size=64" in exit_message(main, [*args, f"--out_dir={tmp_path / 'x'}", "--block_size=128"])
    assert "meta.json" in exit_message(main, [f"--dataset={char_data}", *TINY, f"--init_from={hf_dir}",
                                        f"--out_dir={tmp_path / 'y'}"])  # char data for a BPE model


# ---------------------------------------------------------------------------------------------------- faults


def sigint_at_forward(monkeypatch: pytest.MonkeyPatch, n: int, training: bool) -> list[int]:
    """Send this process SIGINT during the n-th (1-based) training or evaluation forward pass; returns the count of
    such passes so far, as a one-element list that keeps counting."""
    forward, calls = GPT.forward, [0]

    def patched(self, *args, **kwargs):
        if self.training == training:
            calls[0] += 1
            if calls[0] == n:  # the handler, called as the signal would call it: no real signal ever reaches pytest
                handler = signal.getsignal(signal.SIGINT)
                assert isinstance(getattr(handler, "__self__", None), runlog.StopSignal), "no stop handler installed"
                handler(signal.SIGINT, None)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(model_module.GPT, "forward", patched)
    return calls


def nan_forward(monkeypatch: pytest.MonkeyPatch, bad_calls: range) -> None:
    """Make the training forward passes numbered bad_calls (0-based, 2 per iteration here) return a NaN loss."""
    forward, calls = GPT.forward, [0]

    def patched(self, idx, targets=None, kv_cache=None):
        logits, loss = forward(self, idx, targets, kv_cache)
        if self.training:
            if calls[0] in bad_calls:
                loss = loss * float("nan")
            calls[0] += 1
        return logits, loss

    monkeypatch.setattr(model_module.GPT, "forward", patched)


def test_nonfinite_steps_are_skipped(char_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture) -> None:
    nan_forward(monkeypatch, range(10, 13))  # iterations 6 and 7 (1-based) see a NaN in one of their micro-steps
    run(char_data, tmp_path, "--max_iters=20")
    assert "update skipped (1 in a row)" in capsys.readouterr().out
    state = load_state(tmp_path / "latest")
    assert state["iter_num"] == 20
    assert all(s["step"].item() == 18 for s in state["optimizer"]["state"].values())  # 2 of 20 updates skipped
    assert all(torch.isfinite(t).all() for t in weights(tmp_path).values())


def test_nonfinite_run_stops_and_keeps_the_last_good_checkpoint(char_data: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    nan_forward(monkeypatch, range(50, 10_000))  # from iteration 26 on
    message = exit_message(main, [f"--dataset={char_data}", f"--out_dir={tmp_path}", *TINY, "--max_iters=40",
                            "--max_skipped_steps=3"])
    assert "3 steps in a row" in message and "iterations 26-28" in message and "ckpt_000020" in message
    assert iteration(tmp_path) == 20 and not (tmp_path / "ckpt_000028").exists()
    load_state(tmp_path / "latest")


def test_nonfinite_gradient_norm_skips_the_update(char_data: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A finite loss with a non-finite gradient (an overflow in backward): iterations 6 and 7 leave the weights as
    they were, and from iteration 26 on the run stops after max_skipped_steps, naming the last (finite) checkpoint."""
    clip, before = torch.nn.utils.clip_grad_norm_, []

    def patched(params, max_norm, *args, **kwargs):
        before.append([p.detach().clone() for p in params])  # the weights before this iteration's update
        norm = clip(params, max_norm, *args, **kwargs)
        return norm * float("nan") if len(before) in (6, 7) or len(before) >= 26 else norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", patched)
    message = exit_message(main, [f"--dataset={char_data}", f"--out_dir={tmp_path}", *TINY, "--max_iters=40",
                            "--max_skipped_steps=3"])
    assert "3 steps in a row" in message and "iterations 26-28" in message and "ckpt_000020" in message
    assert iteration(tmp_path) == 20 and not (tmp_path / "ckpt_000028").exists()
    same = lambda a, b: all(torch.equal(x, y) for x, y in zip(a, b))
    assert same(before[5], before[7])  # the updates of iterations 6 and 7 (before[5], before[6]) were skipped
    assert not same(before[4], before[5]) and not same(before[7], before[8])  # those of 5 and 8 were not
    assert all(s["step"].item() == 18 for s in load_state(tmp_path / "latest")["optimizer"]["state"].values())


def strict_json(line: str) -> dict:
    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")
    return json.loads(line, parse_constant=refuse)


def test_a_diverged_run_stops_and_names_the_last_finite_checkpoint(char_data: Path, tmp_path: Path) -> None:
    """--learning_rate=2e9 (near the top of its range): the first update is finite (weights ~1e9), every later loss
    NaN. The evaluation at 40 sees val loss nan: nothing is saved, `latest` and `best` stay on iteration 20, and
    metrics.jsonl stays JSON."""
    run(char_data, tmp_path, "--max_iters=20")
    message = exit_message(main, [f"--dataset={char_data}", f"--out_dir={tmp_path}", *TINY, "--max_iters=40",
                                  "--init_from=resume", "--learning_rate=2e9", "--max_skipped_steps=100"])
    assert message.startswith("iteration 40: val loss nan, the run diverged") and "\n" not in message
    assert f"The last finite checkpoint: {tmp_path / 'ckpt_000020'}" in message and "good" not in message
    assert [p.name for p in tmp_path.glob("ckpt_*")] == ["ckpt_000020"]
    assert (tmp_path / "latest").resolve() == (tmp_path / "best").resolve() == tmp_path / "ckpt_000020"
    rows = [strict_json(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["iter"] == 40 and rows[-1]["val_loss"] is None  # the diverged evaluation, recorded as null
    assert [r["iter"] for r in rows if r["train_loss"] is None] == [30, 40, 40]  # log_interval=10, and the eval


def test_nonfinite_weights_are_never_saved(reference: Path) -> None:
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=8))
    train.check_finite(model, 1.0, 3, reference)
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("inf")
    with pytest.raises(SystemExit, match=f"iteration 3: the weights are not finite.*{reference / 'ckpt_000080'}"):
        train.check_finite(model, 1.0, 3, reference)


def test_a_second_run_into_one_out_dir_is_refused(char_data: Path, tmp_path: Path,
                                                   children: list[subprocess.Popen]) -> None:
    """Another process holds out_dir's lock: a fresh run and a resume into it are refused in one line naming its
    pid, and leave its files alone; once it is killed with -9, the kernel has released the lock."""
    first = slow_process(children, char_data, tmp_path, hold_at=HOLD_AT_21, hold_for=0)  # holds until killed
    read_until(first, "holding")  # iteration 20 is saved
    argv = [f"--dataset={char_data}", f"--out_dir={tmp_path}", *TINY, f"--max_iters={ITERS}"]
    for extra in ([], ["--init_from=resume"]):
        assert exit_message(main, [*argv, *extra]) == (f"{tmp_path} is in use by another train.py (pid "
                                                       f"{first.pid}): wait for it to end, or pass another --out_dir")
    assert first.poll() is None
    first.kill()
    first.communicate()
    text = (tmp_path / "metrics.jsonl").read_text()
    rows = [json.loads(line) for line in text.splitlines()[:None if text.endswith("\n") else -1]]  # kill -9: a part
    assert [r["iter"] for r in rows if r["val_loss"] is None] == list(range(10, rows[-1]["iter"] + 1, 10))  # one run's
    run(char_data, tmp_path, f"--max_iters={ITERS}", "--init_from=resume")
    assert iteration(tmp_path) == ITERS and not (tmp_path / ".lock").exists()


def test_out_of_memory_says_what_to_change_and_saves_nothing(char_data: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Out of memory in the evaluation at iteration 40, after the checkpoint of iteration 20 was saved: that one is
    left as it is, and no newer or partial one appears."""
    forward, evals = GPT.forward, [0]

    def patched(self, *args, **kwargs):
        if not self.training:
            evals[0] += 1
            if evals[0] > 8:  # the evaluations at iterations 0 and 20 make 4 forward passes each (2 splits x 2)
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(model_module.GPT, "forward", patched)
    message = exit_message(main, [f"--dataset={char_data}", f"--out_dir={tmp_path}", *TINY, "--max_iters=60"])
    assert "--batch_size=2 --gradient_accumulation_steps=4" in message
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("ckpt_", ".tmp"))) == ["ckpt_000020"]
    assert iteration(tmp_path) == 20 and load_state(tmp_path / "latest")["iter_num"] == 20
    load_model(tmp_path)  # whole


def test_sigint_saves_then_resume_matches_the_uninterrupted_run(reference: Path, char_data: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture,
                                                                children: list[subprocess.Popen]) -> None:
    proc = slow_process(children, char_data, tmp_path, hold_at=HOLD_AT_21)
    read_until(proc, "holding")  # in iteration 21, iteration 20 saved
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == 128 + signal.SIGINT, err[-2000:]
    assert iteration(tmp_path) == 21
    assert "stopped by SIGINT at iteration 21" in out and "--init_from=resume" in out
    assert "finishing this step" in err

    capsys.readouterr()
    run(char_data, tmp_path, f"--max_iters={ITERS}", "--init_from=resume")
    assert "resuming from iteration 21" in capsys.readouterr().out
    assert_same_weights(weights(tmp_path), weights(reference))


def test_stop_at_an_evaluation_iteration_evaluates_first(reference: Path, char_data: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A stop signal during iteration 20, which evaluates: the run evaluates and saves before it stops, so the
    resumed run's metrics.jsonl and `best` are the uninterrupted run's (it starts after iteration 20)."""
    sigint_at_forward(monkeypatch, 39, training=True)  # the first micro-step of iteration 20 (2 per iteration)
    with pytest.raises(SystemExit) as e:
        run(char_data, tmp_path, f"--max_iters={ITERS}")
    assert e.value.code == 128 + signal.SIGINT
    assert iteration(tmp_path) == 20
    monkeypatch.undo()
    run(char_data, tmp_path, f"--max_iters={ITERS}", "--init_from=resume")
    assert metrics(tmp_path) == metrics(reference)
    assert (tmp_path / "best").resolve().name == (reference / "best").resolve().name
    assert_same_weights(weights(tmp_path), weights(reference))


def test_sigterm_delivered_twice_at_once_still_saves(char_data: Path, tmp_path: Path,
                                                      children: list[subprocess.Popen],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Under SLURM a preempted worker gets SIGTERM from SLURM and again from torchrun, milliseconds apart: one
    request, not "quit at once". The child holds until it has handled both; its window for a repeat is widened to an
    hour, so that a slow machine between the two sends cannot make the second one "later" (the window itself:
    test_a_later_sigterm_exits_at_once)."""
    monkeypatch.setenv("DUPLICATE_S", "3600")
    proc = slow_process(children, char_data, tmp_path, hold_at=HOLD_AT_21, hold_for=2)
    read_until(proc, "holding")
    proc.send_signal(signal.SIGTERM)
    read_until(proc, "finishing this step")  # handled: Python would merge two pending SIGTERMs into one call
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "exiting now" not in err
    assert iteration(tmp_path) == 21 and "stopped by SIGTERM at iteration 21" in out


def test_second_signal_exits_at_once_and_keeps_the_checkpoint(char_data: Path, tmp_path: Path,
                                                               children: list[subprocess.Popen]) -> None:
    proc = slow_process(children, char_data, tmp_path, hold_at=HOLD_AT_21, hold_for=2)  # holds past the first
    read_until(proc, "holding")
    os.kill(proc.pid, signal.SIGINT)
    os.kill(proc.pid, signal.SIGTERM)  # a different signal, so Python cannot merge the two into one
    _, err = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "SIGTERM again: exiting now" in err
    assert iteration(tmp_path) == 20  # the stop request was not honoured by saving: the process left at once
    model, _, _ = load_model(tmp_path)  # and the checkpoint on disk is whole
    assert load_state(tmp_path / "latest")["iter_num"] == 20
    assert not list(tmp_path.glob(".tmp*"))


def test_a_later_sigterm_exits_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A SIGTERM within DUPLICATE_S of the first is the same request delivered twice (ignored); a later one is a new
    request: exit at once. The handler is called as the signal would call it, on a clock the test moves."""
    now, exits = [100.0], []
    monkeypatch.setattr(runlog, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    monkeypatch.setattr(runlog, "os", types.SimpleNamespace(write=os.write, _exit=exits.append))
    with runlog.StopSignal(verbose=False) as stop:
        stop._handle(signal.SIGTERM, None)
        now[0] += runlog.StopSignal.DUPLICATE_S * 0.9
        stop._handle(signal.SIGTERM, None)
        assert exits == [] and stop.signum == signal.SIGTERM
        now[0] += runlog.StopSignal.DUPLICATE_S * 0.2
        stop._handle(signal.SIGTERM, None)
        assert exits == [128 + signal.SIGTERM]


def test_kill_9_three_times_then_resume_matches_the_uninterrupted_run(reference: Path, char_data: Path,
                                                                      tmp_path: Path,
                                                                      children: list[subprocess.Popen]) -> None:
    """SIGKILL at random-ish moments (mid-step, mid-save), resuming each time from whatever was left. Each run holds
    15 iterations after its own first save (its 69th forward pass), so that a slow test process never finds it done:
    the kill lands anywhere in between, and the runs resume from 20, 40 and 60."""
    rng = random.Random(0)
    resumed_from = []
    for attempt in range(3):
        extra = ["--init_from=resume"] if attempt else []
        start = iteration(tmp_path) if attempt else 0
        proc = slow_process(children, char_data, tmp_path, *extra, delay=0.005, hold_at=69, hold_for=0)
        # Wait until this run has saved a checkpoint of its own, then kill it a little later.
        wait_for(lambda: saved_past(tmp_path, start), proc)
        time.sleep(rng.uniform(0.0, 0.15))
        proc.kill()
        proc.communicate()
        assert proc.returncode == -signal.SIGKILL
        resumed_from.append(iteration(tmp_path))
    assert resumed_from == [20, 40, 60]
    run(char_data, tmp_path, f"--max_iters={ITERS}", "--init_from=resume")
    assert_same_weights(weights(tmp_path), weights(reference))


# ---------------------------------------------------------------------------------------------------- first hour


def test_stop_during_an_evaluation_stops_it_between_batches_and_saves(char_data: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A stop request during the evaluation at iteration 20 ends it at the next batch (not after all of them), and
    the run saves iteration 20 without a val loss and exits as after any stop."""
    # the 2nd batch of the evaluation at iteration 20 (4 batches at iteration 0)
    evals = sigint_at_forward(monkeypatch, 6, training=False)
    with pytest.raises(SystemExit) as e:
        run(char_data, tmp_path, f"--max_iters={ITERS}")
    assert e.value.code == 128 + signal.SIGINT
    assert evals[0] == 6  # no batch after the signal
    assert iteration(tmp_path) == 20
    assert json.loads((tmp_path / "latest" / "config.json").read_text())["val_loss"] is None


def test_stop_during_the_first_evaluation_leaves_nothing(char_data: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    evals = sigint_at_forward(monkeypatch, 1, training=False)
    with pytest.raises(SystemExit) as e:
        run(char_data, tmp_path / "run", f"--max_iters={ITERS}")
    assert e.value.code == 128 + signal.SIGINT
    assert evals[0] == 1 and not (tmp_path / "run").exists()  # no empty metrics.jsonl, no untrained checkpoint


def test_failed_fine_tune_download_is_one_line_and_leaves_no_folders(char_data: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 does, with an empty cache
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    message = exit_message(main, [f"--dataset={char_data}", f"--out_dir={tmp_path / 'run'}", "--init_from=gpt2"])
    assert "could not download gpt2" in message and "pass their folder instead of 'gpt2'" in message
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_run_ends_with_a_summary_and_plain_progress_lines_in_a_log(char_data: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(runlog, "PLAIN_LOG_EVERY", 0.0)  # a line at every log interval
    run(char_data, tmp_path, "--max_iters=40")
    out, err = capsys.readouterr()
    assert "\r" not in err  # pytest's stderr is not a terminal: no bar
    assert [line.split(" (")[0] for line in out.splitlines() if "/40 (" in line] == ["iter 10/40", "iter 20/40",
                                                                                     "iter 30/40", "iter 40/40"]
    best = min(r["val_loss"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
               if r["val_loss"] is not None and r["iter"] > 0)
    assert "done: 40 iterations in " in out and f"best val loss {best:.4f}" in out
    assert f"python sample.py --out_dir={tmp_path}" in out


def test_slow_cpu_run_is_announced(char_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture) -> None:
    run(char_data, tmp_path / "fast", "--max_iters=1")
    assert "warning" not in capsys.readouterr().out
    monkeypatch.setattr(runlog, "matmul_flops_per_sec", lambda: 1e3)  # a CPU a billion times slower
    run(char_data, tmp_path / "slow", "--max_iters=1")
    assert "warning: on this CPU (1 thread(s)) one iteration will take about" in capsys.readouterr().out


def test_training_on_bpe_tokens_needs_no_bpe_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Prepared GPT-2 ids train without tiktoken's BPE files: only encoding and decoding text need them."""
    import tiktoken

    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    bpe = tokens.Tokenizer.tiktoken("gpt2")
    ids = np.random.default_rng(0).integers(0, bpe.vocab_size, 2000)
    data = tmp_path / "bpe"
    data.mkdir()
    tokens.write_tokens(data / "train.bin", ids[:1800], tokens.token_dtype(bpe.vocab_size))
    tokens.write_tokens(data / "val.bin", ids[1800:], tokens.token_dtype(bpe.vocab_size))
    prepare_data.write_meta(data, prepare_data.dataset_meta(bpe, 1800, 200, source="random", sha256=None,
                                                            prepare="test"))
    run(data, tmp_path / "out", "--max_iters=2")
    assert iteration(tmp_path / "out") == 2
    assert all(row["val_bpb"] is None for row in metrics(tmp_path / "out"))  # bits per byte need the BPE's bytes
    with pytest.raises(SystemExit, match="could not load the tiktoken encoding"):
        bpe.decode([1, 2])


def test_second_ctrl_c_ends_the_process_at_once_even_inside_a_long_op(char_data: Path, tmp_path: Path,
                                                                       children: list[subprocess.Popen]) -> None:
    """After a first SIGINT, a second one takes the default action: no Python handler has to wait for the op (here
    the child's hold, which a handler would never end)."""
    proc = slow_process(children, char_data, tmp_path, hold_at=HOLD_AT_21, hold_for=2)
    read_until(proc, "holding")
    proc.send_signal(signal.SIGINT)
    read_until(proc, "finishing this step")  # handled: Python would merge two pending SIGINTs into one call
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=WAIT_S)
    assert proc.returncode == -signal.SIGINT  # ended by the signal itself, not by a handler (a shell shows 130)
    load_model(tmp_path)  # the checkpoint on disk is whole


def test_resume_uses_the_runs_own_thread_count(char_data, tmp_path, monkeypatch):
    """CPU sums depend on the thread count, so a resume with threads unset keeps the count the run was saved with."""
    monkeypatch.delenv("OMP_NUM_THREADS")
    args = [f"--dataset={char_data}", f"--out_dir={tmp_path}", "--device=cpu", "--compile=false", "--batch_size=2",
            "--block_size=16", "--n_layer=1", "--n_head=2", "--n_embd=16", "--eval_iters=1", "--eval_interval=2",
            "--log_interval=1", "--warmup_iters=0"]
    main(args + ["--max_iters=2", "--threads=3"])
    torch.set_num_threads(1)
    main(args + ["--max_iters=4", "--init_from=resume"])
    assert torch.get_num_threads() == 3
    state = torch.load(tmp_path / "latest" / "state.pt", weights_only=True)
    assert state["threads"] == 3
    torch.set_num_threads(1)
    main(args + ["--max_iters=6", "--init_from=resume", "--threads=1"])  # an explicit setting wins
    assert torch.get_num_threads() == 1


def test_logged_speed_leaves_out_each_processs_first_iteration(char_data, tmp_path):
    """The first iteration of a process compiles (on a GPU, tens of seconds): counted, it would make the logged
    tokens/s and MFU far too low for many lines after it. A resumed process leaves out its own first one too."""
    run(char_data, tmp_path, "--max_iters=3", "--log_interval=1", "--eval_interval=3")
    run(char_data, tmp_path, "--max_iters=5", "--log_interval=1", "--eval_interval=3", "--init_from=resume")
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logs = {r["iter"]: r["tokens_per_sec"] for r in rows if r["val_loss"] is None}
    assert [i for i, speed in logs.items() if speed is None] == [1, 4]
    assert all(speed > 0 for i, speed in logs.items() if i not in (1, 4))
