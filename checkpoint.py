"""Checkpoints: save a training run atomically, find it again, and load a model from anywhere.

    from checkpoint import from_pretrained, load_model, save_checkpoint
    model, tokenizer, config = load_model("out/shakespeare_char")   # or a ckpt_* folder, an HF folder, "gpt2"
    model = from_pretrained("gpt2")                                  # the model alone, from the same places
    save_checkpoint(out_dir, raw_model, extra_config, state, iter_num=80, is_best=True)

The layout of an out_dir (every folder of a GPT-2 model also loads with transformers.GPT2LMHeadModel, of a
nanochat-like model with transformers.NanoChatForCausalLM: see hf.hf_format):

    out_dir/
      ckpt_000080/            one complete checkpoint, named by iteration
        model.safetensors     hf.hf_state_dict(): Hugging Face's layout (GPT-2 or NanoChat), a tied head left out
        config.json           hf.hf_config() + "tokenizer" + "train" + "iter_num" + "val_loss" + ...
        vocab.json, ...       hf.tokenizer_files(): what AutoTokenizer reads (older folders lack them: export.py)
        state.pt              optimizer, iteration, RNG states...: plain tensors/containers, read with weights_only=True
      latest -> ckpt_000080   symlinks, each replaced in one atomic step
      best -> ckpt_000060

Errors a user can cause (a wrong path, a damaged file, a tokenizer that does not fit) are ValueErrors with one line
that names the file and the fix. A save that fails (disk full) raises CheckpointError, a SystemExit, likewise.

What survives what: a save writes a hidden temporary folder, fsyncs it, renames it to ckpt_NNNNNN and only then
repoints the links, each step atomic; so a crash, a kill -9 or a power cut at any moment leaves `latest` on a
complete checkpoint (the previous one or the new one). Leftover temporary folders are deleted by the next save, and
old checkpoints only once `latest` points at a newer complete one. One process writes an out_dir (rank 0).
"""

from __future__ import annotations

import errno
import dataclasses
import functools
import json
import math
import os
import pickle
import re
import shutil
import socket
import sys
import typing
import urllib.parse
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import safetensors.torch
import torch

import errors
from hf import config_from_hf, hf_config, hf_state_dict, load_hf_state_dict, tokenizer_files
from model import GPT, GPTConfig
from quantize import quantize_model
from tokens import Tokenizer

HUB_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # OpenAI's GPT-2s, openai-community/* on the hub
FILES = ("model.safetensors", "config.json", "state.pt")  # what a complete checkpoint folder holds
LINKS = ("latest", "best")  # the symlinks in an out_dir; a checkpoint that no link points to is deleted on save
_CKPT = re.compile(r"ckpt_(\d+)")


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
    _refuse_non_file(path / "config.json", "restore the file, or pass another checkpoint")
    link = path / which
    if link.is_symlink():
        try:
            target = link.resolve()
        except (OSError, RuntimeError):  # a loop of links: RuntimeError up to Python 3.12, OSError after
            raise ValueError(f"{link} is a loop of symbolic links: point it at a checkpoint (ln -sfn ckpt_NNNNNN "
                             f"{link}) or delete it") from None
        if _is_complete(target):
            return target
        # Saves never leave a link like this, so someone deleted or moved the folder, or broke a file in it.
        others = ", ".join(p.name for p in _checkpoints(path)) or "none"
        wrong = [f"{target / name}: {errors.not_a_file(target / name)}" for name in FILES
                 if target.is_dir() and errors.not_a_file(target / name)]
        if wrong and any(os.path.lexists(target / name) for name in FILES):
            raise ValueError(f"{link} points to {target}, which is not a complete checkpoint: {'; '.join(wrong)}; "
                             f"complete checkpoints in {path}: {others}: pass one of them directly")
        raise ValueError(f"{link} points to {target}, which is not a complete checkpoint (deleted?); complete "
                         f"checkpoints in {path}: {others}: pass one of them directly")
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


