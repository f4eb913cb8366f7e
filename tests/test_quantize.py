"""quantize.py: the int8 layer against its dequantized matrix, every matrix int8 in memory (either Linear layout),
the quantized model against a float twin holding the dequantized weights, and --quantize=int8 through sample.py,
eval.py, serve.py and bench.py on tiny fp32 models; the default (none) leaves the model untouched."""

import copy
import math

import pytest
import torch
import torch.nn as nn
from torch.nn import functional as F

import model as model_module
import quantize
from checkpoint import load_for_inference
from conftest import TINY, tiny_model
from model import GPT, GPTConfig
from quantize import KERNEL_ROWS, Int8Linear, is_linear, quantize_model
from sample import SEPARATOR, decode
from test_sample import char_run, expected_output, run  # noqa: F401 (fixture)

CPU = torch.device("cpu")
# Every architecture switch at once, the head untied (its own matrix) and grouped-query attention.
MODERN = dict(pos_embedding="rope", norm="rmsnorm", embed_norm=True, qk_norm=True, mlp="relu2", n_kv_head=2,
              tie_embeddings=False, logit_softcap=15.0, bias=False)


def int8(m: GPT) -> GPT:
    return quantize_model(copy.deepcopy(m), "int8", CPU)


@pytest.fixture(params=["model.Linear (in, out)", "nn.Linear (out, in)"])
def layout(request, monkeypatch):
    """Build the blocks with the project's Linear, or with nn.Linear's layout in its place (as h-core may switch)."""
    if request.param.startswith("nn."):
        monkeypatch.setattr(model_module, "Linear", nn.Linear)
    return request.param


def float_twin(m: GPT, q: GPT) -> GPT:
    """m with every matrix replaced by the float matrix q multiplies by: the reference quantization must match."""
    twin = copy.deepcopy(m)
    quantized = dict(q.named_modules())
    with torch.no_grad():
        for name, module in list(twin.named_modules()):
            if is_linear(module):
                deq = quantized[name].dequantized()  # (out, in)
                shape = module.weight.shape
                module.weight = nn.Parameter(deq if isinstance(module, nn.Linear) else deq.t().contiguous())
                assert module.weight.shape == shape
    return twin


# ------------------------------------------------------------------------------------------------------ the layer


@pytest.mark.parametrize("rows", [1, 3, KERNEL_ROWS, KERNEL_ROWS + 1, 70])  # the int8 kernel, then dequantized
def test_int8_linear_is_its_dequantized_matrix(rows):
    torch.manual_seed(0)
    w, b = torch.randn(48, 64), torch.randn(48)
    w[5] = 0  # an all-zero row (zero_init) must not divide by zero
    w[7, 3] = 40.0  # an outlier sets its row's scale
    layer = Int8Linear(w, b)
    assert layer.weight.dtype == torch.int8 and layer.weight.shape == (48, 64) and layer.scale.shape == (48,)
    assert layer.weight.abs().max() == 127 and (layer.weight[5] == 0).all()
    step = layer.scale.float()[:, None]
    assert ((layer.dequantized() - w).abs() <= step / 2 + 1e-6).all()  # round to nearest, never clipped
    x = torch.randn(rows, 64)
    y = layer(x)
    assert y.dtype == torch.float32 and y.shape == (rows, 48)
    # both paths take x in bf16 and round the sum to bf16 once: the reference rounds x alike, and allows that
    ref = F.linear(x.bfloat16().float(), layer.dequantized(), b)
    assert torch.allclose(y, ref, atol=ref.abs().max().item() * 2**-8)
    assert not torch.allclose(y, F.linear(x, w, b), atol=ref.abs().max().item() * 2**-8)  # W was rounded
    assert torch.allclose(layer(x.view(1, rows, 64)), y.view(1, rows, 48))  # any leading shape


def test_many_rows_give_the_same_numbers_in_slices_of_w(monkeypatch):
    layer = Int8Linear(torch.randn(48, 64), torch.randn(48))
    x = torch.randn(40, 64)
    whole = layer(x)
    monkeypatch.setattr(quantize, "CHUNK", 5 * 64)  # 5 rows of W at a time: 10 slices, the last of 3
    assert torch.equal(layer(x), whole)


