"""tokens.py: tokenizers, the token file format and its checks, the downloader, piecewise tokenization.

    python -m pytest -q tests/test_tokens.py
"""

import json
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import prepare_data
import tokens
from conftest import corpus, gpt2_bpe


@pytest.fixture(scope="module")
def gpt2() -> tokens.Tokenizer:
    return gpt2_bpe()


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer


def test_char_tokenizer_round_trip_and_meta() -> None:
    tok = tokens.Tokenizer.char("\n !abc")
    ids = tok.encode("abc cab!\n")
    assert ids == [3, 4, 5, 1, 5, 3, 4, 2, 0]
    assert tok.decode(ids) == "abc cab!\n"
    assert tok.decode(np.array(ids, dtype=np.uint16)) == "abc cab!\n"
    assert (tok.kind, tok.vocab_size, tok.eot_token) == ("char", 6, None)
    assert tok.to_meta() == {"kind": "char", "chars": "\n !abc"}
    assert tokens.Tokenizer.from_meta(json.loads(json.dumps(tok.to_meta()))) == tok


def test_char_tokenizer_ids_follow_the_table_order_not_code_points() -> None:
    tok = tokens.Tokenizer.char("zéa")  # unsorted and non-ASCII: ids are positions in the table
    assert tok.encode("aéz") == [2, 1, 0]
    assert tok.decode([2, 1, 0]) == "aéz"


def test_char_tokenizer_names_the_unknown_character() -> None:
    tok = tokens.Tokenizer.char("abc")
    with pytest.raises(ValueError, match=r"'é' \(U\+00E9\) at position 2"):
        tok.encode("abé")
    with pytest.raises(ValueError, match="twice"):
        tokens.Tokenizer.char("abca")


def test_gpt2_tokenizer(gpt2: tokens.Tokenizer) -> None:
    assert (gpt2.kind, gpt2.vocab_size, gpt2.eot_token) == ("tiktoken", 50257, 50256)
    assert gpt2.encode("Hello world") == [15496, 995]  # GPT-2's published ids
    text = "First Citizen:\nBefore we proceed any further, hear me speak.  Ünïcødé ✓\n\n"
    assert gpt2.decode(gpt2.encode(text)) == text
    assert gpt2.to_meta() == {"kind": "tiktoken", "encoding": "gpt2"}
    assert tokens.Tokenizer.from_meta({"kind": "tiktoken", "encoding": "gpt2"}) == gpt2


def test_end_of_text_written_in_a_document_is_plain_text(gpt2: tokens.Tokenizer) -> None:
    ids = gpt2.encode("a<|endoftext|>b")
    assert gpt2.eot_token not in ids
    assert gpt2.decode(ids) == "a<|endoftext|>b"


def test_decode_names_an_id_outside_the_vocabulary(gpt2: tokens.Tokenizer) -> None:
    with pytest.raises(ValueError, match="token id 50300 is outside this tiktoken vocabulary of 50257"):
        gpt2.decode([15496, 50300])
    with pytest.raises(ValueError, match="token id 3 is outside this char vocabulary of 3"):
        tokens.Tokenizer.char("abc").decode([0, 3])


def test_encode_batch_equals_encode(gpt2: tokens.Tokenizer) -> None:
    texts = ["one", "two words", "", "three\nlines\n", "x" * 1000]
    assert gpt2.encode_batch(texts, num_threads=2) == [gpt2.encode(t) for t in texts]
    char = tokens.Tokenizer.char("".join(sorted(set("".join(texts)))))
    assert char.encode_batch(texts[:4]) == [char.encode(t) for t in texts[:4]]


def test_from_meta_errors_say_what_is_expected() -> None:
    with pytest.raises(ValueError, match="expected 'char' or 'tiktoken'"):
        tokens.Tokenizer.from_meta({"kind": "sentencepiece"})
    with pytest.raises(ValueError, match="meta\\['tokenizer'\\]"):
        tokens.Tokenizer.from_meta({"vocab_size": 65, "tokenizer": {"kind": "char", "chars": "ab"}})
    with pytest.raises(ValueError, match="'chars'"):
        tokens.Tokenizer.from_meta({"kind": "char"})
    with pytest.raises(ValueError, match="unknown tiktoken encoding 'gpt3'"):
        tokens.Tokenizer.tiktoken("gpt3")


def test_token_dtype_widens_past_16_bits() -> None:
    assert tokens.token_dtype(65) == np.uint16
    assert tokens.token_dtype(50257) == np.uint16
    assert tokens.token_dtype(65536) == np.uint16  # ids 0..65535 still fit
    assert tokens.token_dtype(65537) == np.uint32
    assert tokens.token_dtype(100277) == np.uint32  # cl100k_base


