"""Checkpoints: save a training run atomically, find it again, and load a model from anywhere.

    from checkpoint import load_model, save_checkpoint
    model, tokenizer, config = load_model("out/shakespeare_char")   # or a ckpt_* folder, an HF folder, "gpt2"
    save_checkpoint(out_dir, raw_model, extra_config, state, iter_num=80, is_best=True)

The layout of an out_dir (every folder also loads with transformers.GPT2LMHeadModel.from_pretrained):

    out_dir/
      ckpt_000080/            one complete checkpoint, named by iteration
        model.safetensors     GPT.hf_state_dict(): Hugging Face GPT-2 layout, tied head left out
        config.json           GPT.hf_config() + "tokenizer" + "train" + "iter_num" + "val_loss" + ...
        state.pt              optimizer, iteration, RNG states...: plain tensors/containers, read with weights_only=True
      latest -> ckpt_000080   symlinks, each replaced in one atomic step
      best -> ckpt_000060

Errors a user can cause (a wrong path, a damaged file, a tokenizer that does not fit) are ValueErrors with one line
that names the file and the fix.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch

from model import GPT, HUB_MODELS
from tokens import Tokenizer

LINKS = ("latest", "best")  # the symlinks in an out_dir; a checkpoint that no link points to is deleted on save
_CKPT = re.compile(r"ckpt_(\d+)")
_REQUIRED_CONFIG = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")  # what GPT.from_pretrained reads


# ---------------------------------------------------------------------------------------------------------- loading


def find_checkpoint(path: str | Path, which: str = "latest") -> Path:
    """The checkpoint folder `path` means: out_dir -> the folder out_dir/latest (or best) points to; a folder holding
    config.json (a ckpt_* folder, a Hugging Face GPT-2 folder) -> itself.

    The link is resolved here, once, so a caller that reads the model and then the training state from the returned
    folder reads one checkpoint even if a save repoints `latest` in between.
    """
    if which not in LINKS:
        raise ValueError(f"which must be 'latest' or 'best', got {which!r}")
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path} does not exist: pass an out_dir written by train.py, a checkpoint folder, or a "
                         f"GPT-2 name ({', '.join(HUB_MODELS)})")
    if not path.is_dir():
        raise ValueError(f"{path} is a file: pass the folder that holds config.json and model.safetensors")
    if (path / "config.json").is_file():
        return path.resolve() if path.is_symlink() else path  # out_dir/latest given directly: pin its target
    link = path / which
    if link.is_symlink():
        target = link.resolve()
        if _is_complete(target):
            return target
        # Saves never leave a link like this, so someone deleted or moved the folder.
        hint = f"; complete checkpoints here: {', '.join(p.name for p in _checkpoints(path))}" if _checkpoints(
            path) else ""
        raise ValueError(f"{link} points to {target}, which is not a complete checkpoint (deleted?){hint}: pass one "
                         f"of those folders directly")
    if which == "latest" and _checkpoints(path):
        # A save finished its folder but was killed before it created the first `latest` link.
        newest = _checkpoints(path)[-1]
        print(f"{path} has no 'latest' link; using the newest complete checkpoint {newest}", file=sys.stderr)
        return newest
    if which == "best" and _checkpoints(path):
        raise ValueError(f"{path} has no 'best' checkpoint (none was saved with a new best val loss): "
                         f"load 'latest' instead")
    raise ValueError(f"no checkpoint in {path}: train one with train.py --out_dir={path}")


def has_checkpoint(out_dir: Path) -> bool:
    """Whether out_dir already holds a training run's checkpoint (so a fresh run there would overwrite it)."""
    out_dir = Path(out_dir)
    return any((out_dir / name).is_symlink() for name in LINKS) or bool(_checkpoints(out_dir))


