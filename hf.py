"""Hugging Face formats: which transformers architecture a model is exactly, its config.json, its weight names.

    from hf import config_from_hf, hf_config, hf_format, hf_state_dict, load_hf_state_dict, tokenizer_files
    hf_format(model.config)                     # "gpt2", "nanochat", or "smallgpt" (no transformers class)
    weights, config = hf_state_dict(model), hf_config(model.config, eot_token=50256)
    tokenizer_files(tokenizer, block_size=1024)  # {"vocab.json": ..., "merges.txt": ..., "tokenizer_config.json": ...}

checkpoint.py reads and writes the files; docs/training.md ("The modern recipe") says which model loads where.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import asdict, fields

import torch

from model import GPT, GPTConfig
from tokens import Tokenizer

SIZES = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd")


def _any(c: GPTConfig) -> bool:
    return True


# The values of each GPTConfig field a format implements; a field not named, only its default (GPT-2's maths,
# which NanoChat shares except where named). Dropout and zero_init do not change a trained model's maths.
Implemented = tuple | Callable[[GPTConfig], bool]
FORMATS: dict[str, dict[str, Implemented]] = {
    "gpt2": {**dict.fromkeys(SIZES, _any), "dropout": _any, "zero_init": _any, "bias": _any,
             "rope_theta": _any,  # unused by learned positions
             "n_kv_head": lambda c: c.kv_heads == c.n_head},
    "nanochat": {**dict.fromkeys(SIZES, _any), "dropout": _any, "zero_init": _any, "rope_theta": _any,
                 "n_kv_head": _any, "logit_softcap": _any, "pos_embedding": ("rope",), "norm": ("rmsnorm",),
                 "embed_norm": (True,), "qk_norm": (True,), "mlp": ("relu2",), "bias": (False,),
                 "tie_embeddings": (False,)},
}


def hf_format(config: GPTConfig) -> str:
    """The transformers architecture `config` is exactly: one whose table implements every field's value, else
    "smallgpt", which transformers refuses rather than loads with other maths."""
    return next((name for name, table in FORMATS.items() if not unimplemented(config, table)), "smallgpt")


def unimplemented(config: GPTConfig, table: dict[str, Implemented]) -> list[str]:
    """The fields of config, as name=value, whose value a format's table (as FORMATS' are) does not implement."""
    return [f"{f.name}={getattr(config, f.name)!r}" for f in fields(config)
            if not _implements(table.get(f.name, (f.default,)), getattr(config, f.name), config)]


def _implements(allowed: Implemented, value: object, config: GPTConfig) -> bool:
    return allowed(config) if callable(allowed) else value in allowed and type(value) in map(type, allowed)


def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The weights as hf_format names them (GPT-2: `wte.weight`, `h.0.attn.c_attn.weight`, ..., a tied head left
    out), as copies in host memory, ready for safetensors."""
    ours = {k.removeprefix("transformer."): t.detach().to("cpu", copy=True) for k, t in model.state_dict().items()
            if not (k == "lm_head.weight" and model.config.tie_embeddings)}
    return _to_nanochat(ours, model.config) if hf_format(model.config) == "nanochat" else ours