def test_bfloat16_activations_stay_bfloat16():
    layer = Int8Linear(torch.randn(32, 32), None)
    for rows in (1, KERNEL_ROWS + 5):
        assert layer(torch.randn(rows, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------------ the model


@pytest.mark.parametrize("switches", [{}, MODERN], ids=["gpt2", "modern"])
def test_every_matrix_is_int8_in_memory_and_the_lookup_stays_float(layout, switches):
    m = tiny_model(**switches)
    wte = m.transformer.wte.weight.detach().clone()
    q = int8(m)
    matrices = [mod for mod in q.modules() if isinstance(mod, Int8Linear)]
    assert not [mod for mod in q.modules() if is_linear(mod)]  # by rule: nothing that multiplies is left float
    assert len(matrices) == 4 * TINY["n_layer"] + 1  # c_attn, c_proj, c_fc, c_proj per block, and the head
    assert all(mod.weight.dtype == torch.int8 for mod in matrices)
    assert isinstance(q.lm_head, Int8Linear)
    assert torch.equal(q.transformer.wte.weight, wte)  # the embedding lookup is exact (a tied wte too)
    assert all(p.dtype == torch.float32 for n, p in q.named_parameters() if not n.endswith("weight")
               or "ln" in n or "wte" in n or "wpe" in n)
    idx = torch.tensor([[3, 1, 4]])
    assert torch.equal(q.transformer.wte(idx), m.transformer.wte(idx))


@pytest.mark.parametrize("switches", [{}, MODERN], ids=["gpt2", "modern"])
def test_quantized_model_is_its_float_twin(layout, switches):
    """Logits of the int8 model against a float model holding the dequantized matrices: a matrix quantized in the
    wrong orientation, or one missed, fails here (the square c_proj would still fit by shape)."""
    m = tiny_model(**switches)
    q = int8(m)
    twin = float_twin(m, q)
    idx = torch.randint(0, TINY["vocab_size"], (2, 20))
    with torch.no_grad():
        for x in (idx, idx[:1, :KERNEL_ROWS]):  # 40 rows: the bf16 matmul; 4: the int8 kernel (both bf16 x)
            assert torch.allclose(q(x)[0], twin(x)[0], atol=1e-2)  # logits ~0.6: bf16 rounding of ~0.002


def test_kv_cache_decoding_is_the_recomputed_decoding():
    """generate through the KV cache, one row at a time and in a batch, against recomputing every step (nanoGPT)."""
    q = int8(tiny_model())
    idx = torch.randint(0, TINY["vocab_size"], (3, 4))
    cached = q.generate(idx, 10, temperature=0)
    recomputed = idx
    with torch.no_grad():
        for _ in range(10):
            logits = q(recomputed)[0][:, -1]
            recomputed = torch.cat([recomputed, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, recomputed)
    assert all(torch.equal(q.generate(idx[i:i + 1], 10, temperature=0), cached[i:i + 1]) for i in range(3))


def test_none_returns_the_model_untouched(char_run):
    plain, _, _, _ = load_for_inference(str(char_run), None, "latest", CPU)
    none, _, _, _ = load_for_inference(str(char_run), None, "latest", CPU, quantize="none")
    assert plain.state_dict().keys() == none.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), none.state_dict().values()))
    assert not any(isinstance(mod, Int8Linear) for mod in none.modules())
    m = tiny_model()
    assert quantize_model(m, "none", CPU) is m


def test_bad_settings_are_one_line(monkeypatch):
    m = tiny_model()
    for setting, device, words in [("int4", CPU, "there is no int4"), ("int8", torch.device("cuda"), "CPU only"),
                                   ("int8", torch.device("mps"), "CPU only")]:
        with pytest.raises(SystemExit) as e:
            quantize_model(m, setting, device)
        assert words in str(e.value) and "\n" not in str(e.value)
    odd = tiny_model(n_embd=24, n_head=4)  # the kernel reads 16 inputs at a time: 24 would crash it
    with pytest.raises(SystemExit, match="multiple of 16"):
        quantize_model(odd, "int8", CPU)
    assert not any(isinstance(mod, Int8Linear) for mod in m.modules())  # nothing half-quantized


# ------------------------------------------------------------------------------------------------------ the scripts


def quantized_expected(out_dir, prompt: str, n: int, new: int, seed: int, **sampling) -> str:
    """What sample.py --quantize=int8 must print: the quantized checkpoint's model.generate, seeded alike."""
    m, tokenizer, _, _ = load_for_inference(str(out_dir), None, "latest", CPU, quantize="int8")
    ids = tokenizer.encode(prompt)
    out = m.generate(torch.tensor([ids] * n), new, generator=torch.Generator().manual_seed(seed), **sampling)
    return "".join(f"{prompt}{decode(tokenizer, row)}\n{SEPARATOR}\n" for row in out[:, len(ids):].tolist())


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0, top_k=20),
                                      dict(temperature=1.0, top_k=None, top_p=0.9)])
