"""Score a model: loss, perplexity and bits per byte on any text, or HellaSwag accuracy.

    python eval.py --out_dir=out/shakespeare_char_cpu --dataset=shakespeare_char   # a prepared split, --split=val
    python eval.py --init_from=gpt2 --input=data/shakespeare_char/input.txt        # text files or a folder
    python eval.py --init_from=gpt2 --task=hellaswag --device=cuda                 # downloads the val set once
    python eval.py --out_dir=out/x --input=notes.txt --json=true                   # one JSON object on stdout
    python eval.py --out_dir=out/x --input=docs.jsonl --docs=lm_eval               # lm-eval's rolling perplexity

Bits per byte = total nats / ln 2 / UTF-8 bytes of the scored text, so models with different tokenizers compare.
A long text is scored in windows of block_size tokens that advance by `stride`: each token is scored once, with at
least block_size - stride + 1 tokens of context (fewer only in the first window). `--docs=lm_eval` scores each
document alone, as lm-evaluation-harness's rolling perplexity does, to give its numbers. Standard output carries
only the result; settings and the progress bar go to standard error. docs/eval.md has the conventions and figures.
"""

from __future__ import annotations

import errors

errors.install(__name__)  # before the other imports: a Ctrl-C while torch loads is one line too

import hashlib
import json
import math
import os
import re
import sys
import time
from collections import Counter
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from checkpoint import check_tokenizer_matches, load_for_inference
from config import (DTYPES, autocast_context, format_config, parse_config, resolve_device, resolve_dtype,
                    set_threads)
from prepare_data import find_inputs, iter_files, local_or_download  # eval.py reads raw text, as the preparers do
from quantize import check_quantize
from tokens import Tokenizer, load_meta, load_split, resolve_dataset

# rowanz/hellaswag publishes no checksum: the file is pinned by its commit and checked against the git blob id
# that commit's tree gives it (sha1 of "blob <size>\0" + content), and by its example count.
HELLASWAG_URL = ("https://raw.githubusercontent.com/rowanz/hellaswag/a29ff8e9a04bba4bd6588223785ce105328adc57/"
                 "data/hellaswag_val.jsonl")
HELLASWAG_BLOB = "0f5ee25d72216f12317d5d8a7b92deafa423d81e"
HELLASWAG_EXAMPLES = 10_042