def check_out_dir(out_dir: Path, resuming: bool, fresh_run_writes: bool) -> None:
    """SystemExit unless train.py can start in out_dir: a run resumes from a checkpoint there, and a fresh one (its
    writer: rank 0) would overwrite none."""
    if fresh_run_writes and not resuming and has_checkpoint(out_dir):
        raise SystemExit(f"{out_dir} already holds a checkpoint: continue that run with --init_from=resume, or "
                         f"start a new one with another --out_dir (nothing was overwritten)")
    if resuming and not has_checkpoint(out_dir):
        raise SystemExit(f"init_from=resume but {out_dir} holds no checkpoint: check --out_dir, or start with "
                         f"--init_from=scratch")


def load_model(name_or_path: str | Path, which: str = "latest", device: str = "cpu",
               dropout: float | None = None) -> tuple[GPT, Tokenizer, dict]:
    """A model in eval mode on `device`, its tokenizer, and its config.json as a dict.

    name_or_path: an out_dir (its `which` checkpoint), a ckpt_* folder, a local Hugging Face GPT-2 or NanoChat
    folder, or a hub name (gpt2, gpt2-medium, gpt2-large, gpt2-xl). The tokenizer is config.json's "tokenizer";
    folders without one (Hugging Face's) use GPT-2 BPE. dropout overrides the saved value (for fine-tuning); None
    keeps it.
    """
    folder = model_folder(name_or_path, which)
    config, gpt_config = _read_config(folder, dropout)
    tokenizer = config_tokenizer(config, folder / "config.json")
    # A BPE vocabulary may be padded (padded_vocab_size); a char one is exact, or the model's extra ids print as U+FFFD.
    if tokenizer.vocab_size > gpt_config.vocab_size or tokenizer.kind == "char" and \
            tokenizer.vocab_size != gpt_config.vocab_size:
        raise ValueError(f"{folder / 'config.json'}: its tokenizer has {tokenizer.vocab_size} tokens but the "
                         f"model {gpt_config.vocab_size} (vocab_size): the config does not belong to these "
                         f"weights; save the checkpoint again")
    return _load_weights(folder, gpt_config).to(device).eval(), tokenizer, config


def load_for_inference(out_dir: str, init_from: str | None, which: str, device: torch.device,
                       dtype: torch.dtype | None = None,
                       quantize: str = "none") -> tuple[GPT, Tokenizer, dict, str]:
    """What sample.py, serve.py, eval.py and attention.py load: init_from's model (None or "resume", as in nanoGPT:
    out_dir's `which` checkpoint) in eval mode on device, cast to dtype when given and quantized as quantize.py's
    quantize_model says; with its tokenizer, config.json and the source's name. SystemExit with the reason when it
    cannot be loaded."""
    source = out_dir if init_from in (None, "resume") else init_from
    try:
        model, tokenizer, config = load_model(source, which, device="cpu")
    except ValueError as e:
        raise SystemExit(str(e)) from None
    model = quantize_model(model.to(device=device, dtype=dtype), quantize, device)
    return model, tokenizer, config, source


def load_for_training(source: str | Path, meta: dict, meta_path: Path, dropout: float,
                      resume: bool) -> tuple[GPT, dict, dict | None, Path]:
    """What train.py starts from: source's model (an out_dir's latest checkpoint, a ckpt_* or Hugging Face folder, a
    hub name), its config.json, its state.pt when resuming (checked), and the folder they all come from; checked to
    fit the dataset's meta.json. SystemExit with the reason when it cannot be loaded."""
    try:
        folder = model_folder(source)  # resolved once: the model and the state come from the same folder
        model, _, config = load_model(folder, dropout=dropout)
        check_tokenizer_matches(config, meta, meta_path)
        state = load_state(folder) if resume else None
        if resume:
            check_train_state(state, folder / "state.pt")
    except ValueError as e:  # the messages name the file and the fix
        raise SystemExit(str(e) if resume else f"init_from={source}: {e}") from None
    return model, config, state, folder


