"""Tokenizers, the token-file format and its readers: what train.py, sample.py, checkpoint.py and attention.py need.

    tok = Tokenizer.from_meta(load_meta("data/shakespeare_char")["tokenizer"])
    train_files = load_split(Path("data/shakespeare_char"), "train")      # memory-mapped, headers checked
    data = load_dataset("shakespeare_char")    # meta.json, tokenizer and both splits, checked to fit each other

Writing datasets (the shard writer, the tokenize-and-shard pipeline, downloads) is prepare_data.py's, which only
data/*/prepare.py import. See docs/data.md for every corpus.

Token file format, used for every file (train.bin, val.bin and shards alike): 256 little-endian int32 (1024 bytes)
    [0] MAGIC = 20251123   [1] VERSION = 1   [2:4] token count as one little-endian int64   [4] bytes per token (2|4)
    [5:7] the preparation's id as an int64, also in meta.json (0: none)
    the rest zero; then the tokens, little-endian uint16 or uint32. (llm.c's .bin files use the same idea.)
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

import errors

if TYPE_CHECKING:
    import tiktoken

REPO = Path(__file__).resolve().parent

# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer


# (vocab_size, end-of-text id) of tiktoken encodings, from tiktoken_ext/openai_public.py: known without the BPE files
_TIKTOKEN_SIZES = {"gpt2": (50257, 50256), "r50k_base": (50257, 50256), "p50k_base": (50281, 50256)}


class Tokenizer:
    """A char-level table or a tiktoken encoding, rebuilt from the dict `to_meta()` returns.

    tiktoken encodes with `encode_ordinary`: an "<|endoftext|>" written inside a document is plain text, never the
    end-of-text token, so no document can forge a document boundary.
    """

    def __init__(self, kind: str, chars: str | None = None, encoding: str | None = None):
        # use Tokenizer.char(...) / Tokenizer.tiktoken(...) / Tokenizer.from_meta(...)
        self.kind = kind
        if kind == "char":
            assert chars is not None
            if len(set(chars)) != len(chars):
                dup = next(c for c, n in Counter(chars).items() if n > 1)  # linear: tables can be a million long
                raise ValueError(f"char table lists {dup!r} twice: each character must appear once")
            self.chars = chars
            self.vocab_size = len(chars)
            self.eot_token: int | None = None  # a char vocabulary has no end-of-text symbol
            # vectorised encode: look up code points in a sorted array instead of a Python dict per character
            cps = np.array([ord(c) for c in chars], dtype=np.uint32)
            order = np.argsort(cps)
            self._sorted_cps = cps[order]
            self._sorted_ids = order.astype(np.int64)
        elif kind == "tiktoken":
            assert encoding is not None
            self.encoding = encoding
            self._loaded = None
            # Training on prepared ids needs only the sizes: the BPE files are loaded at the first encode or decode.
            self.vocab_size, self.eot_token = _TIKTOKEN_SIZES.get(encoding) or (self._enc.n_vocab, self._enc.eot_token)
        else:
            raise ValueError(f"unknown tokenizer kind {kind!r}: expected 'char' or 'tiktoken'")

    @property
    def _enc(self) -> tiktoken.Encoding:
        """The tiktoken encoding, loaded on first use (tiktoken fetches its BPE files over the network once)."""
        if self._loaded is None:
            import tiktoken  # lazily: importing tokens.py for the file format should not need it

            try:
                self._loaded = tiktoken.get_encoding(self.encoding)
            except ValueError:
                raise ValueError(
                    f"unknown tiktoken encoding {self.encoding!r}: use one of {tiktoken.list_encoding_names()}"
                ) from None
            except Exception as e:
                raise SystemExit(
                    f"could not load the tiktoken encoding {self.encoding!r} ({type(e).__name__}): offline? set "
                    f"TIKTOKEN_CACHE_DIR to a folder holding its BPE files, or run once with network access"
                ) from None
        return self._loaded

    @property
    def tiktoken_encoding(self) -> tiktoken.Encoding:
        """The tiktoken Encoding behind a BPE tokenizer (its ranks and pattern: hf.py writes them as files)."""
        assert self.kind == "tiktoken", "a char tokenizer has no tiktoken encoding"
        return self._enc

    @classmethod
    def char(cls, chars: str) -> Tokenizer:
        """Character-level tokenizer: token i is chars[i]."""
        return cls("char", chars=chars)

    @classmethod
    def tiktoken(cls, name: str) -> Tokenizer:
        """A tiktoken encoding by name, e.g. "gpt2" (50,257 tokens, end-of-text = 50256)."""
        return cls("tiktoken", encoding=name)

    @classmethod
    def from_meta(cls, tokenizer_dict: dict) -> Tokenizer:
        """Rebuild from meta.json's (or a checkpoint config's) "tokenizer" object."""
        if not isinstance(tokenizer_dict, dict) or "kind" not in tokenizer_dict:
            hint = " (pass meta['tokenizer'], not the whole meta)" if isinstance(tokenizer_dict, dict) else ""
            raise ValueError(f"a tokenizer dict needs a 'kind' key, got {tokenizer_dict!r:.80}{hint}")
        kind = tokenizer_dict["kind"]
        if kind == "char":
            if not isinstance(tokenizer_dict.get("chars"), str):
                raise ValueError("a char tokenizer dict needs 'chars': the string of its symbols in id order")
            return cls.char(tokenizer_dict["chars"])
        if kind == "tiktoken":
            if not isinstance(tokenizer_dict.get("encoding"), str):
                raise ValueError("a tiktoken tokenizer dict needs 'encoding', e.g. {'kind': 'tiktoken', 'encoding': 'gpt2'}")
            return cls.tiktoken(tokenizer_dict["encoding"])
        raise ValueError(f"unknown tokenizer kind {kind!r}: expected 'char' or 'tiktoken'")

    def to_meta(self) -> dict:
        if self.kind == "char":
            return {"kind": "char", "chars": self.chars}
        return {"kind": "tiktoken", "encoding": self.encoding}

    def encode(self, text: str, special: bool = False) -> list[int]:
        """special: "<|endoftext|>" in text is the end-of-text token, as Hugging Face's and vLLM's tokenizers read it
        (lm-eval's tokenizers); otherwise plain text (see the class docstring)."""
        if special and self.kind == "tiktoken":
            return self._enc.encode(text, allowed_special="all")
        return self._encode_array(text).tolist()

    def encode_batch(self, texts: list[str], num_threads: int | None = None) -> list[list[int]]:
        """Encode many texts; tiktoken's Rust core releases the GIL, so its threads use all cores."""
        if self.kind == "tiktoken":
            return self._enc.encode_ordinary_batch(texts, num_threads=num_threads or cpu_count())
        return [self.encode(t) for t in texts]

    def decode(self, ids: list[int] | np.ndarray) -> str:
        if isinstance(ids, np.ndarray):
            ids = ids.tolist()
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):  # e.g. a model whose embedding is padded past the vocabulary (50304 > 50257) sampled a padding id
            raise ValueError(
                f"token id {next(i for i in ids if not 0 <= i < self.vocab_size)} is outside this {self.kind} vocabulary of {self.vocab_size} tokens: mask the "
                f"logits beyond vocab_size before sampling"
            )
        if self.kind == "char":
            return "".join([self.chars[i] for i in ids])
        return self._enc.decode(ids)

    @property
    def prefix_token(self) -> int:
        """The token a document's first token is predicted from (lm-eval's prefix): end-of-text; a char vocabulary,
        which has none, uses its newline (what its documents and paragraphs follow), else its first symbol."""
        if self.eot_token is not None:
            return self.eot_token
        return self.chars.index("\n") if "\n" in self.chars else 0

    def offsets(self, ids: list[int]) -> list[int]:
        """Where each token's text starts in decode(ids), in characters (a token that starts inside a character:
        that character's offset)."""
        if self.kind == "char":
            return list(range(len(ids)))
        return self._enc.decode_with_offsets(ids)[1]

    def token_byte_lengths(self) -> np.ndarray:
        """UTF-8 bytes of text each token id stands for (0 for special tokens such as end-of-text), (vocab_size,):
        summed over the tokens of a text, its UTF-8 length, the denominator of bits per byte."""
        if self.kind == "char":
            return np.array([len(c.encode("utf-8")) for c in self.chars], dtype=np.int64)
        special = {self._enc.encode_single_token(s) for s in self._enc.special_tokens_set}
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        for i in range(self.vocab_size):
            if i not in special:
                try:
                    lengths[i] = len(self._enc.decode_single_token_bytes(i))
                except KeyError:  # an unused id inside the range (some encodings have gaps)
                    pass
        return lengths

    def _encode_array(self, text: str) -> np.ndarray:
        if self.kind == "tiktoken":
            if hasattr(self._enc, "encode_to_numpy"):  # tiktoken >= 0.8: no Python list, less time holding the GIL
                # disallowed_special=() with no allowed specials encodes exactly as encode_ordinary
                return self._enc.encode_to_numpy(text, disallowed_special=())
            return np.array(self._enc.encode_ordinary(text), dtype=np.uint32)
        cps = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
        pos = np.minimum(np.searchsorted(self._sorted_cps, cps), len(self._sorted_cps) - 1)
        bad = self._sorted_cps[pos] != cps
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(
                f"character {text[i]!r} (U+{ord(text[i]):04X}) at position {i} is not in this char vocabulary of "
                f"{self.vocab_size} symbols: a char tokenizer only knows the characters of the corpus it was built "
                f"from; use only those"
            )
        return self._sorted_ids[pos]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tokenizer) and self.to_meta() == other.to_meta()

    def __repr__(self) -> str:
        what = f"encoding={self.encoding!r}" if self.kind == "tiktoken" else f"chars={self.chars[:20]!r}..."
        return f"Tokenizer(kind={self.kind!r}, {what}, vocab_size={self.vocab_size})"