@dataclass
class EvalConfig:
    out_dir: str = "out"  # training output folder to score (its `checkpoint` link), or a checkpoint folder
    init_from: str | None = None  # gpt2, gpt2-medium, gpt2-large, gpt2-xl or a Hugging Face GPT-2 folder; none: out_dir
    checkpoint: str = "latest"  # which checkpoint of out_dir: latest or best (lowest validation loss)
    task: str = "text"  # text: loss, perplexity and bits per byte; hellaswag: multiple-choice accuracy
    input: str | None = None  # text: a .txt/.jsonl/.parquet file or folder; hellaswag: a local hellaswag_val.jsonl
    dataset: str | None = None  # text: a prepared dataset (a folder, or a name under data/) instead of --input
    split: str = "val"  # the split of --dataset to score
    text_field: str = "text"  # the field (jsonl) or column (parquet) holding the text of --input
    stride: int | None = None  # tokens each window advances; none: block_size // 2; block_size: no overlap (fastest)
    docs: str = "joined"  # text: joined (documents joined by end-of-text, one text) or lm_eval (each alone, as lm-eval)
    max_seq_len: int | None = None  # docs=lm_eval: tokens a window predicts; none: block_size (docs/eval.md, lm-eval)
    batch_size: int = 8  # windows (text) or examples (hellaswag) per forward pass
    limit: int | None = None  # hellaswag: score only the first this many examples (none: all)
    device: str = "auto"  # cpu, cuda, cuda:1, mps; auto: cuda when available, else cpu
    dtype: str = "auto"  # autocast dtype: float32, bfloat16 or float16; auto: bfloat16 on CUDA, else float32
    threads: int | None = None  # torch CPU threads; none: $OMP_NUM_THREADS, else the idle cores (docs/training.md: Threads); 0: one per core
    quantize: str = "none"  # none, or int8: weights stored as int8, one scale per output channel (CPU; quantize.py)
    json: bool = False  # print the result as one JSON object instead of the summary line

    def __post_init__(self) -> None:
        if self.task not in ("text", "hellaswag"):
            raise ValueError(f"task must be text or hellaswag, got {self.task!r}")
        if self.docs not in ("joined", "lm_eval"):
            raise ValueError(f"docs must be joined or lm_eval, got {self.docs!r}")
        if self.docs == "lm_eval" and (self.task != "text" or self.input is None or self.stride is not None):
            raise ValueError("docs=lm_eval scores the documents of --input (a prepared --dataset has no document "
                             "text), in lm-eval's windows: pass --input=FILE_OR_FOLDER, and --max_seq_len instead "
                             "of --stride")
        if self.max_seq_len is not None and self.docs != "lm_eval":
            raise ValueError("max_seq_len is the window of docs=lm_eval: pass --docs=lm_eval, or --stride instead")
        if self.task == "text" and (self.input is None) == (self.dataset is None):
            raise ValueError("task=text scores one source: pass --input=FILE_OR_FOLDER or --dataset=DIR (not both)")
        if self.task == "hellaswag" and self.dataset is not None:
            raise ValueError("task=hellaswag reads its own JSONL: drop --dataset (--input=PATH for a local copy)")
        if self.checkpoint not in ("latest", "best"):
            raise ValueError(f"checkpoint must be latest or best, got {self.checkpoint!r}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be auto, {', '.join(DTYPES)}; got {self.dtype!r}")
        check_quantize(self.quantize)
        for name in ("stride", "batch_size", "limit", "max_seq_len"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


# ------------------------------------------------------------------------------------------------- text scoring


def windows(n: int, block_size: int, stride: int) -> list[tuple[int, int]]:
    """(start, first scored position) of each window of min(block_size, n) targets over n targets.

    Windows start at 0, stride, 2 * stride, ...; the last is moved back to end at n. A window scores the targets
    that earlier windows have not, so each target is scored exactly once.
    """
    assert 1 <= stride <= block_size and n >= 1
    length, scored, start, plan = min(block_size, n), 0, 0, []
    while scored < n:
        start = min(start, n - length)
        plan.append((start, scored - start))
        scored = start + length
        start += stride
    return plan


def token_nll(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
              autocast: AbstractContextManager = nullcontext()) -> torch.Tensor:
    """Cross-entropy in nats of each target y (B, T) given inputs x (B, T), in float32; 0 where y is -1."""
    with autocast:
        logits, _ = model(x)  # (B, T, vocab_size)
    nll = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-1, reduction="none")
    return nll.view_as(y)


@torch.no_grad()
def score_tokens(model: torch.nn.Module, ids: np.ndarray, stride: int, batch_size: int = 8,
                 autocast: AbstractContextManager = nullcontext(), window: int | None = None,
                 progress: bool = True) -> float:
    """Total nats of ids[1:], each token given the ones before it, through windows() of `window` (none:
    block_size) targets; ids needs 2+ tokens."""
    device = next(model.parameters()).device
    n = len(ids) - 1
    window = window or model.config.block_size
    plan = windows(n, window, stride)
    length = min(window, n)
    positions = torch.arange(length, device=device)
    total = 0.0
    with tqdm(total=len(plan), unit="window", mininterval=0.1 if sys.stderr.isatty() else 30,
              disable=not progress) as bar:
        for i in range(0, len(plan), batch_size):
            batch = plan[i:i + batch_size]
            rows = torch.from_numpy(np.stack([ids[s:s + length + 1] for s, _ in batch]).astype(np.int64)).to(device)
            first = torch.tensor([f for _, f in batch], device=device)
            x, y = rows[:, :-1], rows[:, 1:].masked_fill(positions < first[:, None], -1)  # (B, T), (B, T)
            total += token_nll(model, x, y, autocast).sum().item()
            bar.update(len(batch))
    return total


@torch.no_grad()
def score_documents(model: torch.nn.Module, documents: list[str], tokenizer: Tokenizer, max_seq_len: int,
                    batch_size: int = 8, autocast: AbstractContextManager = nullcontext()) -> dict[str, float]:
    """lm-evaluation-harness's rolling perplexity (loglikelihood_rolling): each document alone, its every token
    scored, the first from tokenizer.prefix_token; windows of max_seq_len targets, the last moved back to end at
    the document's end (lm_eval.utils.get_rolling_token_windows, context_len 1, made disjoint, is windows() with
    stride = max_seq_len). Its metrics: word and byte perplexity, bits per byte (words: runs between whitespace)."""
    nats, tokens = 0.0, 0
    for i, doc in enumerate(tqdm(documents, unit="doc", mininterval=0.1 if sys.stderr.isatty() else 30)):
        try:  # as lm-eval's tokenizers: "<|endoftext|>" in a document is the end-of-text token
            ids = tokenizer.encode(doc, special=True)
        except ValueError as e:  # a character a char vocabulary lacks
            raise SystemExit(f"document {i + 1}: {e}") from None
        if ids:
            nats += score_tokens(model, np.array([tokenizer.prefix_token] + ids), max_seq_len, batch_size, autocast,
                                 max_seq_len, progress=False)
            tokens += len(ids)
    nbytes = sum(len(doc.encode("utf-8")) for doc in documents)
    words = sum(len(re.split(r"\s+", doc)) for doc in documents)
    return {"nats": nats, "tokens": tokens, "bytes": nbytes, "words": words,
            "word_perplexity": math.exp(min(nats / words, 700.0)),
            "byte_perplexity": math.exp(min(nats / max(nbytes, 1), 700.0)),
            "bpb": nats / math.log(2) / max(nbytes, 1)}


