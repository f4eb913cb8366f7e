"""A decoder-only GPT in one file: GPT-2's architecture with names to match, a KV cache, generation, GPT-2 import.

    from model import GPT, GPTConfig
    model = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65))
    model = GPT.from_pretrained("gpt2")                 # or a local Hugging Face GPT-2 folder
    out = model.generate(idx, max_new_tokens=100, temperature=0.8, top_k=200)

References: GPT-2 (Radford et al. 2019) for the architecture and initialisation; nanoGPT for the names and the
training-time shapes; Hugging Face's GPT2LMHeadModel for the weight layout imported and exported here.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import math
import os
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest context the model sees (number of learned positions)
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for faster matmuls
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads per block
    n_embd: int = 768  # width of the residual stream
    dropout: float = 0.0  # dropout probability on attention weights and residual branches (0 for pretraining)
    bias: bool = True  # biases in Linear layers and LayerNorms, as GPT-2; False is a little faster

    def __post_init__(self) -> None:
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name} must be at least 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}): "
                f"change n_head to a divisor of n_embd, or n_embd to a multiple of n_head"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


class KVCache:
    """Keys and values of every layer for the tokens seen so far, preallocated for `max_len` positions.

    The caller creates it, passes it to `GPT.forward`, and resets it; nothing about it lives on the modules.
    Each layer appends its new keys/values at `pos`; the model advances `pos` once all layers have run.
    """

    def __init__(self, n_layer: int, batch_size: int, n_head: int, head_dim: int, max_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        shape = (n_layer, batch_size, n_head, max_len, head_dim)
        # Uninitialised: attention only ever reads the filled positions, and zeroing 2 x 38 MB for GPT-2 124M
        # would cost a decode step's worth of time per generate() call.
        self.k = torch.empty(shape, device=device, dtype=dtype)  # (L, B, n_head, max_len, head_dim)
        self.v = torch.empty(shape, device=device, dtype=dtype)  # (L, B, n_head, max_len, head_dim)
        self.max_len = max_len
        self.batch_size = batch_size
        self.pos = 0  # number of positions filled

    @classmethod
    def for_model(cls, model: GPT, batch_size: int, max_len: int | None = None) -> KVCache:
        """A cache shaped for `model`, on its device and in its dtype, holding up to block_size positions."""
        c = model.config
        p = model.transformer.wte.weight
        return cls(c.n_layer, batch_size, c.n_head, c.head_dim, max_len or c.block_size, p.device, p.dtype)

    def reset(self) -> None:
        self.pos = 0  # stale entries past pos are never read, so no need to zero them

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this layer's new keys/values (B, n_head, T, head_dim) at pos; return all keys/values so far."""
        end = self.pos + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {self.pos} used, {k.size(2)} more asked. "
                             f"Reset it, or create it with a larger max_len (at most block_size)")
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # (B, n_head, end, head_dim)


