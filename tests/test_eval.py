"""eval.py: bits per byte against a hand computation, the sliding window against plain forward passes, eval.py
against train.py's evaluation, HellaSwag against a hand-built model, and the one-line errors.

    python -m pytest tests/test_eval.py

Tiny fp32 models on the CPU, texts made here; nothing is downloaded.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import train
from checkpoint import save_checkpoint
from conftest import exit_message, gpt2_bpe, tiny_model
from eval import git_blob_id, main, read_hellaswag, score_hellaswag, score_tokens, windows
from model import GPT
from prepare_data import dataset_meta, write_meta
from tokens import Tokenizer, token_dtype, write_tokens

REPO = Path(__file__).resolve().parents[1]
# Some characters take 2 or 3 UTF-8 bytes, so bits per byte differs from bits per character.
TEXT = ("Thou art more lovely — and more temperate; café, naïve, señor. " * 40).strip()
CHARS = Tokenizer.char("".join(sorted(set(TEXT))))


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def save_model(folder: Path, model: GPT, tokenizer: Tokenizer) -> Path:
    save_checkpoint(folder, model, {"tokenizer": tokenizer.to_meta()}, {}, iter_num=0, is_best=False)
    return folder


def hand_nats(model: GPT, ids: list[int]) -> float:
    """Nats of ids[1:] from one forward pass over ids[:-1], by log-softmax in float64."""
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids[:-1]]))
    logp = torch.log_softmax(logits[0].double(), dim=-1)
    return -logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum().item()


# ------------------------------------------------------------------------------------------------ bits per byte


def test_bpb_of_a_char_model_equals_the_hand_computation(tmp_path: Path) -> None:
    text = "é" + TEXT[:40]  # shorter than the block: one forward pass; the unscored first token has 2 bytes
    model = tiny_model(vocab_size=CHARS.vocab_size, block_size=64)
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    record = main([f"--out_dir={save_model(tmp_path / 'run', model, CHARS)}", f"--input={tmp_path / 't.txt'}",
                   "--device=cpu", "--json=true"])
    nats, nbytes = hand_nats(model, CHARS.encode(text)), len(text[1:].encode("utf-8"))
    assert nbytes > len(text) - 1  # the multi-byte characters count
    assert record["tokens"] == len(text) - 1 and record["bytes"] == nbytes
    assert record["loss"] == pytest.approx(nats / (len(text) - 1), rel=1e-5)
    assert record["bpb"] == pytest.approx(nats / math.log(2) / nbytes, rel=1e-5)
    assert record["ppl"] == pytest.approx(math.exp(record["loss"]), rel=1e-9)


def test_bpb_of_a_bpe_model_counts_the_bytes_of_the_text(tmp_path: Path) -> None:
    bpe = gpt2_bpe()
    text = "— a café in Zürich, naïve “quotes” and 日本語."  # the unscored first token is 3 bytes
    ids = bpe.encode(text)
    model = tiny_model(vocab_size=bpe.vocab_size, block_size=64)
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    record = main([f"--out_dir={save_model(tmp_path / 'run', model, bpe)}", f"--input={tmp_path / 't.txt'}",
                   "--device=cpu"])
    nbytes = len(text.encode("utf-8")) - len(bpe.decode(ids[:1]).encode("utf-8"))  # all but the first token
    assert record["bytes"] == nbytes and record["tokens"] == len(ids) - 1
    assert record["bpb"] == pytest.approx(hand_nats(model, ids) / math.log(2) / nbytes, rel=1e-5)


def test_token_byte_lengths_sum_to_the_utf8_length() -> None:
    bpe = gpt2_bpe()
    lengths = bpe.token_byte_lengths()
    assert lengths[bpe.eot_token] == 0  # end-of-text stands for no text
    for tok, text in ((bpe, TEXT), (CHARS, TEXT)):
        assert tok.token_byte_lengths()[tok.encode(text)].sum() == len(text.encode("utf-8"))


# ------------------------------------------------------------------------------------------------ sliding window


@pytest.mark.parametrize("n, block, stride", [(1, 4, 4), (3, 8, 4), (10, 4, 4), (10, 4, 3), (37, 8, 1), (37, 8, 5),
                                              (64, 16, 16), (65, 16, 8)])
def test_windows_score_each_target_once_with_enough_context(n: int, block: int, stride: int) -> None:
    plan, seen = windows(n, block, stride), []
    length = min(block, n)
    for k, (start, first) in enumerate(plan):
        assert 0 <= start and start + length <= n
        seen += range(start + first, start + length)
        if k:  # past the first window, every scored target sees block - stride + 1 tokens or more
            assert first + 1 >= block - stride + 1
    assert seen == list(range(n))


def test_stride_equal_to_block_size_is_non_overlapping_chunks() -> None:
    block = 8
    model = tiny_model(vocab_size=CHARS.vocab_size, block_size=block)
    ids = np.array(CHARS.encode(TEXT[:3 * block + 1]))
    chunks = torch.tensor(ids[:-1]).view(3, block), torch.tensor(ids[1:]).view(3, block)
    with torch.no_grad():
        _, loss = model(*chunks)
    assert score_tokens(model, ids, stride=block, batch_size=2) == pytest.approx(loss.item() * 3 * block, rel=1e-5)


def test_stride_one_gives_every_token_a_full_block_of_context() -> None:
    """The oracle: each target past the first block scored by its own forward pass over the block before it."""
    block = 8
    model = tiny_model(vocab_size=CHARS.vocab_size, block_size=block)
    ids = CHARS.encode(TEXT[:30])
    expected = hand_nats(model, ids[:block + 1])
    for p in range(block + 1, len(ids)):
        expected += hand_nats(model, ids[p - block:p + 1]) - hand_nats(model, ids[p - block:p])
    assert score_tokens(model, np.array(ids), stride=1, batch_size=5) == pytest.approx(expected, rel=1e-5)


def test_a_text_shorter_than_the_block_is_one_forward_pass() -> None:
    model = tiny_model(vocab_size=CHARS.vocab_size, block_size=32)
    ids = CHARS.encode(TEXT[:11])
    with torch.no_grad():
        _, loss = model(torch.tensor([ids[:-1]]), torch.tensor([ids[1:]]))
    for stride in (1, 16, 32):
        assert score_tokens(model, np.array(ids), stride=stride) == pytest.approx(loss.item() * 10, rel=1e-5)


# -------------------------------------------------------------------------------------------- eval.py vs train.py


@pytest.mark.parametrize("switches", [[], ["--pos_embedding=rope", "--norm=rmsnorm", "--qk_norm=true", "--mlp=relu2",
                                          "--tie_embeddings=false", "--bias=false", "--logit_softcap=15"]],
                         ids=["gpt2", "modern"])
def test_eval_on_a_prepared_split_equals_train_evaluation(tmp_path: Path, switches: list[str]) -> None:
    """A val split of block_size + 1 tokens has one window, which train.py's batches and eval.py's stride-block
    pass both score whole: the loss and the bpb that train.py records are eval.py's."""
    block = 16
    ids = np.array(CHARS.encode(TEXT))
    data = tmp_path / "data"
    data.mkdir()
    dtype = token_dtype(CHARS.vocab_size)
    write_tokens(data / "train.bin", ids[:2000], dtype)
    write_tokens(data / "val.bin", ids[2000:2000 + block + 1], dtype)
    write_meta(data, dataset_meta(CHARS, 2000, block + 1, source="test", sha256=None, prepare="tests/test_eval.py"))
    out = tmp_path / "run"
    train.main([f"--dataset={data}", f"--out_dir={out}", "--device=cpu", "--n_layer=2", "--n_head=2", "--n_embd=16",
                f"--block_size={block}", "--batch_size=2", "--gradient_accumulation_steps=1", "--max_iters=3",
                "--eval_interval=3", "--eval_iters=2", "--warmup_iters=1", "--lr_decay_iters=3", "--dropout=0", *switches])
    recorded = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert recorded["iter"] == 3 and recorded["val_bpb"] is not None
    record = main([f"--out_dir={out}", f"--dataset={data}", "--split=val", f"--stride={block}", "--device=cpu"])
    assert record["tokens"] == block
    assert record["loss"] == pytest.approx(recorded["val_loss"], rel=1e-5)
    assert record["bpb"] == pytest.approx(recorded["val_bpb"], rel=1e-5)
    assert record["bpb"] != pytest.approx(record["loss"] / math.log(2), rel=1e-3)  # the multi-byte chars count


