"""Export a checkpoint for other tools: tokenizer files for transformers, or one GGUF file for llama.cpp and Ollama.

    python export.py --out_dir=out/gpt2_ft --format=hf                        # add the tokenizer files it lacks
    python export.py --out_dir=out/gpt2_ft --format=hf --output=exported/gpt2_ft   # a copy, for inference only
    python export.py --out_dir=out/gpt2_ft --format=gguf --output=gpt2_ft.gguf    # f16; --gguf_type=f32 or q8_0

The checkpoint is picked as sample.py picks it (--out_dir and --checkpoint, or --init_from). Checkpoints saved now
hold their tokenizer files already; --format=hf adds them to a folder saved by an older version, never rewriting its
weights. A GGUF is written only for a model llama.cpp's gpt2 architecture runs exactly (other switches are refused,
by name) and needs the gguf package (pip install 'smallgpt[gguf]'). Nothing is left half-written: each file is
written under a temporary name and renamed. docs/elsewhere.md shows how to use the results.
"""

from __future__ import annotations

import errors

errors.install(__name__)  # before the other imports: a Ctrl-C while torch loads is one line too

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from checkpoint import HUB_MODELS, load_model, model_folder
from config import parse_config
from hf import SIZES, Implemented, _any, hf_state_dict, tokenizer_files, unimplemented
from model import GPT, GPTConfig
from tokens import Tokenizer

GGUF_TYPES = ("f32", "f16", "q8_0")


@dataclass
class ExportConfig:
    out_dir: str = "out"  # training output folder to export (see --checkpoint), or a checkpoint folder
    init_from: str | None = None  # a Hugging Face GPT-2 folder or gpt2, gpt2-medium, ... instead; none/resume: out_dir
    checkpoint: str = "latest"  # which checkpoint of out_dir: latest or best (lowest validation loss)
    format: str = "hf"  # hf: config.json, model.safetensors and tokenizer files; gguf: one file for llama.cpp
    output: str | None = None  # hf: a new folder (none: add the tokenizer files to the checkpoint's); gguf: the file
    gguf_type: str = "f16"  # the GGUF's matrices: f32, f16 or q8_0 (norms, biases and positions stay f32)

    def __post_init__(self) -> None:
        if self.format not in ("hf", "gguf"):
            raise ValueError(f"format={self.format!r} is not an export format: use --format=hf (transformers) or "
                             f"--format=gguf (llama.cpp, Ollama)")
        if self.checkpoint not in ("latest", "best"):
            raise ValueError(f"checkpoint must be latest or best, got {self.checkpoint!r}")
        if self.gguf_type not in GGUF_TYPES:
            raise ValueError(f"gguf_type must be one of {', '.join(GGUF_TYPES)}, got {self.gguf_type!r}")
        if self.format == "gguf" and not self.output:
            raise ValueError("--format=gguf needs --output=FILE.gguf: the file to write")


def main(argv: list[str] | None = None) -> Path:
    """Export as configured by argv (default sys.argv[1:]); returns the folder or file written."""
    cfg = parse_config(ExportConfig, argv, description=__doc__)
    source = cfg.out_dir if cfg.init_from in (None, "resume") else cfg.init_from
    output = Path(cfg.output) if cfg.output else None
    if output is not None and output.exists() and (cfg.format == "gguf" and output.is_dir() or
                                                   cfg.format == "hf" and not _empty_dir(output)):
        what = "a folder" if output.is_dir() else "a file"
        raise SystemExit(f"--output={output} is already {what}: choose a new path, or delete it first")
    if output is not None and not output.absolute().parent.is_dir():
        raise SystemExit(f"--output={output}: the folder {output.absolute().parent} does not exist; create it first")
    if cfg.format == "hf" and output is None and str(source) in HUB_MODELS and not Path(source).exists():
        raise SystemExit(f"{source} is a hub model: pass --output=FOLDER to write its export there")
    try:
        folder = model_folder(source, cfg.checkpoint)
        model, tokenizer, _ = load_model(folder)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if cfg.format == "gguf":
        write_gguf(model, tokenizer, output, cfg.gguf_type, name=Path(source).resolve().name)  # the run's, not ckpt_*
        print(f"wrote {output} ({output.stat().st_size / 2**20:.1f} MiB, {cfg.gguf_type}) from {folder}",
              file=sys.stderr)
        return output
    try:
        files = tokenizer_files(tokenizer, model.config.block_size)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if output is None:
        written = add_files(folder, files)
        print(f"{folder}: wrote {', '.join(written)}" if written else f"{folder} already has its tokenizer files",
              file=sys.stderr)
        return folder
    write_hf_folder(folder, output, files)
    print(f"wrote {output} from {folder}", file=sys.stderr)
    return output


