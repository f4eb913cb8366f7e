"""The architecture switches and Muon: every switch alone and all together (nanochat's recipe) against references.

KV cache (dynamic and static) vs recompute, causality, explicit softmax attention vs SDPA, GQA vs repeat_interleave,
RoPE vs a complex-number reference, RMSNorm vs its formula, zero-init, the softcap, checkpoints and Hugging Face
export (GPT-2, NanoChat, and refusal of what transformers does not implement), and muon.py.
"""

import copy
import json
import math

import pytest
import torch
from safetensors.torch import save_file
from torch.nn import functional as F

from attention import attention_maps, explicit_attention, qkv_arguments
from conftest import TINY, TINY_CHARS
from checkpoint import from_pretrained, load_model, save_checkpoint
from hf import hf_config, hf_format, hf_state_dict
from model import GPT, GPTConfig, KVCache, apply_rope, attend, causal_mask, rms_norm
from muon import Muon
from sample import StaticKVCache, static_step
from test_model import generate_uncached
from tokens import Tokenizer

NANOCHAT = dict(pos_embedding="rope", norm="rmsnorm", embed_norm=True, qk_norm=True, mlp="relu2", bias=False,
                tie_embeddings=False, logit_softcap=15.0, zero_init=True, n_kv_head=2)
SWITCHES = {
    "gpt2": {},
    "rope": dict(pos_embedding="rope"),
    "rope_theta": dict(pos_embedding="rope", rope_theta=100.0),
    "rmsnorm": dict(norm="rmsnorm"),
    "embed_norm": dict(embed_norm=True),
    "qk_norm": dict(qk_norm=True),
    "relu2": dict(mlp="relu2"),
    "gqa": dict(n_kv_head=2),
    "mqa": dict(n_kv_head=1),
    "untied": dict(tie_embeddings=False),
    "softcap": dict(logit_softcap=2.0),  # low enough to bend these logits (up to ~3)
    "zero_init": dict(zero_init=True),
    "no_bias": dict(bias=False),
    "window": dict(window=4),  # each token sees itself and the 3 before
    "all": NANOCHAT,
}
HF_FORMAT = {"gpt2": "gpt2", "zero_init": "gpt2", "no_bias": "gpt2", "all": "nanochat"}  # the rest: "smallgpt"


