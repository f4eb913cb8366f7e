"""Dataset preparation, shared by data/*/prepare.py (and only imported by them): the shard writer, the meta.json
writer, a preparation as a transaction, the corpus downloader, and the streaming tokenize-and-shard pipeline.

    python data/shakespeare_char/prepare.py      # one of the scripts that use this module; see docs/data.md

Tokenizer and token_dtype are imported from tokens.py here, so that a script needs this module only.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import hashlib
import http.client
import json
import os
import shlex
import shutil
import sys
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

import errors
from tokens import HEADER_BYTES, MAGIC, VERSION, Tokenizer, cpu_count, split_files, token_dtype, write_tokens  # noqa: F401

DEFAULT_SHARD_SIZE = 100_000_000  # tokens per shard: 200 MB of uint16, as llm.c's FineWeb shards
MAX_SHARDS = 1000  # files per split (FineWeb-Edu's 100BT in default shards): train.py keeps every one open


class ShardWriter:
    """Streams tokens of one split into files of `shard_size` tokens: `{split}_000000.bin`, `{split}_000001.bin`, ...

    A split that fits in one shard is written as `{split}.bin`, nanoGPT's layout. Memory: one shard's buffer.
    Old files of the same split in `out_dir` are removed first, so a re-run never mixes two preparations.
    """

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype | str, shard_size: int = DEFAULT_SHARD_SIZE):
        if shard_size < 1:
            raise ValueError(f"shard_size must be a positive number of tokens, got {shard_size}")
        self.out_dir, self.split, self.dtype, self.shard_size = Path(out_dir), split, np.dtype(dtype), shard_size
        self.out_dir.mkdir(parents=True, exist_ok=True)
        single, shards = split_files(self.out_dir, split)
        for old in ([single] if single else []) + shards:
            old.unlink()
        self._buf = np.empty(shard_size, dtype=self.dtype)  # pages are only touched as tokens arrive
        self._fill = 0
        self.files: list[Path] = []
        self.tokens = 0

    def write(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= 1 << (8 * self.dtype.itemsize)):
            raise ValueError(f"{self.split}: token ids {tokens.min()}..{tokens.max()} do not fit {self.dtype.name}")
        self.tokens += tokens.size
        while tokens.size:
            if self._fill == self.shard_size:  # flush lazily: only now do we know the split needs another shard
                self._flush()
            take = min(tokens.size, self.shard_size - self._fill)
            self._buf[self._fill : self._fill + take] = tokens[:take]
            self._fill += take
            tokens = tokens[take:]

    def _flush(self, last: bool = False) -> None:
        if len(self.files) == MAX_SHARDS:
            raise ValueError(f"--shard_size={self.shard_size} makes more than {MAX_SHARDS:,} {self.split} files, "
                             f"which train.py would all keep open: use a larger --shard_size")
        name = f"{self.split}.bin" if last and not self.files else f"{self.split}_{len(self.files):06d}.bin"
        write_tokens(self.out_dir / name, self._buf[: self._fill], self.dtype)
        self.files.append(self.out_dir / name)
        self._fill = 0

    def close(self) -> list[Path]:
        """Write the last (partial) shard; returns every file written. An empty split writes no file."""
        if self._fill:
            self._flush(last=True)
        return self.files

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:  # after an error the folder has no meta.json, so loaders refuse it anyway
            self.close()


def dataset_meta(
    tokenizer: Tokenizer, train_tokens: int, val_tokens: int, source: str | list[str], sha256: str | dict | None,
    prepare: str, **extra: object,
) -> dict:
    """The meta.json every preparer writes; `extra` adds corpus-specific entries (files, split rule, ...)."""
    return {
        "tokenizer": tokenizer.to_meta(),
        "vocab_size": tokenizer.vocab_size,
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "train_tokens": int(train_tokens),
        "val_tokens": int(val_tokens),
        "source": source,
        "sha256": sha256,
        "prepare": prepare,
        "format": {"magic": MAGIC, "version": VERSION, "header_bytes": HEADER_BYTES},
        **extra,
    }


def write_meta(out_dir: Path, meta: dict) -> Path:
    """Written last and atomically: a folder with meta.json is a complete preparation."""
    path = Path(out_dir) / "meta.json"
    tmp = path.with_name(".meta.json.tmp")
    try:
        with errors.writing(tmp):
            tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


class Preparation:
    """One preparation of a dataset folder, as a transaction: the new token files are written into a hidden folder
    inside out_dir and moved into place only when all are complete, meta.json last. A failed, interrupted or killed
    run leaves the previous preparation as it was: during the swap the old files wait in .old-prepare/, so a kill in
    those milliseconds leaves the folder without meta.json (unprepared, never a mix) and the next run puts the old
    preparation back before it starts. Every token file's header carries the id that meta.json records, and
    load_split refuses a file with another id. A second preparation of the folder meanwhile is refused: out_dir/.lock
    is held (errors.lock) from __enter__ to __exit__.

        with Preparation(out_dir) as prep:           # checks out_dir before anything is written
            with ShardWriter(prep.dir, "train", dtype) as w: ...
            prep.commit(meta)                         # refuses an empty split; then swaps the files in
    """

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        if os.path.lexists(self.out_dir) and not self.out_dir.is_dir():  # a file, or a link that loops or leads nowhere
            what = "is a file" if self.out_dir.is_file() else f"is {errors.not_a_file(self.out_dir)}"
            raise ValueError(f"--out_dir {self.out_dir} {what}: pass a folder (new or holding a preparation)")
        self.dir = self.out_dir / f".tmp-prepare-{os.getpid()}"
        self.id = int.from_bytes(os.urandom(8), "little") >> 1 or 1  # a positive int64: 0 means "no id"
        self._made_out_dir = False
        self._swapping = False

    def __enter__(self) -> Preparation:
        self._made_out_dir = not self.out_dir.exists()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # One preparation at a time, from before its look at what a killed one left until its end: another one,
        # paused in its swap, is not a killed run to undo.
        self._lock = errors.lock(self.out_dir / ".lock", f"{self.out_dir} is being prepared by another process (pid {{pid}}): wait for it to end or stop it, or use another folder; nothing was changed")
        try:
            for old in self.out_dir.glob(".tmp-prepare-*"):  # left by a killed run
                pid = old.name.removeprefix(".tmp-prepare-")
                if pid.isdigit() and (int(pid) == os.getpid() or not errors.pid_alive(int(pid))):
                    shutil.rmtree(old, ignore_errors=True)
            self._restore()
            self.dir.mkdir()
        except BaseException:
            errors.unlock(self._lock)
            raise
        return self

    def _restore(self) -> None:
        """Put back the preparation that a swap killed half-way had moved into .old-prepare/."""
        backup = self.out_dir / ".old-prepare"
        if not backup.is_dir():
            return
        if not (self.out_dir / "meta.json").exists() and (backup / "meta.json").exists():
            old_id = int(json.loads((backup / "meta.json").read_text()).get("preparation", "0"), 16)
            for split in ("train", "val"):  # files already swapped in belong to the killed run: not the old id
                single, shards = split_files(self.out_dir, split)
                for path in ([single] if single else []) + shards:
                    if int(np.fromfile(path, dtype="<i8", count=1, offset=5 * 4)[0]) != old_id:
                        path.unlink()
            for path in sorted(backup.glob("*.bin")):
                os.replace(path, self.out_dir / path.name)
            os.replace(backup / "meta.json", self.out_dir / "meta.json")
            errors.fsync(self.out_dir)
        shutil.rmtree(backup, ignore_errors=True)

    def commit(self, meta: dict) -> None:
        """Swap the files written into self.dir, and meta.json, into out_dir; adds the id to meta as "preparation"."""
        for split in ("train", "val"):
            if not meta[f"{split}_tokens"]:
                raise ValueError(f"the {split} split is empty ({meta['train_tokens']:,} train and "
                                 f"{meta['val_tokens']:,} val tokens; split {meta.get('split', '?')}): train.py needs "
                                 f"both; use more text or change the split setting")
        new = sorted(self.dir.glob("*.bin"))
        for path in new:
            with open(path, "r+b") as f:
                f.seek(5 * 4)
                f.write(np.array([self.id], dtype="<i8").tobytes())
                f.flush()
                os.fsync(f.fileno())
        meta["preparation"] = f"{self.id:016x}"
        write_meta(self.dir, meta)
        errors.fsync(self.dir / "meta.json")
        self._swapping = True
        backup = self.out_dir / ".old-prepare"  # the old files wait here until the new ones are all in place
        backup.mkdir()
        if (self.out_dir / "meta.json").exists():  # meta.json first: from here to the last rename, unprepared
            os.replace(self.out_dir / "meta.json", backup / "meta.json")
            errors.fsync(self.out_dir)
        for split in ("train", "val"):
            single, shards = split_files(self.out_dir, split)
            for old in ([single] if single else []) + shards:
                os.replace(old, backup / old.name)
        for path in new:
            os.replace(path, self.out_dir / path.name)
        os.replace(self.dir / "meta.json", self.out_dir / "meta.json")
        errors.fsync(self.out_dir)
        shutil.rmtree(backup)
        self._swapping = False

    def __exit__(self, kind: type[BaseException] | None, e: BaseException | None, tb: object) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        if self._swapping:  # stopped half-way through the swap: put the old files back now
            with contextlib.suppress(OSError):
                self._restore()
                self._swapping = False
        errors.unlock(self._lock)
        if kind is None:
            return
        if self._made_out_dir:
            with contextlib.suppress(OSError):
                self.out_dir.rmdir()  # only if still empty
        state = (f"{self.out_dir} holds no complete preparation now (stopped while swapping the files in): run "
                 f"again" if self._swapping else f"{self.out_dir} was left as it was")
        if kind is KeyboardInterrupt:
            raise KeyboardInterrupt(f"interrupted: {state}") from None


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """For the prepare scripts: --help lays the docstring out as every script's (config.fit_text) and shows every
    default, within 100 columns (config.HELP_WIDTH)."""

    def __init__(self, prog: str, **kwargs: object) -> None:
        super().__init__(prog, width=100, **kwargs)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        from config import fit_text  # only for --help: config imports torch, which preparing data never needs

        return "".join(indent + line for line in fit_text(text, width).splitlines(keepends=True))


MAX_SHARD_SIZE = 1 << 30  # tokens; a shard's buffer is reserved whole (4 GiB of uint32)
_ARG_CHECKS = {  # preparer argument -> (valid?, what is expected)
    "val_fraction": (lambda v: 0 < v < 1, "a fraction between 0 and 1, e.g. 0.1 (train.py needs both splits)"),
    "shard_size": (lambda v: 1 <= v <= MAX_SHARD_SIZE, f"a number of tokens from 1 to {MAX_SHARD_SIZE:,}"),
    "num_threads": (lambda v: 0 <= v <= 1024, "0 (all cores) or a number of threads up to 1024"),
    "val_tokens": (lambda v: v >= 0, "0 (one shard) or a positive number of tokens"),
}


def check_args(args: argparse.Namespace) -> None:
    """Refuse a preparer's impossible arguments before anything is read or written."""
    for name, (valid, expected) in _ARG_CHECKS.items():
        value = getattr(args, name, None)
        if value is not None and not valid(value):
            raise SystemExit(f"--{name}={value}: expected {expected}")


