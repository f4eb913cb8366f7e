"""Tiny Shakespeare with GPT-2's BPE (tiktoken "gpt2"), nanoGPT's 90/10 train/val split.

    python data/shakespeare/prepare.py                                           # downloads input.txt once (1.1 MB)
    python data/shakespeare/prepare.py --input ~/Downloads/input.txt --out_dir=/tmp/s

Writes train.bin (301,966 tokens), val.bin (36,059 tokens) and meta.json into this folder (or --out_dir); then
fine-tune GPT-2 on it with `python train.py --dataset=data/shakespeare ...`. The text is one document: no end-of-text.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # prepare_data.py lives at the repository root
import errors  # noqa: E402

errors.install(__name__)  # before numpy loads: a Ctrl-C while it does is one line too
import prepare_data  # noqa: E402

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=prepare_data.HelpFormatter)
    parser.add_argument("--input", help="local copy of input.txt instead of downloading it")
    parser.add_argument("--out_dir", default=str(Path(__file__).resolve().parent), help="where the files go")
    parser.add_argument("--val_fraction", type=float, default=0.1, help="the last this much of the text is val")
    parser.add_argument("--encoding", default="gpt2", help="tiktoken encoding name")
    args = parser.parse_args(argv)
    prepare_data.check_args(args)
    out_dir = Path(args.out_dir)
    prep = prepare_data.Preparation(out_dir)

    path = prepare_data.local_or_download(args.input, URL, out_dir / "input.txt", SHA256)
    text = prepare_data.read_utf8(path)
    tok = prepare_data.Tokenizer.tiktoken(args.encoding)
    n = int(len(text) * (1 - args.val_fraction))  # split the characters first, then encode each part: nanoGPT's way
    if not 0 < n < len(text):
        raise SystemExit(f"{path} has {len(text):,} characters: too few for a train and a val split with "
                         f"--val_fraction={args.val_fraction}; use a longer text")
    train_ids, val_ids = tok.encode_batch([text[:n], text[n:]])
    dtype, files = prepare_data.token_dtype(tok.vocab_size), {}
    with prep:
        for split, ids in (("train", train_ids), ("val", val_ids)):
            with prepare_data.ShardWriter(prep.dir, split, dtype) as w:
                w.write(ids)
            files[split] = [f.name for f in w.files]
        meta = prepare_data.dataset_meta(
            tok, len(train_ids), len(val_ids), source=str(args.input) if args.input else URL,
            sha256=prepare_data.file_sha256(path),
            prepare=prepare_data.prepare_command("data/shakespeare/prepare.py", argv),
            files=files, split=f"by characters: the first {1 - args.val_fraction:.0%} train, the rest val",
        )
        prep.commit(meta)
    print(f"shakespeare: {len(train_ids):,} train + {len(val_ids):,} val tokens ({args.encoding}) -> {out_dir}")
    return meta


if __name__ == "__main__":
    main()