# ----------------------------------------------------------------------------------------------------- HellaSwag


class Unigram(torch.nn.Module):
    """A hand-built model: the same next-token distribution at every position."""

    def __init__(self, probs: dict[str, float], tokenizer: Tokenizer, block_size: int = 64) -> None:
        super().__init__()
        p = torch.full((tokenizer.vocab_size,), 1e-4)
        for c, q in probs.items():
            p[tokenizer.encode(c)[0]] = q
        self.logp = torch.nn.Parameter(torch.log(p / p.sum()))
        self.config = SimpleNamespace(block_size=block_size)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        return self.logp.expand(*idx.shape, -1), None


def test_hellaswag_picks_the_ending_the_model_prefers() -> None:
    """' a' has the lowest total loss, ' aaaaaaaa' the lowest loss per token: acc and acc_norm part ways."""
    tok = Tokenizer.char(" .abcx")
    model = Unigram({" ": 0.05, "a": 0.8, "b": 0.1, "c": 0.05}, tok)
    examples = [("x", ["aaaaaaaa", "a", "bbbb", "c"], 0),  # acc_norm right, acc wrong
                ("x.", ["aaaaaaaa", "a", "bbbb", "c"], 1),  # acc right, acc_norm wrong
                ("xx", ["bbbb", "cc", "a", "c"], 2),  # both right
                ("x", ["aaaaaaaa", "a", "bbbb", "c"], 0)]
    for batch_size in (1, 3):
        assert score_hellaswag(model, tok, examples, batch_size) == {"acc": 2 / 4, "acc_norm": 3 / 4}
    # rows longer than the block keep their last tokens: cut to its last 3 tokens ("aaa"), the long ending has the
    # lowest total loss too
    short = Unigram({" ": 0.05, "a": 0.8, "b": 0.1, "c": 0.05}, tok, block_size=3)
    assert score_hellaswag(short, tok, examples[:1]) == {"acc": 1.0, "acc_norm": 1.0}


