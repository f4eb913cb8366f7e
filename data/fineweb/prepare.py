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

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # prepare_data.py lives at the repository root
import errors  # noqa: E402

errors.install(__name__)  # before numpy loads: a Ctrl-C while it does is one line too
import prepare_data  # noqa: E402

DATASET = "HuggingFaceFW/fineweb-edu"


def main(argv: list[str] | None = None) -> dict:
    return prepare_data.prepare_web_corpus(argv, corpus="fineweb", doc=__doc__, dataset=DATASET, name="sample-10BT",
                                     val_tokens=0)


if __name__ == "__main__":
    main()
