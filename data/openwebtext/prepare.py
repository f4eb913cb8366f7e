"""OpenWebText (~9B GPT-2 tokens, nanoGPT's GPT-2 reproduction corpus): streamed through `datasets`, sharded.

    pip install -e '.[web]'
    python data/openwebtext/prepare.py                          # ~8M documents, ~9B tokens, ~18 GB of shards
    python data/openwebtext/prepare.py --input owt_part.jsonl --out_dir=/tmp/owt      # offline, from a local copy

Documents stream from the Hugging Face hub (or --input files: .txt/.jsonl, and .parquet with pyarrow), are tokenized
on all cores and written as shards of --shard_size tokens. Every document is preceded by GPT-2's end-of-text token
(but the first). The validation split is the first --val_tokens tokens of the stream (default 4M, about the size of
nanoGPT's random 0.05% val split, which a stream cannot draw). Then `python train.py --dataset=data/openwebtext ...`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tokens.py lives at the repository root
import errors  # noqa: E402

errors.install(__name__)  # before numpy loads: a Ctrl-C while it does is one line too
import tokens  # noqa: E402

DATASET = "Skylion007/openwebtext"  # what nanoGPT's load_dataset("openwebtext") resolves to


def main(argv: list[str] | None = None) -> dict:
    return tokens.prepare_web_corpus(argv, corpus="openwebtext", doc=__doc__, dataset=DATASET, name=None,
                                     val_tokens=4_000_000)


if __name__ == "__main__":
    main()
