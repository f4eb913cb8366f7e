"""Tiny Shakespeare at the character level: 65 symbols, nanoGPT's 90/10 train/val split.

    python data/shakespeare_char/prepare.py                                      # downloads input.txt once (1.1 MB)
    python data/shakespeare_char/prepare.py --input ~/Downloads/input.txt --out_dir=/tmp/sc

Writes train.bin (1,003,854 tokens), val.bin (111,540 tokens) and meta.json into this folder (or --out_dir);
then `python train.py --dataset=data/shakespeare_char`.
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
    args = parser.parse_args(argv)
    prepare_data.check_args(args)
    out_dir = Path(args.out_dir)
    prep = prepare_data.Preparation(out_dir)

    path = prepare_data.local_or_download(args.input, URL, out_dir / "input.txt", SHA256)
    text = prepare_data.read_utf8(path)
    n = int(len(text) * (1 - args.val_fraction))  # split by characters, as nanoGPT does
    if not 0 < n < len(text):
        raise SystemExit(f"{path} has {len(text):,} characters: too few for a train and a val split with "
                         f"--val_fraction={args.val_fraction}; use a longer text")
    tok = prepare_data.Tokenizer.char("".join(sorted(set(text))))
    dtype, files = prepare_data.token_dtype(tok.vocab_size), {}
    with prep:
        for split, part in (("train", text[:n]), ("val", text[n:])):
            with prepare_data.ShardWriter(prep.dir, split, dtype) as w:
                w.write(tok.encode(part))
            files[split] = [f.name for f in w.files]
        meta = prepare_data.dataset_meta(
            tok, n, len(text) - n, source=str(args.input) if args.input else URL, sha256=prepare_data.file_sha256(path),
            prepare=prepare_data.prepare_command("data/shakespeare_char/prepare.py", argv),
            files=files, split=f"by characters: the first {1 - args.val_fraction:.0%} train, the rest val",
        )
        prep.commit(meta)
    print(f"shakespeare_char: {tok.vocab_size} symbols, {n:,} train + {len(text) - n:,} val tokens -> {out_dir}")
    return meta


if __name__ == "__main__":
    main()
