"""attention.py: the explicit attention path against the model's own SDPA attention, the probabilities' invariants,
the terminal report, the PNG files, and the command line end to end from a checkpoint folder."""

import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import attention
from attention import attention_maps, output_paths, report, save_grid, save_head, token_labels
from conftest import CHARS, gpt2_bpe, tiny_model
from hf import hf_config, hf_state_dict
from model import GPT
from tokens import Tokenizer



def sharp_model(seed: int = 0) -> GPT:
    """A tiny model whose attention is far from uniform, so that a wrong q or k would change the output.

    At GPT-2's initialisation (std 0.02) the scores are ~0.01 and every head averages its inputs evenly; any
    mistake in q or k would then hide below the tolerance. Scaling c_attn up makes the heads pick tokens.
    """
    model = tiny_model(seed, vocab_size=len(CHARS))
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.weight.mul_(25.0)
    return model


@pytest.fixture
def ckpt_dir(tmp_path):
    """out_dir/ckpt_000010 in the checkpoint format (model.safetensors, config.json, state.pt) with a `latest` link."""
    model = sharp_model()
    folder = tmp_path / "out" / "ckpt_000010"
    folder.mkdir(parents=True)
    save_file(hf_state_dict(model), folder / "model.safetensors")
    config = hf_config(model.config) | {"tokenizer": Tokenizer.char(CHARS).to_meta(), "iter_num": 10, "val_loss": 4.0}
    (folder / "config.json").write_text(json.dumps(config))
    torch.save({"iter_num": 10}, folder / "state.pt")
    os.symlink("ckpt_000010", tmp_path / "out" / "latest")
    return tmp_path / "out"


# ---------------------------------------------------------------------------- the probabilities


def test_rows_sum_to_one_and_future_is_exactly_zero():
    model = sharp_model()
    idx = torch.randint(0, len(CHARS), (2, 20))
    weights = attention_maps(model, idx)
    assert weights.shape == (2, 2, 4, 20, 20)  # (n_layer, B, n_head, T, T)
    torch.testing.assert_close(weights.sum(dim=-1), torch.ones(2, 2, 4, 20), atol=1e-6, rtol=0)
    future = torch.ones(20, 20, dtype=torch.bool).triu(diagonal=1)
    assert torch.equal(weights[..., future], torch.zeros_like(weights[..., future]))
    assert (weights[..., ~future] > 0).all()  # every earlier token gets some weight
    assert torch.equal(weights[..., 0, 0], torch.ones(2, 2, 4))  # the first token can only attend to itself
    assert weights.max() > 0.9  # the heads of sharp_model are peaked (this is what makes the next test bite)


# softmax weights @ v reproduce each attention module's SDPA output, for every switch: tests/test_switches.py


def test_one_sequence_and_model_state_restored():
    model = sharp_model().train()
    idx = torch.randint(0, len(CHARS), (12,))
    weights = attention_maps(model, idx)
    assert weights.shape == (2, 1, 4, 12, 12)
    assert model.training  # the mode is restored
    assert all(not b.attn._forward_pre_hooks for b in model.transformer.h)  # and no hook is left behind
    torch.testing.assert_close(weights, attention_maps(model.eval(), idx[None]), atol=0, rtol=0)
    with pytest.raises(ValueError, match="block_size"):  # hooks are removed even when the forward fails
        attention_maps(model, torch.zeros(1, 40, dtype=torch.long))
    assert all(not b.attn._forward_pre_hooks for b in model.transformer.h)


# ---------------------------------------------------------------------------- labels and the terminal report


def test_token_labels_make_whitespace_visible():
    tok = Tokenizer.char(CHARS)
    assert token_labels(tok, tok.encode("a b\nc")) == ["a", "␣", "b", "↵", "c"]
    gpt2 = gpt2_bpe()
    assert token_labels(gpt2, gpt2.encode(" the cat\tsat")) == ["␣the", "␣cat", "⇥", "sat"]


def test_report_names_the_most_attended_tokens():
    labels = ["a", "b", "c", "d"]
    weights = torch.zeros(1, 2, 4, 4)  # (n_layer, n_head, T, T): only the rows of query 3 matter here
    weights[0, 0, 3] = torch.tensor([0.1, 0.6, 0.0, 0.3])
    weights[0, 1, 3] = torch.tensor([0.7, 0.0, 0.1, 0.2])
    lines = report(weights, labels, token=3, top=2).splitlines()
    assert lines[0].startswith("token 3 'd' attends most to (top 2")
    assert lines[1].split() == ["layer", "0", "mean", "a[0]", "0.40", "b[1]", "0.30"]  # (0.1+0.7)/2, (0.6+0)/2
    assert lines[2].split() == ["head", "0", "b[1]", "0.60", "d[3]", "0.30"]
    assert lines[3].split() == ["head", "1", "a[0]", "0.70", "d[3]", "0.20"]
    # an early query sees only the tokens up to itself, however large --top is
    assert report(weights, labels, token=0, top=5).splitlines()[1].split()[3:] == ["a[0]", "0.00"]


# ---------------------------------------------------------------------------- pictures


