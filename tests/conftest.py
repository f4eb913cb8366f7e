"""Shared pytest fixtures: local copies of the public corpora and tiktoken's GPT-2 files.

CI sets SMALLGPT_DATA_DIR and TIKTOKEN_CACHE_DIR (see .ci/run); in a developer checkout the `../shared` folder
beside the repository is used when it exists. Tests that need a corpus skip when neither is there.
"""

import functools
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the flat top-level modules (model.py, train.py, ...) import without installing

_shared = REPO.parent / "shared"
if "TIKTOKEN_CACHE_DIR" not in os.environ and (_shared / "tiktoken_cache").is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(_shared / "tiktoken_cache")


from model import GPT, GPTConfig  # noqa: E402  (after the path is set)

TINY = dict(block_size=32, vocab_size=97, n_layer=2, n_head=4, n_embd=32)  # the tiny model's GPTConfig
BPE_PROBE_S = 15  # seconds the GPT-2 BPE probe may wait for a download
CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"  # Tiny Shakespeare's 65 symbols
TINY_CHARS = CHARS + "".join(chr(0x3b1 + i) for i in range(TINY["vocab_size"] - len(CHARS)))  # one per tiny id


def tiny_model(seed: int = 0, **overrides: object) -> GPT:
    """A GPT of TINY (| overrides) in eval mode, its weights drawn from seed."""
    torch.manual_seed(seed)
    return GPT(GPTConfig(**TINY | overrides)).eval()


@pytest.fixture(autouse=True)
def _float32_matmul_precision():
    """bench.main and train.main turn TF32 on for their process: a test after them must still compare in fp32."""
    precision, cudnn = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    yield
    torch.set_float32_matmul_precision(precision)
    torch.backends.cudnn.allow_tf32 = cudnn


def same_weights(a: GPT | dict, b: GPT | dict) -> bool:
    a, b = (x.state_dict() if isinstance(x, torch.nn.Module) else x for x in (a, b))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def assert_same_weights(a: GPT | dict, b: GPT | dict) -> None:
    """Models or state dicts with the same keys and bit-identical tensors; names the first that differs."""
    a, b = (x.state_dict() if isinstance(x, torch.nn.Module) else x for x in (a, b))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs by {(a[key] - b[key]).abs().max().item()}"


def exit_message(main: Callable, *args: object) -> str:
    """The message of the SystemExit that main(*args) raises, checked to be one line (a user's error)."""
    with pytest.raises(SystemExit) as e:
        main(*args)
    assert isinstance(e.value.code, str) and "\n" not in e.value.code, "user errors are one line, no traceback"
    return e.value.code


def _data_dir() -> Path | None:
    env = os.environ.get("SMALLGPT_DATA_DIR")
    if env:
        return Path(env)
    if (_shared / "data").is_dir():
        return _shared / "data"
    return None


def corpus(name: str) -> Path:
    """Path of a local corpus file (tinyshakespeare.txt, sotu.txt, kjv.txt), or skip the test."""
    d = _data_dir()
    if d is None or not (d / name).is_file():
        pytest.skip(f"{name} not found: set SMALLGPT_DATA_DIR to a folder holding it")
    return d / name


@pytest.fixture
def shakespeare_path() -> Path:
    return corpus("tinyshakespeare.txt")


@pytest.fixture
def repo() -> Path:
    return REPO


@functools.cache
def _gpt2_bpe_missing() -> str | None:
    """Why tiktoken's GPT-2 BPE files cannot be had here, or None; probed once, in a child process with a time limit,
    since tiktoken's download has none (an offline machine may fail at once or wait on the network)."""
    probe = "import tiktoken; tiktoken.get_encoding('gpt2')"
    try:
        r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=BPE_PROBE_S)
    except subprocess.TimeoutExpired:
        why = f"not cached, and no download within {BPE_PROBE_S} s"
    else:
        if r.returncode == 0:
            return None
        why = (r.stderr.strip().splitlines() or ["?"])[-1].split(":")[0].rsplit(".")[-1] + ": offline?"
    return f"tiktoken's GPT-2 BPE files cannot be loaded ({why}): set TIKTOKEN_CACHE_DIR to a folder holding them"


def gpt2_bpe():
    """tiktoken's GPT-2 BPE, loaded, or skip the test when its files cannot be had (offline, no TIKTOKEN_CACHE_DIR).
    Call it first in every test that needs them, directly or through the code under test."""
    from tokens import Tokenizer

    if reason := _gpt2_bpe_missing():
        pytest.skip(reason)
    tokenizer = Tokenizer.tiktoken("gpt2")
    tokenizer.encode("x")  # the files load lazily, at the first encode
    return tokenizer


class FakeHub:
    """huggingface_hub.hf_hub_download without the network: serves the files of `repos[repo_id]` (a local folder)
    from a snapshot folder, as the real cache lays them out, and records every (repo_id, filename) asked for."""

    def __init__(self, root: Path) -> None:
        self.root, self.repos, self.calls = root, {}, []
        self.error: Exception | None = None  # raised instead of serving, as a failed download would

    def hf_hub_download(self, repo_id: str, filename: str, **kwargs) -> str:
        self.calls.append((repo_id, filename))
        if self.error is not None:
            raise self.error
        snapshot = self.root / repo_id / "snapshots" / "0123abc"
        snapshot.mkdir(parents=True, exist_ok=True)
        (snapshot / filename).write_bytes((self.repos[repo_id] / filename).read_bytes())
        return str(snapshot / filename)


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeHub:
    huggingface_hub = pytest.importorskip("huggingface_hub")
    hub = FakeHub(tmp_path / "hub-cache")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub.hf_hub_download)
    return hub