def prepare_command(script: str, argv: list[str] | None) -> str:
    """The command line that made a dataset, kept in meta.json and quoted by the loaders' error messages."""
    return shlex.join(["python", script, *(sys.argv[1:] if argv is None else argv)])


# ----------------------------------------------------------------------------------------------------------------------
# Downloads


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def download(url: str, dest: Path, sha256: str | None) -> Path:
    """Fetch `url` into `dest` once: skipped when `dest` is there with the right hash; verified; atomic."""
    dest = Path(dest)
    if dest.is_file():
        if sha256 is None or file_sha256(dest) == sha256:
            print(f"using {dest} (already downloaded)", file=sys.stderr)  # stdout may carry results
            return dest
        print(f"{dest} does not match sha256 {sha256[:12]}...: downloading it again", file=sys.stderr)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part")
    h = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {dest.name}") as bar:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    h.update(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        tmp.unlink(missing_ok=True)
        reason = getattr(e, "reason", None) or e
        raise SystemExit(f"could not download {url} ({reason}): offline? pass --input PATH to use a local copy") from None
    if sha256 is not None and h.hexdigest() != sha256:
        tmp.unlink()
        raise SystemExit(
            f"{url} downloaded with sha256 {h.hexdigest()}, expected {sha256}: the file changed upstream or the "
            f"download was corrupted; try again, or pass --input PATH to a copy you trust"
        )
    os.replace(tmp, dest)
    return dest