def test_sample_int8_is_the_quantized_model_generate(char_run, capsys, sampling):
    args = [f"--{k}={'none' if v is None else v}" for k, v in sampling.items()]
    n = 1 if sampling["temperature"] == 0 else 3
    out, _ = run(capsys, f"--out_dir={char_run}", "--start=ROMEO", f"--num_samples={n}", "--max_new_tokens=40",
                 "--seed=7", "--quantize=int8", *args)
    assert out == quantized_expected(char_run, "ROMEO", n, 40, 7, **sampling)
    plain, _ = run(capsys, f"--out_dir={char_run}", "--start=ROMEO", f"--num_samples={n}", "--max_new_tokens=40",
                   "--seed=7", *args)
    assert plain == expected_output(char_run, "ROMEO", n, 40, 7, **sampling)  # no flag: the float model, exactly


@pytest.mark.parametrize("args, words", [(["--quantize=int4"], "there is no int4"),
                                         (["--quantize=int8", "--device=cuda"], None)])
def test_sample_bad_quantize_is_one_line(char_run, args, words):
    import sample

    with pytest.raises(SystemExit) as e:
        sample.main([f"--out_dir={char_run}", *args])
    message = str(e.value.code)
    assert "\n" not in message and (words in message if words else ("CPU only" in message or "CUDA" in message))


def test_eval_int8_scores_the_quantized_model(char_run, tmp_path, monkeypatch):
    """eval.py --quantize=int8 gives the loss that eval.py gives the float twin (the dequantized weights)."""
    import eval as eval_py

    (tmp_path / "t.txt").write_text("ROMEO: But soft, what light through yonder window breaks? It is the east.")
    common = [f"--out_dir={char_run}", f"--input={tmp_path / 't.txt'}", "--device=cpu"]
    fp32 = eval_py.main(common)
    q = eval_py.main(common + ["--quantize=int8"])

    def load_twin(*args, **kwargs):
        m, tokenizer, config, source = load_for_inference(*args, **kwargs)
        return float_twin(m, int8(m)), tokenizer, config, source

    monkeypatch.setattr(eval_py, "load_for_inference", load_twin)
    twin = eval_py.main(common)
    assert q["tokens"] == fp32["tokens"] == twin["tokens"]
    assert q["loss"] == pytest.approx(twin["loss"], rel=1e-4)  # not exact: the int8 layers round x to bf16
    assert q["bpb"] == pytest.approx(q["loss"] / fp32["loss"] * fp32["bpb"], rel=1e-9)
    assert q["loss"] != fp32["loss"] and q["loss"] == pytest.approx(fp32["loss"], rel=0.05)
    with pytest.raises(SystemExit, match="no int4"):
        eval_py.main(common + ["--quantize=int4"])


def test_serve_int8_rows_logprobs_and_attention(char_run):
    pytest.importorskip("uvicorn")
    from serve import ServeConfig
    from test_serve import check_attention, complete, greedy, serving

    m, tokenizer, _, _ = load_for_inference(str(char_run), None, "latest", CPU, quantize="int8")
    assert isinstance(m.lm_head, Int8Linear)
    prompts = ["ROMEO", "To be", "What light"]
    with serving(m, tokenizer) as (port, _):
        answer = complete(port, prompt=prompts, max_tokens=12, temperature=0)  # three rows decoded together
        assert [c["text"] for c in sorted(answer["choices"], key=lambda c: c["index"])] == \
            [greedy(m, tokenizer, p, 12) for p in prompts]
        answer = complete(port, prompt="ROMEO", max_tokens=5, temperature=0.8, top_k=10, top_p=0.9, logprobs=3,
                          seed=1)
        top = answer["choices"][0]["logprobs"]["top_logprobs"]
        assert len(top) == 5 and all(len(t) == 3 and all(lp <= 0 for lp in t.values()) for t in top)
        check_attention(port, m, tokenizer)
    with pytest.raises(ValueError, match="no int4"):
        ServeConfig(quantize="int4")


def test_bench_int8_rows(tmp_path):
    import bench

    out = tmp_path / "r.jsonl"
    rows = bench.main(["--model=tiny", "--block_size=32", "--vocab_size=128", "--repeats=2", "--warmup=1",
                       "--decode_tokens=3", "--prompt_len=4", "--decode_batch=1,2", "--device=cpu", "--what=decode",
                       "--quantize=both", f"--out={out}"])
    assert [(r["what"], r.get("quantize"), r.get("batch_size")) for r in rows] == [
        ("copy", None, None), ("decode", "none", 1), ("decode", "int8", 1), ("decode", "none", 2),
        ("decode", "int8", 2)]
    assert rows[0]["gb_per_s"] > 0 and all(r["weights_gb_per_s"] > 0 and r["of_copy"] > 0 for r in rows[1:])
    fp32, q = rows[1]["weights_mb"], rows[2]["weights_mb"]
    assert q < fp32 / 2.5  # int8 plus float biases, norms and scales: about a quarter
    for bad, words in [("--quantize=int4", "no int4"), ("--quantize=xyz", "no int4")]:
        with pytest.raises(SystemExit, match=words):
            bench.main(["--model=tiny", "--what=decode", bad, f"--out={out}"])


