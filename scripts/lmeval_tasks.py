r"""Two lm-evaluation-harness tasks from a local text, to score a model offline (docs/eval.md):

    python scripts/lmeval_tasks.py --input=tinyshakespeare.txt --out_dir=tasks
    lm_eval --model hf --model_args pretrained=out/x/latest \
        --include_path tasks --tasks tiny_mc,tiny_ppl

From the text's last --val_chars characters (Tiny Shakespeare's val split, as
data/shakespeare_char cuts it): tiny_ppl (loglikelihood_rolling) scores its first --docs
passages, blank-line separated, of over 200 characters; tiny_mc (multiple_choice, acc) asks
for --questions lines' true next line among it and 3 lines from elsewhere.
"""

import argparse
import json
import random
import sys
from pathlib import Path


def make_tasks(text: str, n_docs: int, n_questions: int, seed: int) -> tuple[list[str], list[dict]]:
    """(passages, questions) of text: whole passages after the first (which the val split cuts), and questions
    {"question": a line, "choices": its next line and 3 others shuffled, "label": where the next line went}."""
    docs = [p for p in text.split("\n\n")[1:] if len(p) > 200][:n_docs]
    lines = [line for line in text.splitlines() if len(line) > 30 and not line.endswith(":")]  # no speaker names
    rng = random.Random(seed)
    questions = []
    for i in rng.sample(range(len(lines) - 1), min(n_questions, len(lines) - 1)):
        choices = [lines[i + 1]] + [lines[j] for j in rng.sample(range(len(lines)), 3)]
        order = list(range(4))
        rng.shuffle(order)
        questions.append({"question": lines[i], "choices": [choices[k] for k in order], "label": order.index(0)})
    return docs, questions


def write_tasks(folder: Path, docs: list[str], questions: list[dict]) -> None:
    """tiny_ppl.yaml over docs.jsonl and tiny_mc.yaml over mc.jsonl in folder (lm-eval wants absolute data paths)."""
    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (folder / "mc.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    common = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {}\ntest_split: test\n"
    (folder / "tiny_ppl.yaml").write_text(
        "task: tiny_ppl\n" + common.format(folder / "docs.jsonl") + "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n  - metric: word_perplexity\n'
        "  - metric: byte_perplexity\n  - metric: bits_per_byte\n")
    (folder / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n" + common.format(folder / "mc.jsonl") + "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, required=True, help="a UTF-8 text file")
    parser.add_argument("--out_dir", type=Path, required=True, help="folder for the task files (created)")
    parser.add_argument("--val_chars", type=int, default=111540, help="the text's tail to draw from (0: all)")
    parser.add_argument("--docs", type=int, default=40, help="passages in tiny_ppl")
    parser.add_argument("--questions", type=int, default=100, help="questions in tiny_mc")
    parser.add_argument("--seed", type=int, default=0, help="draws the questions' lines and their order")
    args = parser.parse_args(argv)
    if not args.input.is_file():
        sys.exit(f"--input={args.input} is not a file: give the text to draw the tasks from")
    text = args.input.read_text(encoding="utf-8")[-args.val_chars:]
    docs, questions = make_tasks(text, args.docs, args.questions, args.seed)
    if not docs or not questions:
        sys.exit(f"--input={args.input} gave {len(docs)} passages and {len(questions)} questions: it needs "
                 f"blank-line separated passages of over 200 characters and lines of over 30 (or a larger --val_chars)")
    write_tasks(args.out_dir, docs, questions)
    print(f"{len(docs)} passages, {len(questions)} questions -> {args.out_dir}/tiny_ppl.yaml, tiny_mc.yaml")


if __name__ == "__main__":
    main()