def text_documents(inputs: list[str], text_field: str) -> list[str]:
    """The documents of --input as data/text/prepare.py reads them: a .txt file, a JSONL line, a parquet row."""
    docs: list[str] = []
    try:
        for text, new_doc, _ in iter_files(find_inputs(inputs), {}, text_field):
            if new_doc or not docs:
                docs.append(text)
            else:
                docs[-1] += text  # a long document comes in pieces
    except ValueError as e:  # not UTF-8, a bad JSONL line: tokens.py names the file and the fix
        raise SystemExit(str(e)) from None
    if not docs:
        raise SystemExit(f"--input {' '.join(inputs)} holds no documents: pass a file with text")
    return docs


def text_tokens(inputs: list[str], tokenizer: Tokenizer, text_field: str) -> np.ndarray:
    """The token ids of --input as data/text/prepare.py would make them (end-of-text between documents)."""
    files = find_inputs(inputs)
    known = set(tokenizer.chars) if tokenizer.kind == "char" else None
    parts, unknown, first = [], Counter(), True
    try:
        for text, new_doc, _ in iter_files(files, {}, text_field):
            if known is not None and set(text) - known:
                unknown.update(c for c in text if c not in known)
                continue
            if new_doc and not first and tokenizer.eot_token is not None:
                parts.append(np.array([tokenizer.eot_token]))
            first = False
            parts.append(np.asarray(tokenizer.encode(text), dtype=np.int64))
    except ValueError as e:  # not UTF-8, a bad JSONL line: tokens.py names the file and the fix
        raise SystemExit(str(e)) from None
    if unknown:
        shown = ", ".join(f"{c!r} ({n}x)" for c, n in unknown.most_common(10))
        raise SystemExit(f"--input has {sum(unknown.values()):,} characters of {len(unknown)} kinds that this char "
                         f"model's vocabulary of {tokenizer.vocab_size} symbols lacks: {shown}"
                         f"{' ...' if len(unknown) > 10 else ''}; remove them, or score a model whose tokenizer "
                         f"covers them (GPT-2 BPE covers any text)")
    ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    if len(ids) < 2:
        what = "no text" if not len(ids) else "a single token"
        raise SystemExit(f"--input {' '.join(inputs)} holds {what}: scoring needs at least 2 tokens (one to predict "
                         f"from, one to predict); pass a longer text")
    return ids


# ------------------------------------------------------------------------------------------------------ HellaSwag


def git_blob_id(path: Path) -> str:
    """The id git gives the file's content: sha1 of "blob <size>\\0" + content."""
    data = Path(path).read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def hellaswag_file(local: str | None) -> Path:
    """--input as given, else the pinned val set downloaded once into $SMALLGPT_CACHE (~/.cache/smallgpt)."""
    cache = Path(os.environ.get("SMALLGPT_CACHE") or Path.home() / ".cache" / "smallgpt")
    path = local_or_download(local, HELLASWAG_URL, cache / "hellaswag_val.jsonl", None)
    if git_blob_id(path) != HELLASWAG_BLOB:
        if local is not None:
            print(f"note: {path} is not the canonical HellaSwag val set (git blob {HELLASWAG_BLOB[:12]}...); "
                  f"scoring it anyway", file=sys.stderr)
        else:
            path.unlink()
            raise SystemExit(f"{HELLASWAG_URL} downloaded with other contents than git blob {HELLASWAG_BLOB}: the "
                             f"download was corrupted; nothing was kept: try again, or pass --input=PATH")
    return path