def padded_vocab_size(vocab_size: int, char: bool) -> int:
    """The model's vocabulary for a tokenizer's: BPE rounds up to a multiple of 64 (GPT-2's 50257 to 50304: faster
    matmuls, as nanoGPT; the extra logits learn to be never predicted), a char vocabulary stays exact."""
    return vocab_size if char else -(-vocab_size // 64) * 64


def cpu_count() -> int:
    """Cores this process may run on (a container's limit, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


# ----------------------------------------------------------------------------------------------------------------------
# Token files

MAGIC = 20251123
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id (0 .. vocab_size-1) fits in 16 bits, else uint32; always little-endian on disk."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def _prepare_hint(dataset_dir: Path) -> str:
    """The command that (re)creates a dataset folder: its meta.json's record, else the script named like it."""
    try:
        recorded = json.loads((dataset_dir / "meta.json").read_text())["prepare"]
        if isinstance(recorded, str):
            return recorded
    except (OSError, ValueError, KeyError, TypeError):
        pass
    script = REPO / "data" / dataset_dir.name / "prepare.py"
    if script.is_file():
        same = dataset_dir.resolve() == script.parent
        return f"python data/{dataset_dir.name}/prepare.py" + ("" if same else f" --out_dir={dataset_dir}")
    return f"python data/text/prepare.py --input=YOUR_FILES --out_dir={dataset_dir}"


def write_tokens(path: Path, tokens: np.ndarray, dtype: np.dtype | str) -> None:
    """Write one token file (header + tokens) atomically: a reader never sees a half-written file."""
    path = Path(path)
    dtype = np.dtype(dtype).newbyteorder("<")
    if dtype.itemsize not in (2, 4) or dtype.kind != "u":
        raise ValueError(f"token files hold uint16 or uint32, not {dtype}: use token_dtype(vocab_size)")
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 1 << (8 * dtype.itemsize)):
        raise ValueError(
            f"{path.name}: token ids span {tokens.min()}..{tokens.max()}, which {dtype.name} cannot hold: "
            f"pass token_dtype(vocab_size)"
        )
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[4] = MAGIC, VERSION, dtype.itemsize
    header[2:4].view("<i8")[0] = tokens.size
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with errors.writing(tmp), open(tmp, "wb") as f:
            f.write(header.tobytes())
            f.write(tokens.astype(dtype, copy=False).tobytes())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def open_tokens(path: Path, preparation: int | None = None) -> np.memmap:
    """Memory-map a token file after checking its header against its size; refuses foreign or truncated files, and
    with `preparation`, a file whose header carries another preparation's id."""
    path = Path(path)
    size = path.stat().st_size
    redo = f"re-run {_prepare_hint(path.parent)}"
    if size < HEADER_BYTES:
        raise ValueError(f"{path}: {size} bytes, too short for the {HEADER_BYTES}-byte token file header: {redo}")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != MAGIC:
        raise ValueError(
            f"{path}: not a token file of this project (magic {header[0]}, expected {MAGIC}); nanoGPT's raw .bin "
            f"files have no header: {redo}"
        )
    if header[1] != VERSION:
        raise ValueError(f"{path}: token file version {header[1]}, this code reads version {VERSION}: {redo}")
    itemsize = int(header[4])
    if itemsize not in (2, 4):
        raise ValueError(f"{path}: header says {itemsize} bytes per token, expected 2 or 4: {redo}")
    count = int(header[2:4].view("<i8")[0])
    expected = HEADER_BYTES + count * itemsize
    if size != expected:
        raise ValueError(
            f"{path}: header says {count:,} tokens ({expected:,} bytes) but the file has {size:,} bytes "
            f"(truncated or interrupted copy?): {redo}"
        )
    if preparation is not None and int(header[5:7].view("<i8")[0]) != preparation:
        raise ValueError(f"{path} is not from the preparation that {path.parent / 'meta.json'} describes (a mix of "
                         f"two runs, or a file copied in from elsewhere): {redo}")
    dtype = np.dtype("<u2") if itemsize == 2 else np.dtype("<u4")
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(count,))


