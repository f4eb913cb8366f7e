"""A decoder-only GPT in one file: GPT-2's architecture and names, the modern recipe as switches, a KV cache and
generation. GPTConfig's defaults are GPT-2 exactly; docs/recipe.md explains the switches, hf.py the export.

    from model import GPT, GPTConfig
    model = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65))
    out = model.generate(idx, max_new_tokens=100, temperature=0.8, top_k=200)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from config import bounded, flash_supported
from muon import Muon
from sampling import check_sampling, sample_next


# the values of the str switches: GPTConfig checks them, tests walk them
CHOICES = {"pos_embedding": ("learned", "rope"), "norm": ("layernorm", "rmsnorm"), "mlp": ("gelu", "relu2")}


@dataclass
class GPTConfig:
    block_size: int = bounded(1024, 1, 2**24)  # longest context the model sees
    vocab_size: int = bounded(50304, 1, 2**24)  # GPT-2's 50257 padded up to a multiple of 64 for faster matmuls
    n_layer: int = bounded(12, 1, 4096)  # transformer blocks
    n_head: int = bounded(12, 1, 2**16)  # attention (query) heads per block
    n_embd: int = bounded(768, 1, 2**16)  # width of the residual stream
    dropout: float = bounded(0.0, 0.0, 1.0)  # dropout probability on attention weights and residual branches (0 for pretraining)
    bias: bool = True  # biases in Linear layers and LayerNorms, as GPT-2; False is a little faster
    # switches: the defaults are GPT-2
    pos_embedding: str = "learned"  # learned (GPT-2's wpe) or rope (rotary embeddings on q and k, no wpe)
    rope_theta: float = bounded(10000.0, 0.0, 1e9)  # RoPE base: the longest wavelength is about 2π·rope_theta positions
    norm: str = "layernorm"  # layernorm (GPT-2) or rmsnorm (F.rms_norm without a learned weight, as nanochat)
    embed_norm: bool = False  # normalise the token embeddings before the first block (nanochat, modded-nanogpt)
    qk_norm: bool = False  # RMS-normalise q and k per head before attention (weightless, so before or after RoPE alike)
    mlp: str = "gelu"  # gelu (GPT-2's tanh approximation) or relu2 (ReLU squared)
    n_kv_head: int | None = bounded(None, 1, 2**16)  # key/value heads (grouped-query attention); None: n_head
    tie_embeddings: bool = True  # the output head reuses the token embedding matrix (GPT-2); False: its own weight
    logit_softcap: float | None = bounded(None, 0.0, 1e6)  # cap * tanh(logits / cap) on the output logits; None: no cap
    zero_init: bool = False  # output projections (and an untied head) start at zero instead of GPT-2's N(0, 0.02)
    window: int | None = bounded(None, 1, 2**24)  # sliding-window attention: each token sees itself and the window - 1 before; None: all

    def __post_init__(self) -> None:
        for f in fields(self):  # sizes from a config.json too: bounded before a loop or an allocation uses them
            value, (lo, hi) = getattr(self, f.name), f.metadata.get("range", (None, None))
            if lo is not None and value is not None and not lo <= value <= hi:
                raise ValueError(f"{f.name} must be from {lo} to {hi}, got {value}")
        if self.n_embd % self.n_head != 0:
            near = min((d for d in range(1, self.n_embd + 1) if self.n_embd % d == 0),
                       key=lambda d: abs(d - self.n_head))
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}): change n_head to "
                             f"a divisor of n_embd (e.g. n_head={near}), or n_embd to a multiple of n_head")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.pos_embedding == "rope" and (self.head_dim % 2 or self.rope_theta <= 0):
            raise ValueError(f"RoPE needs an even head_dim (n_embd / n_head = {self.head_dim}) and rope_theta > 0")
        if self.n_kv_head is not None and not (1 <= self.n_kv_head <= self.n_head and self.n_head % self.n_kv_head == 0):
            raise ValueError(f"n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head}): each key/value head "
                             f"serves n_head / n_kv_head query heads")
        if self.logit_softcap is not None and self.logit_softcap <= 0:
            raise ValueError(f"logit_softcap must be positive (nanochat uses 15) or unset, got {self.logit_softcap}")
        if self.window is not None and self.window < 1:
            raise ValueError(f"window must be at least 1 (1: each token sees only itself) or none, got {self.window}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def rolling(self) -> bool:
        """Whether generation goes past block_size on a rolling cache: the maths needs neither learned positions
        (wpe ends at block_size) nor keys older than the window."""
        return self.window is not None and self.pos_embedding == "rope"


MODEL_FIELDS = tuple(f.name for f in fields(GPTConfig) if f.name != "vocab_size")  # set by a config; vocab: the data's


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer  # index into the KV cache
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        self.qk_norm, self.window, self.dropout = config.qk_norm, config.window, config.dropout
        # q, k, v for all heads in one matmul; with GQA, k and v have n_kv_head heads each
        self.c_attn = Linear(config.n_embd, (config.n_head + 2 * config.kv_heads) * config.head_dim, bias=config.bias)
        self.c_proj = Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def qkv(self, x: torch.Tensor,
            rope: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (B, n_head, T, hd), k and v (B, n_kv_head, T, hd) of x (B, T, n_embd): normed and rotated as switched."""
        B, T, _ = x.size()
        q, k, v = self.c_attn(x).split([self.n_head * self.head_dim, self.n_kv_head * self.head_dim,
                                        self.n_kv_head * self.head_dim], dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, head_dim)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, n_kv_head, T, head_dim)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, n_kv_head, T, head_dim)
        if self.qk_norm:
            q, k = rms_norm(q), rms_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return q.to(v.dtype), k.to(v.dtype), v  # CUDA autocast runs rms_norm in fp32 (torch >= 2.12): flash needs bf16

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                mask: torch.Tensor | None = None, kv_cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.qkv(x, rope)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer, k, v)  # every key to attend to: (B, n_kv_head, Tk, head_dim)
        y = attend(q, k, v, mask, self.dropout if self.training else 0.0)  # (B, n_head, T, head_dim)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, n_embd): heads side by side again
        return self.resid_dropout(self.c_proj(y))

    def mask(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """Which keys (positions k_pos) each query (q_pos) sees, with this module's switches: forward and
        attention.py's maps both ask here."""
        return causal_mask(q_pos, k_pos, self.window)


def causal_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """True where a query sees a key: at or before its position and fewer than `window` back. The model's one mask
    builder; positions (Tq,), (Tk,) give (Tq, Tk), per-row positions (B, Tq) give (B, Tq, Tk): unsqueeze(1) for SDPA."""
    back = q_pos.unsqueeze(-1) - k_pos.unsqueeze(-2)  # (..., Tq, Tk): how far back each key is
    return (back >= 0) if window is None else (back >= 0) & (back < window)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
           dropout_p: float = 0.0) -> torch.Tensor:
    """The model's one SDPA call: q (B, n_head, Tq, hd), k and v (B, n_kv_head, Tk, hd); mask (Tq, Tk) or
    (B, 1, Tq, Tk) from causal_mask. Without one: causal, the Tq queries being the last Tq of the Tk positions."""
    Tq, Tk = q.size(2), k.size(2)
    if mask is None and Tq not in (1, Tk):  # SDPA's is_causal aligns top-left: wrong for a chunk after a cache
        mask = causal_mask(torch.arange(Tk - Tq, Tk, device=q.device), torch.arange(Tk, device=q.device))
    flash = (mask is None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)
             and flash_supported(q.device.index, q.size(-1)))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION) if flash else nullcontext():  # fail loudly, not slowly
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                              is_causal=mask is None and Tq > 1, enable_gqa=k.size(1) != q.size(1))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.relu2 = config.mlp == "relu2"
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c_fc(x)
        x = F.relu(x).square() if self.relu2 else F.gelu(x, approximate="tanh")  # tanh: GPT-2's "gelu_new"
        return self.dropout(self.c_proj(x))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                mask: torch.Tensor | None = None, kv_cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope=rope, mask=mask, kv_cache=kv_cache)  # pre-norm: the stream is never normed
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        modules = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))  # token embeddings
        if config.pos_embedding == "learned":
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)  # learned position embeddings
        if config.embed_norm:
            modules["ln_emb"] = make_norm(config)
        self.transformer = nn.ModuleDict(dict(
            **modules,
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=make_norm(config),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:  # Press & Wolf 2017, as GPT-2: the output head reuses the token embeddings
            self.lm_head.weight = self.transformer.wte.weight
        if config.pos_embedding == "rope":  # not saved: recomputed from the config
            cos, sin = rope_tables(config)
            self.register_buffer("rope_cos", cos, persistent=False)  # (block_size, head_dim / 2)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        """All initialisation, in one place: GPT-2's N(0, 0.02), the residual projections scaled by
        1/sqrt(2 * n_layer) (GPT-2 paper, sec. 2.3); zero_init starts them (and an untied head) at zero instead."""
        if isinstance(module, (Linear, nn.Linear)):
            std = 0.02
            if module is self.lm_head and not self.config.tie_embeddings and self.config.zero_init:
                std = 0.0
            elif any(module is b.attn.c_proj or module is b.mlp.c_proj for b in self.transformer.h):
                std = 0.0 if self.config.zero_init else 0.02 / math.sqrt(2 * self.config.n_layer)
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; by default without the embedding lookups: every nn.Embedding but a tied wte (the head's
        matmul), so that a new table is counted right by itself."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= sum(m.weight.numel() for m in self.modules()
                     if isinstance(m, nn.Embedding) and m.weight is not self.lm_head.weight)
        return n

    def crop_block_size(self, block_size: int) -> None:
        """Shorten the context to block_size (fine-tuning a pretrained model on shorter sequences)."""
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        if "wpe" in self.transformer:
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size].detach().clone())

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                logits_at: int | torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, vocab_size) for token ids idx (B, T), and the mean cross-entropy (-1 ignored) of targets.
        With a KV cache, idx continues the cached sequence at the positions the cache gives. logits_at (a position,
        or one per row (B,)): logits (B, 1, vocab_size) there only, as a prefill needs (the head is a third of a
        GPT-2 token's work)."""
        B, T = idx.size()
        if kv_cache is None:
            pos = torch.arange(T, device=idx.device)  # (T,)
            mask = None if self.config.window is None else causal_mask(pos, pos, self.config.window)
            end = T
        else:  # positions (T,), or per row (B, T), and one mask for every layer
            pos, mask, end = kv_cache.begin(T, self.config.window)
        if end > self.config.block_size and not self.config.rolling:
            raise ValueError(f"sequence of {end} tokens is longer than block_size {self.config.block_size}; crop the "
                             f"input to the last {self.config.block_size} tokens (only RoPE window models go past it)")
        x = self.transformer.wte(idx)  # (B, T, n_embd)
        if "wpe" in self.transformer:
            x = x + self.transformer.wpe(pos)
        if self.config.embed_norm:
            x = self.transformer.ln_emb(x)
        x = self.transformer.drop(x)
        rope = self.rope_at(pos, end) if "wpe" not in self.transformer else None
        for block in self.transformer.h:
            x = block(x, rope, mask, kv_cache)
        if logits_at is not None:
            if targets is not None:
                raise ValueError("logits_at is for inference: a loss needs the logits of every position")
            x = x[torch.arange(B, device=x.device), logits_at].unsqueeze(1)  # (B, 1, n_embd)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T or 1, vocab_size)
        if self.config.logit_softcap is not None:
            cap = self.config.logit_softcap
            logits = cap * torch.tanh(logits.float() / cap)  # fp32: tanh saturates coarsely in bf16
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    def rope_at(self, pos: torch.Tensor, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (1 or B, 1, T, head_dim / 2) of positions pos (all below end), the same for every head; the
        tables double when end passes them (a window model generates past block_size)."""
        if end > self.rope_cos.size(0):
            cos, sin = rope_tables(self.config, max(end, 2 * self.rope_cos.size(0)))
            self.register_buffer("rope_cos", cos.to(self.rope_cos), persistent=False)
            self.register_buffer("rope_sin", sin.to(self.rope_sin), persistent=False)
        return self.rope_cos[pos].unsqueeze(-3), self.rope_sin[pos].unsqueeze(-3)

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Continue each row of idx (B, T) by max_new_tokens tokens: (B, T + max_new_tokens). temperature=0 is
        greedy; top_k and top_p (nucleus) narrow the choice. Past block_size a RoPE window model's cache rolls on
        (Mistral's rolling buffer: the model's own maths, at constant cost); any other model sees the last
        block_size tokens from position 0, recomputed each step, exactly as nanoGPT."""
        new = self.generate_stream(idx, max_new_tokens, temperature, top_k, top_p, generator)
        return torch.cat([idx, *new], dim=1)

    def generate_stream(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                        top_k: int | None = None, top_p: float | None = None,
                        generator: torch.Generator | None = None,
                        step: Callable[[torch.Tensor], torch.Tensor] | None = None,
                        cache: KVCache | None = None) -> Iterator[torch.Tensor]:
        """generate(), yielding each new token (B, 1) as it is sampled; arguments are checked at the call.
        A cache passed in is reset and reused; step (sample.py's --compile) feeds it tokens (B, T) and returns
        their logits (B, T, vocab_size) in place of the model's forward."""
        check_sampling(temperature, top_k, top_p)
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if idx.dim() != 2 or idx.size(1) == 0:
            raise ValueError(f"idx must be (batch, length) with length >= 1, got shape {tuple(idx.shape)}")
        c = self.config
        need = max(c.block_size, c.window) if c.rolling else c.block_size  # a rolling cache: window keys at least
        if cache is None:
            cache = KVCache.for_model(self, idx.size(0), need)
        elif not c.rolling:  # the positions this generation fills
            need = min(need, min(idx.size(1), need) + max_new_tokens - 1)
        if cache.batch_size != idx.size(0) or cache.max_len < need:
            raise ValueError(f"the cache passed in must hold batch {idx.size(0)} and {need} positions: create it "
                             f"with KVCache.for_model(model, batch_size) (or a long enough max_len)")
        step = step or (lambda t: self(t, kv_cache=cache, logits_at=-1 if t.size(1) > 1 else None)[0])
        return self._decode(idx, max_new_tokens, temperature, top_k, top_p, generator, step, cache)

    @torch.no_grad()
    def _decode(self, idx: torch.Tensor, max_new_tokens: int, temperature: float, top_k: int | None,
                top_p: float | None, generator: torch.Generator | None,
                step: Callable[[torch.Tensor], torch.Tensor], cache: KVCache) -> Iterator[torch.Tensor]:
        """The loop of generate_stream: prefill, then one token a step, rolling on or recomputing past block_size."""
        if max_new_tokens == 0:
            return
        block_size, rolling = self.config.block_size, self.config.rolling
        cache.reset()
        logits = self._prefill(idx if rolling else idx[:, -block_size:], cache, step)
        tokens = [idx]
        for i in range(max_new_tokens):
            next_token = sample_next(logits, temperature, top_k, top_p, generator)  # (B, 1)
            yield next_token
            if i == max_new_tokens - 1:
                break
            if rolling or cache.pos < block_size:
                logits = step(next_token)[:, -1]
                tokens += [] if rolling else [next_token]  # a rolling cache never looks back
                continue
            tokens = [torch.cat([*tokens, next_token], dim=1)[:, -block_size:]]  # only the window is needed again
            cache.reset()  # context full: recompute the last block_size tokens from position 0 (nanoGPT's crop)
            logits = self._prefill(tokens[0], cache, step)

    def _prefill(self, idx: torch.Tensor, cache: KVCache, step: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Feed idx (B, T) to the empty cache; the last logits (B, vocab). Past max_len in chunks that leave every
        query its window in a rolling cache."""
        start, n = 0, cache.max_len
        while start < idx.size(1):
            logits = step(idx[:, start:start + n])[:, -1]
            start, n = start + n, cache.max_len - (self.config.window or 0) + 1
        return logits

    # ------------------------------------------------------------------ optimizer and FLOPs

    def configure_optimizers(self, weight_decay: float, learning_rate: float, betas: tuple[float, float],
                             device_type: str, optimizer: str = "adamw", muon_lr: float = 0.02,
                             muon_momentum: float = 0.95, muon_weight_decay: float = 0.0) -> torch.optim.Optimizer:
        """AdamW for every weight (decay on 2-D weights only); or, with optimizer="muon", Muon for every matrix
        inside the blocks, one group per shape (nanochat), and AdamW for the rest (embeddings, head, biases, norms).
        Each group keeps its peak rate as "base_lr"; train.py scales every group by the schedule."""
        by_shape: dict[torch.Size, list[nn.Parameter]] = {}
        if optimizer == "muon":
            for p in self.transformer.h.parameters():
                if p.requires_grad and p.dim() == 2:
                    by_shape.setdefault(p.shape, []).append(p)
        groups = [{"params": ps, "muon": True, "lr": muon_lr, "momentum": muon_momentum,
                   "weight_decay": muon_weight_decay} for ps in by_shape.values()]
        hidden = {id(p) for ps in by_shape.values() for p in ps}
        adam = [p for p in self.parameters() if p.requires_grad and id(p) not in hidden]
        groups += [
            {"params": [p for p in adam if p.dim() >= 2], "weight_decay": weight_decay, "lr": learning_rate},
            {"params": [p for p in adam if p.dim() < 2], "weight_decay": 0.0, "lr": learning_rate},
        ]
        groups = [group | {"base_lr": group["lr"]} for group in groups if group["params"]]
        if optimizer == "muon":
            return Muon(groups, betas=betas)
        # One kernel for the whole update instead of several per parameter (on the CPU ~5x faster than foreach)
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type in ("cuda", "cpu"))

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs (forward + backward) per token, PaLM's 6N + 12 * n_layer * n_head * head_dim * T (Chowdhery
        et al. 2022, app. B), T being the keys a query attends: at most window (nanochat's count)."""
        c = self.config
        T = min(seq_len or c.block_size, c.window or c.block_size)
        return 6 * self.num_params() + 12 * c.n_layer * c.n_head * c.head_dim * T

    def estimate_mfu(self, tokens_per_sec: float, peak_flops: float, seq_len: int | None = None) -> float:
        """Model FLOPs utilisation: achieved training FLOP/s over the device's peak (see device_peak_flops)."""
        return self.flops_per_token(seq_len) * tokens_per_sec / peak_flops


class KVCache:
    """Every layer's keys and values in max_len slots, owned by the caller (nanochat); position p in slot p % max_len,
    so past max_len a window model rolls on (Mistral). Its protocol (engine.RowCache, sample.StaticKVCache follow it):
    begin(T, window) per forward gives positions, the mask (None: causal) and the end; update(layer, k, v) per layer."""

    def __init__(self, n_layer: int, batch_size: int, n_kv_head: int, head_dim: int, max_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.k = torch.empty(n_layer, batch_size, n_kv_head, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.empty_like(self.k)  # (L, B, n_kv_head, max_len, head_dim)
        self.batch_size, self.max_len, self.pos = batch_size, max_len, 0  # pos: positions given so far

    @classmethod
    def for_model(cls, model: GPT, batch_size: int, max_len: int | None = None) -> KVCache:
        c, p = model.config, model.transformer.wte.weight
        return cls(c.n_layer, batch_size, c.kv_heads, c.head_dim, max_len or c.block_size, p.device, p.dtype)

    def reset(self) -> None:
        self.pos = 0  # stale entries are never read again

    def begin(self, T: int, window: int | None) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        start, end, size = self.pos, self.pos + T, self.max_len
        if end > size and (window is None or window > size - T + 1):  # a query would lose keys it sees
            raise ValueError(f"KV cache holds {size} positions; {start} used, {T} more asked. Reset it, or create it "
                             f"with a larger max_len (only a window model rolls on, {T} tokens at most window - 1 "
                             f"below max_len)")
        self.pos, q_pos = end, torch.arange(start, end, device=self.k.device)
        if window is None and (start == 0 or T == 1):
            return q_pos, None, end
        k_pos = slot_positions(end, size, self.k.device) if end > size else torch.arange(end, device=self.k.device)
        return q_pos, causal_mask(q_pos, k_pos, window), end

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end, T = self.pos, k.size(2)
        if end <= self.max_len:
            self.k[layer, :, :, end - T:end], self.v[layer, :, :, end - T:end] = k, v
            return self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # (B, n_kv_head, end, head_dim)
        slots = torch.arange(end - T, end, device=k.device) % self.max_len
        self.k[layer].index_copy_(2, slots, k.to(self.k.dtype)), self.v[layer].index_copy_(2, slots, v.to(self.v.dtype))
        return self.k[layer], self.v[layer]  # (B, n_kv_head, max_len, head_dim), in slot order


def slot_positions(end: int | torch.Tensor, size: int, device: torch.device | str) -> torch.Tensor:
    """The position each of a rolling cache's `size` slots holds once positions 0..end-1 are written (p in slot
    p % size); a slot not yet written gets a future position, which the causal mask hides."""
    slot = torch.arange(size, device=device)
    return slot + size * torch.div(end - 1 - slot, size, rounding_mode="floor").clamp(min=0)  # (size,), or (B, size)


# ---------------------------------------------------------------------- layers and helpers


class Linear(nn.Module):
    """y = x W + b with W stored (in, out): nn.Linear's maths in GPT-2's layout (OpenAI's checkpoints load without
    transposes, and a batch-1 decode step streams W 6 to 17% faster on the CPU: docs/benchmarks.md)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.t(), self.bias)  # a transposed view: no copy, the BLAS reads W as stored


class RMSNorm(nn.Module):
    """RMS normalisation without a learned weight (nanochat found learned scales no better)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x)


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),), eps=1e-6)  # Hugging Face's NanoChat eps, so exports match exactly


def make_norm(config: GPTConfig) -> nn.Module:
    return nn.LayerNorm(config.n_embd, bias=config.bias) if config.norm == "layernorm" else RMSNorm()


def rope_tables(config: GPTConfig, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (n or block_size, head_dim / 2) of the rotation angles position * theta^(-2i / head_dim)."""
    inv_freq = config.rope_theta ** -(torch.arange(0, config.head_dim, 2, dtype=torch.float64) / config.head_dim)
    angles = torch.outer(torch.arange(n or config.block_size, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs (x[i], x[i + head_dim/2]) of x (B, H, T, head_dim) by each position's angles (T, head_dim/2),
    by -angle as nanochat (and Hugging Face NanoChat), so that exports need no permuted weights."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # under autocast q and k are bf16: keep them so (flash needs it)
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)
