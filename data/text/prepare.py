"""Any corpus of your own: .txt files (one document each), .jsonl (one document a line), .parquet (a row each).

    python data/text/prepare.py --input ~/corpora/sotu.txt --input ~/corpora/kjv.txt --out_dir=data/sotu_kjv
    python data/text/prepare.py --input my_folder/ --tokenizer=char --out_dir=data/mine
    python train.py --dataset=data/sotu_kjv

Folders are searched recursively, files are read in sorted order. GPT-2 BPE puts the end-of-text token between
documents; a char vocabulary has none, so its documents simply follow each other. The first (1 - val_fraction) of
the source bytes is train, the rest val (nanoGPT's split). Large corpora stream through in pieces on all cores and
are written in shards of --shard_size tokens (a split that fits in one shard is plain train.bin / val.bin).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # prepare_data.py lives at the repository root
import errors  # noqa: E402

errors.install(__name__)  # before numpy loads: a Ctrl-C while it does is one line too
import prepare_data  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=prepare_data.HelpFormatter)
    parser.add_argument("--input", action="append", required=True, help="a .txt/.jsonl/.parquet file or a folder; repeatable")
    parser.add_argument("--tokenizer", default="gpt2", help="'char', or a tiktoken encoding name (gpt2, cl100k_base, ...)")
    parser.add_argument("--out_dir", default=str(Path(__file__).resolve().parent), help="where the files go")
    parser.add_argument("--val_fraction", type=float, default=0.1, help="the last this much of the source bytes is val")
    parser.add_argument("--shard_size", type=int, default=prepare_data.DEFAULT_SHARD_SIZE, help="tokens per shard file")
    parser.add_argument("--text_field", default="text", help="the field (jsonl) or column (parquet) holding the text")
    parser.add_argument("--num_threads", type=int, default=0, help="tokenizer threads; 0 = all cores")
    args = parser.parse_args(argv)
    prepare_data.check_args(args)
    prep = prepare_data.Preparation(Path(args.out_dir))
    files = prepare_data.find_inputs(args.input)
    hashes: dict[str, str] = {}

    def pieces():  # a fresh pass over the corpus each time it is called
        return prepare_data.iter_files(files, hashes, args.text_field)

    if args.tokenizer == "char":
        tok = prepare_data.Tokenizer.char(prepare_data.collect_chars(pieces()))  # a first pass to find the vocabulary
    else:
        try:
            tok = prepare_data.Tokenizer.tiktoken(args.tokenizer)
        except ValueError as e:
            raise SystemExit(f"--tokenizer={args.tokenizer}: {e}, or char") from None
    total = sum(f.stat().st_size for f in files)
    with prep:
        stats = prepare_data.tokenize_to_shards(
            pieces(), tok, prep.dir, shard_size=args.shard_size, train_bytes=int(total * (1 - args.val_fraction)),
            total_bytes=total, num_threads=args.num_threads or None,
        )
        meta = prepare_data.dataset_meta(
            tok, stats["train_tokens"], stats["val_tokens"], source=[str(f) for f in files], sha256=hashes,
            prepare=prepare_data.prepare_command("data/text/prepare.py", argv), files=stats["files"],
            documents=stats["documents"], shard_size=args.shard_size,
            split=f"by source bytes in file order: the first {1 - args.val_fraction:.0%} train, the rest val",
        )
        prep.commit(meta)
    prepare_data.report("text", Path(args.out_dir), stats)
    return meta


if __name__ == "__main__":
    main()