class StaticKVCache:
    """KVCache's fixed-shape twin, for decoding under CUDA graphs (torch.compile(mode="reduce-overhead")).

    A CUDA graph replays fixed shapes at fixed addresses, so nothing here may depend on a Python int: one buffer per
    layer, marked static, the positions passed in as a tensor, new keys/values written with index_copy_, and
    attention over the whole buffer under a mask (the gpt-fast recipe). Used by `GPT.forward_static`; `pos` only
    counts the filled positions for the caller, who advances it.
    """

    def __init__(self, n_layer: int, batch_size: int, n_head: int, head_dim: int, max_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        shape = (batch_size, n_head, max_len, head_dim)
        # Zeros, unlike KVCache's empty buffers: attention here multiplies the masked positions too (by a weight of
        # 0), and 0 * NaN from uninitialised memory would be NaN.
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]  # (B, n_head, max_len, hd)
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]  # (B, n_head, max_len, hd)
        for buffer in self.k + self.v:
            torch._dynamo.mark_static_address(buffer)  # lets a CUDA graph update the cache in place
        self.max_len = max_len
        self.batch_size = batch_size
        self.pos = 0

    @classmethod
    def for_model(cls, model: GPT, batch_size: int) -> StaticKVCache:
        c = model.config
        p = model.transformer.wte.weight
        return cls(c.n_layer, batch_size, c.n_head, c.head_dim, c.block_size, p.device, p.dtype)

    def reset(self) -> None:
        self.pos = 0  # positions past the ones written are masked out, so stale entries are never seen

    def update(self, layer: int, input_pos: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write keys/values (B, n_head, T, head_dim) at positions input_pos (T,); return the whole buffers."""
        self.k[layer].index_copy_(2, input_pos, k.to(self.k[layer].dtype))  # .to: k is bf16 under autocast
        self.v[layer].index_copy_(2, input_pos, v.to(self.v[layer].dtype))
        return self.k[layer], self.v[layer]  # (B, n_head, max_len, head_dim)


class Linear(nn.Module):
    """y = x W + b, with W stored (in_features, out_features): nn.Linear's maths, GPT-2's storage.

    OpenAI's checkpoints keep these weights in this layout (Hugging Face's "Conv1D"), so they load without
    transposes. It is also faster where decoding is bound by reading the weights: a batch-1 step is one
    vector-matrix product per layer, and on the CPU the BLAS streams W about 15% faster in this layout than in
    nn.Linear's (out, in) (docs/benchmarks.md). For the batched matmuls of training the two are the same.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.t(), self.bias)  # a transposed view: no copy, the BLAS reads W as stored