def from_pretrained(name_or_path: str | Path, which: str = "latest", dropout: float | None = None) -> GPT:
    """The model alone (in train mode, on the CPU), from any place load_model reads; no tokenizer is loaded."""
    folder = model_folder(name_or_path, which)
    return _load_weights(folder, _read_config(folder, dropout)[1])


def model_folder(name_or_path: str | Path, which: str = "latest") -> Path:
    """The folder holding config.json and model.safetensors: a hub name's (downloaded once), else find_checkpoint."""
    if str(name_or_path) in HUB_MODELS and not Path(name_or_path).exists():
        return download_gpt2(str(name_or_path))
    return find_checkpoint(name_or_path, which)


def download_gpt2(name: str) -> Path:
    """The hub's openai-community/<name> config.json and model.safetensors, through huggingface_hub: its cache is
    shared with transformers, honours HF_HOME, HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE, resumes and verifies.
    Cached files are used without the network; a hub that cannot be reached fails in seconds, not after retries."""
    try:
        from huggingface_hub import constants, hf_hub_download
    except ImportError:
        raise SystemExit(f"{name} is downloaded from the Hugging Face hub, which needs huggingface_hub: pip install "
                         f"huggingface_hub (or pass a folder holding its config.json and model.safetensors)") from None
    offline = (f"Offline? Download its config.json and model.safetensors elsewhere and pass their folder instead of "
               f"{name!r}")

    def fetch(**kwargs: bool) -> list[Path]:
        return [Path(hf_hub_download(f"openai-community/{name}", f, **kwargs)) for f in ("config.json",
                                                                                        "model.safetensors")]

    try:
        try:
            paths = fetch(local_files_only=True)
        except FileNotFoundError:  # huggingface_hub's LocalEntryNotFoundError: not in the cache
            if not constants.HF_HUB_OFFLINE and (why := _unreachable(constants.ENDPOINT)):
                raise SystemExit(f"could not download {name} from the Hugging Face hub: {why}. {offline}") from None
            paths = fetch()
    except Exception as e:  # offline, a proxy, a failed check: huggingface_hub raises many types, all say the same
        first = (str(e).strip().splitlines() or [""])[0]
        raise SystemExit(f"could not download {name} from the Hugging Face hub ({type(e).__name__}: {first}). "
                         f"{offline}") from None
    assert paths[0].parent == paths[1].parent, "huggingface_hub keeps one revision's files in one snapshot folder"
    return paths[1].parent