def load_model(name_or_path: str | Path, which: str = "latest", device: str = "cpu",
               dropout: float | None = None) -> tuple[GPT, Tokenizer, dict]:
    """A model in eval mode on `device`, its tokenizer, and its config.json as a dict.

    name_or_path: an out_dir (its `which` checkpoint), a ckpt_* folder, a local Hugging Face GPT-2 folder, or a hub
    name (gpt2, gpt2-medium, gpt2-large, gpt2-xl). The tokenizer is config.json's "tokenizer"; folders without one
    (Hugging Face's) use GPT-2 BPE. dropout overrides the saved value (for fine-tuning); None keeps it.
    """
    if str(name_or_path) in HUB_MODELS and not Path(name_or_path).exists():
        model = GPT.from_pretrained(str(name_or_path), dropout=dropout)
        config = model.hf_config()
        tokenizer = Tokenizer.tiktoken("gpt2")
    else:
        folder = find_checkpoint(name_or_path, which)
        config = read_config(folder)
        tokenizer = config_tokenizer(config, folder / "config.json")
        if tokenizer.vocab_size > config["vocab_size"]:
            raise ValueError(f"{folder / 'config.json'}: its tokenizer has {tokenizer.vocab_size} tokens but the "
                             f"model only {config['vocab_size']} (vocab_size): the config does not belong to these "
                             f"weights; save the checkpoint again")
        model = GPT.from_pretrained(folder, dropout=dropout)  # refuses a missing, truncated or damaged safetensors
    return model.to(device).eval(), tokenizer, config


def load_state(ckpt_dir: Path, device: str = "cpu") -> dict:
    """The training state (state.pt) of a checkpoint folder, read with weights_only=True: no code runs on load."""
    path = Path(ckpt_dir) / "state.pt"
    if not path.is_file():
        raise ValueError(f"{path} not found: {ckpt_dir} holds weights only, so training cannot resume from it; "
                         f"fine-tune from it with --init_from={ckpt_dir} instead")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # pickle.UnpicklingError for foreign objects, RuntimeError for a truncated zip
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} is refused: {first_line} (it must hold only tensors, dicts, lists and numbers, "
                         f"and be complete): resume from another checkpoint") from None


def read_config(folder: Path) -> dict:
    """config.json of a checkpoint folder, checked to be JSON with the model keys GPT.from_pretrained reads."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path} not found: a checkpoint folder holds config.json and model.safetensors") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}): the file is damaged; use another checkpoint") from None
    if not isinstance(config, dict) or any(key not in config for key in _REQUIRED_CONFIG):
        missing = [k for k in _REQUIRED_CONFIG if not isinstance(config, dict) or k not in config]
        raise ValueError(f"{path} lacks {', '.join(missing)}: it is not a GPT-2 config.json")
    return config


def config_tokenizer(config: dict, config_path: Path) -> Tokenizer:
    """The tokenizer a config.json names under "tokenizer"; GPT-2 BPE when it names none (Hugging Face folders)."""
    if "tokenizer" not in config:
        return Tokenizer.tiktoken("gpt2")
    try:
        return Tokenizer.from_meta(config["tokenizer"])
    except ValueError as e:
        raise ValueError(f"{config_path}: bad \"tokenizer\" entry: {e}") from None


def check_tokenizer_matches(config: dict, meta: dict, meta_path: Path) -> None:
    """Refuse a dataset (meta.json) whose tokenizer differs from the checkpoint's: its token ids would mean other
    text. Used when resuming or fine-tuning on a dataset."""
    ours = config.get("tokenizer", Tokenizer.tiktoken("gpt2").to_meta())
    theirs = meta.get("tokenizer")
    if ours != theirs:
        raise ValueError(f"{meta_path} uses tokenizer {_describe(theirs)} but the checkpoint was trained with "
                         f"{_describe(ours)}: prepare the dataset with the checkpoint's tokenizer, or train from "
                         f"scratch")


def _describe(tokenizer_meta: object) -> str:
    """A short name for a tokenizer dict: 'tiktoken gpt2', 'char (65 symbols)'."""
    if not isinstance(tokenizer_meta, dict):
        return repr(tokenizer_meta)
    if tokenizer_meta.get("kind") == "char" and isinstance(tokenizer_meta.get("chars"), str):
        return f"char ({len(tokenizer_meta['chars'])} symbols, {tokenizer_meta['chars'][:12]!r}...)"
    if tokenizer_meta.get("kind") == "tiktoken":
        return f"tiktoken {tokenizer_meta.get('encoding')}"
    return json.dumps(tokenizer_meta)[:80]


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in ("config.json", "model.safetensors", "state.pt"))


def _checkpoints(out_dir: Path) -> list[Path]:
    """Complete ckpt_* folders of out_dir, oldest iteration first."""
    if not out_dir.is_dir():
        return []
    found = [p for p in out_dir.iterdir() if _CKPT.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]
    return sorted((p for p in found if _is_complete(p)), key=lambda p: int(p.name.removeprefix("ckpt_")))