def local_or_download(input_path: str | None, url: str, dest: Path, sha256: str | None) -> Path:
    """`--input PATH` when given (the hash is checked but only warned about), else the cached download."""
    if input_path is None:
        return download(url, dest, sha256)
    path = Path(input_path)
    if not path.is_file():  # a pipe or /dev/zero too: never opened, a pipe would wait for a writer
        raise SystemExit(f"--input {path}: {errors.not_a_file(path)} (leave --input out to download {url})")
    if sha256 is not None and file_sha256(path) != sha256:
        print(f"note: {path} is not the canonical file (sha256 differs from {url}); using it anyway")
    return path


# ----------------------------------------------------------------------------------------------------------------------
# Streaming preparation: documents -> pieces of text -> tokens (all cores) -> train/val shards
#
# A "piece" is (text, starts_document, source_bytes). Long texts are cut into pieces so memory stays bounded, at
# points where the cut cannot change GPT-2's pre-tokenization (see _safe_cut), so a file tokenized in pieces gives
# exactly the tokens of the file tokenized whole.

PIECE_CHARS = 1 << 18  # 256K characters: many pieces per batch keep every thread busy


def _safe_cut(text: str, limit: int) -> int:
    """Largest i <= limit where text[i] is one space or newline between two non-space characters.

    GPT-2's pre-tokenizer regex cannot match across such a point (no pattern runs from a non-space through a single
    whitespace, and the pattern has no look-behind), so text[:i] and text[i:] tokenize as they would inside the whole.
    """
    for ws in ("\n", " "):
        i = text.rfind(ws, 1, limit + 1)
        while i > 0:
            if i + 1 < len(text) and not text[i - 1].isspace() and not text[i + 1].isspace():
                return i
            i = text.rfind(ws, 1, i)
    global _warned_unsafe_cut
    if not _warned_unsafe_cut:
        _warned_unsafe_cut = True
        print(f"warning: no single space or newline in {limit:,} characters; cutting there, so a token or two at the "
              f"cut may differ from tokenizing the text whole (it still decodes to the same text)")
    return limit