def _unreachable(endpoint: str, timeout: float = 5.0) -> str | None:
    """Why the hub at `endpoint` cannot be reached (a TCP connection within `timeout` seconds), or None; not probed
    behind a proxy, which huggingface_hub goes through and this probe would not."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urllib.parse.urlsplit(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError as e:
        return f"{url.hostname} cannot be reached ({e.strerror or e or type(e).__name__})"
    return None


def load_state(ckpt_dir: Path, device: str = "cpu") -> dict:
    """The training state (state.pt) of a checkpoint folder, read with weights_only=True: no code runs on load."""
    path = Path(ckpt_dir) / "state.pt"
    _refuse_non_file(path, "restore the file, or resume from another checkpoint")
    if not path.is_file():
        raise ValueError(f"{path} not found: {ckpt_dir} holds weights only, so training cannot resume from it; "
                         f"fine-tune from it with --init_from={ckpt_dir} instead")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is a paragraph; the line naming the refused object is the useful one.
        detail = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line), None)
        if detail is None:  # not a refused object: bytes that are no pickle at all
            raise ValueError(f"{path} is refused: the file is damaged (not a torch archive); resume from another "
                             f"checkpoint") from None
        raise ValueError(f"{path} is refused: it holds Python objects beyond tensors, numbers, strings, lists and "
                         f"dicts ({detail}), and loading those could run code; resume only from checkpoints you "
                         f"trust, written by train.py") from None
    except (RuntimeError, EOFError, OSError) as e:  # a truncated or overwritten zip archive
        raise ValueError(f"{path} is refused: the file is damaged ({str(e).split('.')[0]}); resume from another "
                         f"checkpoint") from None


def check_train_state(state: object, path: Path) -> None:
    """Refuse a state.pt that is a valid torch file but not what train_state() writes, naming what is wrong,
    before a KeyError or TypeError halfway through a resume."""
    if not isinstance(state, dict):
        wrong = f"it holds a {type(state).__name__}, not a dict"
    else:
        expected = {"optimizer": (dict,), "iter_num": (int,), "best_val_loss": (float, int), "rng": (dict,)}
        wrong = next((f"{key} is {type(state.get(key)).__name__}, not {kinds[0].__name__}"
                      for key, kinds in expected.items() if type(state.get(key)) not in kinds), None)
        if wrong is None:
            optimizer, rng = state["optimizer"], state["rng"].get("torch")
            problems = [
                (state["iter_num"] < 0, "iter_num is negative"),
                (not isinstance(optimizer.get("state"), dict) or not isinstance(optimizer.get("param_groups"), list),
                 "optimizer is not an optimizer's state_dict"),
                (not isinstance(rng, torch.Tensor) or rng.dtype != torch.uint8 or
                 rng.shape != torch.get_rng_state().shape, "rng['torch'] is not a CPU generator's state"),
                (type(state.get("elapsed", 0.0)) not in (int, float), "elapsed is not a number"),
                (type(state.get("threads", 1)) is not int or state.get("threads", 1) < 1, "threads is not a count"),
                (not isinstance(state.get("scaler") or {}, dict), "scaler is not a state_dict"),
            ]
            wrong = next((what for bad, what in problems if bad), None)
    if wrong is not None:
        raise ValueError(f"{path} is refused: it is not a training state written by train.py ({wrong}); resume "
                         f"from another checkpoint")


def train_state(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, device: torch.device,
                **counters: float) -> dict:
    """state.pt: the optimizer's and the gradient scaler's states, the RNGs, the thread count (CPU sums, so the
    weights, depend on it) and train.py's counters (iter_num, best_val_loss, elapsed)."""
    rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
    return {"optimizer": optimizer.state_dict(), "rng": rng, "scaler": scaler.state_dict(),
            "threads": torch.get_num_threads(), **counters}


def restore_train_state(state: dict, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                        device: torch.device) -> None:
    """Set the optimizer, the gradient scaler and the RNGs back to a state.pt (checked by check_train_state)."""
    # load_state_dict also restores the saved hyperparameters; this run's settings win (lr is set every step).
    settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(state["optimizer"])
    for group, own in zip(optimizer.param_groups, settings):
        group.update(own)
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    # Nothing draws from these generators (data and dropout are seeded per micro-step), but a change that does will
    # then resume exactly too.
    torch.set_rng_state(state["rng"]["torch"])
    if device.type == "cuda" and state["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state(state["rng"]["cuda"], device)


def read_config(folder: Path) -> dict:
    """config.json of a model folder, checked to be JSON with model settings that fit model.safetensors beside it."""
    return _read_config(Path(folder), None)[0]


def _read_config(folder: Path, dropout: float | None) -> tuple[dict, GPTConfig]:
    """config.json of a model folder and the GPTConfig it describes; the one place that reads the file."""
    path, weights = folder / "config.json", folder / "model.safetensors"
    _refuse_non_file(path, "restore the file, or use another checkpoint")
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path} not found: a model folder holds config.json and model.safetensors") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}): the file is damaged; use another checkpoint") from None
    check_config_types(config, path)
    c = config_from_hf(config, str(path), dropout)
    _refuse_non_file(weights, "restore the file, or use another checkpoint")
    if not weights.is_file():
        raise ValueError(f"{weights} not found: a model folder holds config.json and model.safetensors "
                         f"(pytorch_model.bin is not read: convert it to safetensors)")
    # Every weight takes at least a byte of model.safetensors: a config that asks for more (a damaged or foreign
    # config.json) would have the allocation fail or swap before load_hf_state_dict compares the shapes.
    # RoPE's tables (block_size x head_dim numbers, not in the file) are held to the same bound.
    params = ((c.vocab_size + c.n_layer * c.n_embd) * c.n_embd +
              c.block_size * (c.n_embd if c.pos_embedding == "learned" else c.head_dim))
    data = _tensor_bytes(weights)
    if params > data:
        raise ValueError(f"{path}: its sizes make ~{params:,} weights, more than the {data:,} bytes of tensors in "
                         f"{weights}: the config does not belong to these weights")
    return config, c