def hf_config(c: GPTConfig, eot_token: int | None = None) -> dict:
    """config.json for hf_format(c), plus every GPTConfig field under "smallgpt". eot_token: the tokenizer's
    end-of-text id, written as bos/eos (None for a char vocabulary; left out, transformers would assume 50256)."""
    fmt = hf_format(c)
    own = {"bos_token_id": eot_token, "eos_token_id": eot_token, "smallgpt": asdict(c)}
    if fmt == "nanochat":
        return {"model_type": "nanochat", "architectures": ["NanoChatForCausalLM"], "vocab_size": c.vocab_size,
                "hidden_size": c.n_embd, "intermediate_size": 4 * c.n_embd, "num_hidden_layers": c.n_layer,
                "num_attention_heads": c.n_head, "num_key_value_heads": c.kv_heads,
                "max_position_embeddings": c.block_size, "hidden_act": "relu2", "rms_norm_eps": 1e-6,
                "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
                "final_logit_softcapping": c.logit_softcap, "attention_bias": False,
                "attention_dropout": c.dropout, "tie_word_embeddings": False, "pad_token_id": None} | own
    sizes = {"vocab_size": c.vocab_size, "n_positions": c.block_size, "n_ctx": c.block_size, "n_embd": c.n_embd,
             "n_layer": c.n_layer, "n_head": c.n_head}
    if fmt == "smallgpt":
        return {"model_type": "smallgpt", "architectures": ["smallgpt.GPT"]} | sizes | own
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]} | sizes | {
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True,
        "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout} | own


def load_hf_state_dict(model: GPT, weights: dict[str, torch.Tensor], source: str = "weights") -> None:
    """Copy weights as hf_state_dict names them (GPT-2's layout with or without the `transformer.` prefix, or
    NanoChat's) into model; refuse missing, unexpected, misshapen and non-finite ones, naming `source`."""
    if hf_format(model.config) == "nanochat":
        weights = _from_nanochat(weights, model.config)
    ours = model.state_dict()
    tied = model.config.tie_embeddings
    expected = {k.removeprefix("transformer.") for k in ours if not (tied and k == "lm_head.weight")}
    found = {}
    for key, tensor in weights.items():
        name = key.removeprefix("transformer.")
        if name.endswith((".attn.bias", ".attn.masked_bias")) or (tied and name == "lm_head.weight"):
            continue  # HF's causal-mask buffers, and a head that is tied to wte anyway
        found[name] = tensor
    missing, unexpected = expected - found.keys(), found.keys() - expected
    if missing or unexpected:
        raise ValueError(f"{source} does not match the model in config.json: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    with torch.no_grad():
        for name, tensor in found.items():
            target = ours[name if name in ours else "transformer." + name]
            if tensor.shape != target.shape:
                raise ValueError(f"{source}: {name} has shape {tuple(tensor.shape)}, the config asks for "
                                 f"{tuple(target.shape)}")
            # aminmax: one pass, no temporary the size of the weights, 12x faster than isfinite().all() on the CPU
            # (NaN propagates, inf shows). float8 has no aminmax kernel.
            if not tensor.is_floating_point() or not all(x.isfinite() for x in torch.aminmax(
                    tensor if tensor.element_size() > 1 else tensor.float())):
                what = f"holds {tensor.dtype} values" if not tensor.is_floating_point() else "holds NaN or Inf"
                raise ValueError(f"{source}: {name} {what}: weights must be finite floating-point numbers; "
                                 f"use another checkpoint")
            target.copy_(tensor)


# config.json settings that change the maths, and the values of each format that this model implements.
_GPT2_SETTINGS = {"activation_function": ("gelu_new", "gelu_pytorch_tanh"), "layer_norm_epsilon": (1e-5,),
                  "scale_attn_weights": (True,), "scale_attn_by_inverse_layer_idx": (False,),
                  "tie_word_embeddings": (True,)}
_NANOCHAT_SETTINGS = {"hidden_act": ("relu2",), "attention_bias": (False,), "tie_word_embeddings": (False,),
                      "rms_norm_eps": (1e-6,)}


def config_from_hf(hf: dict, path: str, dropout: float | None) -> GPTConfig:
    """GPTConfig from a config.json's contents (`path` names it in errors): GPT-2's or NanoChat's keys, overridden by
    our own "smallgpt" entry where present (ours always write one); refuse settings this model does not implement
    and values of the wrong type. The inverse of hf_config."""
    hf = hf if isinstance(hf, dict) else {}
    model_type = hf.get("model_type", "gpt2")
    if model_type == "nanochat":
        settings, keys = _NANOCHAT_SETTINGS, ("vocab_size", "hidden_size", "num_hidden_layers",
                                              "num_attention_heads", "max_position_embeddings")
    elif model_type in ("gpt2", "smallgpt"):
        settings, keys = _GPT2_SETTINGS, ("vocab_size", "n_layer", "n_head", "n_embd")
    else:
        raise ValueError(f"{path}: model_type {model_type!r} is not supported: this GPT loads gpt2 and nanochat "
                         f"folders, and the folders train.py writes")
    own = hf.get("smallgpt", {})
    if not isinstance(own, dict) or own.keys() - {f.name for f in fields(GPTConfig)}:
        raise ValueError(f"{path}: its \"smallgpt\" entry has unknown keys: it was written by another version; "
                         f"save the checkpoint again with this one")
    block_size = hf.get("n_positions", hf.get("n_ctx"))  # older GPT-2 configs name the context n_ctx only
    missing = [k for k in keys if k not in hf] + ["n_positions"] * (model_type != "nanochat" and block_size is None)
    if missing and model_type != "smallgpt":
        raise ValueError(f"{path} lacks {', '.join(missing)}: it is not a {model_type} config.json")
    for key, allowed in settings.items():
        if key in hf and hf[key] not in allowed:
            raise ValueError(f"{path}: {key}={hf[key]!r} is not supported: this GPT implements {model_type}'s "
                             f"{key}={allowed[0]!r}")
    if model_type == "nanochat":
        if hf.get("intermediate_size", 4 * hf["hidden_size"]) != 4 * hf["hidden_size"]:
            raise ValueError(f"{path}: intermediate_size must be 4 * hidden_size, as in this GPT's MLP")
        rope = hf.get("rope_parameters") or {"rope_theta": hf.get("rope_theta", 10000.0)}  # older: at the top level
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"{path}: rope_type {rope['rope_type']!r} is not supported: this GPT implements "
                             f"RoPE's default type")
        base = dict(block_size=hf["max_position_embeddings"], vocab_size=hf["vocab_size"],
                    n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"], n_embd=hf["hidden_size"],
                    n_kv_head=hf.get("num_key_value_heads"), bias=False, pos_embedding="rope",
                    rope_theta=rope.get("rope_theta", 10000.0), norm="rmsnorm", embed_norm=True, qk_norm=True,
                    mlp="relu2", tie_embeddings=False, logit_softcap=hf.get("final_logit_softcapping", 15.0))
    elif model_type == "gpt2":
        base = dict(block_size=block_size, vocab_size=hf["vocab_size"], n_layer=hf["n_layer"], n_head=hf["n_head"],
                    n_embd=hf["n_embd"])
    else:
        base = {}
    kwargs = base | own | ({} if dropout is None else {"dropout": dropout})
    kinds = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "None": (type(None),)}
    for f in fields(GPTConfig):  # field types are strings here (from __future__ import annotations)
        if f.name in kwargs and type(kwargs[f.name]) not in sum((kinds[t.strip()] for t in f.type.split("|")), ()):
            raise ValueError(f"{path}: {f.name}={kwargs[f.name]!r} is not of type {f.type}")
    try:
        c = GPTConfig(**kwargs)
    except TypeError as e:  # a required size missing from a "smallgpt" config
        raise ValueError(f"{path}: {e}; save the checkpoint again") from None
    except ValueError as e:  # GPTConfig's own checks (sizes, divisibility, switches)
        raise ValueError(f"{path}: {e}") from None
    return c


