"""model.py: shapes, causality, attention against an explicit reference, the KV cache against recomputation,
sampling, GPT-2 import against Hugging Face transformers, and the safetensors round trip."""

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from checkpoint import from_pretrained
from conftest import TINY, tiny_model
from hf import hf_config, hf_state_dict
from config import flash_supported
from model import GPT, GPTConfig, KVCache
from sampling import check_sampling, sample_next

def generate_uncached(model: GPT, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                      top_k: int | None = None, top_p: float | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """The test oracle: nanoGPT's generate, which recomputes the cropped context for every new token."""
    for _ in range(max_new_tokens):
        logits, _ = model(idx[:, -model.config.block_size:])
        idx = torch.cat([idx, sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)], dim=1)
    return idx


# ---------------------------------------------------------------------------- config


@pytest.mark.parametrize("bad, words", [
    (dict(n_embd=30, n_head=4), "divisible by n_head"),
    (dict(n_layer=0), "n_layer"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(block_size=-1), "block_size"),
    (dict(dropout=1.0), "dropout"),
])
def test_config_rejects_invalid(bad, words):
    with pytest.raises(ValueError, match=words):
        GPTConfig(**{**TINY, **bad})


def test_defaults_are_gpt2_124m():
    c = GPTConfig()
    assert (c.block_size, c.vocab_size, c.n_layer, c.n_head, c.n_embd, c.bias) == (1024, 50304, 12, 12, 768, True)


# ---------------------------------------------------------------------------- forward


def test_shapes_and_loss():
    model = tiny_model()
    idx = torch.randint(0, 97, (3, 20))
    logits, loss = model(idx)
    assert logits.shape == (3, 20, 97) and loss is None
    _, loss = model(idx, targets=idx)
    assert loss.shape == ()


def test_initial_loss_is_about_ln_vocab():
    model = tiny_model(vocab_size=512)
    idx = torch.randint(0, 512, (8, 32))
    _, loss = model(idx, targets=torch.randint(0, 512, (8, 32)))
    assert abs(loss.item() - math.log(512)) < 0.1


def test_ignore_index_minus_one():
    model = tiny_model()
    idx = torch.randint(0, 97, (2, 16))
    targets = idx.clone()
    targets[:, 8:] = -1
    logits, loss = model(idx, targets=targets)
    expected = F.cross_entropy(logits[:, :8].reshape(-1, 97), idx[:, :8].reshape(-1))
    torch.testing.assert_close(loss, expected)


def test_output_head_is_tied():
    model = tiny_model()
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


def test_residual_projection_init_is_scaled():
    model = tiny_model(n_layer=8, n_embd=256, n_head=4)
    std = model.transformer.h[0].attn.c_proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(16)) < 0.001
    assert abs(model.transformer.h[0].attn.c_attn.weight.std().item() - 0.02) < 0.001


def test_causality():
    model = tiny_model()
    idx = torch.randint(0, 97, (1, 24))
    changed = idx.clone()
    changed[0, 12:] = (changed[0, 12:] + 1) % 97
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_longer_than_block_size_is_refused():
    with pytest.raises(ValueError, match="block_size"):
        tiny_model()(torch.zeros(1, 33, dtype=torch.long))