def randomize(model: GPT, seed: int = 0) -> GPT:
    """Perturb every weight, so that zero-initialised projections, unit norms and near-uniform attention (GPT-2's
    init gives scores ~0.01) cannot hide a mistake; c_attn more, so that the heads pick tokens."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.5 if "c_attn" in name else 0.15))
    return model


def switch_model(name: str, seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return randomize(GPT(GPTConfig(**TINY | SWITCHES[name] | overrides)).eval(), seed)


def tokens(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], shape, generator=torch.Generator().manual_seed(seed))


each_switch = pytest.mark.parametrize("name", list(SWITCHES))


@each_switch
def test_test_models_are_not_trivial(name):
    """What the equivalence tests below need to bite: spread-out logits and attention that prefers some tokens."""
    model = switch_model(name)
    idx = tokens(2, 24)
    assert model(idx)[0].std() > 0.3
    uniform = 1 / torch.arange(1, 25)  # the largest weight of each query row if attention were uniform
    assert attention_maps(model, idx).max(dim=-1).values.mean() > 1.5 * uniform.mean()


# ---------------------------------------------------------------------------- KV cache vs recompute


def run_cached(model: GPT, idx: torch.Tensor, cuts: list[int], static: bool,
               cache: KVCache | StaticKVCache | None = None) -> tuple[torch.Tensor, KVCache | StaticKVCache]:
    """Logits of idx fed through one cache in the pieces idx[:, cuts[i]:cuts[i+1]]."""
    if cache is None:
        cache = StaticKVCache(model, idx.size(0)) if static else KVCache.for_model(model, idx.size(0))
    step = static_step(model, cache) if static else lambda t: model(t, kv_cache=cache)[0]
    return torch.cat([step(idx[:, a:b]) for a, b in zip(cuts, cuts[1:])], dim=1), cache


CUTS = {
    "prefill_then_decode": [0, 12, *range(13, 21)],  # one-token steps: no mask
    "chunks_after_a_cache": [0, 5, 13, 14, 24],  # chunks after a non-empty cache: the bottom-right mask
    "whole_block": [0, 32],
}


@each_switch
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("cuts", list(CUTS))
def test_cache_equals_recompute(name, static, cuts):
    model = switch_model(name)
    idx = tokens(2, CUTS[cuts][-1])
    with torch.no_grad():
        full, _ = model(idx)
        cached, cache = run_cached(model, idx, CUTS[cuts], static)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
    assert cache.pos == idx.size(1)


@each_switch
def test_static_cache_reused_dirty_equals_a_fresh_one(name):
    """A static cache keeps stale keys past pos (it is reused to spare a CUDA graph): the mask must hide them."""
    model = switch_model(name)
    with torch.no_grad():
        _, cache = run_cached(model, tokens(2, 32, seed=1), [0, 32], static=True)
        cache.reset()
        idx = tokens(2, 10)
        logits, _ = run_cached(model, idx, [0, 6, 10], static=True, cache=cache)
        torch.testing.assert_close(logits, model(idx)[0], atol=1e-5, rtol=1e-5)


@each_switch
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=0.9, top_k=20, top_p=0.95)],
                         ids=["greedy", "sampled"])
def test_generate_past_block_size_equals_uncached(name, static, sampling):
    model = switch_model(name)
    idx = tokens(2, 5)
    new = 40  # past block_size (32): the window is recomputed from position 0, as the uncached loop does
    expected = generate_uncached(model, idx, new, generator=torch.Generator().manual_seed(7), **sampling)
    cache = StaticKVCache(model, 2)
    extra = dict(step=static_step(model, cache), cache=cache) if static else {}
    for _ in range(2):  # the second run reuses the (static) cache that the first left full
        stream = model.generate_stream(idx, new, generator=torch.Generator().manual_seed(7), **sampling, **extra)
        assert torch.equal(torch.cat([idx, *stream], dim=1), expected)


@each_switch
def test_causality(name):
    model = switch_model(name)
    idx = tokens(2, 24)
    changed = idx.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % TINY["vocab_size"]
    with torch.no_grad():
        a, b = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(a[:, :12], b[:, :12], atol=1e-6, rtol=0)
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-2


# ---------------------------------------------------------------------------- attention: explicit vs SDPA, GQA


@each_switch
def test_explicit_attention_reproduces_the_module(name):
    """attention.py's probabilities @ v, heads side by side, through c_proj == the module's SDPA output."""
    model = switch_model(name)
    idx = tokens(2, 24)
    seen = []  # (module, input, rope, output) of each attention module in the model's ordinary forward
    handles = [b.attn.register_forward_hook(lambda m, args, kwargs, out: seen.append(
        (m, qkv_arguments(m, args, kwargs), out)), with_kwargs=True) for b in model.transformer.h]
    with torch.no_grad():
        model(idx)
    for h in handles:
        h.remove()
    maps = attention_maps(model, idx)
    assert len(seen) == TINY["n_layer"]
    assert (seen[0][1]["rope"] is not None) == (model.config.pos_embedding == "rope")
    with torch.no_grad():
        for layer, (attn, qkv_args, expected) in enumerate(seen):
            weights, heads = explicit_attention(attn, **qkv_args)  # (B, n_head, T, T), (B, n_head, T, head_dim)
            torch.testing.assert_close(attn.c_proj(heads.transpose(1, 2).reshape(expected.shape)), expected,
                                       atol=1e-5, rtol=1e-5)
            assert torch.equal(maps[layer], weights)  # attention_maps returns exactly these weights
    # the maps differ between layers: a bug returning one layer's map for all would show here
    assert not torch.allclose(maps[0], maps[1], atol=1e-3)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Causal attention written out, the Tq queries being the last of the Tk positions, each seeing at most `window`
    keys (itself included); each key/value head serves n_head / n_kv_head consecutive query heads (repeat_interleave,
    as Hugging Face's repeat_kv)."""
    group = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    Tq, Tk = q.size(2), k.size(2)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    visible = torch.ones(Tq, Tk, dtype=torch.bool).tril(diagonal=Tk - Tq)
    if window is not None:  # a band: drop the keys window or more places back
        visible &= ~torch.ones(Tq, Tk, dtype=torch.bool).tril(diagonal=Tk - Tq - window)
    return scores.masked_fill(~visible, float("-inf")).softmax(dim=-1) @ v