def test_pngs_have_the_size_of_their_figures(tmp_path):
    image = pytest.importorskip("matplotlib.image")
    weights = attention_maps(sharp_model(), torch.arange(10)[None])[:, 0].numpy()  # (2, 4, 10, 10)
    labels = token_labels(Tokenizer.char(CHARS), list(range(10)))
    grid_size = save_grid(weights, labels, tmp_path / "grid.png", dpi=50)
    head_size = save_head(weights[1, 2], labels, "layer 1, head 2", tmp_path / "sub" / "head.png", dpi=50)
    grid, head = image.imread(tmp_path / "grid.png"), image.imread(tmp_path / "sub" / "head.png")
    assert grid.shape[:2] == grid_size[::-1] and head.shape[:2] == head_size[::-1]  # (height, width)
    assert grid_size[0] > grid_size[1]  # 4 heads across, 2 layers down
    assert grid_size == (round((4 * 1.2 + 1.5) * 50), round((2 * 1.2 + 1.5) * 50))  # 1.2-inch cells for 10 tokens
    # the heatmaps are drawn: the picture is not just white and labels
    assert grid[..., :3].std() > 0.05 and head[..., :3].std() > 0.05


def test_output_paths():
    assert output_paths("maps/run1", 2, 3) == (Path("maps/run1_grid.png"), Path("maps/run1_L2_H3.png"))
    assert output_paths("maps/", 0, 1) == (Path("maps/attention_grid.png"), Path("maps/attention_L0_H1.png"))
    from attention import AttentionConfig
    from config import field_help

    out_help = field_help(AttentionConfig)["out"]  # --help names the files, for a prefix and for a folder
    assert "P_grid.png" in out_help and "P_L{layer}_H{head}.png" in out_help and "/attention_grid.png" in out_help


# ---------------------------------------------------------------------------- the command line


def test_main_end_to_end(ckpt_dir, tmp_path, capsys):
    image = pytest.importorskip("matplotlib.image")
    text = "To be, or not to be"
    (tmp_path / "line.txt").write_text(text)
    argv = [f"--out_dir={ckpt_dir}", f"--text=FILE:{tmp_path / 'line.txt'}", f"--out={tmp_path / 'maps'}/",
            "--layer=-1", "--head=2", "--token=-2", "--top=3", "--dpi=40"]
    assert attention.main(argv) == 0
    printed = capsys.readouterr().out
    # the report agrees with the maps computed directly from the same weights
    model = sharp_model()
    tok = Tokenizer.char(CHARS)
    ids = tok.encode(text)
    weights = attention_maps(model, torch.tensor(ids))[:, 0]
    assert report(weights, token_labels(tok, ids), token=len(ids) - 2, top=3) in printed
    assert "token 17 'b' attends most to (top 3" in printed
    grid = image.imread(tmp_path / "maps" / "attention_grid.png")
    head = image.imread(tmp_path / "maps" / "attention_L1_H2.png")
    # the PNGs draw these weights: layer -1 = 1 and head 2 in the full-size one, at --dpi=40
    labels = token_labels(tok, ids)
    title = "layer 1, head 2: how much each token (row) attends to each earlier token (column)"
    w, h = save_head(weights[1, 2].numpy(), labels, title, tmp_path / "head.png", dpi=40)
    save_head(weights[1, 0].numpy(), labels, title, tmp_path / "other_head.png", dpi=40)
    assert head.shape[:2] == (h, w) and np.array_equal(head, image.imread(tmp_path / "head.png"))
    assert not np.array_equal(head, image.imread(tmp_path / "other_head.png"))
    save_grid(weights.numpy(), labels, tmp_path / "grid.png", dpi=40)
    assert np.array_equal(grid, image.imread(tmp_path / "grid.png"))


@pytest.mark.parametrize("arg, words", [
    ("--layer=2", "--layer=2 is out of range: there are 2 layers"),
    ("--head=-5", "--head=-5 is out of range: there are 4 heads"),
    ("--token=30", "--token=30 is out of range"),
    ("--text=café", "--text cannot be encoded: character 'é'"),
    ("--text=" + "a" * 33, "--text is 33 tokens; this model takes 1 to 32"),
    ("--checkpoint=first", "--checkpoint must be latest or best"),
    ("--text=FILE:/nonexistent/line.txt", "--text=FILE:/nonexistent/line.txt cannot be read as UTF-8 text"),
])
def test_main_user_errors_are_one_line(ckpt_dir, tmp_path, arg, words):
    with pytest.raises(SystemExit) as e:
        attention.main([f"--out_dir={ckpt_dir}", f"--out={tmp_path}/", "--text=Hello", arg])
    assert words in str(e.value) and "\n" not in str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_exits_with_one_line(ckpt_dir):
    with pytest.raises(SystemExit) as e:
        attention.main([f"--out_dir={ckpt_dir}", "--device=cuda"])
    assert "no CUDA GPU" in str(e.value) and "\n" not in str(e.value)


def test_text_from_standard_input(ckpt_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello there"))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # the report is enough here; no PNG to draw
    assert attention.main([f"--out_dir={ckpt_dir}", "--text=-", f"--out={tmp_path}/"]) == 0
    assert "token 10 'e' attends most to" in capsys.readouterr().out


def test_missing_matplotlib_still_prints_the_report(ckpt_dir, tmp_path, monkeypatch, capsys):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # `import matplotlib` now raises ImportError
    assert attention.main([f"--out_dir={ckpt_dir}", "--text=Hello there", f"--out={tmp_path}/"]) == 0
    printed = capsys.readouterr().out
    assert "pip install matplotlib (or pip install -e '.[plot]')" in printed
    assert "token 10 'e' attends most to" in printed
    assert not list(tmp_path.glob("*.png"))


def test_maps_go_into_the_run_folder_by_default(ckpt_dir, capsys, monkeypatch, tmp_path):
    pytest.importorskip("matplotlib")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # nothing may land in the working directory
    assert attention.main([f"--out_dir={ckpt_dir}", "--text=Hello", "--layer=1", "--head=2"]) == 0
    assert (ckpt_dir / "attention_grid.png").is_file() and (ckpt_dir / "attention_L1_H2.png").is_file()
    assert list((tmp_path / "cwd").iterdir()) == []