# ---------------------------------------------------------------------------------------------------------------------
# Token files


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_write_and_open_round_trip(tmp_path: Path, dtype: str) -> None:
    data = np.array([0, 1, 65535, 7, 42], dtype=dtype)
    if dtype == "uint32":
        data[2] = 100_000
    tokens.write_tokens(tmp_path / "train.bin", data, dtype)
    m = tokens.open_tokens(tmp_path / "train.bin")
    assert m.dtype == np.dtype(dtype) and np.array_equal(m, data)
    header = np.fromfile(tmp_path / "train.bin", dtype="<i4", count=256)
    assert list(header[:5]) == [tokens.MAGIC, 1, 5, 0, np.dtype(dtype).itemsize]
    assert not header[5:].any()
    assert (tmp_path / "train.bin").stat().st_size == 1024 + 5 * np.dtype(dtype).itemsize
    assert list(tmp_path.iterdir()) == [tmp_path / "train.bin"]  # no temp file left behind


def test_empty_token_file(tmp_path: Path) -> None:
    tokens.write_tokens(tmp_path / "val.bin", np.zeros(0, dtype=np.uint16), np.uint16)
    assert len(tokens.open_tokens(tmp_path / "val.bin")) == 0


def test_write_refuses_ids_that_do_not_fit(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="token_dtype"):
        tokens.write_tokens(tmp_path / "x.bin", np.array([1, 70000]), np.uint16)
    with pytest.raises(ValueError, match="uint16 or uint32"):
        tokens.write_tokens(tmp_path / "x.bin", np.array([1]), np.int64)


def _write(tmp_path: Path, n: int = 100) -> Path:
    path = tmp_path / "train.bin"
    tokens.write_tokens(path, np.arange(n) % 50257, np.uint16)
    return path


def test_open_refuses_a_truncated_file(tmp_path: Path) -> None:
    path = _write(tmp_path)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(ValueError, match=r"train\.bin: header says 100 tokens .*truncated"):
        tokens.open_tokens(path)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(ValueError, match="too short"):
        tokens.open_tokens(path)


def test_open_refuses_extra_bytes(tmp_path: Path) -> None:
    path = _write(tmp_path)
    path.write_bytes(path.read_bytes() + b"\0\0")
    with pytest.raises(ValueError, match="header says 100 tokens"):
        tokens.open_tokens(path)


def test_open_refuses_a_wrong_magic(tmp_path: Path) -> None:
    path = tmp_path / "train.bin"
    np.arange(5000, dtype=np.uint16).tofile(path)  # a nanoGPT-style raw file: no header
    with pytest.raises(ValueError, match=r"train\.bin: not a token file .*magic") as e:
        tokens.open_tokens(path)
    assert "prepare.py" in str(e.value)


def test_open_refuses_a_wrong_version_or_width(tmp_path: Path) -> None:
    path = _write(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[4:8] = np.int32(2).tobytes()
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="version 2"):
        tokens.open_tokens(path)
    raw[4:8] = np.int32(1).tobytes()
    raw[16:20] = np.int32(3).tobytes()
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="3 bytes per token"):
        tokens.open_tokens(path)


def test_token_count_is_64_bit(tmp_path: Path) -> None:
    path = _write(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[8:16] = np.int64((1 << 32) + 100).tobytes()  # slots 2 and 3 hold one int64
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="4,294,967,396 tokens"):
        tokens.open_tokens(path)


def test_shard_writer_sizes_names_and_content(tmp_path: Path) -> None:
    data = np.arange(25_500) % 50257
    with prepare_data.ShardWriter(tmp_path, "train", np.uint16, shard_size=10_000) as w:
        for chunk in np.array_split(data, 37):  # chunks that straddle shard boundaries
            w.write(chunk)
    assert [p.name for p in w.files] == ["train_000000.bin", "train_000001.bin", "train_000002.bin"]
    shards = tokens.load_split(tmp_path, "train")
    assert [len(s) for s in shards] == [10_000, 10_000, 5_500]
    assert np.array_equal(np.concatenate(shards), data)


def test_shard_writer_single_shard_is_nanogpt_layout_and_clears_old_files(tmp_path: Path) -> None:
    with prepare_data.ShardWriter(tmp_path, "val", np.uint16, shard_size=10) as w:
        w.write(np.arange(25))
    with prepare_data.ShardWriter(tmp_path, "val", np.uint16, shard_size=10) as w:
        w.write(np.arange(10))  # exactly one full shard: still the single-file name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["val.bin"]
    with prepare_data.ShardWriter(tmp_path, "val", np.uint16, shard_size=10) as w:
        w.write(np.arange(11))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["val_000000.bin", "val_000001.bin"]


def test_shards_are_bounded_and_loading_makes_room_for_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each memory-mapped shard keeps a file open: a split of 20,000 shards ended train.py with "Too many open
    files". A preparation stops at MAX_SHARDS a split; loading raises the soft limit where the hard one allows."""
    import resource

    monkeypatch.setattr(prepare_data, "MAX_SHARDS", 3)
    with pytest.raises(ValueError, match="--shard_size=10 makes more than 3 train files"):
        with prepare_data.ShardWriter(tmp_path, "train", np.uint16, shard_size=10) as w:
            w.write(np.arange(31))
    with prepare_data.ShardWriter(tmp_path, "train", np.uint16, shard_size=10) as w:
        w.write(np.arange(30))  # exactly three
    limits = []
    monkeypatch.setattr(resource, "setrlimit", lambda which, value: limits.append(value))
    monkeypatch.setattr(resource, "getrlimit", lambda which: (2, 100_000))
    assert len(tokens.load_split(tmp_path, "train")) == 3
    assert limits and limits[-1][0] > 3 and limits[-1][1] == 100_000

    def refuse(which: int, value: tuple[int, int]) -> None:
        raise ValueError("not allowed")

    monkeypatch.setattr(resource, "setrlimit", refuse)
    with pytest.raises(SystemExit, match="3 token files in one split, more than this process may open"):
        tokens.load_split(tmp_path, "train")