_warned_unsafe_cut = False


def _split_long(text: str, piece_chars: int) -> Iterator[str]:
    while len(text) > piece_chars:
        cut = _safe_cut(text, piece_chars)
        yield text[:cut]
        text = text[cut:]
    if text:
        yield text


def _not_utf8(path: Path, offset: int) -> str:
    return (f"{path}: not UTF-8 text (bad byte near offset {offset}): convert it first, e.g. iconv -f latin1 -t "
            f"utf-8 {path.name} > {path.stem}.utf8.txt")


def read_utf8(path: Path) -> str:
    """The whole text of a file; ValueError naming the file and the offset if it is not UTF-8 (binary, Latin-1)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(_not_utf8(Path(path), e.start)) from None


def _iter_txt(path: Path, hashes: dict, piece_chars: int) -> Iterator[tuple[str, bool, int]]:
    """One document per .txt file, read in pieces; hashes the raw bytes on the way (no second pass)."""
    h, dec = hashlib.sha256(), codecs.getincrementaldecoder("utf-8")()
    buf, first, offset = "", True, 0
    with open(path, "rb") as f:
        while True:
            raw = f.read(piece_chars)
            h.update(raw)
            try:
                buf += dec.decode(raw, final=not raw)
            except UnicodeDecodeError as e:
                raise ValueError(_not_utf8(path, offset + e.start)) from None
            offset += len(raw)
            while len(buf) > piece_chars or (not raw and buf):
                cut = _safe_cut(buf, piece_chars) if len(buf) > piece_chars else len(buf)
                piece, buf = buf[:cut], buf[cut:]
                yield piece, first, len(piece.encode("utf-8"))
                first = False
            if not raw:
                break
    hashes[str(path)] = h.hexdigest()


def _iter_jsonl(path: Path, hashes: dict, piece_chars: int, text_field: str) -> Iterator[tuple[str, bool, int]]:
    """One document per line: the string under `text_field` of each JSON object."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            h.update(line)
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: not JSON ({e}); a .jsonl file holds one JSON object a line") from None
            text = obj.get(text_field) if isinstance(obj, dict) else None
            if not isinstance(text, str):
                keys = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
                raise ValueError(f"{path}:{lineno}: no string field {text_field!r} (found {keys}): pass --text_field=NAME")
            pieces = list(_split_long(text, piece_chars)) or [""]
            sizes = [len(piece.encode("utf-8")) for piece in pieces]
            sizes[0] += len(line) - sum(sizes)  # the JSON around the text counts too: progress and split see file bytes
            for i, (piece, size) in enumerate(zip(pieces, sizes)):
                yield piece, i == 0, size
    hashes[str(path)] = h.hexdigest()


