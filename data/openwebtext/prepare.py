"""OpenWebText (~9B GPT-2 tokens, nanoGPT's GPT-2 reproduction corpus): streamed through `datasets`, sharded.

    pip install -e '.[web]'
    python data/openwebtext/prepare.py                          # ~8M documents, ~9B tokens, ~18 GB of shards
    python data/openwebtext/prepare.py --input owt_part.jsonl --out_dir=/tmp/owt      # offline, from a local copy

Documents stream from the Hugging Face hub (or --input files: .txt/.jsonl, and .parquet with pyarrow), are tokenized
on all cores and written as shards of --shard_size tokens. Every document is preceded by GPT-2's end-of-text token
(but the first). The validation split is the first --val_tokens tokens of the stream (default 4M, about the size of
nanoGPT's random 0.05% val split, which a stream cannot draw). Then `python train.py --dataset=data/openwebtext ...`.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tokens.py lives at the repository root
import tokens  # noqa: E402

DATASET = "Skylion007/openwebtext"  # what nanoGPT's load_dataset("openwebtext") resolves to


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=tokens.HelpFormatter)
    parser.add_argument("--input", action="append", help="local .txt/.jsonl/.parquet files or folders instead of streaming")
    parser.add_argument("--out_dir", default=str(Path(__file__).resolve().parent), help="where the shards go")
    parser.add_argument("--dataset", default=DATASET, help="Hugging Face dataset to stream")
    parser.add_argument("--shard_size", type=int, default=tokens.DEFAULT_SHARD_SIZE, help="tokens per shard file")
    parser.add_argument("--val_tokens", type=int, default=4_000_000, help="the first this many tokens are val")
    parser.add_argument("--text_field", default="text", help="the field holding each document's text")
    parser.add_argument("--encoding", default="gpt2", help="tiktoken encoding name")
    parser.add_argument("--num_threads", type=int, default=0, help="tokenizer threads; 0 = all cores")
    args = parser.parse_args(argv)
    out_dir = Path(args.out_dir)

    tok = tokens.Tokenizer.tiktoken(args.encoding)
    hashes: dict[str, str] = {}
    if args.input:
        files = tokens.find_inputs(args.input)
        pieces, total = tokens.iter_files(files, hashes, args.text_field), sum(f.stat().st_size for f in files)
        source: str | list[str] = [str(f) for f in files]
    else:
        pieces, total = tokens.iter_hf_dataset(args.dataset, None, args.text_field), None
        source = f"https://huggingface.co/datasets/{args.dataset}"
    stats = tokens.tokenize_to_shards(
        pieces, tok, out_dir, shard_size=args.shard_size, val_tokens=args.val_tokens, total_bytes=total,
        num_threads=args.num_threads or None,
    )
    meta = tokens.dataset_meta(
        tok, stats["train_tokens"], stats["val_tokens"], source=source, sha256=hashes or None,
        prepare=tokens.prepare_command("data/openwebtext/prepare.py", argv), files=stats["files"],
        documents=stats["documents"], shard_size=args.shard_size,
        split=f"the first {args.val_tokens:,} tokens of the stream are val, the rest train",
    )
    tokens.write_meta(out_dir, meta)
    tokens.report("openwebtext", out_dir, stats)
    return meta


if __name__ == "__main__":
    main()