def test_shard_writer_refuses_ids_too_wide(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="do not fit uint16"):
        prepare_data.ShardWriter(tmp_path, "train", np.uint16, 10).write(np.array([70_000]))


def test_load_split_and_meta_errors_name_the_folder_and_the_script(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"does not exist: prepare it with python data/text/prepare.py"):
        tokens.load_split(tmp_path / "nowhere", "train")
    with pytest.raises(ValueError, match=rf"{tmp_path} has no token files.*prepare.py"):
        tokens.load_split(tmp_path, "train")
    with pytest.raises(ValueError, match=r"meta.json not found.*prepare.py"):
        tokens.load_meta(tmp_path)
    (tmp_path / "meta.json").write_text('{"vocab_size": 65}')
    with pytest.raises(ValueError, match="no 'tokenizer' entry"):
        tokens.load_meta(tmp_path)
    shakespeare = tokens.REPO / "data" / "shakespeare_char"
    if not (shakespeare / "train.bin").exists():
        with pytest.raises(ValueError, match="python data/shakespeare_char/prepare.py"):
            tokens.load_split(shakespeare, "train")


def test_load_split_refuses_mixed_layouts(tmp_path: Path) -> None:
    tokens.write_tokens(tmp_path / "train.bin", np.arange(5), np.uint16)
    tokens.write_tokens(tmp_path / "train_000000.bin", np.arange(5), np.uint16)
    with pytest.raises(ValueError, match="both train.bin and 1 train_"):
        tokens.load_split(tmp_path, "train")


# ---------------------------------------------------------------------------------------------------------------------
# Downloads


def test_download_verifies_caches_and_is_atomic(tmp_path: Path, shakespeare_path: Path, monkeypatch) -> None:
    sha = prepare_data.file_sha256(shakespeare_path)
    dest = tmp_path / "input.txt"
    assert prepare_data.download(shakespeare_path.as_uri(), dest, sha) == dest
    assert dest.read_bytes() == shakespeare_path.read_bytes()

    def no_network(*args, **kwargs):
        raise AssertionError("a cached file with the right hash must not be downloaded again")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    prepare_data.download(shakespeare_path.as_uri(), dest, sha)
    monkeypatch.undo()

    dest.write_text("corrupted")  # a bad cached copy is fetched again
    prepare_data.download(shakespeare_path.as_uri(), dest, sha)
    assert prepare_data.file_sha256(dest) == sha

    with pytest.raises(SystemExit, match="expected 0000"):
        prepare_data.download(shakespeare_path.as_uri(), tmp_path / "other.txt", "0000")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input.txt"]  # neither the bad file nor a .part remains


def test_download_offline_is_one_line_naming_url_and_flag(tmp_path: Path, monkeypatch) -> None:
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    url = "http://127.0.0.1:9/input.txt"  # the discard port: connection refused at once
    with pytest.raises(SystemExit) as e:
        prepare_data.download(url, tmp_path / "input.txt", None)
    msg = str(e.value)
    assert url in msg and "--input" in msg and "\n" not in msg
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------------------------------
# Piecewise tokenization: bounded memory must not change the tokens


def test_pieces_tokenize_exactly_like_the_whole_text(gpt2: tokens.Tokenizer, tmp_path: Path) -> None:
    text = corpus("sotu.txt").read_text()[:200_000]
    text += "\n\n  tricky   spacing\t\tand\n\n\nnewlines  \n x ünïcødé 123 456's we'll " * 50
    path = tmp_path / "doc.txt"
    path.write_text(text)
    pieces = list(prepare_data.iter_files([path], {}, piece_chars=1000))
    assert len(pieces) > 200 and max(len(p[0]) for p in pieces) <= 1000
    assert [p[1] for p in pieces] == [True] + [False] * (len(pieces) - 1)
    assert sum(p[2] for p in pieces) == path.stat().st_size
    assert "".join(p[0] for p in pieces) == text
    assert sum((gpt2.encode(p[0]) for p in pieces), []) == gpt2.encode(text)


def test_safe_cut_falls_back_when_there_is_no_space() -> None:
    assert prepare_data._safe_cut("x" * 50, 20) == 20
    assert prepare_data._safe_cut("ab cd\nef gh", 8) == 5  # a newline is preferred over a later space
    assert prepare_data._safe_cut("ab  cd", 5) == 5  # two spaces are not a safe point


def test_training_and_sampling_do_not_import_the_preparation_machinery() -> None:
    import subprocess
    import sys
    code = ("import sys, train, sample, attention, checkpoint; "
            "print(sorted(m for m in ('prepare_data', 'huggingface_hub') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(tokens.__file__).parent, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]"
