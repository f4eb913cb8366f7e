"""data/*/prepare.py: round trips, split sizes, meta.json, shards and their checks, offline behaviour.

    python -m pytest -q tests/test_data.py

Everything is written under tmp_path; the web-scale preparers run on local files (their --input path).
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tokens
from conftest import REPO, corpus, gpt2_bpe

EOT = "<|endoftext|>"


def script(name: str):
    """Import data/<name>/prepare.py as a module, to call its main(argv) in-process."""
    spec = importlib.util.spec_from_file_location(f"prepare_{name}", REPO / "data" / name / "prepare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_split(out_dir: Path, split: str) -> np.ndarray:
    return np.concatenate(tokens.load_split(out_dir, split))


@pytest.fixture(scope="module")
def gpt2() -> tokens.Tokenizer:
    return gpt2_bpe()


@pytest.fixture
def small_docs(tmp_path: Path) -> list[Path]:
    """Slices of sotu.txt and kjv.txt (~100 KB each, cut at a line end) and a .jsonl of three documents."""
    src = tmp_path / "src"
    src.mkdir()
    sotu = corpus("sotu.txt").read_text()[:120_000]
    kjv = corpus("kjv.txt").read_text()[:80_000]
    (src / "a_sotu.txt").write_text(sotu[: sotu.rindex("\n") + 1])
    (src / "b_kjv.txt").write_text(kjv[: kjv.rindex("\n") + 1])
    docs = [{"text": "First document.\n", "id": 1}, {"text": "Second, with <|endoftext|> inside.", "id": 2},
            {"text": "Third: ünïcødé ✓", "id": 3}]
    (src / "c_docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    return sorted(src.iterdir())


def documents(files: list[Path]) -> list[str]:
    out = []
    for f in files:
        if f.suffix == ".jsonl":
            out += [json.loads(line)["text"] for line in f.read_text().splitlines()]
        else:
            out.append(f.read_text())
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Tiny Shakespeare


def test_shakespeare_char(tmp_path: Path, shakespeare_path: Path) -> None:
    meta = script("shakespeare_char").main(["--input", str(shakespeare_path), "--out_dir", str(tmp_path)])
    text = shakespeare_path.read_text()
    train, val = read_split(tmp_path, "train"), read_split(tmp_path, "val")
    assert (len(train), len(val)) == (1_003_854, 111_540)  # nanoGPT's split of the 1,115,394 characters
    assert train.dtype == np.uint16
    saved = tokens.load_meta(tmp_path)
    assert saved == json.loads(json.dumps(meta))
    assert saved["vocab_size"] == 65 and saved["tokenizer"]["kind"] == "char"
    assert saved["tokenizer"]["chars"] == "".join(sorted(set(text)))
    assert (saved["train_tokens"], saved["val_tokens"], saved["dtype"]) == (1_003_854, 111_540, "uint16")
    assert saved["sha256"] == "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
    assert saved["source"] == str(shakespeare_path)
    assert saved["files"] == {"train": ["train.bin"], "val": ["val.bin"]}
    tok = tokens.Tokenizer.from_meta(saved["tokenizer"])
    assert tok.decode(train) + tok.decode(val) == text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json", "train.bin", "val.bin"]


def test_shakespeare_bpe(tmp_path: Path, shakespeare_path: Path, gpt2: tokens.Tokenizer) -> None:
    script("shakespeare").main(["--input", str(shakespeare_path), "--out_dir", str(tmp_path)])
    text = shakespeare_path.read_text()
    train, val = read_split(tmp_path, "train"), read_split(tmp_path, "val")
    assert (len(train), len(val)) == (301_966, 36_059)  # the counts nanoGPT's README reports
    meta = tokens.load_meta(tmp_path)
    assert meta["tokenizer"] == {"kind": "tiktoken", "encoding": "gpt2"}
    assert (meta["vocab_size"], meta["dtype"], meta["train_tokens"], meta["val_tokens"]) == (50257, "uint16", 301_966, 36_059)
    n = int(len(text) * 0.9)
    assert gpt2.decode(train) == text[:n] and gpt2.decode(val) == text[n:]
    assert gpt2.eot_token not in train  # one document: nothing to separate


def test_prepare_offline_without_input_fails_in_one_line(tmp_path: Path) -> None:
    env = dict(os.environ, https_proxy="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9", no_proxy="", NO_PROXY="")
    for name in ("shakespeare_char", "shakespeare"):
        r = subprocess.run(
            [sys.executable, str(REPO / "data" / name / "prepare.py"), "--out_dir", str(tmp_path / name)],
            capture_output=True, text=True, env=env, timeout=120,
        )
        assert r.returncode == 1
        assert "Traceback" not in r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1, r.stderr
        assert "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt" in lines[0]
        assert "--input" in lines[0]
        assert not (tmp_path / name / "input.txt").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Any user corpus: data/text


def test_text_char_reproduces_shakespeare_char(tmp_path: Path, shakespeare_path: Path) -> None:
    script("shakespeare_char").main(["--input", str(shakespeare_path), "--out_dir", str(tmp_path / "a")])
    script("text").main(["--input", str(shakespeare_path), "--tokenizer=char", "--out_dir", str(tmp_path / "b")])
    for split in ("train", "val"):  # the same tokens (the headers differ only in the preparation id)
        assert np.array_equal(read_split(tmp_path / "a", split), read_split(tmp_path / "b", split))
    assert tokens.load_meta(tmp_path / "a")["tokenizer"] == tokens.load_meta(tmp_path / "b")["tokenizer"]


def test_text_gpt2_on_files_and_a_folder(tmp_path: Path, small_docs: list[Path], gpt2: tokens.Tokenizer) -> None:
    out = tmp_path / "out"
    meta = script("text").main(["--input", str(small_docs[0].parent), "--out_dir", str(out), "--num_threads=2"])
    docs = documents(small_docs)
    train, val = read_split(out, "train"), read_split(out, "val")
    # train then val is the whole corpus, documents separated by end-of-text (and never preceded by one)
    assert gpt2.decode(np.concatenate([train, val])) == EOT.join(docs)
    assert np.count_nonzero(np.concatenate([train, val]) == gpt2.eot_token) == len(docs) - 1 == 4
    # the split: the first 90% of the source bytes are train; the piece holding the boundary is cut in proportion
    # to its tokens, so the cut lands within a fraction of a percent of the byte
    total = sum(f.stat().st_size for f in small_docs)
    train_bytes = len(gpt2.decode(train).encode()) - len(EOT) * np.count_nonzero(train == gpt2.eot_token)
    assert abs(train_bytes - int(0.9 * total)) < 0.005 * total
    assert meta["source"] == [str(f) for f in small_docs]
    assert meta["sha256"] == {str(f): tokens.file_sha256(f) for f in small_docs}
    assert (meta["documents"], meta["train_tokens"], meta["val_tokens"]) == (5, len(train), len(val))
    assert meta["files"] == {"train": ["train.bin"], "val": ["val.bin"]}
    assert "data/text/prepare.py --input" in meta["prepare"]


def test_text_shards_large_corpora(tmp_path: Path, small_docs: list[Path], gpt2: tokens.Tokenizer) -> None:
    out = tmp_path / "out"
    args = [a for f in small_docs[:2] for a in ("--input", str(f))]  # repeated --input keeps its order
    script("text").main(args + ["--out_dir", str(out), "--shard_size=10000", "--val_fraction=0.2"])
    meta = tokens.load_meta(out)
    assert meta["files"]["train"][:2] == ["train_000000.bin", "train_000001.bin"]
    train, val = tokens.load_split(out, "train"), tokens.load_split(out, "val")
    assert all(len(s) == 10_000 for s in train[:-1] + val[:-1]) and len(train) > 3
    assert sum(map(len, train)) == meta["train_tokens"] and sum(map(len, val)) == meta["val_tokens"]
    assert gpt2.decode(np.concatenate(train + val)) == EOT.join(documents(small_docs[:2]))
    assert 0.15 < meta["val_tokens"] / (meta["train_tokens"] + meta["val_tokens"]) < 0.25

    # a re-run with a larger shard size replaces the shards instead of mixing with them
    script("text").main(args + ["--out_dir", str(out), "--val_fraction=0.2"])
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]


def test_text_char_on_several_documents(tmp_path: Path, small_docs: list[Path]) -> None:
    script("text").main(["--input", str(small_docs[0].parent), "--tokenizer=char", "--out_dir", str(tmp_path / "o")])
    meta = tokens.load_meta(tmp_path / "o")
    tok = tokens.Tokenizer.from_meta(meta["tokenizer"])
    text = "".join(documents(small_docs))  # no end-of-text symbol in a char vocabulary
    assert tok.vocab_size == len(set(text)) and "✓" in tok.chars
    assert tok.decode(read_split(tmp_path / "o", "train")) + tok.decode(read_split(tmp_path / "o", "val")) == text


def test_text_input_errors(tmp_path: Path) -> None:
    gpt2_bpe()  # the code under test loads GPT-2's BPE: skip without its files
    prepare = script("text").main
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt: not UTF-8 text .*iconv"):
        prepare(["--input", str(tmp_path / "latin1.txt"), "--out_dir", str(tmp_path / "o")])
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: no string field 'text' \(found \['body'\]\).*--text_field"):
        prepare(["--input", str(tmp_path / "bad.jsonl"), "--out_dir", str(tmp_path / "o")])
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(SystemExit, match=r"x.csv: unsupported file type .csv"):
        prepare(["--input", str(tmp_path / "x.csv"), "--out_dir", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="no such file or folder"):
        prepare(["--input", str(tmp_path / "missing.txt"), "--out_dir", str(tmp_path / "o")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="holds no"):
        prepare(["--input", str(tmp_path / "empty"), "--out_dir", str(tmp_path / "o")])


def test_text_field_option_and_parquet(tmp_path: Path, gpt2: tokens.Tokenizer) -> None:
    (tmp_path / "d.jsonl").write_text('{"body": "alpha beta"}\n{"body": "gamma"}\n')
    script("text").main(["--input", str(tmp_path / "d.jsonl"), "--text_field=body", "--out_dir", str(tmp_path / "o")])
    both = np.concatenate([read_split(tmp_path / "o", "train"), read_split(tmp_path / "o", "val")])
    assert gpt2.decode(both) == "alpha beta" + EOT + "gamma"
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["alpha beta", "gamma"]}), tmp_path / "d.parquet")
    # the split counts the parquet file's (mostly metadata) bytes: 0.99 leaves a few text bytes in train
    script("text").main(["--input", str(tmp_path / "d.parquet"), "--out_dir", str(tmp_path / "p"), "--val_fraction=0.99"])
    both = np.concatenate([read_split(tmp_path / "p", "train"), read_split(tmp_path / "p", "val")])
    assert gpt2.decode(both) == "alpha beta" + EOT + "gamma"


# ---------------------------------------------------------------------------------------------------------------------
# Web scale: fineweb and openwebtext, offline on local files


def test_fineweb_shards_from_a_local_file(tmp_path: Path, small_docs: list[Path], gpt2: tokens.Tokenizer) -> None:
    out = tmp_path / "fw"
    meta = script("fineweb").main(["--input", str(small_docs[0].parent), "--out_dir", str(out), "--shard_size=10000"])
    assert meta["files"]["val"] == ["val.bin"]  # the first shard's worth of tokens, as llm.c
    assert meta["files"]["train"][0] == "train_000000.bin"
    val, train = tokens.load_split(out, "val"), tokens.load_split(out, "train")
    assert len(val[0]) == 10_000 and all(len(s) == 10_000 for s in train[:-1])
    assert gpt2.decode(np.concatenate(val + train)) == EOT.join(documents(small_docs))
    assert meta["sha256"] == {str(f): tokens.file_sha256(f) for f in small_docs}

    # the header check refuses a truncated shard and names it
    shard = out / "train_000001.bin"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"train_000001.bin: header says 10,000 tokens.*data/fineweb/prepare.py"):
        tokens.load_split(out, "train")


def test_openwebtext_from_a_local_file(tmp_path: Path, small_docs: list[Path], gpt2: tokens.Tokenizer) -> None:
    out = tmp_path / "owt"
    meta = script("openwebtext").main(
        ["--input", str(small_docs[2]), "--input", str(small_docs[1]), "--out_dir", str(out), "--val_tokens=500"]
    )
    val, train = read_split(out, "val"), read_split(out, "train")
    assert len(val) == 500 and meta["val_tokens"] == 500
    assert gpt2.decode(np.concatenate([val, train])) == EOT.join(documents([small_docs[2], small_docs[1]]))


def test_web_corpora_without_datasets_fail_cleanly_and_touch_nothing(tmp_path: Path, monkeypatch) -> None:
    gpt2_bpe()  # the code under test loads GPT-2's BPE: skip without its files
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if `pip install -e '.[web]'` had not been run
    tokens.write_tokens(tmp_path / "train.bin", np.arange(10), np.uint16)
    for name in ("fineweb", "openwebtext"):
        with pytest.raises(SystemExit, match=r"pip install -e '\.\[web\]'.*--input"):
            script(name).main(["--out_dir", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.bin"]