@pytest.mark.parametrize("n_kv_head", [1, 2, 4])
@pytest.mark.parametrize("Tq, Tk", [(9, 9), (4, 9), (1, 9)])
def test_sdpa_gqa_equals_repeat_interleave(n_kv_head, Tq, Tk):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, Tq, 8, generator=g) * 2
    k, v = (torch.randn(2, n_kv_head, Tk, 8, generator=g) * 2 for _ in range(2))
    torch.testing.assert_close(attend(q, k, v), reference_attention(q, k, v), atol=1e-5, rtol=1e-5)
    if n_kv_head < 4:  # the grouping matters: repeat (0, 1, 0, 1) instead of repeat_interleave (0, 0, 1, 1) differs
        wrong = reference_attention(q, k.repeat(1, 4 // n_kv_head, 1, 1), v.repeat(1, 4 // n_kv_head, 1, 1))
        assert n_kv_head == 1 or not torch.allclose(attend(q, k, v), wrong, atol=1e-3)


@pytest.mark.parametrize("n_kv_head", [1, 4])
@pytest.mark.parametrize("Tq, Tk", [(9, 9), (4, 9), (1, 9)])
@pytest.mark.parametrize("window", [1, 3, 20])
def test_attend_with_a_window_equals_a_band_reference(n_kv_head, Tq, Tk, window):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, Tq, 8, generator=g) * 2
    k, v = (torch.randn(2, n_kv_head, Tk, 8, generator=g) * 2 for _ in range(2))
    pos = torch.arange(Tk)
    mask = causal_mask(pos[Tk - Tq:], pos, window)
    torch.testing.assert_close(attend(q, k, v, mask), reference_attention(q, k, v, window), atol=1e-5, rtol=1e-5)
    if window < Tk:  # the band matters
        assert not torch.allclose(attend(q, k, v, mask), reference_attention(q, k, v), atol=1e-3)


@pytest.mark.parametrize("name", ["window", "all"])
def test_window_bounds_what_a_token_sees(name):
    """Each layer reaches window - 1 tokens further back: a token's logits ignore anything before that reach."""
    model = switch_model(name, window=3)
    reach = TINY["n_layer"] * (3 - 1)  # 4: position 20 sees tokens 16..20
    idx = tokens(2, 24)
    far, near = idx.clone(), idx.clone()
    far[:, 20 - reach - 1] = (far[:, 20 - reach - 1] + 1) % TINY["vocab_size"]
    near[:, 20 - reach] = (near[:, 20 - reach] + 1) % TINY["vocab_size"]
    with torch.no_grad():
        base, a, b = model(idx)[0][:, 20], model(far)[0][:, 20], model(near)[0][:, 20]
    torch.testing.assert_close(a, base, atol=1e-6, rtol=0)
    assert (b - base).abs().max() > 1e-2


@each_switch
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_window_works_with_every_switch(name, static):
    """A window on top of each switch: cache == recompute (chunks, decode) and the maps zero outside the band."""
    model = switch_model(name, window=5)
    idx = tokens(2, 24)
    with torch.no_grad():
        full, _ = model(idx)
        cached, _ = run_cached(model, idx, CUTS["chunks_after_a_cache"], static)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
    maps = attention_maps(model, idx)  # (n_layer, B, n_head, T, T)
    pos = torch.arange(24)
    back = pos[:, None] - pos[None, :]
    assert not maps[..., (back < 0) | (back >= 5)].any() and (maps[..., back == 4] > 0).all()


@pytest.mark.parametrize("n_kv_head", [1, 2, 4])
def test_gqa_shrinks_the_cache_and_c_attn(n_kv_head):
    model = switch_model("gpt2", n_kv_head=n_kv_head)
    cache = KVCache.for_model(model, batch_size=3)
    assert cache.k.shape == cache.v.shape == (2, 3, n_kv_head, 32, 8)  # (L, B, n_kv_head, block_size, head_dim)
    assert model.transformer.h[0].attn.c_attn.weight.shape == (32, 32 + 2 * n_kv_head * 8)
    with torch.no_grad():
        model(tokens(3, 7), kv_cache=cache)
    assert cache.pos == 7


# ---------------------------------------------------------------------------- RoPE, RMSNorm, QK-norm, embed norm, ReLU²


def reference_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE as a complex rotation: the pair (x[i], x[i + d/2]) is x[i] + j x[i + d/2], turned by -pos * theta^(-2i/d)
    (nanochat's and Hugging Face NanoChat's sign); the sign does not change the relative-position property."""
    d = x.size(-1)
    freqs = theta ** (-torch.arange(0, d // 2, dtype=torch.float64) * 2 / d)
    turn = torch.polar(torch.ones(len(positions), d // 2, dtype=torch.float64),
                       -positions[:, None].double() * freqs)  # (T, d/2)
    z = torch.complex(x[..., : d // 2].double(), x[..., d // 2:].double()) * turn
    return torch.cat([z.real, z.imag], dim=-1).float()


@pytest.mark.parametrize("theta", [10000.0, 100.0])
def test_rope_equals_a_complex_reference(theta):
    model = switch_model("rope", rope_theta=theta)
    x = torch.randn(2, 4, 32, 8)
    positions = torch.arange(32)
    torch.testing.assert_close(apply_rope(x, model.rope_cos, model.rope_sin), reference_rope(x, positions, theta),
                               atol=1e-5, rtol=1e-5)
    other = 100.0 if theta != 100.0 else 10000.0
    assert not torch.allclose(apply_rope(x, model.rope_cos, model.rope_sin), reference_rope(x, positions, other))


def test_rope_scores_depend_only_on_distance():
    model = switch_model("rope")
    q, k = torch.randn(2, 8, dtype=torch.float64).float()

    def score(m: int, n: int) -> float:
        pos = torch.tensor([m, n])
        r = apply_rope(torch.stack([q, k])[None, None], model.rope_cos[pos], model.rope_sin[pos])[0, 0]
        return float(r[0] @ r[1])

    assert score(3, 1) == pytest.approx(score(10, 8), abs=1e-5) == pytest.approx(score(30, 28), abs=1e-5)
    assert score(3, 1) != pytest.approx(score(3, 2), abs=1e-3)


class Shifted:
    """The smallest cache of model.py's protocol: keys kept nowhere, the tokens placed at positions shift.."""

    def __init__(self, shift: int) -> None:
        self.shift = shift

    def begin(self, T: int, window: int | None) -> tuple[torch.Tensor, None, int]:
        return torch.arange(self.shift, self.shift + T), None, self.shift + T

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return k, v


@pytest.mark.parametrize("name", ["rope", "all", "gpt2"])
def test_rope_model_is_translation_invariant(name):
    """Without learned positions, the same tokens at positions 7.. give the logits they give at 0.."""
    model = switch_model(name)
    idx = tokens(2, 20)
    with torch.no_grad():
        at_zero = model(idx)[0]
        shifted = model(idx, kv_cache=Shifted(7))[0]
    if name == "gpt2":  # learned positions: the test can tell
        assert not torch.allclose(shifted, at_zero, atol=1e-3)
    else:
        torch.testing.assert_close(shifted, at_zero, atol=1e-4, rtol=1e-4)


def test_rms_norm_is_the_textbook_formula():
    x = torch.randn(3, 5, 32) * 3 + 1
    torch.testing.assert_close(rms_norm(x), x / torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + 1e-6))
    model = switch_model("rmsnorm")
    assert not any("ln_" in name for name, _ in model.named_parameters())  # weightless, as nanochat
    torch.testing.assert_close(model.transformer.h[0].ln_1(x), rms_norm(x))