def hellaswag_line(ctx: str, endings: list[str], label: int) -> str:
    return json.dumps({"ind": 0, "ctx": ctx, "endings": endings, "label": label, "split": "val"})


def test_hellaswag_from_a_file_end_to_end(tmp_path: Path) -> None:
    path = tmp_path / "hs.jsonl"
    path.write_text("\n".join(hellaswag_line(f"A man{'.' * i}", [" a", " b", " c", " d"], i % 4)
                              for i in range(5)) + "\n")
    assert len(read_hellaswag(path, limit=3)) == 3
    tok = Tokenizer.char(" .Aabcdmn")
    run = save_model(tmp_path / "run", tiny_model(vocab_size=tok.vocab_size, block_size=32), tok)
    record = main([f"--out_dir={run}",
                   "--task=hellaswag", f"--input={path}", "--device=cpu", "--batch_size=2"])
    assert record["examples"] == 5 and 0 <= record["acc_norm"] <= 1 and record["bpb"] is None


# ----------------------------------------------------------------------------------------------------- bad input


@pytest.fixture
def char_run(tmp_path: Path) -> Path:
    return save_model(tmp_path / "run", tiny_model(vocab_size=CHARS.vocab_size, block_size=16), CHARS)


@pytest.mark.parametrize("text, expected", [
    ("", "holds no text"),
    ("T", "holds a single token"),
    ("Thou Ω art Ω ☃", "3 characters of 2 kinds that this char model's vocabulary of"),
])
def test_bad_text_is_a_one_line_error(char_run: Path, tmp_path: Path, text: str, expected: str) -> None:
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    message = exit_message(main, [f"--out_dir={char_run}", f"--input={tmp_path / 't.txt'}", "--device=cpu"])
    assert expected in message
    if "kinds" in message:
        assert "'Ω' (2x)" in message and "'☃' (1x)" in message


def test_a_dataset_with_another_tokenizer_is_refused(char_run: Path, tmp_path: Path) -> None:
    other = Tokenizer.char("abc")
    write_tokens(tmp_path / "val.bin", np.array([0, 1, 2, 0]), token_dtype(3))
    write_meta(tmp_path, dataset_meta(other, 0, 4, source="test", sha256=None, prepare="tests/test_eval.py"))
    message = exit_message(main, [f"--out_dir={char_run}", f"--dataset={tmp_path}", "--device=cpu"])
    assert "uses tokenizer char (3 symbols" in message and "the checkpoint was trained with" in message


