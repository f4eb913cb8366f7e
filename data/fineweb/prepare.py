"""FineWeb-Edu for the GPT-2 (124M) reproduction: streamed through `datasets`, GPT-2 BPE, shards of 100M tokens.

    pip install -e '.[web]'
    python data/fineweb/prepare.py                              # sample-10BT: ~10B tokens, ~100 shards, ~20 GB
    python data/fineweb/prepare.py --name=sample-100BT          # ~100B tokens
    python data/fineweb/prepare.py --input fineweb_part.jsonl --out_dir=/tmp/fw      # offline, from a local copy

Nothing but the tokens is stored: documents stream from the Hugging Face hub (or --input files: .txt/.jsonl, and
.parquet with pyarrow), are tokenized on all cores and written as val.bin and train_000000.bin, train_000001.bin, ... Every
document is preceded by GPT-2's end-of-text token (but the first). The validation split is the first --val_tokens
tokens of the stream (default: one shard, as llm.c's fineweb.py); the dataset's row order is fixed, so it is the
same on every run. Then `python train.py --dataset=data/fineweb ...`.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tokens.py lives at the repository root
import tokens  # noqa: E402

DATASET = "HuggingFaceFW/fineweb-edu"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=tokens.HelpFormatter)
    parser.add_argument("--input", action="append", help="local .txt/.jsonl/.parquet files or folders instead of streaming")
    parser.add_argument("--out_dir", default=str(Path(__file__).resolve().parent), help="where the shards go")
    parser.add_argument("--dataset", default=DATASET, help="Hugging Face dataset to stream")
    parser.add_argument("--name", default="sample-10BT", help="its configuration: sample-10BT, sample-100BT, ...")
    parser.add_argument("--shard_size", type=int, default=tokens.DEFAULT_SHARD_SIZE, help="tokens per shard file")
    parser.add_argument("--val_tokens", type=int, default=0, help="the first this many tokens are val; 0 = one shard")
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
        pieces, total = tokens.iter_hf_dataset(args.dataset, args.name, args.text_field), None
        source = f"https://huggingface.co/datasets/{args.dataset} ({args.name})"
    stats = tokens.tokenize_to_shards(
        pieces, tok, out_dir, shard_size=args.shard_size, val_tokens=args.val_tokens or args.shard_size,
        total_bytes=total, num_threads=args.num_threads or None,
    )
    meta = tokens.dataset_meta(
        tok, stats["train_tokens"], stats["val_tokens"], source=source, sha256=hashes or None,
        prepare=tokens.prepare_command("data/fineweb/prepare.py", argv), files=stats["files"],
        documents=stats["documents"], shard_size=args.shard_size,
        split=f"the first {args.val_tokens or args.shard_size:,} tokens of the stream are val, the rest train",
    )
    tokens.write_meta(out_dir, meta)
    tokens.report("fineweb", out_dir, stats)
    return meta


if __name__ == "__main__":
    main()