@pytest.mark.parametrize("name", ["qk_norm", "all"])
def test_qk_norm_gives_unit_rms_queries_and_keys(name):
    model = switch_model(name)
    attn = model.transformer.h[0].attn
    x = torch.randn(2, 10, 32)
    rope = (model.rope_cos[:10], model.rope_sin[:10]) if model.config.pos_embedding == "rope" else None
    with torch.no_grad():
        q, k, v = attn.qkv(x, rope)
        plain = switch_model("gpt2").transformer.h[0].attn.qkv(x, None)
    for t in (q, k):  # RoPE rotates pairs, so it keeps the norm
        torch.testing.assert_close(t.pow(2).mean(dim=-1), torch.ones(t.shape[:-1]), atol=1e-4, rtol=0)
    assert not torch.allclose(v.pow(2).mean(dim=-1), torch.ones(v.shape[:-1]), atol=0.1)
    assert not torch.allclose(plain[0].pow(2).mean(dim=-1), torch.ones(plain[0].shape[:-1]), atol=0.1)


@pytest.mark.parametrize("name, normed", [("embed_norm", True), ("all", True), ("gpt2", False)])
def test_embed_norm_normalises_the_first_block_input(name, normed):
    model = switch_model(name)
    if name == "embed_norm":  # at identity, so the check below is exactly "normalised"
        torch.nn.init.ones_(model.transformer.ln_emb.weight)
        torch.nn.init.zeros_(model.transformer.ln_emb.bias)
    seen = []
    model.transformer.h[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        model(tokens(2, 12))
    rms = seen[0].pow(2).mean(dim=-1).sqrt()  # (B, T); LayerNorm's output also has mean 0, so rms = std
    assert torch.allclose(rms, torch.ones_like(rms), atol=1e-3) == normed


def test_relu2_mlp():
    mlp = switch_model("relu2").transformer.h[0].mlp
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        h = x @ mlp.c_fc.weight + mlp.c_fc.bias
        torch.testing.assert_close(mlp(x), F.relu(h) ** 2 @ mlp.c_proj.weight + mlp.c_proj.bias)
        gelu = switch_model("gpt2").transformer.h[0].mlp
        h = x @ gelu.c_fc.weight + gelu.c_fc.bias
        torch.testing.assert_close(gelu(x), F.gelu(h, approximate="tanh") @ gelu.c_proj.weight + gelu.c_proj.bias)


# ---------------------------------------------------------------------------- zero-init, untied head, softcap


@pytest.mark.parametrize("tied", [True, False])
def test_zero_init(tied):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY, zero_init=True, tie_embeddings=tied))
    for block in model.transformer.h:
        assert not block.attn.c_proj.weight.any() and not block.mlp.c_proj.weight.any()
        assert 0.015 < block.attn.c_attn.weight.std() < 0.025 and 0.015 < block.mlp.c_fc.weight.std() < 0.025
    assert 0.015 < model.transformer.wte.weight.std() < 0.025  # a tied head is wte: unaffected
    assert (model.lm_head.weight is model.transformer.wte.weight) == tied
    assert model.lm_head.weight.any() == tied  # an untied head starts at zero
    idx = tokens(2, 16)
    logits, loss = model(idx, targets=idx)
    assert logits.any() == tied
    if not tied:  # all logits 0: the loss is exactly ln(vocab), and the head still learns
        assert loss.item() == pytest.approx(math.log(TINY["vocab_size"]), abs=1e-6)
        loss.backward()
        assert model.lm_head.weight.grad.abs().sum() > 0
    torch.manual_seed(0)
    plain = GPT(GPTConfig(**TINY, tie_embeddings=tied))
    assert plain.transformer.h[0].attn.c_proj.weight.any() and plain.lm_head.weight.any()