def read_hellaswag(path: Path, limit: int | None = None) -> list[tuple[str, list[str], int]]:
    """(context, 4 endings, label) of each line of a HellaSwag JSONL file; SystemExit naming a malformed line."""
    examples = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if limit is not None and len(examples) == limit:
                break
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise SystemExit(f"{path}:{lineno}: not UTF-8 text (byte {e.start + 1} of the line): a HellaSwag file "
                                 f"is JSONL, one example a line") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise SystemExit(f"{path}:{lineno}: not JSON ({e}); a HellaSwag file has one example a line") from None
            obj = obj if isinstance(obj, dict) else {}
            ctx, endings, label = obj.get("ctx"), obj.get("endings"), obj.get("label")
            if isinstance(label, str) and label.isdigit():  # Hugging Face's copy stores the label as a string
                label = int(label)
            if not (isinstance(ctx, str) and isinstance(endings, list) and len(endings) == 4
                    and all(isinstance(e, str) for e in endings) and label in (0, 1, 2, 3)):
                raise SystemExit(f"{path}:{lineno}: a HellaSwag example needs \"ctx\" (text), \"endings\" (4 texts) "
                                 f"and \"label\" (0-3), got {line.strip()[:100]!r}")
            examples.append((ctx, endings, label))
    if not examples:
        raise SystemExit(f"{path} holds no examples: pass a HellaSwag JSONL file")
    return examples


@torch.no_grad()
def score_hellaswag(model: torch.nn.Module, tokenizer: Tokenizer, examples: list[tuple[str, list[str], int]],
                    batch_size: int = 8, autocast: AbstractContextManager = nullcontext()) -> dict[str, float]:
    """acc and acc_norm as GPT-2 papers and build-nanogpt/llm.c score HellaSwag: each ending, with a space before it,
    follows the context; the loss is over the ending's tokens only; acc picks the ending with the lowest total loss,
    acc_norm (the headline figure) the lowest mean loss per token. A row longer than block_size + 1 tokens keeps its
    last ones."""
    device = next(model.parameters()).device
    keep = model.config.block_size + 1
    correct = correct_norm = 0
    with tqdm(total=len(examples), unit="example", mininterval=0.1 if sys.stderr.isatty() else 30) as bar:
        for i in range(0, len(examples), batch_size):
            batch = examples[i:i + batch_size]
            rows, scored = [], []
            try:
                for ctx, endings, _ in batch:
                    ctx_ids = tokenizer.encode(ctx)
                    for ending in endings:
                        end_ids = tokenizer.encode(" " + ending)
                        rows.append((ctx_ids + end_ids)[-keep:])
                        scored.append(min(len(end_ids), len(rows[-1]) - 1))  # the ending's tokens among the targets
                        if not scored[-1]:
                            raise ValueError(f"context and ending {ending!r} make a single token: nothing to score")
            except ValueError as e:  # a character a char vocabulary lacks, an example too short to score
                raise SystemExit(f"HellaSwag example {i + 1 + len(rows) // 4}: {e}") from None
            width = max(len(r) for r in rows)
            x = torch.zeros(len(rows), width - 1, dtype=torch.long)
            y = torch.full((len(rows), width - 1), -1, dtype=torch.long)  # -1: context and padding, not scored
            for j, (row, k) in enumerate(zip(rows, scored)):
                x[j, :len(row) - 1] = torch.tensor(row[:-1])
                y[j, len(row) - 1 - k:len(row) - 1] = torch.tensor(row[-k:])
            nll = token_nll(model, x.to(device), y.to(device), autocast).view(len(batch), 4, -1).sum(-1).cpu()
            counts = torch.tensor(scored, dtype=torch.float32).view(len(batch), 4)
            labels = torch.tensor([label for _, _, label in batch])
            correct += (nll.argmin(-1) == labels).sum().item()
            correct_norm += ((nll / counts).argmin(-1) == labels).sum().item()
            bar.update(len(batch))
    return {"acc": correct / len(examples), "acc_norm": correct_norm / len(examples)}