def _refuse_non_file(path: Path, fix: str) -> None:
    """ValueError naming what stands at path instead of a file (a folder, a looping or dangling link, a pipe); a
    missing file is left to the caller, which knows what its absence means."""
    if os.path.lexists(path) and not path.is_file():
        raise ValueError(f"{path}: {errors.not_a_file(path)}: {fix}")


def _tensor_bytes(weights: Path) -> int:
    """The bytes of tensors a safetensors file's header announces, once the file is checked to hold them (an empty
    or cut file is the weights' fault, not the config's); ValueError naming the file otherwise."""
    size = weights.stat().st_size
    damaged = f"{weights} is damaged ({{}}): download or save it again"
    with open(weights, "rb") as f:
        n = int.from_bytes(f.read(8), "little")  # safetensors: an 8-byte header length, the JSON header, the data
        if size < 8 or not 2 <= n <= 100_000_000:  # safetensors' own limit on a header: 100 MB
            raise ValueError(damaged.format("empty" if size == 0 else f"{size:,} bytes, no safetensors header"))
        if 8 + n > size:
            raise ValueError(damaged.format(f"cut short: {size:,} bytes, its header alone announces {8 + n:,}"))
        try:
            header = json.loads(f.read(n))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
            end = int(end)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            raise ValueError(damaged.format("its header is not a safetensors header")) from None
    if 8 + n + end > size:
        raise ValueError(damaged.format(f"cut short: {size:,} bytes of the {8 + n + end:,} its header announces"))
    return end


_NUMBER, _NONE = (float,), (type(None),)  # a float takes an int too
# The JSON types of the config.json entries that are read, checked once, here, before anything reads them: GPT-2's
# and NanoChat's sizes and settings, the entries train.py adds; the "smallgpt" entry's by GPTConfig's field types.
CONFIG_TYPES: dict[str, tuple[type, ...]] = {
    "model_type": (str,), "smallgpt": (dict,), "tokenizer": (dict,), "train": (dict,), "iter_num": (int,),
    "val_loss": _NUMBER + _NONE, "n_positions": (int,), "n_ctx": (int,), "n_embd": (int,), "n_layer": (int,),
    "n_head": (int,), "vocab_size": (int,), "hidden_size": (int,), "intermediate_size": (int,),
    "num_hidden_layers": (int,), "num_attention_heads": (int,), "num_key_value_heads": (int,) + _NONE,
    "max_position_embeddings": (int,), "rope_theta": _NUMBER, "rope_parameters": (dict,) + _NONE,
    "final_logit_softcapping": _NUMBER + _NONE,
}
_ROPE_PARAMETER_TYPES = {"rope_type": (str,), "rope_theta": _NUMBER}


def check_config_types(config: object, path: Path) -> None:
    """Refuse a config.json whose entries, nested ones too, have the wrong JSON type (a bool is not a number)."""
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds no JSON object: it is not a model's config.json")
    _check_types(config, CONFIG_TYPES, path, "")
    for key, types in (("rope_parameters", _ROPE_PARAMETER_TYPES), ("smallgpt", _field_types(GPTConfig))):
        if isinstance(config.get(key), dict):
            _check_types(config[key], types, path, f"{key}.")