def test_untied_head_is_its_own_weight():
    model = switch_model("untied")
    assert model.lm_head.weight is not model.transformer.wte.weight
    tied = switch_model("gpt2")
    assert model.num_params() == tied.num_params()  # the head counts; the wte lookup does not
    assert model.num_params(non_embedding=False) == tied.num_params(non_embedding=False) + 97 * 32


@pytest.mark.parametrize("cap", [2.0, 15.0])
def test_softcap_bounds_the_logits(cap):
    model = switch_model("softcap", logit_softcap=cap)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)  # raw logits far beyond the cap
        uncapped = GPT(GPTConfig(**TINY | {"logit_softcap": None})).eval()
        uncapped.load_state_dict(model.state_dict())
        idx = tokens(2, 16)
        logits, loss = model(idx, targets=idx)
        raw = uncapped(idx)[0]
    assert raw.abs().max() > 2 * cap
    assert logits.abs().max() <= cap and (logits.abs() < 0.9 * cap).any()  # fp32 tanh rounds to 1 far out
    torch.testing.assert_close(logits, cap * torch.tanh(raw / cap))
    torch.testing.assert_close(loss, F.cross_entropy(logits.view(-1, 97), idx.view(-1)))


# ---------------------------------------------------------------------------- checkpoints and Hugging Face