def explicit_attention(attn, x: torch.Tensor) -> torch.Tensor:
    """softmax(QK^T / sqrt(d)) V with the causal mask, written out."""
    B, T, C = x.shape
    q, k, v = attn.c_attn(x).split(C, dim=2)
    q, k, v = (t.view(B, T, attn.n_head, C // attn.n_head).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-2, -1) / math.sqrt(C // attn.n_head)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, T, C)
    return attn.c_proj(y)


def test_sdpa_equals_explicit_attention():
    model = tiny_model()
    attn = model.transformer.h[0].attn
    x = torch.randn(2, 17, 32)
    torch.testing.assert_close(attn(x), explicit_attention(attn, x), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- KV cache


def test_cache_prefill_and_decode_equal_recompute():
    model = tiny_model()
    idx = torch.randint(0, 97, (2, 20))
    full, _ = model(idx)
    cache = KVCache.for_model(model, batch_size=2)
    prefill, _ = model(idx[:, :12], kv_cache=cache)
    torch.testing.assert_close(prefill, full[:, :12], atol=1e-5, rtol=1e-5)
    for t in range(12, 20):  # one-token decode, no mask
        step, _ = model(idx[:, t:t + 1], kv_cache=cache)
        torch.testing.assert_close(step[:, 0], full[:, t], atol=1e-5, rtol=1e-5)
    assert cache.pos == 20


def test_cache_chunked_prefill_uses_bottom_right_mask():
    model = tiny_model()
    idx = torch.randint(0, 97, (2, 24))
    full, _ = model(idx)
    cache = KVCache.for_model(model, batch_size=2)
    pieces = [model(idx[:, a:b], kv_cache=cache)[0] for a, b in [(0, 5), (5, 13), (13, 14), (14, 24)]]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_logits_at_gives_only_the_positions_asked():
    model = tiny_model()
    idx = torch.randint(0, 97, (3, 10))
    full, _ = model(idx)
    last, _ = model(idx, logits_at=-1)
    assert last.shape == (3, 1, 97)
    torch.testing.assert_close(last[:, 0], full[:, -1], atol=1e-5, rtol=1e-5)
    ends = torch.tensor([9, 0, 4])  # one per row: a padded batch's prompt ends
    some, _ = model(idx, kv_cache=KVCache.for_model(model, batch_size=3), logits_at=ends)
    torch.testing.assert_close(some[:, 0], full[torch.arange(3), ends], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="logits_at is for inference"):
        model(idx, targets=idx, logits_at=-1)


def test_cache_reset_and_overflow():
    model = tiny_model()
    cache = KVCache.for_model(model, batch_size=1, max_len=8)
    model(torch.zeros(1, 8, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="KV cache"):
        model(torch.zeros(1, 1, dtype=torch.long), kv_cache=cache)
    cache.reset()
    idx = torch.randint(0, 97, (1, 6))
    torch.testing.assert_close(model(idx, kv_cache=cache)[0], model(idx)[0], atol=1e-5, rtol=1e-5)


def test_no_cache_state_on_modules():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.generate(torch.zeros(1, 3, dtype=torch.long), 5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any("cache" in name for name, _ in model.named_buffers())


@pytest.mark.parametrize("prompt_len, new", [(1, 10), (7, 20), (30, 40)])  # the last one runs past block_size
def test_generate_greedy_equals_uncached(prompt_len, new):
    model = tiny_model()
    idx = torch.randint(0, 97, (2, prompt_len))
    expected = generate_uncached(model, idx, new, temperature=0)
    torch.testing.assert_close(model.generate(idx, new, temperature=0), expected, rtol=0, atol=0)


def test_generate_sampling_equals_uncached_past_block_size():
    model = tiny_model()
    idx = torch.randint(0, 97, (3, 5))
    kwargs = dict(temperature=0.9, top_k=20, top_p=0.95)
    a = model.generate(idx, 50, generator=torch.Generator().manual_seed(7), **kwargs)
    b = generate_uncached(model, idx, 50, generator=torch.Generator().manual_seed(7), **kwargs)
    assert a.shape == (3, 55)
    assert torch.equal(a, b)


def test_generate_stream_checks_arguments_before_the_first_token():
    model = tiny_model()
    idx = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="top_k"):
        model.generate_stream(idx, 5, top_k=0)  # no next() needed: the error comes with the call
    with pytest.raises(ValueError, match="KVCache.for_model"):
        model.generate_stream(idx, 5, cache=KVCache.for_model(model, batch_size=3))
    with pytest.raises(ValueError, match="KVCache.for_model"):  # 3 + 5 tokens fill 7 positions (the last is not fed)
        model.generate_stream(idx, 5, cache=KVCache.for_model(model, batch_size=2, max_len=6))
    for cache in (KVCache.for_model(model, batch_size=2), KVCache.for_model(model, batch_size=2, max_len=7)):
        stream = model.generate_stream(idx, 5, temperature=0, cache=cache)
        assert torch.equal(torch.cat([idx, *stream], dim=1), model.generate(idx, 5, temperature=0))


def test_generate_keeps_prompt_and_zero_tokens():
    model = tiny_model()
    idx = torch.randint(0, 97, (2, 6))
    assert torch.equal(model.generate(idx, 0), idx)
    assert torch.equal(model.generate(idx, 4)[:, :6], idx)


def test_top_k_1_equals_greedy():
    model = tiny_model()
    idx = torch.randint(0, 97, (2, 4))
    assert torch.equal(model.generate(idx, 15, top_k=1), model.generate(idx, 15, temperature=0))


def test_same_seed_same_tokens_other_seed_other_tokens():
    model = tiny_model()
    idx = torch.zeros(1, 1, dtype=torch.long)
    a = model.generate(idx, 30, generator=torch.Generator().manual_seed(1))
    b = model.generate(idx, 30, generator=torch.Generator().manual_seed(1))
    c = model.generate(idx, 30, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seen = {sample_next(logits, top_p=0.7, generator=torch.Generator().manual_seed(s)).item() for s in range(200)}
    assert seen == {0, 1}  # 0.5 alone is below 0.7, 0.5 + 0.3 reaches it
    seen = {sample_next(logits, top_p=0.4, generator=torch.Generator().manual_seed(s)).item() for s in range(50)}
    assert seen == {0}


def test_top_k_keeps_k_tokens():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    seen = {sample_next(logits, top_k=2, generator=torch.Generator().manual_seed(s)).item() for s in range(200)}
    assert seen == {1, 3}


@pytest.mark.parametrize("kwargs, words", [
    (dict(temperature=-0.1), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
])
def test_generate_rejects_bad_arguments(kwargs, words):
    args = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(ValueError, match=words):
        tiny_model().generate(torch.zeros(1, 2, dtype=torch.long), **args)


@pytest.mark.parametrize("temperature", [1e-300, 1e-40, 1e-37, 1e-20])
def test_tiny_temperatures_sample_the_top_token(temperature):
    """A temperature fp32 rounds to 0 (1e-300) or whose logits / temperature overflow must not give NaN: it is
    greedy in effect, the top token kept."""
    logits = torch.tensor([[0.0, 50.0, 49.0, -30.0], [3.0, 1.0, 2.0, 3.5]])
    check_sampling(temperature, None, None)
    for seed in range(5):
        got = sample_next(logits, temperature, generator=torch.Generator().manual_seed(seed))
        assert got.tolist() == [[1], [3]]
    assert model_generate_ok(temperature=temperature)


@pytest.mark.parametrize("top_p", [1e-300, 1e-45, 1e-9])
def test_tiny_top_p_keeps_the_top_token(top_p):
    logits = torch.tensor([[0.0, 2.0, 1.0], [5.0, 5.0, -1.0]])
    seen = {tuple(sample_next(logits, top_p=top_p, generator=torch.Generator().manual_seed(s)).flatten().tolist())
            for s in range(30)}
    assert {row[0] for row in seen} == {1} and {row[1] for row in seen} <= {0, 1}
    assert model_generate_ok(top_p=top_p)


def model_generate_ok(**sampling) -> bool:
    model = tiny_model()
    out = model.generate(torch.zeros(2, 3, dtype=torch.long), 4, generator=torch.Generator().manual_seed(0), **sampling)
    return out.shape == (2, 7)


@pytest.mark.parametrize("temperature", [float("nan"), float("inf")])
def test_non_finite_temperature_is_refused(temperature):
    with pytest.raises(ValueError, match="temperature"):
        check_sampling(temperature, None, None)


# ---------------------------------------------------------------------------- optimizer and FLOPs


def test_optimizer_groups_decay_only_matrices():
    model = tiny_model()
    opt = model.configure_optimizers(weight_decay=0.1, learning_rate=1e-3, betas=(0.9, 0.95), device_type="cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() == 1 for p in no_decay["params"])
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == model.num_params(non_embedding=False)


@pytest.mark.parametrize("switches", [{}, dict(bias=False, norm="rmsnorm"),
                                      dict(bias=False, norm="rmsnorm", pos_embedding="rope", n_kv_head=2,
                                           tie_embeddings=False)])
def test_flops_per_token_matches_torchs_flop_counter(switches):
    """flops_per_token (PaLM's 6N + attention) against the matmul FLOPs torch counts in a forward and backward. The
    formula also counts 6 per bias and norm weight, which are no matmuls: the only difference."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    model = tiny_model(**switches).train()
    B, T = 2, TINY["block_size"]
    idx = torch.randint(0, TINY["vocab_size"], (B, T))
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):  # SDPA as countable matmuls
        model(idx, idx)[1].backward()
    not_matmul = sum(p.numel() for name, p in model.named_parameters() if p.dim() == 1)  # biases, LayerNorms
    assert counter.get_total_flops() == (model.flops_per_token(T) - 6 * not_matmul) * B * T


@pytest.mark.parametrize("window", [1, 8, 32, 100])
def test_flops_and_mfu_count_only_the_keys_a_window_attends(window):
    full, windowed = tiny_model(), tiny_model(window=window)
    T, c = TINY["block_size"], full.config
    per_key = 12 * c.n_layer * c.n_head * c.head_dim
    assert windowed.flops_per_token(T) == full.flops_per_token(T) - per_key * max(0, T - window)
    assert windowed.flops_per_token(T) == 6 * windowed.num_params() + per_key * min(window, T)
    peak = full.flops_per_token(T) * 1000
    assert windowed.estimate_mfu(1000, peak, T) == windowed.flops_per_token(T) / full.flops_per_token(T)


def test_mfu_and_gpt2_size():
    model = GPT(GPTConfig())  # GPT-2 124M
    assert 123e6 < model.num_params(non_embedding=False) < 125e6
    assert model.estimate_mfu(tokens_per_sec=1000, peak_flops=model.flops_per_token() * 2000) == 0.5


# ---------------------------------------------------------------------------- GPT-2 weights


def save_hf_gpt2(tmp_path, n_positions=32, vocab_size=97):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(3)
    config = transformers.GPT2Config(n_positions=n_positions, vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4,
                                     resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    hf = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # HF zero-initialises biases and sets LayerNorms to identity: make every weight count
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    return hf


def test_parity_with_transformers_gpt2(tmp_path):
    hf = save_hf_gpt2(tmp_path)
    ours = from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 97, (2, 32))
    with torch.no_grad():
        expected = hf(idx).logits
    logits, _ = ours(idx)
    assert (logits - expected).abs().max().item() < 1e-4
    prompt = idx[:, :5]
    with torch.no_grad():
        hf_tokens = hf.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0,
                                attention_mask=torch.ones_like(prompt))
    assert torch.equal(ours.generate(prompt, 20, temperature=0), hf_tokens)


def test_import_accepts_transformer_prefix_and_ignores_mask_buffers(tmp_path):
    from safetensors.torch import load_file, save_file
    save_hf_gpt2(tmp_path)
    reference = from_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    prefixed = {("transformer." + k if not k.startswith("transformer.") else k): v for k, v in weights.items()}
    prefixed["transformer.h.0.attn.bias"] = torch.ones(1, 1, 32, 32)
    prefixed["transformer.h.0.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(prefixed, tmp_path / "model.safetensors")
    again = from_pretrained(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(), again.state_dict().values()))


def test_import_rejects_mismatched_and_damaged_files(tmp_path):
    save_hf_gpt2(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_embd": 64}))
    with pytest.raises(ValueError, match="shape"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="damaged"):
        from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        from_pretrained(tmp_path / "nowhere")


def test_import_reads_n_ctx_and_refuses_what_gpt2_is_not(tmp_path):
    save_hf_gpt2(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    reference = from_pretrained(tmp_path)
    older = {k: v for k, v in config.items() if k != "n_positions"} | {"n_ctx": config["n_positions"]}
    (tmp_path / "config.json").write_text(json.dumps(older))
    assert from_pretrained(tmp_path).config == reference.config
    for key, value in [("activation_function", "relu"), ("layer_norm_epsilon", 1e-2), ("scale_attn_weights", False),
                       ("tie_word_embeddings", False)]:
        (tmp_path / "config.json").write_text(json.dumps(config | {key: value}))
        with pytest.raises(ValueError, match=key):
            from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "n_layer"}))
    with pytest.raises(ValueError, match="lacks n_layer"):
        from_pretrained(tmp_path)


def test_hub_download_goes_through_huggingface_hub(tmp_path, fake_hub):
    save_hf_gpt2(tmp_path / "src")
    reference = from_pretrained(tmp_path / "src")
    fake_hub.repos["openai-community/gpt2"] = tmp_path / "src"
    model = from_pretrained("gpt2")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    assert fake_hub.calls == [("openai-community/gpt2", "config.json"), ("openai-community/gpt2", "model.safetensors")]


def test_hub_download_failure_is_one_line_naming_the_folder_alternative(tmp_path, fake_hub):
    fake_hub.error = OSError("Consistency check failed: file should be of size 500 but has size 250")
    with pytest.raises(SystemExit, match="could not download gpt2 .*Consistency check failed.*pass their folder"):
        from_pretrained("gpt2")


def test_hub_download_offline_is_one_line(tmp_path, monkeypatch):
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 does; the real hf_hub_download
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    with pytest.raises(SystemExit, match="could not download gpt2-medium .* Offline\\? .*pass their folder") as e:
        from_pretrained("gpt2-medium")
    assert "\n" not in str(e.value)


def test_hub_without_huggingface_hub_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as if it were not installed
    with pytest.raises(SystemExit, match="pip install huggingface_hub"):
        from_pretrained("gpt2")


def test_safetensors_round_trip_keeps_tied_weights(tmp_path):
    from safetensors.torch import save_file
    model = tiny_model(bias=False, dropout=0.1)
    save_file(hf_state_dict(model), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(hf_config(model.config)))
    loaded = from_pretrained(tmp_path).eval()
    assert loaded.config == model.config
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    idx = torch.randint(0, 97, (2, 10))
    torch.testing.assert_close(loaded(idx)[0], model.eval()(idx)[0], rtol=0, atol=0)


def test_exported_folder_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_file
    model = tiny_model()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_file(hf_state_dict(model), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(hf_config(model.config)))
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        assert (hf(idx).logits - model(idx)[0]).abs().max().item() < 1e-4


@pytest.mark.parametrize("capability, head_dim, ok", [
    ((9, 0), 256, True), ((8, 0), 256, True), ((8, 6), 192, True), ((8, 6), 256, False), ((8, 9), 200, False),
    ((10, 0), 128, True), ((12, 0), 128, True), ((7, 5), 64, False), ((9, 0), 260, False), ((9, 0), 36, False)])
def test_flash_supported_follows_pytorchs_limits(capability, head_dim, ok, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "a GPU")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert flash_supported.__wrapped__(0, head_dim) == ok
    assert len(caught) == (not ok)
    if not ok and head_dim <= 256 and capability >= (8, 0):
        assert f"at most {192 if capability in ((8, 6), (8, 9)) else 256}" in str(caught[0].message)


def test_import_model_leaves_torch_dynamo_unloaded():
    """torch._dynamo adds seconds to every script's start-up: model.py imports it only where a static cache needs it,
    and marks flash_supported constant for torch.compile by hand, as torch.compiler.assume_constant_result does."""
    code = "import sys, model; assert 'torch._dynamo' not in sys.modules, 'torch._dynamo imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
    import torch._dynamo

    def f() -> None:
        pass
    torch._dynamo.assume_constant_result(f)
    assert f.__dict__ == {"_dynamo_marked_constant": True}  # what config.py sets on flash_supported
    assert flash_supported._dynamo_marked_constant is True


# ---------------------------------------------------------------------------- CUDA only


MODERN = dict(pos_embedding="rope", norm="rmsnorm", embed_norm=True, qk_norm=True, mlp="relu2", n_kv_head=2,
              tie_embeddings=False, logit_softcap=15.0, bias=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("switches", [{}, MODERN], ids=["gpt2", "modern"])
def test_training_step_runs_on_the_flash_kernel(dtype, switches, monkeypatch):
    import model as model_module
    from torch.profiler import ProfilerActivity, profile

    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("the flash kernel needs an Ampere or newer GPU")
    asked = []
    real = model_module.sdpa_kernel

    def recording_sdpa_kernel(backends):
        asked.append(backends)
        return real(backends)

    monkeypatch.setattr(model_module, "sdpa_kernel", recording_sdpa_kernel)
    model = GPT(GPTConfig(block_size=128, vocab_size=256, n_layer=2, n_head=4, n_embd=128, dropout=0.1,
                          **switches)).cuda()
    idx = torch.randint(0, 256, (4, 128), device="cuda")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        with torch.autocast("cuda", dtype=dtype):
            _, loss = model(idx, targets=idx)
        loss.backward()
        torch.cuda.synchronize()
    assert torch.isfinite(loss)
    assert asked == [model_module.SDPBackend.FLASH_ATTENTION] * 2  # forced in both layers, so nothing else could run
    kernels = " ".join(e.key.lower() for e in prof.key_averages())
    assert "flash" in kernels  # and the kernels that ran are flash's, forward and backward


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("switches", [{}, MODERN], ids=["gpt2", "modern"])
def test_generate_on_cuda_equals_cpu(switches):
    model = tiny_model(**switches)
    idx = torch.randint(0, 97, (2, 5))
    on_cpu = model.generate(idx, 20, temperature=0)
    on_gpu = model.cuda().generate(idx.cuda(), 20, temperature=0)
    assert torch.equal(on_gpu.cpu(), on_cpu)