def _field_types(cls: type) -> dict[str, tuple[type, ...]]:
    """The JSON types each field of a dataclass takes: `int | None` -> (int, NoneType); a float takes an int too."""
    hints = typing.get_type_hints(cls)
    return {f.name: typing.get_args(hints[f.name]) or (hints[f.name],) for f in dataclasses.fields(cls)}


def _check_types(entries: dict, types: dict[str, tuple[type, ...]], path: Path, prefix: str) -> None:
    for key, allowed in types.items():
        value = entries.get(key)
        fits = type(value) in allowed or type(value) is int and float in allowed
        if key not in entries or fits and (type(value) is not float or math.isfinite(value)):
            continue
        if not fits:
            what = "of type " + " | ".join("None" if t is type(None) else t.__name__ for t in allowed)
        else:
            what = "a finite number"
        raise ValueError(f"{path}: {prefix}{key}={value!r:.60} is not {what}: the file is damaged or not a model's "
                         f"config.json; use another checkpoint")


def _load_weights(folder: Path, config: GPTConfig) -> GPT:
    """A GPT of `config` holding folder/model.safetensors; refuses a truncated, damaged or mismatched file."""
    path = folder / "model.safetensors"
    try:
        weights = safetensors.torch.load_file(path)
    except Exception as e:  # safetensors raises its own error types for truncated or corrupted files
        raise ValueError(f"{path} could not be read ({e}); the file is damaged: download or save it again") from None
    model = GPT(config)
    load_hf_state_dict(model, weights, source=str(path))
    return model


GPT2_TOKENIZER = {"kind": "tiktoken", "encoding": "gpt2"}  # Tokenizer.tiktoken("gpt2").to_meta(), without loading it


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
    ours = config.get("tokenizer", GPT2_TOKENIZER)  # Hugging Face folders name none: they are GPT-2 BPE
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
    return all((folder / name).is_file() for name in FILES)


def _checkpoints(out_dir: Path) -> list[Path]:
    """Complete ckpt_* folders of out_dir, oldest iteration first."""
    if not out_dir.is_dir():
        return []
    found = [p for p in out_dir.iterdir() if _CKPT.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]
    return sorted((p for p in found if _is_complete(p)), key=lambda p: int(p.name.removeprefix("ckpt_")))


# ----------------------------------------------------------------------------------------------------------- saving


class CheckpointError(SystemExit):
    """A save failed (disk full, no permission, ...). Its one-line message names the path and the checkpoint that is
    still intact, and the partial folder is already gone. A SystemExit, so that uncaught it ends the run with that line
    and no traceback, and `except Exception` does not swallow it; train.py may catch it to log or tell other ranks."""