def save_folder(model: GPT, folder) -> None:
    """What a Hugging Face folder holds: model.safetensors and config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(hf_state_dict(model), folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(hf_config(model.config)))


@each_switch
def test_checkpoint_round_trip_restores_every_switch(name, tmp_path):
    model = switch_model(name, dropout=0.1)
    extra = {"tokenizer": Tokenizer.char(TINY_CHARS).to_meta()}  # a char table as large as the model's vocabulary
    save_checkpoint(tmp_path, model, extra, {"iter_num": 1}, iter_num=1, is_best=True)
    loaded, _, config = load_model(tmp_path)
    assert loaded.config == model.config
    assert config["model_type"] == hf_format(model.config) == HF_FORMAT.get(name, "smallgpt")
    assert (loaded.lm_head.weight is loaded.transformer.wte.weight) == model.config.tie_embeddings
    idx = tokens(2, 20)
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx)[0], model.eval()(idx)[0], atol=0, rtol=0)


@pytest.mark.parametrize("name", [n for n, f in HF_FORMAT.items() if f == "gpt2"])
def test_gpt2_formats_load_in_transformers(name, tmp_path):
    transformers = pytest.importorskip("transformers")
    model = switch_model(name)
    save_folder(model, tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()  # missing biases start at 0, as ours
    idx = tokens(2, 32)
    with torch.no_grad():
        assert (hf(idx).logits - model(idx)[0]).abs().max() < 1e-4


@pytest.mark.parametrize("name", [n for n in SWITCHES if n not in HF_FORMAT])
def test_other_switches_are_smallgpt_which_transformers_refuses(name, tmp_path):
    transformers = pytest.importorskip("transformers")
    model = switch_model(name)
    save_folder(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "smallgpt"
    with pytest.raises(ValueError, match="smallgpt"):
        transformers.AutoConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="smallgpt"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    loaded = from_pretrained(tmp_path).eval()  # but we load it
    assert loaded.config == model.config
    idx = tokens(2, 20)
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx)[0], model(idx)[0], atol=0, rtol=0)


@pytest.mark.parametrize("n_kv_head", [None, 2])
@pytest.mark.parametrize("cap", [None, 15.0])
def test_nanochat_export_matches_transformers(n_kv_head, cap, tmp_path):
    transformers = pytest.importorskip("transformers")
    model = switch_model("all", n_kv_head=n_kv_head, logit_softcap=cap, rope_theta=500.0)
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)  # logits beyond 15, so that the softcap (or its absence) shows
    assert hf_format(model.config) == "nanochat"
    save_folder(model, tmp_path)
    hf = transformers.NanoChatForCausalLM.from_pretrained(tmp_path).eval()
    assert hf.config.num_key_value_heads == (n_kv_head or 4)
    idx = tokens(2, 32)
    with torch.no_grad():
        ours = model(idx)[0]
        assert (ours.abs().max() > 15) == (cap is None)
        assert (hf(idx).logits - ours).abs().max() < 1e-4
        assert torch.equal(model.generate(idx[:, :4], 10, temperature=0),
                           hf.generate(idx[:, :4], max_new_tokens=10, do_sample=False,
                                       attention_mask=torch.ones_like(idx[:, :4])))
    loaded = from_pretrained(tmp_path).eval()
    assert loaded.config == model.config
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx)[0], ours, atol=0, rtol=0)


def test_nanochat_folder_from_transformers_loads(tmp_path):
    """A folder transformers wrote itself (no "smallgpt" entry in config.json) loads with the same logits."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.NanoChatConfig(vocab_size=97, hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                         final_logit_softcapping=15.0)
    hf = transformers.NanoChatForCausalLM(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.15)
    hf.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path).eval()
    assert ours.config == GPTConfig(**TINY | NANOCHAT | {"zero_init": False})
    idx = tokens(2, 32)
    with torch.no_grad():
        assert (hf(idx).logits - ours(idx)[0]).abs().max() < 1e-4

    # Older config.json files keep rope_theta at the top level (transformers still reads them so)
    config = json.loads((tmp_path / "config.json").read_text())
    older = {k: v for k, v in config.items() if k != "rope_parameters"} | {"rope_theta": 500.0}
    (tmp_path / "config.json").write_text(json.dumps(older))
    hf, ours = transformers.NanoChatForCausalLM.from_pretrained(tmp_path).eval(), from_pretrained(tmp_path).eval()
    assert ours.config.rope_theta == 500.0
    with torch.no_grad():
        assert (hf(idx).logits - ours(idx)[0]).abs().max() < 1e-4
    # and settings that change the maths in ways this GPT does not implement are refused
    for key, value, words in [("rope_parameters", {"rope_type": "linear", "factor": 2.0}, "rope_type 'linear'"),
                              ("rms_norm_eps", 1e-5, "rms_norm_eps"), ("hidden_act", "gelu", "hidden_act"),
                              ("intermediate_size", 96, "intermediate_size")]:
        (tmp_path / "config.json").write_text(json.dumps(config | {key: value}))
        with pytest.raises(ValueError, match=words):
            from_pretrained(tmp_path)


# ---------------------------------------------------------------------------- Muon


def muon_model(**overrides) -> tuple[GPT, Muon]:
    model = switch_model("gpt2", **overrides).train()
    # lr 1, no momentum, no decay: a weight's change is exactly its update
    optimizer = model.configure_optimizers(0.0, 1e-3, (0.9, 0.95), "cpu", optimizer="muon", muon_lr=1.0,
                                           muon_momentum=0.0)
    return model, optimizer


def muon_rule(name: str, p: torch.nn.Parameter) -> bool:
    """Muon's share: every 2-D weight inside the blocks; the embeddings, the head and 1-D weights are AdamW's."""
    return name.startswith("transformer.h.") and p.dim() == 2