@torch.compiler.assume_constant_result  # decided once while torch.compile traces, not on every call
def flash_supported(device_index: int, head_dim: int) -> bool:
    """Whether SDPA's flash kernel (FlashAttention-2) can run on this GPU for this head size.

    It needs an Ampere or Hopper GPU (compute capability 8.x or 9.0) and head_dim a multiple of 8, at most 256 on
    A100/H100 (sm80, sm90) and at most 192 on the consumer parts (sm86, sm89), whose backward lacks the shared memory.
    Elsewhere (T4, V100, a head_dim of 100) the training forward leaves the choice to SDPA, and says so once.
    """
    major, minor = torch.cuda.get_device_capability(device_index)
    limit = 256 if (major, minor) in ((8, 0), (9, 0)) else 192
    ok = major in (8, 9) and head_dim % 8 == 0 and head_dim <= limit
    if not ok:
        warnings.warn(f"the flash attention kernel does not run on {torch.cuda.get_device_name(device_index)} "
                      f"(compute capability {major}.{minor}) with head_dim {head_dim}: attention uses another, "
                      f"slower SDPA kernel. On Ampere/Hopper GPUs, choose n_embd / n_head a multiple of 8, <= 192")
    return ok


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer  # index into the KV cache
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v for all heads
        self.c_proj = Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | StaticKVCache | None = None,
                input_pos: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, n_head, T, head_dim)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, n_head, T, head_dim)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, n_head, T, head_dim)

        if isinstance(kv_cache, StaticKVCache):  # fixed shapes (see StaticKVCache): the whole buffer, masked
            k, v = kv_cache.update(self.layer, input_pos, k, v)  # (B, n_head, max_len, head_dim)
            mask = torch.arange(k.size(2), device=q.device) <= input_pos[:, None]  # (T, max_len): keys up to pos
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        elif kv_cache is None:  # training, or a plain forward: one causal pass over the whole sequence
            dropout_p = self.dropout if self.training else 0.0
            if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and flash_supported(q.device.index, q.size(-1)):
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # fail loudly rather than silently use a slow kernel
                    y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
            else:
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            start = kv_cache.pos
            k, v = kv_cache.append(self.layer, k, v)  # (B, n_head, start + T, head_dim)
            if start == 0:  # prefill into an empty cache: the usual causal mask
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            elif T == 1:  # one-token decode: the new token may see every cached position
                y = F.scaled_dot_product_attention(q, k, v)
            else:
                # A chunk appended to a non-empty cache. SDPA's is_causal aligns the mask top-left, which is wrong
                # when queries are the last T of start + T keys: query i sees keys 0 .. start + i (bottom-right).
                mask = torch.ones(T, start + T, dtype=torch.bool, device=q.device).tril(diagonal=start)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, n_embd): heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | StaticKVCache | None = None,
                input_pos: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache, input_pos)  # pre-norm: the residual stream is never normalised
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embeddings
            wpe=nn.Embedding(config.block_size, config.n_embd),  # learned position embeddings
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying (Press & Wolf 2017), as GPT-2: the output head reuses the token embedding matrix.
        self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        """GPT-2's initialisation, all in one place.

        Linear and Embedding weights ~ N(0, 0.02), biases zero, LayerNorms at identity. The projections that write
        into the residual stream (attn.c_proj, mlp.c_proj) get std 0.02 / sqrt(2 * n_layer): each block adds two
        such branches, and the scaling keeps the stream's variance from growing with depth (GPT-2 paper, sec. 2.3).
        """
        if isinstance(module, (Linear, nn.Linear)):
            std = 0.02
            if module is not self.lm_head and any(module is b.attn.c_proj or module is b.mlp.c_proj
                                                  for b in self.transformer.h):
                std = 0.02 / math.sqrt(2 * self.config.n_layer)
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; by default without the position embeddings (the token ones are the tied head)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                kv_cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, vocab_size) for token ids idx (B, T); the mean cross-entropy too when targets are given.

        Targets of -1 are ignored. With a KV cache, idx continues the cached sequence: positions start at the
        cache's length, and the cache is advanced by T.
        """
        B, T = idx.size()
        start = kv_cache.pos if kv_cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than block_size {self.config.block_size}; "
                             f"crop the input to the last {self.config.block_size} tokens")
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, n_embd)
        for block in self.transformer.h:
            x = block(x, kv_cache)
        if kv_cache is not None:
            kv_cache.pos += T
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)  # (B, T, vocab_size)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    def forward_static(self, idx: torch.Tensor, input_pos: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
        """Logits (B, T, vocab_size) for idx (B, T) at positions input_pos (T,), continuing a StaticKVCache.

        forward(idx, kv_cache=...) with fixed shapes and no Python-side state, so that torch.compile can capture a
        one-token step in a CUDA graph. The caller passes the positions and advances cache.pos.
        """
        x = self.transformer.wte(idx) + self.transformer.wpe(input_pos)  # (B, T, n_embd)
        for block in self.transformer.h:
            x = block(x, cache, input_pos)
        return self.lm_head(self.transformer.ln_f(x))  # (B, T, vocab_size)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Continue each row of idx (B, T) by max_new_tokens tokens; returns (B, T + max_new_tokens).

        The prompt is prefilled once into a KV cache, then each step feeds one token. temperature=0 is greedy;
        top_k keeps the k likeliest tokens, top_p the smallest set whose probability reaches p (nucleus sampling);
        a torch.Generator makes sampling reproducible.

        Past block_size the model keeps going as nanoGPT's generate does: the context is cropped to the last
        block_size tokens, which restart at position 0. The cache cannot shift positions, so from then on every
        step recomputes the cropped window (as slow as nanoGPT there, and giving exactly its tokens).
        """
        new = self.generate_stream(idx, max_new_tokens, temperature, top_k, top_p, generator)
        return torch.cat([idx, *new], dim=1)

    def generate_stream(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                        top_k: int | None = None, top_p: float | None = None,
                        generator: torch.Generator | None = None,
                        decode_step: Callable[[torch.Tensor, torch.Tensor, StaticKVCache], torch.Tensor] | None = None,
                        cache: KVCache | StaticKVCache | None = None) -> Iterator[torch.Tensor]:
        """generate(), one step at a time: yields each new token (B, 1) as soon as it is sampled.

        decode_step switches to fixed shapes: a StaticKVCache, and every one-token step run as
        decode_step(token, input_pos, cache) -> logits, normally a torch.compile of forward_static (sample.py's
        --compile); prefill and the recompute past block_size stay eager. In fp32 the tokens are generate()'s; in
        bf16/fp16 the fixed-shape attention rounds differently and may pick another token where two nearly tie.
        A cache passed in is reset and reused: a StaticKVCache that keeps its addresses spares a new CUDA graph.
        Arguments are checked here, before the first token is asked for.
        """
        check_sampling(temperature, top_k, top_p)
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if idx.dim() != 2 or idx.size(1) == 0:
            raise ValueError(f"idx must be (batch, length) with length >= 1, got shape {tuple(idx.shape)}")
        kind = KVCache if decode_step is None else StaticKVCache
        if cache is None:
            cache = kind.for_model(self, idx.size(0))
        elif not isinstance(cache, kind) or cache.max_len < self.config.block_size or cache.batch_size != idx.size(0):
            raise ValueError(f"the cache passed in must be a {kind.__name__} for batch {idx.size(0)} holding "
                             f"block_size={self.config.block_size} positions: create it with "
                             f"{kind.__name__}.for_model(model, batch_size)")
        return self._decode(idx, max_new_tokens, temperature, top_k, top_p, generator, decode_step, cache)

    @torch.no_grad()
    def _decode(self, idx: torch.Tensor, max_new_tokens: int, temperature: float, top_k: int | None,
                top_p: float | None, generator: torch.Generator | None,
                decode_step: Callable[[torch.Tensor, torch.Tensor, StaticKVCache], torch.Tensor] | None,
                cache: KVCache | StaticKVCache) -> Iterator[torch.Tensor]:
        """The loop of generate_stream: prefill, then one token a step, recomputing the window past block_size."""
        if max_new_tokens == 0:
            return
        block_size = self.config.block_size
        cache.reset()

        def feed(tokens: torch.Tensor) -> torch.Tensor:  # (B, T) after the cached ones -> last logits (B, vocab)
            if decode_step is None:
                return self(tokens, kv_cache=cache)[0][:, -1, :]
            T = tokens.size(1)
            input_pos = torch.arange(cache.pos, cache.pos + T, device=tokens.device)  # (T,)
            logits = (decode_step if T == 1 else self.forward_static)(tokens, input_pos, cache)
            cache.pos += T
            return logits[:, -1, :]

        logits = feed(idx[:, -block_size:])  # prefill
        tokens = [idx]
        for step in range(max_new_tokens):
            next_token = sample_next(logits, temperature, top_k, top_p, generator)  # (B, 1)
            yield next_token
            if step == max_new_tokens - 1:
                break
            tokens.append(next_token)
            if cache.pos < block_size:
                logits = feed(next_token)
            else:  # context full: recompute the window of the last block_size tokens from position 0
                cache.reset()
                logits = feed(torch.cat(tokens, dim=1)[:, -block_size:])

    # ------------------------------------------------------------------ optimizer and FLOPs

    def configure_optimizers(self, weight_decay: float, learning_rate: float, betas: tuple[float, float],
                             device_type: str) -> torch.optim.AdamW:
        """AdamW with weight decay on the 2-D weights (matmuls, embeddings) only, never on biases or norms."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        # One kernel for the whole update instead of several per parameter (on the CPU ~5x faster than foreach)
        fused = device_type in ("cuda", "cpu")
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs (forward + backward) per token: 6 per parameter plus the attention scores.

        From the PaLM paper (Chowdhery et al. 2022, appendix B): 6N + 12 * n_layer * n_head * head_dim * T.
        """
        c = self.config
        T = seq_len or c.block_size
        return 6 * self.num_params() + 12 * c.n_layer * c.n_head * c.head_dim * T

    def estimate_mfu(self, tokens_per_sec: float, peak_flops: float, seq_len: int | None = None) -> float:
        """Model FLOPs utilisation: achieved training FLOP/s over the device's peak (e.g. 989e12 for H100 bf16)."""
        return self.flops_per_token(seq_len) * tokens_per_sec / peak_flops

    # ------------------------------------------------------------------ Hugging Face GPT-2 weights

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under Hugging Face's GPT-2 names: `wte.weight`, `h.0.attn.c_attn.weight`, ...

        The layouts are already the same (see Linear). The tied head is left out (HF ties it again on load);
        the tensors are copies in host memory, ready for safetensors.
        """
        out = {}
        for key, tensor in self.state_dict().items():
            if key == "lm_head.weight":
                continue
            name = key.removeprefix("transformer.")
            out[name] = tensor.detach().to("cpu", copy=True)  # one copy, off the GPU: safetensors writes from host memory
        return out

    def hf_config(self) -> dict:
        """config.json in Hugging Face's GPT-2 form, plus this model's own fields under "smallgpt"."""
        c = self.config
        return {
            "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
            "vocab_size": c.vocab_size, "n_positions": c.block_size, "n_ctx": c.block_size,
            "n_embd": c.n_embd, "n_layer": c.n_layer, "n_head": c.n_head,
            "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True,
            "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout,
            "smallgpt": asdict(c),
        }

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, dropout: float | None = None,
                        cache_dir: str | os.PathLike | None = None) -> GPT:
        """Load GPT-2 weights: a local folder (config.json + model.safetensors) or a hub name such as "gpt2".

        Hub names (gpt2, gpt2-medium, gpt2-large, gpt2-xl) are downloaded once over HTTPS from huggingface.co (or
        the mirror in $HF_ENDPOINT) into cache_dir (default $SMALLGPT_CACHE or ~/.cache/smallgpt), and the weights
        are checked against the sha256 the hub reports.
        Folders written by this project's train.py load the same way.
        """
        from safetensors.torch import load_file

        folder = Path(name_or_path)
        if not folder.is_dir():
            if str(name_or_path) not in HUB_MODELS:
                raise ValueError(f"{name_or_path!r} is neither a folder nor one of {', '.join(HUB_MODELS)}: "
                                 f"pass a folder holding config.json and model.safetensors, or a GPT-2 name")
            folder = _download_hub_model(str(name_or_path), cache_dir)
        config_path, weights_path = folder / "config.json", folder / "model.safetensors"
        for path in (config_path, weights_path):
            if not path.is_file():
                raise ValueError(f"{path} not found: a model folder holds config.json and model.safetensors "
                                 f"(pytorch_model.bin is not read: convert it to safetensors)")
        config = _config_from_hf(json.loads(config_path.read_text()), config_path, dropout)
        try:
            weights = load_file(weights_path)
        except Exception as e:  # safetensors raises its own error types for truncated or corrupted files
            raise ValueError(f"{weights_path} could not be read ({e}); the file is damaged: download or save it "
                             f"again") from None
        model = cls(config)
        model.load_hf_state_dict(weights, source=str(weights_path))
        return model

    def load_hf_state_dict(self, weights: dict[str, torch.Tensor], source: str = "weights") -> None:
        """Copy weights in Hugging Face's GPT-2 layout (with or without the `transformer.` prefix) into the model."""
        ours = self.state_dict()
        expected = {k.removeprefix("transformer.") for k in ours if k != "lm_head.weight"}
        found = {}
        for key, tensor in weights.items():
            name = key.removeprefix("transformer.")
            if name.endswith((".attn.bias", ".attn.masked_bias")) or name == "lm_head.weight":
                continue  # HF's causal-mask buffers, and the head that is tied to wte anyway
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
                target.copy_(tensor)