@pytest.mark.parametrize("bad_line, expected", [
    ("{not json", "not JSON"),
    (json.dumps({"ctx": "A man", "endings": ["a", "b", "c"], "label": 0}), "\"endings\" (4 texts)"),
    (json.dumps({"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": 7}), "\"label\" (0-3)"),
])
def test_a_malformed_hellaswag_line_is_a_one_line_error(char_run: Path, tmp_path: Path, bad_line: str,
                                                         expected: str) -> None:
    path = tmp_path / "hs.jsonl"
    path.write_text(hellaswag_line("Thou", ["a", "b", "c", "d"], 0) + "\n" + bad_line + "\n")
    message = exit_message(main, [f"--out_dir={char_run}", "--task=hellaswag", f"--input={path}", "--device=cpu"])
    assert f"{path}:2:" in message and expected in message


def test_a_binary_hellaswag_file_names_its_file_and_line(char_run: Path, tmp_path: Path) -> None:
    path = tmp_path / "hs.jsonl"
    path.write_bytes((hellaswag_line("Thou", ["a", "b", "c", "d"], 0) + "\n").encode() + b"\x00\xff\xfe\x89PNG\n")
    message = exit_message(main, [f"--out_dir={char_run}", "--task=hellaswag", f"--input={path}", "--device=cpu"])
    assert message.startswith(f"{path}:2: not UTF-8 text (byte 2 of the line)")


@pytest.mark.parametrize("task", ["text", "hellaswag"])
def test_a_pipe_or_a_device_as_input_is_named_and_never_read(char_run: Path, tmp_path: Path, task: str) -> None:
    """A FIFO with no writer would block a reader forever: it is refused without being opened."""
    fifo = tmp_path / "in.txt"
    os.mkfifo(fifo)
    for path, what in ((fifo, "a pipe (FIFO), not a regular file"), ("/dev/zero", "a device, not a regular file")):
        message = exit_message(main, [f"--out_dir={char_run}", f"--task={task}", f"--input={path}", "--device=cpu"])
        assert message.startswith(f"--input {path}: {what}"), message


def test_errors_exit_non_zero_without_a_traceback(char_run: Path, tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("")
    result = subprocess.run([sys.executable, str(REPO / "eval.py"), f"--out_dir={char_run}",
                             f"--input={tmp_path / 'empty.txt'}", "--device=cpu"],
                            capture_output=True, text=True, timeout=120, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert result.returncode != 0 and result.stdout == ""
    assert "Traceback" not in result.stderr and result.stderr.strip().splitlines()[-1].endswith("pass a longer text")


def test_settings_that_cannot_work_are_refused() -> None:
    assert "not both" in exit_message(main, ["--input=a.txt", "--dataset=b"])
    assert "--input=FILE_OR_FOLDER or --dataset=DIR" in exit_message(main, [])
    assert "stride must be at least 1" in exit_message(main, ["--input=a.txt", "--stride=0"])


def test_json_record_has_every_field(char_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "t.txt").write_text(TEXT[:200], encoding="utf-8")
    main([f"--out_dir={char_run}", f"--input={tmp_path / 't.txt'}", "--device=cpu", "--json=true"])
    record = json.loads(capsys.readouterr().out)
    assert {"model", "data", "tokens", "bytes", "loss", "ppl", "bpb", "acc", "acc_norm", "seconds"} <= set(record)
    assert record["tokens"] == 199 and record["stride"] == 8  # block_size 16 // 2


def test_json_is_alone_on_stdout_and_threads_are_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture) -> None:
    """The cached HellaSwag file's "using ... (already downloaded)" went to stdout before the JSON; and eval.py took
    every core whatever --threads said (docs/training.md: Threads)."""
    import eval as eval_script

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "hellaswag_val.jsonl").write_text("\n".join(hellaswag_line(f"A man{'.' * i}", [" a", " b", " c", " d"],
                                                                       i % 4) for i in range(5)) + "\n")
    monkeypatch.setenv("SMALLGPT_CACHE", str(cache))
    monkeypatch.setattr(eval_script, "HELLASWAG_BLOB", git_blob_id(cache / "hellaswag_val.jsonl"))  # as if canonical
    tok = Tokenizer.char(" .Aabcdmn")
    run = save_model(tmp_path / "run", tiny_model(vocab_size=tok.vocab_size, block_size=32), tok)
    torch.set_num_threads(2)  # the module's fixture restores its own setting afterwards
    capsys.readouterr()
    record = main([f"--out_dir={run}", "--task=hellaswag", "--limit=5", "--device=cpu", "--json=true", "--threads=1"])
    captured = capsys.readouterr()
    assert json.loads(captured.out) == record and "already downloaded" in captured.err
    assert torch.get_num_threads() == 1