def add_files(folder: Path, files: dict[str, str]) -> list[str]:
    """Write each file of `files` that folder lacks or holds with other contents, each atomically; the names written."""
    written = []
    for name, text in files.items():
        path = folder / name
        if path.is_file() and path.read_text(encoding="utf-8") == text:
            continue
        tmp = folder / f".tmp-{name}-{os.getpid()}"
        try:
            with errors.writing(tmp):
                tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        written.append(name)
    return written


def write_hf_folder(folder: Path, output: Path, files: dict[str, str]) -> None:
    """output: folder's config.json and model.safetensors (copied, not rewritten) and the tokenizer files, for
    inference (no state.pt); built under a temporary name and renamed, so it appears complete or not at all."""
    tmp = output.absolute().parent / f".tmp-{output.name}-{os.getpid()}"
    try:
        tmp.mkdir()
        for name in ("config.json", "model.safetensors"):
            shutil.copyfile(folder / name, tmp / name)
        add_files(tmp, files)
        if output.is_dir():  # an empty folder given as --output
            output.rmdir()
        os.rename(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


# ------------------------------------------------------------------------------------------------------------ GGUF

# The GPTConfig values llama.cpp's gpt2 architecture computes exactly (as hf.FORMATS, a field not named: GPT-2's
# default only). Without biases, the zero biases llama.cpp requires are written; an untied head is its own tensor
# (output.weight; llama.cpp reuses token_embd where there is none).
GGUF_GPT2: dict[str, Implemented] = {
    **dict.fromkeys(SIZES, _any), "dropout": _any, "zero_init": _any, "rope_theta": _any, "bias": _any,
    "tie_embeddings": _any, "n_kv_head": lambda c: c.kv_heads == c.n_head}

# GPT-2's weight names (hf.hf_state_dict's) -> llama.cpp's (gguf-py's MODEL_TENSORS[GPT2]); {i}: the block.
GGUF_NAMES = {"wte": "token_embd", "wpe": "position_embd", "ln_f": "output_norm", "lm_head": "output",
              "h.{i}.ln_1": "blk.{i}.attn_norm", "h.{i}.attn.c_attn": "blk.{i}.attn_qkv",
              "h.{i}.attn.c_proj": "blk.{i}.attn_output", "h.{i}.ln_2": "blk.{i}.ffn_norm",
              "h.{i}.mlp.c_fc": "blk.{i}.ffn_up", "h.{i}.mlp.c_proj": "blk.{i}.ffn_down"}


def gguf_refusal(config: GPTConfig, tokenizer: Tokenizer) -> str | None:
    """Why this model cannot be a GGUF that llama.cpp runs exactly, in one line; None when it can."""
    if tokenizer.kind == "char":
        return ("a char-level model cannot be a GGUF: llama.cpp's tokenizers are byte-level BPE or SentencePiece "
                "with an end-of-text id among the model's (without one it stops at id 11 for gpt2), so it would "
                "split or end the text otherwise than this model; use it through sample.py or serve.py")
    switches = unimplemented(config, GGUF_GPT2)
    if switches:
        return (f"this checkpoint cannot be a GGUF: llama.cpp's gpt2 architecture does not implement "
                f"{', '.join(switches)} (GPT-2's values only); use it through sample.py, serve.py or transformers")
    return None


def gguf_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """The weights under llama.cpp's names and layout, float32: matrices (out, in) as ggml reads them; zero biases
    where there are none; no output head when it is tied (hf_state_dict leaves it out: llama.cpp reuses token_embd)."""
    weights = hf_state_dict(model)
    names = {theirs.format(i=i): ours.format(i=i) for ours, theirs in GGUF_NAMES.items()
             for i in range(model.config.n_layer)}  # gguf name -> ours, without .weight/.bias
    out = {}
    for gguf_name, ours in names.items():
        if f"{ours}.weight" not in weights:  # a tied head
            continue
        w = weights[f"{ours}.weight"].float()
        if ours.startswith("h.") and w.dim() == 2:  # our Linear stores (in, out): GPT-2's Conv1D layout
            w = w.t()
        out[f"{gguf_name}.weight"] = w.contiguous()
        if ours.startswith("h.") or w.dim() == 1:  # GPT-2 has biases in every norm and block matrix
            bias = weights.get(f"{ours}.bias")
            out[f"{gguf_name}.bias"] = bias.float() if bias is not None else torch.zeros(w.shape[0])
    return out


def write_gguf(model: GPT, tokenizer: Tokenizer, path: Path, gguf_type: str = "f16", name: str = "smallgpt") -> None:
    """Write model and tokenizer as a GGUF of llama.cpp's gpt2 architecture, all or nothing; SystemExit with the
    reason when llama.cpp cannot run it exactly."""
    if (why := gguf_refusal(model.config, tokenizer)) is not None:
        raise SystemExit(why)
    try:
        import gguf
    except ImportError:
        raise SystemExit("--format=gguf needs the gguf package: pip install 'smallgpt[gguf]' (or pip install gguf)"
                         ) from None
    try:
        files = tokenizer_files(tokenizer, model.config.block_size)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    c = model.config
    vocab = json.loads(files["vocab.json"])  # the same vocabulary as the tokenizer files, in id order
    special = tokenizer.tiktoken_encoding.special_tokens_set
    tokens = list(vocab) + [f"[PAD{i}]" for i in range(len(vocab), c.vocab_size)]  # as llama.cpp's converter pads
    types = [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in vocab] + \
            [gguf.TokenType.UNUSED] * (c.vocab_size - len(vocab))
    assert list(vocab.values()) == list(range(len(vocab))), "tiktoken's gpt2-pattern encodings have no gaps"
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type]

    path = Path(path)
    tmp = path.absolute().parent / f".tmp-{path.name}-{os.getpid()}"
    try:
        writer = gguf.GGUFWriter(tmp, "gpt2")
        writer.add_name(name)
        writer.add_block_count(c.n_layer)
        writer.add_context_length(c.block_size)
        writer.add_embedding_length(c.n_embd)
        writer.add_feed_forward_length(4 * c.n_embd)
        writer.add_head_count(c.n_head)
        writer.add_layer_norm_eps(1e-5)  # model.py's nn.LayerNorm default, GPT-2's
        writer.add_file_type(file_type)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(files["merges.txt"].splitlines()[1:])  # after the "#version" line
        for add in (writer.add_bos_token_id, writer.add_eos_token_id, writer.add_unk_token_id):
            add(tokenizer.eot_token)
        writer.add_add_bos_token(False)  # our prompts do not start with end-of-text
        for tensor_name, w in gguf_tensors(model).items():
            data, raw_dtype = _gguf_data(gguf, tensor_name, w.numpy(), gguf_type)
            writer.add_tensor(tensor_name, data, raw_dtype=raw_dtype)
        with errors.writing(tmp):
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _gguf_data(gguf: ModuleType, name: str, w: np.ndarray, gguf_type: str) -> tuple[np.ndarray, object]:
    """A tensor's data in the file's type, and that type where the writer cannot infer it (else None). As llama.cpp's
    converter: vectors and the position table stay f32; a q8_0 matrix with rows not of whole 32-value blocks: f16."""
    if gguf_type == "f32" or w.ndim == 1 or name.startswith("position_embd"):
        return w.astype(np.float32), None
    if gguf_type == "q8_0" and w.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        q8 = gguf.GGMLQuantizationType.Q8_0
        return gguf.quants.quantize(w.astype(np.float32), q8), q8
    return w.astype(np.float16), None


if __name__ == "__main__":
    main()