def save_checkpoint(out_dir: Path, model: GPT, extra_config: dict, state: dict, *, iter_num: int,
                    is_best: bool) -> Path:
    """Write out_dir/ckpt_{iter_num:06d}, point `latest` (and `best` when is_best) at it, delete the checkpoints no
    link points to; return the new folder.

    model: the plain GPT; unwrap it first (`ddp_model.module`, `compiled_model._orig_mod`) so that no wrapper prefix
        reaches the file.
    extra_config: merged into config.json next to hf.hf_config(): "tokenizer" (Tokenizer.to_meta()), "train" (the
        resolved training config), "val_loss", ... iter_num is added.
    state: saved as state.pt; only tensors, numbers, strings, None, lists, tuples and dicts, which is what
        torch.load(weights_only=True) reads back (checked here, not hours later on resume: turn numpy RNG states
        into tensors or lists).
    Raises CheckpointError if the disk is full or out_dir is not writable; the previous checkpoint stays intact.
    """
    assert isinstance(model, GPT), f"pass the unwrapped GPT (ddp_model.module, compiled._orig_mod), not {type(model)}"
    if "tokenizer" not in extra_config:  # loading would fall back to GPT-2 BPE and misread a char model's ids
        raise ValueError("extra_config needs \"tokenizer\": tokenizer.to_meta(), so that the checkpoint decodes")
    tokenizer = Tokenizer.from_meta(extra_config["tokenizer"])
    hf = hf_config(model.config, eot_token=tokenizer.eot_token)
    clash = hf.keys() & extra_config.keys()
    assert not clash, f"extra_config must not override the model's config.json keys {sorted(clash)}"
    _check_plain(state, "state")
    config_text = json.dumps(hf | extra_config | {"iter_num": iter_num}, indent=2)  # TypeError now, not later
    weights = hf_state_dict(model)
    extra_files = _tokenizer_files(tokenizer, model.config.block_size, out_dir)

    out_dir, name = Path(out_dir), f"ckpt_{iter_num:06d}"
    tmp = out_dir / f".tmp-{name}-{os.getpid()}"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        cleanup_partial(out_dir)
        tmp.mkdir()
        with _write_error_as_os_error(tmp / "model.safetensors"):
            safetensors.torch.save_file(weights, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(config_text)
        with open(tmp / "state.pt", "wb") as f, _write_error_as_os_error(tmp / "state.pt"):
            torch.save(state, f)
        for file, text in extra_files.items():
            (tmp / file).write_text(text, encoding="utf-8")
        mode = (tmp / "config.json").stat().st_mode & 0o777  # open()'s, under the umask; safetensors writes 0600
        for file in (*FILES, *extra_files):
            os.chmod(tmp / file, mode)
            errors.fsync(tmp / file)
        errors.fsync(tmp)  # the folder's entries too, or a power cut could leave it empty under its final name
        _install(tmp, out_dir / name)
        errors.fsync(out_dir)  # the folder's new name is on disk before any link names it
        _point(out_dir, "latest", name)
        if is_best:
            _point(out_dir, "best", name)
        errors.fsync(out_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)  # ignore_errors: report the first failure, not one from the cleanup
        raise CheckpointError(_save_failed(out_dir, out_dir / name, e)) from None
    except BaseException:  # a second Ctrl-C, an out-of-memory error: no partial folder either (gone if renamed)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _retain(out_dir)
    return out_dir / name


def _tokenizer_files(tokenizer: Tokenizer, block_size: int, out_dir: Path) -> dict[str, str]:
    """hf.tokenizer_files, or none, said once, where they cannot be made (an encoding GPT2Tokenizer cannot
    reproduce; BPE files that offline tiktoken cannot load): a checkpoint loads without them."""
    try:
        return tokenizer_files(tokenizer, block_size)
    except (ValueError, SystemExit) as e:
        _warn_once(f"warning: checkpoints in {out_dir} get no tokenizer files for transformers ({e}); add them "
                   f"later with python export.py --out_dir={out_dir} --format=hf")
        return {}


@functools.cache
def _warn_once(text: str) -> None:
    print(text, file=sys.stderr)


@contextmanager
def _write_error_as_os_error(path: Path) -> Iterator[None]:
    """torch.save and safetensors report a failed write (a full disk) as a RuntimeError or a SafetensorError without
    the errno; raise the OSError it is, so that the save ends with its one-line message."""
    try:
        yield
    except (RuntimeError, safetensors.SafetensorError) as e:
        full = "No space left" in str(e) or shutil.disk_usage(path.parent).free < 1 << 20
        raise OSError(errno.ENOSPC if full else errno.EIO, "No space left on device" if full else
                      str(e).strip().splitlines()[0], str(path)) from None


def cleanup_partial(out_dir: Path) -> None:
    """Delete what interrupted saves left in out_dir: .tmp-* folders and links of this process or of dead ones.

    save_checkpoint calls it first; a folder that `latest` or `best` points to is never touched.
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return
    linked = {(out_dir / link).resolve() for link in LINKS if (out_dir / link).is_symlink()}
    for path in out_dir.iterdir():
        pid = re.fullmatch(r"\.tmp-.*-(\d+)", path.name)
        if not pid or (int(pid[1]) != os.getpid() and errors.pid_alive(int(pid[1]))):
            continue
        if path.is_symlink() or path.resolve() not in linked:
            _remove(path)


def _install(tmp: Path, final: Path) -> None:
    """Rename the finished folder tmp to final, replacing a folder of that name from an earlier save."""
    if not final.exists():
        os.rename(tmp, final)
        return
    # The same iteration saved again (an evaluation, then the end of training, at one step; or a save that was
    # killed before its link moved). A folder cannot be renamed over another, and moving the old one aside first
    # would leave `latest` dangling for a moment. So its files are replaced one by one, each atomically: both copies
    # hold the same iteration, so whatever mix a crash leaves is a complete, loadable checkpoint.
    for file in os.listdir(tmp):
        os.replace(tmp / file, final / file)
    errors.fsync(final)
    _remove(tmp)


def _point(out_dir: Path, link: str, name: str) -> None:
    """Make out_dir/link a symlink to name in one atomic step: a new link under a temporary name, renamed over."""
    tmp = out_dir / f".tmp-{link}-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.symlink(name, tmp)  # relative, so the out_dir can be moved or copied elsewhere
    os.replace(tmp, out_dir / link)


def _retain(out_dir: Path) -> None:
    """Keep the checkpoints `latest` and `best` point to; delete the other ckpt_* folders."""
    linked = {(out_dir / link).resolve() for link in LINKS if (out_dir / link).is_symlink()}
    # Deleting is only safe while latest leads to a complete checkpoint; save_checkpoint has just made sure of it.
    assert _is_complete((out_dir / "latest").resolve()), f"{out_dir / 'latest'} is not a complete checkpoint"
    try:
        for path in out_dir.iterdir():
            if _CKPT.fullmatch(path.name) and not path.is_symlink() and path.resolve() not in linked:
                _remove(path)
    except OSError as e:  # the new checkpoint is saved; old ones left behind only cost disk space
        print(f"warning: could not delete old checkpoints in {out_dir} ({e}); delete them by hand", file=sys.stderr)


def _remove(path: Path) -> None:
    """Delete a file, link or folder; a folder is first renamed to .tmp-*, so a crash midway leaves no half-deleted
    ckpt_* behind, only a temporary that the next save removes."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        if not path.name.startswith(".tmp-"):
            doomed = path.with_name(f".tmp-del-{path.name}-{os.getpid()}")
            os.rename(path, doomed)
            path = doomed
        shutil.rmtree(path)


def _save_failed(out_dir: Path, final: Path, e: OSError) -> str:
    """The one-line message of a failed save: what failed, how to fix it, and what is still there."""
    hint = ("the disk is full: free some space or pass another --out_dir" if e.errno == errno.ENOSPC
            else "check that the folder is writable, or pass another --out_dir")
    latest = (out_dir / "latest").resolve()
    if latest == final.resolve() and _is_complete(latest):
        intact = f"{final} itself was written and is intact"
    elif _is_complete(latest):
        intact = f"the previous checkpoint {latest} is intact"
    else:
        intact = "no earlier checkpoint existed"
    return f"could not save checkpoint {final} ({e.strerror or e}: {e.filename or final}): {hint}; {intact}"


def _check_plain(obj: object, where: str) -> None:
    """Refuse what torch.load(weights_only=True) would refuse: anything beyond tensors, plain scalars and containers.

    Exact types, because numpy's float64 is a float subclass and would be pickled as a numpy object.
    """
    if isinstance(obj, torch.Tensor) or type(obj) in (str, int, float, bool, type(None)):
        return
    if type(obj) in (dict, OrderedDict):
        for key, value in obj.items():
            if type(key) not in (str, int):
                raise TypeError(f"{where} has key {key!r} of type {type(key).__name__}; use str or int keys")
            _check_plain(value, f"{where}[{key!r}]")
    elif type(obj) in (list, tuple):
        for i, value in enumerate(obj):
            _check_plain(value, f"{where}[{i}]")
    else:
        raise TypeError(f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}, which "
                        f"torch.load(weights_only=True) refuses: store it as a tensor, number, string, list or dict")