def _nanochat_names(config: GPTConfig) -> list[tuple[str, str]]:
    """(our name, NanoChat's name) of every weight but c_attn, which NanoChat splits into q_proj, k_proj, v_proj."""
    names = [("wte.weight", "model.embed_tokens.weight"), ("lm_head.weight", "lm_head.weight")]
    for i in range(config.n_layer):
        names += [(f"h.{i}.attn.c_proj.weight", f"model.layers.{i}.self_attn.o_proj.weight"),
                  (f"h.{i}.mlp.c_fc.weight", f"model.layers.{i}.mlp.fc1.weight"),
                  (f"h.{i}.mlp.c_proj.weight", f"model.layers.{i}.mlp.fc2.weight")]
    return names


def _qkv_sizes(config: GPTConfig) -> list[int]:
    return [config.n_head * config.head_dim, config.kv_heads * config.head_dim, config.kv_heads * config.head_dim]


def _to_nanochat(ours: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """Our weights under Hugging Face NanoChat's names; its nn.Linear stores (out, in), our Linear (in, out)."""
    out = {theirs: ours[name] if name in ("wte.weight", "lm_head.weight") else ours[name].t().contiguous()
           for name, theirs in _nanochat_names(config)}
    for i in range(config.n_layer):
        q, k, v = ours[f"h.{i}.attn.c_attn.weight"].split(_qkv_sizes(config), dim=1)
        for part, tensor in zip("qkv", (q, k, v)):
            out[f"model.layers.{i}.self_attn.{part}_proj.weight"] = tensor.t().contiguous()
    return out


def _from_nanochat(theirs: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """The inverse of _to_nanochat; a missing weight is left out, for load_hf_state_dict to name."""
    out = {name: theirs[hf] if name in ("wte.weight", "lm_head.weight") else theirs[hf].t()
           for name, hf in _nanochat_names(config) if hf in theirs}
    for i in range(config.n_layer):
        parts = [theirs.get(f"model.layers.{i}.self_attn.{p}_proj.weight") for p in "qkv"]
        if all(t is not None for t in parts):
            out[f"h.{i}.attn.c_attn.weight"] = torch.cat([t.t() for t in parts], dim=1)
    return out


# ------------------------------------------------------------------------------------------------- tokenizer files


def tokenizer_files(tokenizer: Tokenizer, block_size: int) -> dict[str, str]:
    """The files that make AutoTokenizer.from_pretrained(folder) give our ids, name -> text. A BPE encoding with
    GPT-2's pre-tokenizer: vocab.json and merges.txt (for "gpt2", byte for byte the encoder.json and vocab.bpe that
    tiktoken and Hugging Face's gpt2 read) and tokenizer_config.json. A char vocabulary: tokenizer.json, a BPE without
    merges (one token per character, no normalizer, no pre-tokenizer), and tokenizer_config.json.

    model_max_length is block_size. A padded model vocabulary (50304 for GPT-2's 50257) stays in config.json's
    vocab_size: the tokenizer lists only the ids that have text. "<|endoftext|>" written in a text stays text
    (split_special_tokens), as in tokens.py; the end-of-text id is bos, eos and unk. A char vocabulary has none."""
    config = {"model_max_length": block_size, "clean_up_tokenization_spaces": False}
    if tokenizer.kind == "char":
        model = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                 "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                 "vocab": {c: i for i, c in enumerate(tokenizer.chars)}, "merges": []}
        spec = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
                "pre_tokenizer": None, "post_processor": None, "decoder": {"type": "Fuse"}, "model": model}
        return {"tokenizer.json": json.dumps(spec, ensure_ascii=False),
                "tokenizer_config.json": json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"} | config, indent=2)}
    vocab, merges = _bpe_files(tokenizer.encoding)
    eot = tokenizer.tiktoken_encoding.decode([tokenizer.eot_token])
    config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": eot, "eos_token": eot, "unk_token": eot,
              "add_bos_token": False, "add_prefix_space": False, "split_special_tokens": True, "errors": "replace"
              } | config
    return {"vocab.json": vocab, "merges.txt": merges, "tokenizer_config.json": json.dumps(config, indent=2)}


@functools.cache  # ~1 s of Python per encoding: once per process, not at every checkpoint
def _bpe_files(encoding: str) -> tuple[str, str]:
    """vocab.json and merges.txt of a tiktoken encoding, rebuilt from its ranks: a token's merge is the pair that
    byte-pair encoding its bytes with the lower ranks ends on; tokens and merges spelled in GPT-2's byte alphabet."""
    from tiktoken_ext.openai_public import r50k_pat_str  # GPT-2's pre-tokenizer pattern (gpt2, r50k, p50k)

    enc = Tokenizer.tiktoken(encoding).tiktoken_encoding
    if enc._pat_str != r50k_pat_str:
        raise ValueError(f"tiktoken encoding {encoding!r} does not split text as GPT-2 does, so Hugging Face's "
                         f"GPT2Tokenizer cannot reproduce it: only GPT-2-pattern encodings (gpt2, r50k_base, "
                         f"p50k_base) and char vocabularies get tokenizer files")
    ranks = enc._mergeable_ranks
    alphabet = _byte_alphabet()

    def spell(b: bytes) -> str:
        return "".join(alphabet[x] for x in b)

    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            a, b = _last_merge(token, rank, ranks)
            merges.append(f"{spell(a)} {spell(b)}")
    vocab = {spell(token): rank for token, rank in ranks.items()} | enc._special_tokens
    vocab_json = json.dumps(dict(sorted(vocab.items(), key=lambda item: item[1])))  # ensure_ascii, as encoder.json
    return vocab_json, "#version: 0.2\n" + "\n".join(merges) + "\n"


def _last_merge(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The two tokens whose merge makes `token`. When only one split has both halves ranked below it, that is the
    one (most tokens); else byte-pair encode the token's bytes with the merges ranked below it."""
    splits = [i for i in range(1, len(token)) if ranks.get(token[:i], rank) < rank > ranks.get(token[i:], rank)]
    if len(splits) == 1:
        return token[:splits[0]], token[splits[0]:]
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, i = min((ranks.get(parts[i] + parts[i + 1], rank), i) for i in range(len(parts) - 1))
        assert best < rank, f"{token!r} cannot be built from tokens ranked below {rank}"
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts[0], parts[1]


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte (openai/gpt-2 encoder.py's bytes_to_unicode): printable Latin-1
    bytes stand for themselves, the others for chr(256 + n) in order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in keep]
    return {b: chr(b) for b in keep} | {b: chr(256 + n) for n, b in enumerate(others)}