def split_files(dataset_dir: Path, split: str) -> tuple[Path | None, list[Path]]:
    """The token files of one split in a folder: `{split}.bin` (or None), and the shards `{split}_NNNNNN.bin`."""
    single = dataset_dir / f"{split}.bin"
    pattern = re.compile(rf"{re.escape(split)}_\d{{6}}\.bin")
    shards = sorted(p for p in dataset_dir.glob(f"{split}_*.bin") if pattern.fullmatch(p.name))
    return (single if single.is_file() else None), shards


def load_split(dataset_dir: Path, split: str) -> list[np.memmap]:
    """The token files of one split: `{split}.bin`, or the shards `{split}_000000.bin`, ... in order."""
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise ValueError(f"dataset folder {dataset_dir} does not exist: prepare it with {_prepare_hint(dataset_dir)}")
    single, shards = split_files(dataset_dir, split)
    if single and shards:
        raise ValueError(
            f"{dataset_dir} holds both {single.name} and {len(shards)} {split}_*.bin shards from different runs: "
            f"delete them and re-run {_prepare_hint(dataset_dir)}"
        )
    if not single and not shards:
        try:
            empty = json.loads((dataset_dir / "meta.json").read_text()).get(f"{split}_tokens") == 0
        except (OSError, ValueError):
            empty = False
        why = "was prepared with an empty split (e.g. --val_fraction=0)" if empty else "has no token files"
        raise ValueError(
            f"{dataset_dir} {why}: no {split}.bin or {split}_*.bin; prepare it with {_prepare_hint(dataset_dir)}"
        )
    try:  # the preparation id every file must carry; None for folders prepared before ids (and without meta.json)
        recorded = json.loads((dataset_dir / "meta.json").read_text(encoding="utf-8")).get("preparation")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if recorded is not None and not (isinstance(recorded, str) and re.fullmatch(r"[0-9a-f]{16}", recorded)):
        raise ValueError(f"{dataset_dir / 'meta.json'}: \"preparation\" is {recorded!r}, not the 16 hex digits a "
                         f"preparer writes: re-run {_prepare_hint(dataset_dir)}")
    expected = None if recorded is None else int(recorded, 16)
    files = [single] if single else shards
    _allow_open_files(len(files), dataset_dir)
    return [open_tokens(p, expected) for p in files]