HUB_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")

# config.json settings that change the maths, and the values of GPT-2 that this model implements.
_GPT2_SETTINGS = {"activation_function": ("gelu_new", "gelu_pytorch_tanh"), "layer_norm_epsilon": (1e-5,),
                  "scale_attn_weights": (True,), "scale_attn_by_inverse_layer_idx": (False,),
                  "tie_word_embeddings": (True,)}


def _config_from_hf(hf: dict, path: Path, dropout: float | None) -> GPTConfig:
    """GPTConfig from a Hugging Face GPT-2 config.json (ours add a "smallgpt" entry); refuse what GPT-2 is not."""
    block_size = hf.get("n_positions", hf.get("n_ctx"))  # older configs name the context n_ctx only
    missing = [k for k in ("vocab_size", "n_layer", "n_head", "n_embd") if k not in hf]
    if missing or block_size is None:
        raise ValueError(f"{path} lacks {', '.join(missing + ['n_positions'] * (block_size is None))}: it is not "
                         f"a GPT-2 config.json")
    for key, allowed in _GPT2_SETTINGS.items():
        if key in hf and hf[key] not in allowed:
            raise ValueError(f"{path}: {key}={hf[key]!r} is not supported: this GPT implements GPT-2's "
                             f"{key}={allowed[0]!r}")
    own = hf.get("smallgpt", {})
    return GPTConfig(block_size=block_size, vocab_size=hf["vocab_size"], n_layer=hf["n_layer"], n_head=hf["n_head"],
                     n_embd=hf["n_embd"], bias=own.get("bias", True),
                     dropout=dropout if dropout is not None else own.get("dropout", 0.0))


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None  # a redirect then surfaces as an HTTPError whose headers _fetch reads