def _iter_parquet(path: Path, hashes: dict, piece_chars: int, text_field: str) -> Iterator[tuple[str, bool, int]]:
    """One document per row of column `text_field` (FineWeb's own files are parquet); needs pyarrow."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise SystemExit(f"{path}: reading .parquet needs pyarrow: pip install pyarrow (or convert it to .jsonl)") from None
    hashes[str(path)] = file_sha256(path)
    pf = pq.ParquetFile(path)
    if text_field not in pf.schema_arrow.names:
        raise ValueError(f"{path}: no column {text_field!r} (columns: {pf.schema_arrow.names}): pass --text_field=NAME")
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            for i, piece in enumerate(_split_long(text or "", piece_chars)):
                yield piece, i == 0, len(piece.encode("utf-8"))


READERS = {".txt": "one document per file", ".jsonl": "one document per line", ".parquet": "one document per row"}


def find_inputs(inputs: list[str | Path]) -> list[Path]:
    """Expand --input arguments (files or folders, searched recursively) into a sorted list of readable files."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix in READERS)
            if not found:
                raise SystemExit(f"--input {p}: the folder holds no {'/'.join(READERS)} files")
            files += found
        elif p.is_file():
            if p.suffix not in READERS:
                raise SystemExit(f"--input {p}: unsupported file type {p.suffix or '(none)'}; expected {', '.join(READERS)}")
            files.append(p)
        else:  # a pipe or /dev/zero too: never opened, a pipe would wait for a writer
            raise SystemExit(f"--input {p}: {errors.not_a_file(p)}")
    return files


def iter_files(
    files: list[Path], hashes: dict, text_field: str = "text", piece_chars: int = PIECE_CHARS
) -> Iterator[tuple[str, bool, int]]:
    """Pieces of every document in `files`, in order; fills `hashes` with each file's sha256 as it is read."""
    for path in files:
        if path.suffix == ".txt":
            yield from _iter_txt(path, hashes, piece_chars)
        elif path.suffix == ".jsonl":
            yield from _iter_jsonl(path, hashes, piece_chars, text_field)
        else:
            yield from _iter_parquet(path, hashes, piece_chars, text_field)


def iter_hf_dataset(
    path: str, name: str | None, text_field: str = "text", piece_chars: int = PIECE_CHARS
) -> Iterator[tuple[str, bool, int]]:
    """Stream a Hugging Face dataset (nothing is stored but the tokens): one document per row.

    Imports `datasets` and opens the stream before returning, so a missing library or network fails before any
    old output is touched.
    """
    try:
        import datasets
    except ImportError:
        raise SystemExit(
            f"streaming {path} needs the datasets library: pip install -e '.[web]' (or pass --input FILE with a local copy)"
        ) from None
    offline = f"could not stream {path}: offline? pass --input FILE with a local copy"
    try:
        ds = datasets.load_dataset(path, name=name, split="train", streaming=True)
    except OSError as e:  # datasets' connection and not-found errors are OSErrors
        raise SystemExit(f"{offline} ({type(e).__name__}: {str(e)[:200]})") from None

    def rows() -> Iterator[tuple[str, bool, int]]:
        try:
            for row in ds:
                for i, piece in enumerate(_split_long(row[text_field] or "", piece_chars)):
                    yield piece, i == 0, len(piece.encode("utf-8"))
        except OSError as e:
            raise SystemExit(f"{offline} ({type(e).__name__}: {str(e)[:200]})") from None

    return rows()