@pytest.mark.parametrize("name", ["gpt2", "all", "gate"])
def test_muon_groups_follow_the_rule(name):
    model = switch_model("all" if name == "all" else "gpt2").train()
    if name == "gate":  # a matrix added later (a SwiGLU gate) joins Muon by itself
        model.transformer.h[1].mlp.gate = torch.nn.Linear(32, 64, bias=False)
    optimizer = model.configure_optimizers(0.0, 1e-3, (0.9, 0.95), "cpu", optimizer="muon", muon_lr=1.0)
    group = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(group) == len(list(model.parameters()))
    by_shape = {}  # one group per shape, in order of appearance: state.pt files of earlier versions still load
    for n, p in model.named_parameters():
        assert group[id(p)]["muon"] == muon_rule(n, p), n
        if muon_rule(n, p):
            by_shape.setdefault(p.shape, []).append(id(p))
    assert [[id(p) for p in g["params"]] for g in optimizer.param_groups if g["muon"]] == list(by_shape.values())


def reference_optimizers(model: GPT, muon_lr: float, lr: float) -> list[torch.optim.Optimizer]:
    """torch.optim.Muon on the block matrices and torch's AdamW on the rest: what Muon must equal."""
    matrices = [p for n, p in model.named_parameters() if muon_rule(n, p)]
    ids = {id(p) for p in matrices}
    return [torch.optim.Muon(matrices, lr=muon_lr, weight_decay=0.0, momentum=0.95, nesterov=True,
                             adjust_lr_fn="original"),
            torch.optim.AdamW([p for p in model.parameters() if id(p) not in ids], lr=lr, betas=(0.8, 0.95),
                              weight_decay=0.0, eps=1e-8)]


def train_steps(model: GPT, optimizers: list, steps: range) -> None:
    """Steps on fixed batches, changing every group's lr and momentum per step as train.py's schedule does."""
    for step in steps:
        idx = tokens(2, 32, seed=step)
        model(idx, targets=idx.roll(-1, dims=1))[1].backward()
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                group["lr"] *= 0.9
                if "momentum" in group:
                    group["momentum"] = 0.85 + 0.02 * step
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", ["gpt2", "all"])
def test_muon_equals_torch_muon_and_adamw(name):
    model = switch_model(name).train()
    reference = copy.deepcopy(model)
    ours = model.configure_optimizers(0.0, 3e-3, (0.8, 0.95), "cpu", optimizer="muon", muon_lr=0.02)
    train_steps(model, [ours], range(4))
    train_steps(reference, reference_optimizers(reference, 0.02, 3e-3), range(4))
    for (n, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), n


def test_muon_state_dict_round_trip_continues_exactly():
    model = switch_model("all").train()
    resumed = copy.deepcopy(model)
    optimizer = model.configure_optimizers(0.0, 3e-3, (0.8, 0.95), "cpu", optimizer="muon", muon_lr=0.02)
    train_steps(model, [optimizer], range(2))
    resumed.load_state_dict(model.state_dict())
    again = resumed.configure_optimizers(0.0, 3e-3, (0.8, 0.95), "cpu", optimizer="muon", muon_lr=0.02)
    again.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # as from a file: its own tensors, not shared
    train_steps(model, [optimizer], range(2, 4))
    train_steps(resumed, [again], range(2, 4))
    for (n, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), n


def test_one_muon_step_lowers_the_loss():
    model = switch_model("all").train()
    optimizer = model.configure_optimizers(0.0, 3e-3, (0.9, 0.95), "cpu", optimizer="muon", muon_lr=0.02)
    idx = tokens(4, 32)
    losses = []
    for _ in range(3):
        _, loss = model(idx, targets=idx.roll(-1, dims=1))
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert losses[2] < losses[1] < losses[0]


