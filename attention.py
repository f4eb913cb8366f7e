"""Attention maps: which earlier tokens every head of a trained GPT looks at, as PNG heatmaps and a terminal report.

    python attention.py --out_dir=out/shakespeare_char_cpu --text="ROMEO: But soft, what light through yonder window"
    python attention.py --init_from=gpt2 --text="The animal didn't cross the street because it was too tired"
    python attention.py --init_from=gpt2 --layer=5 --head=1 --token=-1 --top=5 --out=out/maps/
    python attention.py --help

For every layer and head it computes the attention probabilities softmax(q kᵀ / √head_dim) under the causal mask
through an explicit path used only here: the model runs its ordinary forward once (model.py's fast SDPA path,
untouched), a forward pre-hook captures the input of each block's attention module, and the probabilities are
recomputed from that input with the module's own qkv() (c_attn, then QK-norm and RoPE as switched).

Writes OUT_grid.png (one heatmap per layer and head: rows are the attending tokens, columns the tokens attended to)
and OUT_L{layer}_H{head}.png (the chosen --layer/--head at full size), OUT being out_dir/attention unless --out
says otherwise, then prints, for the query token --token,
the tokens it attends to most in each layer, averaged over the heads and for each head. The PNGs need matplotlib
(pip install -e '.[plot]'); without it the terminal report is still printed.
"""

from __future__ import annotations

import errors

errors.install(__name__)  # before the other imports: a Ctrl-C while torch loads is one line too

import inspect
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.nn import functional as F

from checkpoint import load_for_inference
from model import GPT, CausalSelfAttention
from config import bounded, format_config, parse_config, read_prompt, resolve_device, set_threads
from tokens import Tokenizer

if TYPE_CHECKING:  # matplotlib is optional: imported for real only inside the plotting functions
    from matplotlib.axes import Axes
    from matplotlib.colors import Colormap
    from matplotlib.figure import Figure
    from matplotlib.image import AxesImage

MATPLOTLIB_MISSING = ("matplotlib is not installed, so no PNG was written: "
                      "pip install matplotlib (or pip install -e '.[plot]')")


@dataclass
class AttentionConfig:
    out_dir: str = "out"  # training output folder whose checkpoint is loaded when init_from is "resume"
    init_from: str = "resume"  # "resume" (the checkpoint in out_dir), a model folder, or gpt2 / gpt2-medium / ...
    checkpoint: str = "latest"  # which checkpoint of out_dir to load: latest or best
    text: str = "The animal didn't cross the street because it was too tired"  # FILE:path reads a file, - stdin
    layer: int = bounded(0, -2**24, 2**24)  # layer drawn at full size (negative counts from the last layer)
    head: int = bounded(0, -2**24, 2**24)  # head drawn at full size (negative counts from the last head)
    token: int = bounded(-1, -2**24, 2**24)  # query token of the terminal report, by position (negative counts from the end: -1 is the last)
    top: int = 5  # how many of the most attended tokens to list per layer and head
    out: str | None = None  # prefix P of the PNGs it writes, P_grid.png and P_L{layer}_H{head}.png; a folder (existing or ending in /): FOLDER/attention_grid.png, ...; none: out_dir/attention
    dpi: int = bounded(100, 10, 1000)  # pixels per inch of the PNGs
    device: str = "cpu"  # cpu, cuda, cuda:1, mps, auto: one forward pass over a short text is quick anywhere
    threads: int | None = None  # torch CPU threads; none: $OMP_NUM_THREADS, else the idle cores (docs/training.md: Threads); 0: one per core

    def __post_init__(self) -> None:
        if self.checkpoint not in ("latest", "best"):
            raise ValueError(f"--checkpoint must be latest or best, got {self.checkpoint!r}")
        if not self.text:
            raise ValueError("--text is empty: pass the text whose attention to show, e.g. --text=\"To be, or not\"")
        if self.top < 1:
            raise ValueError(f"--top must be at least 1, got {self.top}")
        if self.out is None:
            self.out = str(Path(self.out_dir) / "attention")
        folder = Path(self.out) if self.out.endswith(("/", os.sep)) else Path(self.out).parent
        existing = next(p for p in (folder, *folder.parents) if p.exists())  # found now, not after the model ran
        if not existing.is_dir():
            raise ValueError(f"--out={self.out}: {existing} is a file, where the PNGs need a folder")