def _download_hub_model(name: str, cache_dir: str | os.PathLike | None) -> Path:
    """Fetch config.json and model.safetensors of a GPT-2 from the hub, once, verifying the weights' sha256."""
    root = Path(cache_dir or os.environ.get("SMALLGPT_CACHE") or Path.home() / ".cache" / "smallgpt")
    hub = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")  # the variable huggingface_hub reads
    folder = root / name
    made = [p for p in (root, folder) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    try:
        for filename in ("config.json", "model.safetensors"):
            dest = folder / filename
            if not dest.is_file():
                _fetch(f"{hub}/openai-community/{name}/resolve/main/{filename}", dest,
                       need_sha256=filename.endswith(".safetensors"), name=name)
    except BaseException:  # offline, say: leave no empty cache folders behind
        for p in reversed(made):
            if not any(p.iterdir()):
                p.rmdir()
        raise
    return folder


def _fetch(url: str, dest: Path, need_sha256: bool, name: str) -> None:
    """Download url into dest through dest.partial, checking the sha256 that the hub reports for large files.

    The hub answers a request for a large (git LFS) file with a redirect to its CDN and gives the file's sha256 in
    that redirect's X-Linked-Etag header; the CDN's own ETag is something else. So redirects are followed by hand.
    """
    tmp = dest.with_name(dest.name + ".partial")
    opener = urllib.request.build_opener(_NoRedirect)
    expected, where = None, url
    try:
        for _ in range(10):
            try:
                response = opener.open(where, timeout=60)
                break
            except urllib.error.HTTPError as e:
                if e.code not in (301, 302, 303, 307, 308):
                    raise
                expected = (e.headers.get("X-Linked-Etag") or "").strip('"').lower() or expected
                where = urllib.parse.urljoin(where, e.headers["Location"])
        else:
            raise OSError("more than 10 redirects")
        digest = hashlib.sha256()
        with response, open(tmp, "wb") as f:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                f.write(chunk)
    except (OSError, http.client.HTTPException) as e:  # URLError and HTTPError are OSErrors; IncompleteRead is not
        tmp.unlink(missing_ok=True)
        raise SystemExit(f"could not download {url} ({e}). Offline? Download {name}'s config.json and "
                         f"model.safetensors elsewhere and pass their folder instead of {name!r}") from None
    if need_sha256 and not (expected and len(expected) == 64 and digest.hexdigest() == expected):
        tmp.unlink(missing_ok=True)
        reported = f"the hub's sha256 {expected}" if expected else "no sha256 from the hub"
        raise SystemExit(f"{url}: downloaded sha256 {digest.hexdigest()} does not match {reported}; nothing was "
                         f"kept: try again")
    os.replace(tmp, dest)


# ---------------------------------------------------------------------- sampling


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise ValueError for sampling settings that make no sense."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 (or None for no limit), got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (or None for no limit), got {top_p}")


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token (B, 1) from last-position logits (B, vocab_size)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, [-1]]  # (B, 1): the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the likelier tokens before it already reach top_p; the top token always stays.
        drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