def test_muon_adamw_part_equals_torch_adamw():
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))
    a2, b2 = (torch.nn.Parameter(p.detach().clone()) for p in (a, b))
    ours = Muon([{"params": [a], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}], lr=1e-2,
                betas=(0.8, 0.95))
    ref = torch.optim.AdamW([{"params": [a2], "weight_decay": 0.1}, {"params": [b2], "weight_decay": 0.0}], lr=1e-2,
                            betas=(0.8, 0.95), eps=1e-8)
    for step in range(5):
        g = torch.Generator().manual_seed(step)
        for p, q in ((a, a2), (b, b2)):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(a, a2, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(b, b2, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("fp32_norm", [False, True], ids=["cpu_autocast", "rms_norm_in_fp32"])
def test_q_and_k_reach_attention_in_vs_dtype(fp32_norm, monkeypatch):
    """Under autocast q, k and v reach SDPA in one low-precision dtype (its flash kernel needs it): fp32 rotation
    tables must not lift them, nor rms_norm run in fp32, as CUDA autocast does from torch 2.12 (simulated here)."""
    import model as model_module
    if fp32_norm:
        monkeypatch.setattr(model_module, "rms_norm", lambda x: F.rms_norm(x.float(), (x.size(-1),), eps=1e-6))
    model = switch_model("all")
    x = torch.randn(2, 8, TINY["n_embd"])
    cos, sin = model.rope_cos[:8], model.rope_sin[:8]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q, k, v = model.transformer.h[0].attn.qkv(x, (cos, sin))
    assert q.dtype == k.dtype == v.dtype == torch.bfloat16


# ---------------------------------------------------------------------------- past block_size: the rolling cache


def whole_sequence_twin(model: GPT, block_size: int) -> GPT:
    """The same weights with a block_size that holds the whole sequence: no crop, the model's own maths."""
    twin = GPT(GPTConfig(**{**model.config.__dict__, "block_size": block_size})).eval()
    twin.load_state_dict(model.state_dict())
    return twin


@pytest.mark.parametrize("name", ["rope", "all"])
@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_a_window_model_generates_past_block_size_with_its_own_maths(name, static):
    """Past block_size a RoPE window model's cache rolls (Mistral's rolling buffer): 8x block_size greedy tokens
    equal those of the same weights uncropped, from a short prompt and from one longer than the block."""
    model = switch_model(name, window=12, block_size=16)  # reaches 2 x 11 back: a crop would change the maths
    twin = whole_sequence_twin(model, 200)
    for prompt_len in (5, 40):
        idx = tokens(2, prompt_len, seed=prompt_len)
        expected = generate_uncached(twin, idx, 128, temperature=0)
        cache = StaticKVCache(model, 2)
        extra = dict(step=static_step(model, cache), cache=cache) if static else {}
        got = torch.cat([idx, *model.generate_stream(idx, 128, temperature=0, **extra)], dim=1)
        assert torch.equal(got, expected), (prompt_len, (got != expected).nonzero()[:1])


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_rolling_cache_logits_equal_the_whole_sequence(static):
    """Logits through a cache of block_size slots, fed one token at a time and in chunks that each leave every query
    its window, equal a forward of the whole 90 tokens by the uncropped twin."""
    model = switch_model("all", window=12, block_size=16)
    idx = tokens(2, 90)
    cache = StaticKVCache(model, 2) if static else KVCache.for_model(model, 2)
    assert cache.max_len == 16
    with torch.no_grad():
        cached, _ = run_cached(model, idx, [0, 16, 21, 22, 23, 28, *range(29, 91)], static, cache)
        full = whole_sequence_twin(model, 90)(idx)[0]
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)


def test_a_cache_refuses_what_it_cannot_hold():
    """A full-attention model cannot roll, and a chunk must leave each of its queries its window in the slots."""
    with torch.no_grad():
        full = switch_model("rope")
        cache = KVCache.for_model(full, 1)
        full(tokens(1, 32), kv_cache=cache)
        with pytest.raises(ValueError, match="holds 32 positions"):
            full(tokens(1, 1), kv_cache=cache)
        windowed = switch_model("rope", window=6, block_size=16)
        cache = KVCache.for_model(windowed, 1)
        windowed(tokens(1, 16), kv_cache=cache)
        windowed(tokens(1, 11), kv_cache=cache)  # 16 - 6 + 1: the first query still finds its 5 keys before
        with pytest.raises(ValueError, match="window - 1 below max_len"):
            windowed(tokens(1, 12), kv_cache=cache)


@each_switch
def test_blocks_use_the_projects_linear(name):
    """Linear stores W as (in, out) (OpenAI's layout; docs/structure.md says why): an nn.Linear in a block would
    load GPT-2's and exported weights transposed."""
    model = switch_model(name)
    assert not [n for n, m in model.transformer.h.named_modules() if isinstance(m, torch.nn.Linear)]


def test_attention_maps_read_the_modules_arguments_by_name():
    """A module whose forward gains an argument before the others (as value embeddings added one) still gets its
    maps: the hook binds the call to the signature instead of counting positions."""
    from model import CausalSelfAttention

    class Extra(CausalSelfAttention):
        def forward(self, x, extra=None, rope=None, mask=None, kv_cache=None):
            return super().forward(x, rope=rope, mask=mask, kv_cache=kv_cache)

    model = switch_model("rope")
    idx = tokens(2, 12)
    expected = attention_maps(model, idx)
    for block in model.transformer.h:
        block.attn.__class__ = Extra
    torch.testing.assert_close(attention_maps(model, idx), expected, atol=0, rtol=0)