def _allow_open_files(n: int, dataset_dir: Path) -> None:
    """Make room for n more open files (a memory-mapped file keeps its own descriptor): raise this process's soft
    limit up to the hard one where needed (Linux starts at 1024, macOS at 256); SystemExit if that is not enough."""
    try:
        import resource
    except ImportError:  # not a POSIX system
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    open_now = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 256  # elsewhere: a guess
    need = open_now + n + 64
    if soft == resource.RLIM_INFINITY or need <= soft:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    except (ValueError, OSError):  # above the hard limit
        raise SystemExit(f"{dataset_dir} has {n:,} token files in one split, more than this process may open "
                         f"(ulimit -n {soft}, at most {hard}): prepare it again with a larger --shard_size") from None


def resolve_dataset(name: str) -> Path:
    """A `dataset` setting as a folder: a path as given, else data/<name> of this repository."""
    if Path(name).is_dir():
        return Path(name)
    if (REPO / "data" / name).is_dir():
        return REPO / "data" / name
    known = sorted(p.parent.name for p in (REPO / "data").glob("*/prepare.py"))
    raise SystemExit(f"dataset={name!r} is neither a folder nor one of data/{{{','.join(known)}}}: pass the folder "
                     f"of a prepared dataset or one of those names")


def load_meta(dataset_dir: Path) -> dict:
    """meta.json of a prepared dataset: the tokenizer, vocab size, dtype, token counts and the source."""
    path = Path(dataset_dir) / "meta.json"
    if not path.is_file():
        raise ValueError(
            f"{path} not found: the dataset is not prepared (or its preparation was interrupted); "
            f"run {_prepare_hint(Path(dataset_dir))}"
        )
    try:
        meta = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e}): re-run {_prepare_hint(Path(dataset_dir))}") from None
    if not isinstance(meta, dict) or "tokenizer" not in meta:
        raise ValueError(
            f"{path} has no 'tokenizer' entry (a nanoGPT meta.pkl-era folder?): re-run {_prepare_hint(Path(dataset_dir))}"
        )
    return meta