def test_weight_bytes_count_the_head_once():
    import bench

    m = tiny_model()
    c = GPTConfig(**TINY)
    floats = sum(p.numel() for p in m.parameters()) - c.block_size * c.n_embd  # wpe is a lookup; wte is the head
    assert bench.weight_bytes(m) == 4 * floats
    q = int8(m)
    ints = sum(mod.weight.numel() for mod in q.modules() if isinstance(mod, Int8Linear))
    others = sum(p.numel() * p.element_size() for n, p in q.named_parameters()
                 if not n.endswith("weight") or "ln" in n) + sum(b.numel() * 2 for b in q.buffers())
    assert bench.weight_bytes(q) == ints + others
    assert math.isclose(bench.weight_bytes(q) / bench.weight_bytes(m), 0.25, abs_tol=0.05)


def test_serve_main_passes_quantize_to_the_loader(char_run, monkeypatch):
    pytest.importorskip("uvicorn")
    import serve

    asked = []

    def loader(*args, **kwargs):
        asked.append(args[5:] + tuple(kwargs.values()))
        raise SystemExit("stopped before listening")

    monkeypatch.setattr(serve, "load_for_inference", loader)
    with pytest.raises(SystemExit, match="stopped before"):
        serve.main([f"--out_dir={char_run}", "--device=cpu", "--quantize=int8"])
    assert asked == [("int8",)]


def test_compiled_int8_step_runs_inductors_template_and_matches_the_eager_step():
    """sample.py --compile on an int8 model: the weights frozen into the graph, inductor's C++ GEMM template
    multiplies by them (its counter moves only then), and each step's logits are the eager int8 model's up to the
    bf16 rounding both apply; the static cache is sized to what the generation fills (one compilation, ~40 s)."""
    import sample
    from config import check_compiler
    from torch._dynamo.utils import counters

    try:
        check_compiler(CPU)
    except SystemExit as e:
        pytest.skip(str(e))
    wide = tiny_model(block_size=256)
    assert [sample.static_cache_len(wide, t, 6) for t in (3, 100, 300)] == [64, 128, 256]
    torch.manual_seed(0)
    q = int8(tiny_model())
    idx = torch.randint(0, TINY["vocab_size"], (1, 3))
    before = counters["inductor"]["cpp_templated_kernel_counter"]
    torch._dynamo.reset()
    try:
        compiled = sample.compiled_generate(q, idx, 6, temperature=0)
        assert counters["inductor"]["cpp_templated_kernel_counter"] > before
        cache = sample._static_caches[q][(1, CPU, torch.float32)]  # the one it used: 3 + 6 - 1 slots, to 64, at most 32
        assert cache.max_len == TINY["block_size"]
        cache.reset()
        step = sample.static_step(q, cache, sample.compiled_decode_step(q))
        eager = model_module.KVCache.for_model(q, 1)
        for t in compiled[0, :8].tolist():
            tok = torch.tensor([[t]])
            torch.testing.assert_close(step(tok), q(tok, kv_cache=eager)[0], rtol=0.02, atol=0.02)
    finally:
        torch._dynamo.reset()


def test_bench_times_each_weight_format_eager_and_compiled(tmp_path, monkeypatch):
    """--quantize=both --compile=both: four rows a batch size, float and int8 each eager and compiled (the compiled
    step built by an eager backend here: no C++ to wait for), with the compiling run's time."""
    import bench
    import sample

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None, **kwargs: real_compile(
        fn, backend=lambda gm, example_inputs: gm.forward, **kwargs))
    monkeypatch.setattr(sample, "_compiled", {})
    torch._dynamo.reset()
    try:
        rows = bench.main(["--model=tiny", "--block_size=32", "--vocab_size=128", "--repeats=1", "--warmup=1",
                           "--decode_tokens=3", "--prompt_len=4", "--decode_batch=1,2", "--device=cpu",
                           "--what=decode", "--quantize=both", "--compile=both", f"--out={tmp_path / 'r.jsonl'}"])
    finally:
        torch._dynamo.reset()
    assert [(r.get("quantize"), r.get("compile"), r.get("batch_size")) for r in rows[1:]] == [
        (q, c, b) for b in (1, 2) for c in (False, True) for q in ("none", "int8")]
    assert all(r["tokens_per_sec"] > 0 and r["first_run_s"] >= 0 for r in rows[1:])
    assert set(sample._compiled) == {"default", "int8"}  # the compiled rows ran the compiled steps