def collect_chars(pieces: Iterable[tuple[str, bool, int]]) -> str:
    """The sorted set of characters of a corpus: the char tokenizer's table (nanoGPT: sorted(set(data)))."""
    chars: set[str] = set()
    for text, _, _ in pieces:
        chars.update(text)
    return "".join(sorted(chars))


def tokenize_to_shards(
    pieces: Iterable[tuple[str, bool, int]],
    tokenizer: Tokenizer,
    out_dir: Path,
    *,
    shard_size: int = DEFAULT_SHARD_SIZE,
    val_tokens: int | None = None,
    train_bytes: int | None = None,
    total_bytes: int | None = None,
    num_threads: int | None = None,
) -> dict:
    """Tokenize a stream of pieces on all cores and write train/val token files into out_dir (a Preparation's
    folder); returns counts and file names.

    The split is made in stream order, by exactly one of:
      val_tokens:  the first `val_tokens` tokens are val, the rest train (llm.c's FineWeb: val = the first shard);
                   for a stream of unknown length.
      train_bytes: the tokens of the first `train_bytes` source bytes are train, the rest val (nanoGPT's 90/10);
                   for local files, whose size is known.
    The piece that straddles the boundary is cut between tokens. With a tiktoken encoding, the end-of-text token
    precedes every document but the first, so val + train (or train + val) is exactly the tokenized corpus.
    """
    assert (val_tokens is None) != (train_bytes is None), "give exactly one of val_tokens, train_bytes"
    if total_bytes is not None and total_bytes > shard_size * MAX_SHARDS:  # a token takes a source byte at least
        raise ValueError(f"--shard_size={shard_size} could make up to {-(-total_bytes // shard_size):,} files a "
                         f"split from {total_bytes:,} bytes of text, more than {MAX_SHARDS:,} (train.py keeps every "
                         f"one open): use --shard_size={-(-total_bytes // MAX_SHARDS)} or more")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    by_tokens = val_tokens is not None
    first, second = ("val", "train") if by_tokens else ("train", "val")
    budget = val_tokens if by_tokens else train_bytes
    used = 0  # of the budget, in tokens or source bytes
    eot = None if tokenizer.eot_token is None else np.array([tokenizer.eot_token])
    threads = num_threads or cpu_count()
    max_inflight = min(64 << 20, threads * (4 << 20))  # characters submitted, not yet written: ~16 pieces a thread
    docs, nbytes_total, seen_doc = 0, 0, False
    writers = {s: ShardWriter(out_dir, s, dtype, shard_size) for s in ("train", "val")}

    def write(new_doc: bool, nbytes: int, ids: np.ndarray) -> None:
        nonlocal used, docs, nbytes_total, seen_doc
        if new_doc:
            docs += 1
            if seen_doc and eot is not None:
                ids = np.concatenate([eot, ids])
            seen_doc = True
        cost = len(ids) if by_tokens else nbytes
        if used >= budget:
            writers[second].write(ids)
        elif used + cost <= budget:
            writers[first].write(ids)
            used += cost
        else:  # the boundary falls inside this piece
            k = budget - used if by_tokens else round(len(ids) * (budget - used) / nbytes)
            writers[first].write(ids[:k])
            writers[second].write(ids[k:])
            used = budget
        nbytes_total += nbytes
        bar.update(nbytes)
        if new_doc and docs % 1000 == 0:
            bar.set_postfix(docs=docs, refresh=False)

    t0, cpu0 = time.perf_counter(), time.process_time()
    # Threads, not processes: tiktoken's Rust core releases the GIL while it encodes. This thread keeps reading and
    # submitting pieces while the pool encodes, and writes the results in order from a window of bounded size.
    inflight: deque = deque()
    inflight_chars = 0
    with ThreadPoolExecutor(threads) as pool, tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing") as bar:
        for text, new_doc, nbytes in pieces:
            inflight.append((new_doc, nbytes, len(text), pool.submit(tokenizer._encode_array, text)))
            inflight_chars += len(text)
            while inflight_chars > max_inflight:
                new_doc, nbytes, n, future = inflight.popleft()
                inflight_chars -= n
                write(new_doc, nbytes, future.result())
        while inflight:
            new_doc, nbytes, n, future = inflight.popleft()
            write(new_doc, nbytes, future.result())
        bar.set_postfix(docs=docs)
    files = {s: [p.name for p in w.close()] for s, w in writers.items()}
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0  # CPU time of all threads
    return {
        "train_tokens": writers["train"].tokens,
        "val_tokens": writers["val"].tokens,
        "documents": docs,
        "bytes": nbytes_total,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "threads": threads,
        "files": files,
    }