# ---------------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    """Score as configured by argv (default sys.argv[1:]); prints and returns the result record."""
    cfg = parse_config(EvalConfig, argv, description=__doc__)
    print(format_config(cfg), file=sys.stderr)  # stderr: standard output carries only the result
    set_threads(cfg.threads)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if dtype == torch.float16 and device.type == "cpu":
        raise SystemExit("dtype=float16 needs a GPU: use --dtype=bfloat16 or --dtype=float32 on the CPU")
    autocast = autocast_context(device, dtype)
    model, tokenizer, config, source = load_for_inference(cfg.out_dir, cfg.init_from, cfg.checkpoint, device,
                                                          quantize=cfg.quantize)
    block_size = model.config.block_size
    record = dict.fromkeys(("model", "task", "data", "tokens", "bytes", "loss", "ppl", "bpb", "acc", "acc_norm",
                            "examples", "stride", "seconds"))
    if cfg.docs == "lm_eval":
        record |= dict.fromkeys(("docs", "documents", "words", "word_perplexity", "byte_perplexity", "max_seq_len"))
    record |= {"model": str(source), "task": cfg.task}
    t0 = time.perf_counter()

    if cfg.task == "hellaswag":
        path = hellaswag_file(cfg.input)
        examples = read_hellaswag(path, cfg.limit)
        if cfg.input is None and cfg.limit is None and len(examples) != HELLASWAG_EXAMPLES:
            raise SystemExit(f"{path} has {len(examples):,} examples, the val set {HELLASWAG_EXAMPLES:,}: delete "
                             f"it and run again to download it afresh")
        record |= {"data": str(path), "examples": len(examples)}
        record |= score_hellaswag(model, tokenizer, examples, cfg.batch_size, autocast)
        summary = (f"{source} on HellaSwag ({path.name}): {len(examples):,} examples, acc_norm "
                   f"{record['acc_norm']:.4f}, acc {record['acc']:.4f}")
    elif cfg.docs == "lm_eval":
        max_seq_len = cfg.max_seq_len or block_size
        if max_seq_len > block_size:
            raise SystemExit(f"max_seq_len={max_seq_len} is longer than the model's block_size {block_size}: pass "
                             f"--max_seq_len={block_size} or less")
        documents = text_documents([cfg.input], cfg.text_field)
        scores = score_documents(model, documents, tokenizer, max_seq_len, cfg.batch_size, autocast)
        loss = scores["nats"] / max(scores["tokens"], 1)
        record |= {k: scores[k] for k in ("tokens", "bytes", "words", "word_perplexity", "byte_perplexity", "bpb")}
        record |= {"data": cfg.input, "docs": "lm_eval", "documents": len(documents), "loss": loss,
                   "ppl": math.exp(min(loss, 700.0)), "max_seq_len": max_seq_len}
        summary = (f"{source} on {cfg.input}, {len(documents):,} documents scored alone (lm-eval's rolling "
                   f"windows of {max_seq_len}): {scores['tokens']:,} tokens, {scores['bytes']:,} bytes: "
                   f"{record['bpb']:.4f} bits/byte, byte perplexity {record['byte_perplexity']:.4f}, word perplexity "
                   f"{record['word_perplexity']:.2f}")
    else:
        if cfg.dataset is not None:
            data_dir = resolve_dataset(cfg.dataset)
            try:
                meta = load_meta(data_dir)
                check_tokenizer_matches(config, meta, data_dir / "meta.json")
                files = load_split(data_dir, cfg.split)
            except ValueError as e:
                raise SystemExit(str(e)) from None
            # shards of a split are scored one after another, each from its own start
            streams = [f for f in files if len(f) >= 2]
            if not streams:
                raise SystemExit(f"the {cfg.split} split of {data_dir} has fewer than 2 tokens: nothing to score")
            record["data"] = f"{data_dir}:{cfg.split}"
        else:
            streams = [text_tokens([cfg.input], tokenizer, cfg.text_field)]
            record["data"] = cfg.input
        stride = cfg.stride or max(1, block_size // 2)
        if stride > block_size:
            raise SystemExit(f"stride={stride} is longer than the model's block_size {block_size}: tokens would go "
                             f"unscored; pass --stride={block_size} or less")
        byte_lengths = tokenizer.token_byte_lengths()
        nats = sum(score_tokens(model, ids, stride, cfg.batch_size, autocast) for ids in streams)
        ntokens = sum(len(ids) - 1 for ids in streams)
        nbytes = int(sum(byte_lengths[np.asarray(ids[1:], dtype=np.int64)].sum() for ids in streams))
        loss = nats / ntokens
        record |= {"tokens": ntokens, "bytes": nbytes, "loss": loss, "ppl": math.exp(min(loss, 700.0)),
                   "bpb": nats / math.log(2) / max(nbytes, 1), "stride": stride}
        summary = (f"{source} on {record['data']}: {ntokens:,} tokens, {nbytes:,} bytes: loss {loss:.4f}, "
                   f"ppl {record['ppl']:.2f}, {record['bpb']:.4f} bits/byte (block {block_size}, stride {stride})")
    record["seconds"] = round(time.perf_counter() - t0, 3)
    print(json.dumps(record) if cfg.json else f"{summary}, {record['seconds']:.1f} s")
    return record


if __name__ == "__main__":
    main()