@dataclass
class Dataset:
    """A prepared dataset, as train.py trains on it: its folder, meta.json, tokenizer, and the token files of each
    split."""
    dir: Path
    meta: dict
    tokenizer: Tokenizer
    splits: dict[str, list[np.memmap]]

    def byte_lengths(self, verbose: bool) -> np.ndarray | None:
        """UTF-8 bytes of each token id, for bits per byte (nats / ln 2 / bytes of the targets: comparable across
        tokenizers); None, said when verbose, when the BPE's files cannot be loaded (offline)."""
        try:
            return self.tokenizer.token_byte_lengths()
        except SystemExit as e:
            if verbose:
                print(f"no bits per byte in this run: {e}")
            return None

    def check_fits(self, vocab_size: int, block_size: int) -> None:
        """SystemExit unless a model of this vocab_size and block_size can train on it."""
        if vocab_size < self.tokenizer.vocab_size:
            raise SystemExit(f"{self.dir / 'meta.json'} has {self.tokenizer.vocab_size} tokens but the model only "
                             f"{vocab_size}: the dataset does not fit this model")
        for split, files in self.splits.items():
            if max(len(f) for f in files) <= block_size:
                raise SystemExit(f"the {split} split of {self.dir} has no file longer than block_size={block_size} "
                                 f"tokens: lower --block_size or prepare more data")


def load_dataset(name: str) -> Dataset:
    """The `dataset` setting's meta.json, tokenizer and train and val token files, checked to fit each other;
    SystemExit naming the file and the prepare.py command to run when they do not."""
    data_dir = resolve_dataset(name)
    try:
        meta = load_meta(data_dir)
        try:
            tokenizer = Tokenizer.from_meta(meta["tokenizer"])
        except ValueError as e:
            raise ValueError(f"{data_dir / 'meta.json'}: bad \"tokenizer\" entry: {e}") from None
        splits = {split: load_split(data_dir, split) for split in ("train", "val")}
    except ValueError as e:
        raise SystemExit(str(e)) from None
    for files in splits.values():  # a token id past the vocabulary would index outside the embedding table
        for f in files:
            if len(f) and int(f.max()) >= tokenizer.vocab_size:
                raise SystemExit(f"{f.filename}: token id {int(f.max())} >= the vocabulary size "
                                 f"{tokenizer.vocab_size} of {data_dir / 'meta.json'}: the file does not belong to "
                                 f"this dataset; prepare it again")
    return Dataset(data_dir, meta, tokenizer, splits)