def report(name: str, out_dir: Path, stats: dict) -> None:
    """The one-line summary every preparer prints (the benchmark in docs/benchmarks.md quotes its MB/s)."""
    mbps = stats["bytes"] / 1e6 / max(stats["seconds"], 1e-9)
    print(
        f"{name}: {stats['train_tokens']:,} train + {stats['val_tokens']:,} val tokens from {stats['documents']:,} "
        f"documents, {stats['bytes'] / 1e6:.1f} MB in {stats['seconds']:.2f} s ({mbps:.1f} MB/s, {stats['threads']} "
        f"threads kept {stats['cpu_seconds'] / max(stats['seconds'], 1e-9):.2f} cores busy) -> {out_dir}"
    )


def prepare_web_corpus(argv: list[str] | None, *, corpus: str, doc: str, dataset: str, name: str | None,
                       val_tokens: int) -> dict:
    """The whole of data/fineweb/prepare.py and data/openwebtext/prepare.py, which differ only in their arguments.

    Streams `dataset` (configuration `name`) from the Hugging Face hub, or reads --input files, tokenizes with GPT-2
    BPE into shards under --out_dir (default data/<corpus>/), the first --val_tokens tokens (0: one shard) as val.
    """
    parser = argparse.ArgumentParser(description=doc, formatter_class=HelpFormatter)
    parser.add_argument("--input", action="append", help="local .txt/.jsonl/.parquet files or folders instead of streaming")
    parser.add_argument("--out_dir", default=str(Path(__file__).resolve().parent / "data" / corpus),
                        help="where the shards go")
    parser.add_argument("--dataset", default=dataset, help="Hugging Face dataset to stream")
    if name is not None:
        parser.add_argument("--name", default=name, help="its configuration: sample-10BT, sample-100BT, ...")
    parser.add_argument("--shard_size", type=int, default=DEFAULT_SHARD_SIZE, help="tokens per shard file")
    parser.add_argument("--val_tokens", type=int, default=val_tokens,
                        help="the first this many tokens are val; 0 = one shard")
    parser.add_argument("--text_field", default="text", help="the field holding each document's text")
    parser.add_argument("--encoding", default="gpt2", help="tiktoken encoding name")
    parser.add_argument("--num_threads", type=int, default=0, help="tokenizer threads; 0 = all cores")
    args = parser.parse_args(argv)
    check_args(args)
    out_dir = Path(args.out_dir)
    prep = Preparation(out_dir)
    config_name = getattr(args, "name", None)

    tok = Tokenizer.tiktoken(args.encoding)
    hashes: dict[str, str] = {}
    if args.input:
        files = find_inputs(args.input)
        pieces, total = iter_files(files, hashes, args.text_field), sum(f.stat().st_size for f in files)
        source: str | list[str] = [str(f) for f in files]
    else:
        pieces, total = iter_hf_dataset(args.dataset, config_name, args.text_field), None
        source = f"https://huggingface.co/datasets/{args.dataset}" + (f" ({config_name})" if config_name else "")
    val = args.val_tokens or args.shard_size
    with prep:
        stats = tokenize_to_shards(pieces, tok, prep.dir, shard_size=args.shard_size, val_tokens=val,
                                   total_bytes=total, num_threads=args.num_threads or None)
        meta = dataset_meta(
            tok, stats["train_tokens"], stats["val_tokens"], source=source, sha256=hashes or None,
            prepare=prepare_command(f"data/{corpus}/prepare.py", argv), files=stats["files"],
            documents=stats["documents"], shard_size=args.shard_size,
            split=f"the first {val:,} tokens of the stream are val, the rest train",
        )
        prep.commit(meta)
    report(corpus, out_dir, stats)
    return meta
