"""What --quantize=int8 costs in quality on a trained checkpoint (docs/benchmarks.md's int8 table):

    python scripts/int8_quality.py --out_dir=out/shakespeare_char_cpu --dataset=shakespeare_char

eval.py's loss and bits per byte on the dataset's val split, float and int8; and greedy decoding from 8 prompts
(256-token windows of the val text, each cut to its first 8 tokens): the share of the int8 model's greedy choices
that equal the float model's, both on the float model's own continuation (teacher-forced, so that one different
token does not change all the contexts after it) and freely, up to the first difference.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import eval as eval_py  # noqa: E402
from checkpoint import load_for_inference  # noqa: E402
from tokens import load_split, resolve_dataset  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", required=True, help="a training run (its latest checkpoint) or checkpoint folder")
    parser.add_argument("--dataset", required=True, help="the prepared dataset whose val split is scored")
    parser.add_argument("--tokens", type=int, default=256, help="greedy tokens per prompt")
    parser.add_argument("--prompts", type=int, default=8, help="prompts, spread over the val split")
    args = parser.parse_args()

    scores = {}
    for quantize in ("none", "int8"):
        scores[quantize] = eval_py.main([f"--out_dir={args.out_dir}", f"--dataset={args.dataset}", "--device=cpu",
                                         f"--quantize={quantize}", "--json=true"])
    cpu = torch.device("cpu")
    fp32, _, _, _ = load_for_inference(args.out_dir, None, "latest", cpu)
    int8, _, _, _ = load_for_inference(args.out_dir, None, "latest", cpu, quantize="int8")
    val = np.concatenate(load_split(resolve_dataset(args.dataset), "val"))
    starts = torch.linspace(0, len(val) - 8, args.prompts).long().tolist()
    prompts = torch.stack([torch.from_numpy(val[s:s + 8].astype("int64")) for s in starts])  # (prompts, 8)
    with torch.no_grad():
        reference = fp32.generate(prompts, args.tokens, temperature=0)  # (prompts, 8 + tokens)
        free = int8.generate(prompts, args.tokens, temperature=0)
        same, first = 0, []
        block = int8.config.block_size
        for row in range(len(prompts)):  # teacher-forced: int8's choice after each prefix of the float text
            for t in range(8, 8 + args.tokens):
                context = reference[row:row + 1, max(0, t - block):t]
                same += int(int8(context, logits_at=-1)[0][0, -1].argmax().item() == reference[row, t].item())
            diff = (free[row, 8:] != reference[row, 8:]).nonzero()
            first.append(diff[0].item() if len(diff) else args.tokens)
    result = {
        "loss": {q: scores[q]["loss"] for q in scores}, "bpb": {q: scores[q]["bpb"] for q in scores},
        "loss_change": scores["int8"]["loss"] / scores["none"]["loss"] - 1,
        "greedy_same_teacher_forced": same / (len(prompts) * args.tokens),
        "greedy_same_until_first_difference": sum(first) / (len(prompts) * args.tokens),
        "first_difference_per_prompt": first,
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
