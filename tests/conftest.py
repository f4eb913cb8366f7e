"""Shared pytest fixtures: local copies of the public corpora and tiktoken's GPT-2 files.

CI sets SMALLGPT_DATA_DIR and TIKTOKEN_CACHE_DIR (see .ci/run); in a developer checkout the `../shared` folder
beside the repository is used when it exists. Tests that need a corpus skip when neither is there.
"""

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the flat top-level modules (model.py, train.py, ...) import without installing

_shared = REPO.parent / "shared"
if "TIKTOKEN_CACHE_DIR" not in os.environ and (_shared / "tiktoken_cache").is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(_shared / "tiktoken_cache")


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


def gpt2_bpe():
    """tiktoken's GPT-2 BPE, or skip the test when its files cannot be had (offline, no TIKTOKEN_CACHE_DIR)."""
    from tokens import Tokenizer

    try:
        return Tokenizer.tiktoken("gpt2")
    except SystemExit as e:  # tokens.py's one-line "could not load the tiktoken encoding" message
        pytest.skip(str(e))