# ---------------------------------------------------------------------------------------------------------------------
# The explicit attention path


def explicit_attention(attn: CausalSelfAttention, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                       **qkv_args: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention probabilities (B, n_head, T, T) and per-head outputs (B, n_head, T, head_dim) of one attention module.

    x (B, T, n_embd) is the module's input, rope its rotation tables, qkv_args any further inputs of its qkv() (see
    qkv_arguments). q, k, v come from the module's own qkv()
    (c_attn, then QK-norm and RoPE as switched); with grouped-query attention each key/value head serves
    n_head / n_kv_head query heads. Scores the module's mask hides are -inf before the softmax, so a token's
    weights on later tokens (and, with a window, on those too far back) are exactly 0. q, k and v are cast to fp32
    first, so that the scores and the softmax are fp32 whatever the model's dtype (bf16 rounding would blur small
    weights), and so are the returned weights and heads.
    """
    T = x.size(1)
    q, k, v = (t.float() for t in attn.qkv(x, rope, **qkv_args))
    group = attn.n_head // attn.n_kv_head
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, n_head, T, head_dim)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(attn.head_dim)  # (B, n_head, T, T): row = query, column = key
    pos = torch.arange(T, device=x.device)
    visible = attn.mask(pos, pos)  # (T, T): the model's own mask (causal, and its window if set)
    weights = F.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)  # (B, n_head, T, T)
    return weights, weights @ v  # (B, n_head, T, T), (B, n_head, T, head_dim)


def qkv_arguments(attn: CausalSelfAttention, args: tuple, kwargs: dict) -> dict:
    """The arguments of a call of attn (a forward hook's args and kwargs) that its qkv() takes, by name: an argument
    added to the module (value embeddings, say) reaches explicit_attention without an edit here."""
    call = inspect.signature(attn.forward).bind(*args, **kwargs).arguments
    return {name: value for name, value in call.items() if name in inspect.signature(attn.qkv).parameters}


@torch.no_grad()
def attention_maps(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """Attention probabilities of every layer and head for token ids idx (T,) or (B, T): (n_layer, B, n_head, T, T).

    Runs the model's ordinary forward once; a forward pre-hook on each block's attention module hands that module's
    input (ln_1 of the residual stream, and the RoPE tables) to explicit_attention. The model is put in eval mode
    meanwhile, because dropout would make the maps random, and its hooks and mode are restored afterwards.
    """
    if idx.dim() == 1:
        idx = idx.unsqueeze(0)  # (1, T)
    maps: list[torch.Tensor] = []

    def capture(module: CausalSelfAttention, args: tuple, kwargs: dict) -> None:
        maps.append(explicit_attention(module, **qkv_arguments(module, args, kwargs))[0])  # maps[i]: layer i

    was_training = model.training
    handles = [block.attn.register_forward_pre_hook(capture, with_kwargs=True) for block in model.transformer.h]
    try:
        model.eval()
        model(idx)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return torch.stack(maps)  # (n_layer, B, n_head, T, T)


# ---------------------------------------------------------------------------------------------------------------------
# Token labels and the terminal report

_VISIBLE = {" ": "␣", "\n": "↵", "\t": "⇥"}


def visible(piece: str) -> str:
    """A token's text with its whitespace made visible: ' the' -> '␣the', '\\n' -> '↵', other controls escaped."""
    shown = "".join(_VISIBLE.get(ch, ch if ch.isprintable() else repr(ch)[1:-1]) for ch in piece)
    return shown or "∅"


def token_labels(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    """One label per token: each id decoded on its own (a GPT-2 token that is part of a UTF-8 character shows �)."""
    return [visible(tokenizer.decode([i])) for i in ids]


def top_attended(row: torch.Tensor, top: int) -> list[tuple[int, float]]:
    """(position, weight) of the `top` largest weights of one query row (T,), the largest first."""
    values, positions = torch.topk(row, min(top, row.numel()))
    return [(int(p), float(v)) for p, v in zip(positions, values)]


def report(weights: torch.Tensor, labels: list[str], token: int, top: int) -> str:
    """For query position `token`, the tokens it attends to most in each layer: mean over heads, then each head.

    weights (n_layer, n_head, T, T) are one sequence's probabilities; only keys 0 .. token can have weight.
    """
    n_layer, n_head, T, _ = weights.shape
    assert 0 <= token < T and len(labels) == T
    top = min(top, token + 1)  # a query sees only itself and the tokens before it

    def listing(row: torch.Tensor) -> str:
        return "  ".join(f"{labels[p]}[{p}] {w:.2f}" for p, w in top_attended(row[:token + 1], top))

    lines = [f"token {token} {labels[token]!r} attends most to (top {top}; [position] weight):"]
    for layer in range(n_layer):
        lines.append(f"layer {layer:<3} mean    {listing(weights[layer, :, token].mean(dim=0))}")
        for head in range(n_head):
            lines.append(f"          head {head:<3}{listing(weights[layer, head, token])}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# Pictures (matplotlib is optional and imported only here)


def output_paths(out: str, layer: int, head: int) -> tuple[Path, Path]:
    """(grid PNG, single-head PNG) for --out: a path prefix, or a folder when it exists or ends with a slash."""
    prefix = Path(out) / "attention" if out.endswith(("/", os.sep)) or Path(out).is_dir() else Path(out)
    return (prefix.with_name(f"{prefix.name}_grid.png"), prefix.with_name(f"{prefix.name}_L{layer}_H{head}.png"))


def _label_fontsize(axis_inches: float, n_labels: int, largest: float) -> float:
    """Points per label so that n_labels fit along an axis, shrinking down to 1 pt for long texts."""
    return max(1.0, min(largest, 0.8 * axis_inches * 72 / n_labels))


def _rotation(labels: list[str]) -> int:
    """Upright x labels for single characters (a char model), vertical ones for words so that they do not overlap."""
    return 0 if max(len(label) for label in labels) == 1 else 90


def _draw(ax: Axes, weights: np.ndarray, cmap: Colormap) -> AxesImage:
    """One heatmap; the cells above the diagonal (a token cannot see later ones) stay blank."""
    T = weights.shape[0]
    future = np.triu(np.ones((T, T), dtype=bool), k=1)
    return ax.imshow(np.ma.masked_array(weights, future), cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")


def save_grid(weights: np.ndarray, labels: list[str], path: Path, dpi: int = 100) -> tuple[int, int]:
    """PNG of every layer (rows) and head (columns), tokens on both axes; returns its (width, height) in pixels.

    weights (n_layer, n_head, T, T). Colours are absolute probabilities from 0 to 1, the same in every cell. Token
    labels go on the left column and the bottom row only, in a font that shrinks with the length of the text.
    """
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    n_layer, n_head, T, _ = weights.shape
    # Inches per heatmap: 0.1 per token keeps labels near 6 pt; the grid stays within 36 inches a side (GPT-2's
    # 12 x 12: cells up to 3 inches; gpt2-xl's 48 x 25: 0.75 inches, too small for labels: see its heads one by one).
    cell = min(max(1.2, 0.1 * T), 36 / max(n_layer, n_head))
    fig = Figure(figsize=(n_head * cell + 1.5, n_layer * cell + 1.5), layout="constrained")
    axes = fig.subplots(n_layer, n_head, squeeze=False, sharex=True, sharey=True)
    fontsize = _label_fontsize(cell, T, largest=7)
    cmap = colormaps["viridis"].with_extremes(bad="white")
    for layer in range(n_layer):
        for head in range(n_head):
            ax = axes[layer, head]
            _draw(ax, weights[layer, head], cmap)
            ax.set_title(f"layer {layer} head {head}", fontsize=min(8, 4 * cell), pad=2)
            ax.set_xticks(range(T), labels, rotation=_rotation(labels), fontsize=fontsize)
            ax.set_yticks(range(T), labels, fontsize=fontsize)
            ax.tick_params(length=0, pad=1, labelbottom=layer == n_layer - 1, labelleft=head == 0)
    fig.supxlabel("attended-to token (key)", fontsize=9)
    fig.supylabel("attending token (query)", fontsize=9)
    return _save(fig, path, dpi)


def save_head(weights: np.ndarray, labels: list[str], title: str, path: Path, dpi: int = 100) -> tuple[int, int]:
    """PNG of one head's weights (T, T) at full size with a colour bar; returns its (width, height) in pixels."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    T = weights.shape[0]
    side = min(max(5.0, 0.25 * T), 30.0)  # inches for the heatmap itself
    fig = Figure(figsize=(side + 2.0, side + 1.5), layout="constrained")
    ax = fig.subplots()
    image = _draw(ax, weights, colormaps["viridis"].with_extremes(bad="white"))
    fontsize = _label_fontsize(side, T, largest=10)
    ax.set_xticks(range(T), labels, rotation=_rotation(labels), fontsize=fontsize)
    ax.set_yticks(range(T), labels, fontsize=fontsize)
    ax.tick_params(length=0)
    ax.set_xlabel("attended-to token (key)")
    ax.set_ylabel("attending token (query)")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, shrink=0.8, label="attention probability")
    return _save(fig, path, dpi)


def _save(fig: Figure, path: Path, dpi: int) -> tuple[int, int]:
    """Write the figure at exactly figsize * dpi pixels (no bbox_inches="tight", which would crop it)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)  # draw with Agg: no display and no global pyplot state, also inside notebooks and servers
    path.parent.mkdir(parents=True, exist_ok=True)
    with errors.writing(path):
        fig.savefig(path, dpi=dpi)
    width, height = fig.get_size_inches() * dpi
    return round(width), round(height)


def save_pictures(weights: np.ndarray, labels: list[str], layer: int, head: int, grid_path: Path, head_path: Path,
                  dpi: int = 100) -> bool:
    """Both PNGs for one sequence's weights (n_layer, n_head, T, T); False, after saying why, without matplotlib."""
    try:
        import matplotlib  # noqa: F401  (optional: only the pictures need it)
    except ImportError:
        print(MATPLOTLIB_MISSING)
        return False
    save_grid(weights, labels, grid_path, dpi)
    title = f"layer {layer}, head {head}: how much each token (row) attends to each earlier token (column)"
    save_head(weights[layer, head], labels, title, head_path, dpi)
    return True


# ---------------------------------------------------------------------------------------------------------------------
# Command line


def _index(value: int, size: int, name: str, what: str) -> int:
    """A Python-style index (negative counts from the end) checked against size; SystemExit naming --name if not."""
    if not -size <= value < size:
        raise SystemExit(f"--{name}={value} is out of range: there are {size} {what} (0..{size - 1}, or -{size}..-1)")
    return value % size


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(AttentionConfig, argv, description=__doc__)
    print(format_config(cfg))
    set_threads(cfg.threads)
    device = resolve_device(cfg.device)
    model, tokenizer, _, _ = load_for_inference(cfg.out_dir, cfg.init_from, cfg.checkpoint, device)

    try:
        ids = tokenizer.encode(read_prompt(cfg.text, "--text"))
    except ValueError as e:
        raise SystemExit(f"--text cannot be encoded: {e}") from None
    block_size = model.config.block_size
    if not 0 < len(ids) <= block_size:
        raise SystemExit(f"--text is {len(ids)} tokens; this model takes 1 to {block_size}: shorten the text")
    layer = _index(cfg.layer, model.config.n_layer, "layer", "layers")
    head = _index(cfg.head, model.config.n_head, "head", "heads")
    token = _index(cfg.token, len(ids), "token", "tokens in --text")

    idx = torch.tensor(ids, dtype=torch.long, device=device)  # (T,)
    weights = attention_maps(model, idx)[:, 0].cpu()  # (n_layer, n_head, T, T)
    labels = token_labels(tokenizer, ids)
    print(f"\n{len(ids)} tokens: {' '.join(labels)}\n")
    print(report(weights, labels, token, cfg.top))

    grid_path, head_path = output_paths(cfg.out, layer, head)
    if save_pictures(weights.numpy(), labels, layer, head, grid_path, head_path, cfg.dpi):
        print(f"\nwrote {grid_path} (every layer and head) and {head_path} (layer {layer}, head {head})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
