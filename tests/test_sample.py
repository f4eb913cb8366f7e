"""sample.py: its output against model.generate with the same seed, prompts from a file and stdin, stop conditions,
streaming against non-streaming, bad settings, an imported Hugging Face GPT-2 folder, and the compiled decode path
(on a GPU too: those tests skip without CUDA)."""

import io
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import sample
from checkpoint import from_pretrained, save_checkpoint
from conftest import CHARS, gpt2_bpe, tiny_model
from model import GPT
from sample import SEPARATOR, Continuation, SampleConfig, compiled_generate, decode, generate_samples, main
from tokens import Tokenizer

REPO = Path(__file__).resolve().parents[1]
EOT = 50256
SPLIT_TOKENS = [8582, 25081, 45739, 252]  # GPT-2 BPE: b"\xf0\x9f" b"\x99\x82" (🙂), b"\xe8\xaa" b"\x9e" (語)


def save_run(out_dir: Path, model: GPT, tokenizer: Tokenizer) -> Path:
    save_checkpoint(out_dir, model, {"tokenizer": tokenizer.to_meta()}, {"iter_num": 10}, iter_num=10, is_best=True)
    return out_dir


@pytest.fixture(scope="module")
def char_run(tmp_path_factory) -> Path:
    """An out_dir with one checkpoint of a tiny char-level model."""
    return save_run(tmp_path_factory.mktemp("char") / "out", tiny_model(vocab_size=len(CHARS)), Tokenizer.char(CHARS))


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory) -> Path:
    """A tiny GPT-2 BPE model that, at every step, picks end-of-text with probability ~0.06, one of four tokens that
    hold parts of multi-byte characters with ~0.89 (so characters get split across tokens, or come out invalid), and
    any other token otherwise."""
    model = tiny_model(vocab_size=50257, n_head=2, n_embd=16)
    with torch.no_grad():
        direction = torch.nn.functional.normalize(torch.randn(16), dim=0)
        model.transformer.ln_f.weight.fill_(0.05)  # every position's output is ~ the bias, and logits ~ wte @ bias
        model.transformer.ln_f.bias.copy_(direction)
        model.transformer.wte.weight[EOT] = 9.4 * direction
        model.transformer.wte.weight[SPLIT_TOKENS] = 10.5 * direction
    return save_run(tmp_path_factory.mktemp("bpe") / "out", model, gpt2_bpe())


def run(capsys, *args: str) -> tuple[str, str]:
    """main(args) in this process, on the CPU (expected_output's device) unless args name another: (stdout, stderr)."""
    device = [] if any(a.startswith("--device=") for a in args) else ["--device=cpu"]
    assert main([*args, *device]) == 0
    captured = capsys.readouterr()
    return captured.out, captured.err


def expected_output(out_dir: Path, prompt: str, n: int, new: int, seed: int, stop_eot: bool = False,
                    stop: str | None = None, dtype: torch.dtype = torch.float32, **sampling) -> str:
    """What sample.py must print, built from model.generate with a generator seeded the same way."""
    model = from_pretrained(out_dir / "latest").to(dtype).eval()
    tokenizer = Tokenizer.from_meta(__import__("json").loads((out_dir / "latest" / "config.json").read_text())["tokenizer"])
    ids = tokenizer.encode(prompt) if prompt else [tokenizer.eot_token]
    idx = torch.tensor([ids] * n)
    out = model.generate(idx, new, generator=torch.Generator().manual_seed(seed), **sampling)
    texts = []
    for row in out[:, len(ids):].tolist():
        if stop_eot and tokenizer.eot_token in row:
            row = row[:row.index(tokenizer.eot_token)]
        text = decode(tokenizer, row)
        if stop is not None and stop in text:
            text = text[:text.index(stop)]
        texts.append(f"{prompt}{text}\n{SEPARATOR}\n")
    return "".join(texts)


# ---------------------------------------------------------------------------------------------------------- output


def test_samples_are_model_generate_with_prompt_kept_and_separators(char_run, capsys):
    # 45 new tokens after a 5-token prompt go past block_size 32: the cropped-window recompute is exercised too
    out, err = run(capsys, f"--out_dir={char_run}", "--start=ROMEO", "--num_samples=3", "--max_new_tokens=45",
                   "--seed=7", "--temperature=1.0", "--top_k=20")
    assert out == expected_output(char_run, "ROMEO", 3, 45, 7, temperature=1.0, top_k=20)
    assert out.count(SEPARATOR) == 3
    assert all(s.startswith("ROMEO") for s in out.split(f"\n{SEPARATOR}\n")[:3])
    assert "tokens/s" in err and "135 new tokens (3 sample(s), 45 steps)" in err


def test_same_seed_same_text_other_seed_other_text(char_run, capsys):
    args = [f"--out_dir={char_run}", "--num_samples=2", "--max_new_tokens=30", "--temperature=1.0"]
    a, _ = run(capsys, *args, "--seed=1")
    b, _ = run(capsys, *args, "--seed=1")
    c, _ = run(capsys, *args, "--seed=2")
    assert a == b and a != c


def test_top_p_and_greedy_follow_model_generate(char_run, capsys):
    out, _ = run(capsys, f"--out_dir={char_run}", "--start=ab", "--num_samples=2", "--max_new_tokens=20",
                 "--top_k=none", "--top_p=0.9", "--temperature=1.0", "--seed=3")
    assert out == expected_output(char_run, "ab", 2, 20, 3, temperature=1.0, top_p=0.9)
    out, _ = run(capsys, f"--out_dir={char_run}", "--start=ab", "--num_samples=1", "--max_new_tokens=20",
                 "--temperature=0")
    assert out == expected_output(char_run, "ab", 1, 20, 0, temperature=0)


def test_prompt_longer_than_block_size_is_kept_whole(char_run, capsys):
    prompt = "to be or not to be, that is the question"  # 40 characters > block_size 32
    out, err = run(capsys, f"--out_dir={char_run}", f"--start={prompt}", "--num_samples=1", "--max_new_tokens=10")
    assert out == expected_output(char_run, prompt, 1, 10, 1337, temperature=0.8, top_k=200)
    assert "sees only its last 32" in err


def test_bfloat16_weights_sample_reproducibly(char_run, capsys, monkeypatch):
    dtypes = []  # what generate_samples decodes with: this tiny model picks the same tokens in fp32, so the text alone
    # cannot tell whether the weights were cast

    def spy(model: GPT, *args, **kwargs) -> tuple[list[str], dict]:
        dtypes.append(model.transformer.wte.weight.dtype)
        return generate_samples(model, *args, **kwargs)

    monkeypatch.setattr(sample, "generate_samples", spy)
    args = [f"--out_dir={char_run}", "--start=ab", "--num_samples=2", "--max_new_tokens=8", "--dtype=bfloat16"]
    a, _ = run(capsys, *args)
    b, _ = run(capsys, *args)
    assert a == b and a.startswith("ab") and a.count(SEPARATOR) == 2
    assert a == expected_output(char_run, "ab", 2, 8, 1337, dtype=torch.bfloat16, temperature=0.8, top_k=200)
    assert dtypes == [torch.bfloat16] * 2


def test_file_prompt_and_stdin_prompt(char_run, capsys, tmp_path, monkeypatch):
    prompt = "First Citizen:\nBefore we proceed any further, hear me speak."
    args = [f"--out_dir={char_run}", "--num_samples=2", "--max_new_tokens=12"]
    direct, _ = run(capsys, *args, f"--start={prompt}")
    (tmp_path / "prompt.txt").write_text(prompt, encoding="utf-8")
    from_file, _ = run(capsys, *args, f"--start=FILE:{tmp_path / 'prompt.txt'}")
    monkeypatch.setattr(sys, "stdin", io.StringIO(prompt))
    from_stdin, _ = run(capsys, *args, "--start=-")
    assert direct.startswith(prompt) and from_file == direct and from_stdin == direct


def test_out_file_holds_the_printed_samples(char_run, capsys, tmp_path):
    out, _ = run(capsys, f"--out_dir={char_run}", "--num_samples=2", "--max_new_tokens=10",
                 f"--out_file={tmp_path / 'samples.txt'}")
    assert (tmp_path / "samples.txt").read_text(encoding="utf-8") == out


def test_best_checkpoint_and_checkpoint_folder(char_run, capsys):
    latest, _ = run(capsys, f"--out_dir={char_run}", "--num_samples=1", "--max_new_tokens=10")
    best, _ = run(capsys, f"--out_dir={char_run}", "--checkpoint=best", "--num_samples=1", "--max_new_tokens=10")
    folder, _ = run(capsys, f"--init_from={char_run / 'ckpt_000010'}", "--num_samples=1", "--max_new_tokens=10")
    resume, _ = run(capsys, f"--out_dir={char_run}", "--init_from=resume", "--num_samples=1", "--max_new_tokens=10")
    assert latest == best == folder == resume


# ---------------------------------------------------------------------------------------------------------- stop


def test_stop_at_end_of_text(bpe_run, capsys):
    out, err = run(capsys, f"--out_dir={bpe_run}", "--start=Hello", "--num_samples=4", "--max_new_tokens=40",
                   "--top_k=none", "--temperature=1.0", "--stop=eot", "--seed=5")
    assert out == expected_output(bpe_run, "Hello", 4, 40, 5, stop_eot=True, temperature=1.0)
    assert "<|endoftext|>" not in out
    # P(eot) is ~0.06 a step: with this seed the 4 samples end after 2, 19, 2 and 22 tokens, and so does the batch
    assert "45 new tokens (4 sample(s), 22 steps)" in err  # 2 + 19 + 2 + 22, not 4 x 40


def test_stop_at_a_string(char_run, capsys):
    args = [f"--out_dir={char_run}", "--start=a", "--num_samples=3", "--max_new_tokens=40", "--temperature=1.5",
            "--seed=11"]
    full, _ = run(capsys, *args)
    stop = "e"
    out, _ = run(capsys, *args, f"--stop={stop}")
    assert out == expected_output(char_run, "a", 3, 40, 11, stop=stop, temperature=1.5, top_k=200)
    assert out != full and all(stop not in s[1:] for s in out.split(f"\n{SEPARATOR}\n"))


def test_stop_string_escapes_mean_newline(char_run, capsys):
    args = [f"--out_dir={char_run}", "--start=a", "--num_samples=3", "--max_new_tokens=40", "--temperature=2.0",
            "--top_k=none", "--seed=4"]
    out, _ = run(capsys, *args, "--stop=\\n")
    assert out == expected_output(char_run, "a", 3, 40, 4, stop="\n", temperature=2.0)


# ---------------------------------------------------------------------------------------------------------- streaming


def test_streaming_prints_the_same_text(bpe_run, char_run, capsys):
    for args in ([f"--out_dir={bpe_run}", "--start=Hi", "--max_new_tokens=60", "--top_k=none", "--temperature=1.0"],
                 [f"--out_dir={bpe_run}", "--start=", "--max_new_tokens=60", "--stop=eot", "--seed=9"],
                 [f"--out_dir={char_run}", "--start=a", "--max_new_tokens=60", "--stop=ab", "--temperature=2.0"]):
        streamed, _ = run(capsys, *args, "--num_samples=1", "--stream=true")
        printed, _ = run(capsys, *args, "--num_samples=1", "--stream=false")
        assert streamed == printed

    # The first stream above really had characters split across tokens: text was held back at some steps.
    model, bpe = from_pretrained(bpe_run / "latest"), gpt2_bpe()
    tokens = model.generate(torch.tensor([bpe.encode("Hi")]), 60, top_k=None,
                            generator=torch.Generator().manual_seed(1337))[0, 1:].tolist()
    c, held = Continuation(bpe, None, None), 0
    for token in tokens:
        c.add(token)
        held += c.settled() != c.text
    assert held >= 5 and "🙂" in c.text and "\ufffd" in c.text


def test_each_sample_is_printed_as_soon_as_it_is_complete(char_run, capsys):
    """Several samples: the first streams, each is printed when done (they were silent until the whole batch was),
    and the bytes are those printed at the end, the same samples as for the seed before."""
    for args in ([f"--out_dir={char_run}", "--start=a", "--max_new_tokens=40", "--temperature=2.0"],
                 [f"--out_dir={char_run}", "--start=a", "--max_new_tokens=60", "--stop=e", "--seed=3"]):
        streamed, _ = run(capsys, *args, "--num_samples=3", "--stream=true")
        printed, _ = run(capsys, *args, "--num_samples=3", "--stream=false")
        assert streamed == printed
    assert printed == expected_output(char_run, "a", 3, 60, 3, stop="e", temperature=0.8, top_k=200)

    model, tokenizer = from_pretrained(char_run / "latest").eval(), Tokenizer.char(CHARS)
    steps, generate_stream = [], model.generate_stream

    def counted(*args, **kwargs):
        for token in generate_stream(*args, **kwargs):
            steps.append(token)
            yield token

    model.generate_stream = counted
    done = []
    cfg = SampleConfig(out_dir=str(char_run), num_samples=4, max_new_tokens=60, stop="e", temperature=2.0)
    texts, _ = generate_samples(model, tokenizer, tokenizer.encode("a"), cfg, torch.Generator().manual_seed(3),
                                on_done=lambda i, text: done.append((i, text, len(steps))))
    assert [(i, text) for i, text, _ in done] == list(enumerate(texts))
    assert done[0][2] < len(steps)  # out before the batch ended


class Scripted:
    """Stands in for a GPT in generate_samples: its generate_stream yields fixed tokens, the same in every row."""

    def __init__(self, tokens: list[int]) -> None:
        self.tokens = tokens
        self.transformer = SimpleNamespace(wte=SimpleNamespace(weight=torch.zeros(1)))  # for its device

    def generate_stream(self, idx: torch.Tensor, max_new_tokens: int, *args) -> Iterator[torch.Tensor]:
        for token in self.tokens[:max_new_tokens]:
            yield torch.full((idx.size(0), 1), token)


@pytest.mark.parametrize("text, split, stop", [
    ("x a", [8582, 25081], "a🙂"),  # "a" is held back while 🙂 lacks its last bytes: it ends up cut
    ("x a", [8582, 25081, 10], "a🙂"),  # 🙂 then "+": the same cut
    ("x a", [45739, 252], "a🙂"),  # 語 completes instead: "a" is printed after all
    ("x", [8582, 25081], "🙂"),
    ("x ab", [8582, 25081], "b🙂"),
])
def test_streamed_text_is_the_final_text_when_a_stop_string_meets_a_split_character(text, split, stop):
    bpe = gpt2_bpe()
    tokens = bpe.encode(text) + split
    cfg = SampleConfig(num_samples=1, max_new_tokens=len(tokens), stop=stop)
    stream = io.StringIO()
    texts, _ = generate_samples(Scripted(tokens), bpe, [EOT], cfg, torch.Generator(), stream_to=stream)
    assert stream.getvalue() == texts[0] == bpe.decode(tokens).split(stop)[0]


def test_streaming_holds_back_split_characters_and_stop_prefixes():
    bpe = gpt2_bpe()
    ids = bpe.encode("🙂")
    assert len(ids) > 1  # GPT-2 BPE spells this emoji with several byte tokens
    c = Continuation(bpe, None, None)
    for token in ids[:-1]:
        c.add(token)
        assert c.settled() == "" and c.text.endswith("\ufffd")
    c.add(ids[-1])
    assert c.settled() == "🙂"

    char = Tokenizer.char(CHARS)
    c = Continuation(char, None, "\n\n")
    for ch, settled in (("a", "a"), ("\n", "a"), ("b", "a\nb"), ("\n", "a\nb"), ("\n", "a\nb")):
        c.add(char.encode(ch)[0])
        assert c.settled() == settled
    assert c.done and c.text == "a\nb"


def test_padded_vocabulary_ids_decode_as_replacement_characters():
    bpe = gpt2_bpe()
    ids = bpe.encode("Hello world")
    assert decode(bpe, ids[:1] + [50300] + ids[1:]) == "Hello\ufffd world"


# ---------------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("args, words", [
    (["--temperature=-1"], "--temperature=-1 is out of range: use a number from 0"),
    (["--top_k=0"], "top_k must be >= 1"),
    (["--top_p=0"], "top_p must be in"),
    (["--top_p=1.5"], "top_p must be in"),
    (["--max_new_tokens=-1"], "--max_new_tokens=-1 is out of range: use a number from 0"),
    (["--num_samples=0"], "num_samples must be >= 1"),
    (["--checkpoint=oldest"], "latest or best"),
    (["--dtype=int8"], "dtype must be"),
    (["--stop="], "stop must not be empty"),
    (["--temprature=1"], "did you mean 'temperature'"),
    (["--stop=eot"], "no end-of-text token"),
    (["--start=héllo"], "cannot be encoded"),
    (["--start="], "prompt is empty"),
    (["--start=FILE:/no/such/prompt.txt"], "no such file"),
    (["--start=-"], "--start=- reads standard input, but it is closed: pipe the text in"),  # sys.stdin: None below
    (["--checkpoint=best", "--out_dir=/no/such/dir"], "does not exist"),
    (["--out_file=/no/such/dir/samples.txt"], "does not exist"),
])
def test_bad_settings_exit_with_one_line(char_run, args, words, monkeypatch):
    monkeypatch.setattr(sys, "stdin", None)  # as Python sets it when the shell closed it: python sample.py <&-
    with pytest.raises(SystemExit) as e:
        main([f"--out_dir={char_run}", "--max_new_tokens=3", *args])
    message = str(e.value.code)
    assert words in message and "\n" not in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_exits_with_one_line(char_run):
    with pytest.raises(SystemExit, match="no CUDA GPU"):
        main([f"--out_dir={char_run}", "--device=cuda"])


def test_damaged_weights_exit_with_one_line(char_run, tmp_path):
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for name in ("config.json", "state.pt"):
        (damaged / name).write_bytes((char_run / "latest" / name).read_bytes())
    weights = (char_run / "latest" / "model.safetensors").read_bytes()
    (damaged / "model.safetensors").write_bytes(weights[:len(weights) // 2])
    with pytest.raises(SystemExit, match="damaged") as e:
        main([f"--init_from={damaged}", "--max_new_tokens=3"])
    assert "\n" not in str(e.value.code)


def test_command_line_error_has_no_traceback(char_run):
    result = subprocess.run([sys.executable, str(REPO / "sample.py"), f"--out_dir={char_run}", "--top_p=2"],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "top_p must be in (0, 1] (or None for no limit), got 2.0"


# ---------------------------------------------------------------------------------------------------------- GPT-2


def test_sampling_from_a_hugging_face_gpt2_folder_matches_transformers(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(config).eval()
    hf.save_pretrained(tmp_path / "gpt2-tiny", safe_serialization=True)

    bpe = gpt2_bpe()
    prompt = "The quick brown fox"
    out, _ = run(capsys, f"--init_from={tmp_path / 'gpt2-tiny'}", f"--start={prompt}", "--num_samples=1",
                 "--max_new_tokens=15", "--temperature=0")
    ids = torch.tensor([bpe.encode(prompt)])
    with torch.no_grad():
        hf_ids = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=15, min_new_tokens=15,
                             do_sample=False, pad_token_id=0)
    assert out == f"{prompt}{bpe.decode(hf_ids[0, ids.size(1):].tolist())}\n{SEPARATOR}\n"


# ---------------------------------------------------------------------------------------------------------- compile


def test_static_cache_path_gives_generate_tokens():
    """The fixed-shape path (a StaticKVCache + forward_static) in eager mode, past block_size, cache reused."""
    model = tiny_model(vocab_size=len(CHARS))
    idx = torch.randint(0, len(CHARS), (3, 5))
    cache = sample.StaticKVCache(model, 3)
    for kwargs in (dict(temperature=0), dict(temperature=1.0, top_k=10), dict(temperature=0.9, top_p=0.8)):
        expected = model.generate(idx, 50, generator=torch.Generator().manual_seed(1), **kwargs)
        new = model.generate_stream(idx, 50, generator=torch.Generator().manual_seed(1),
                                    step=sample.static_step(model, cache), cache=cache, **kwargs)
        assert torch.equal(torch.cat([idx, *new], dim=1), expected)


def compile_with_aot_eager(monkeypatch) -> list:
    """Make sample.py compile its decode step with aot_eager (functionalized like inductor's input, but no C++ to
    build); returns the list of graphs captured, which grows by one per (re)compilation."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    monkeypatch.setitem(sample._compiled, "default", torch.compile(sample.forward_static, backend=counting_backend))
    return graphs


def test_compiled_step_is_captured_once_and_gives_generate_tokens(monkeypatch):
    """torch.compile's capture of the decode step (aot_eager: functionalized like inductor's input, but no C++ to
    build): one graph for every step and for a second call, which reuses the static cache; generate()'s tokens."""
    graphs = compile_with_aot_eager(monkeypatch)
    try:
        model = tiny_model(vocab_size=len(CHARS))
        idx = torch.randint(0, len(CHARS), (2, 5))
        for kwargs in (dict(temperature=0), dict(temperature=1.0, top_k=10)):
            expected = model.generate(idx, 45, generator=torch.Generator().manual_seed(2), **kwargs)
            assert torch.equal(compiled_generate(model, idx, 45, generator=torch.Generator().manual_seed(2),
                                                 **kwargs), expected)
        assert len(graphs) == 1
    finally:
        torch._dynamo.reset()


def test_compiled_step_gives_each_batch_size_a_fixed_shape_graph(monkeypatch):
    """sample.py compiles with dynamic=False: a second batch size is captured again with fixed shapes, as CUDA
    graphs need (torch.compile's default makes the batch dimension symbolic on the second size)."""
    symbolic = []  # per captured graph: whether any of its inputs has a symbolic size

    def recording_backend(gm, example_inputs):
        values = [n.meta.get("example_value") for n in gm.graph.nodes if n.op == "placeholder"]
        sizes = [d for v in values for d in (v.shape if isinstance(v, torch.Tensor) else [v])]
        symbolic.append(any(isinstance(d, torch.SymInt) for d in sizes))
        return gm.forward

    real_compile = torch.compile
    # sample.py's own arguments, with a backend that builds nothing (a mode needs inductor, so it is dropped)
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None, **kwargs: real_compile(fn, backend=recording_backend,
                                                                                      **kwargs))
    monkeypatch.setattr(sample, "_compiled", {})
    torch._dynamo.reset()
    try:
        model = tiny_model(vocab_size=len(CHARS))
        for batch in (2, 3):
            idx = torch.randint(0, len(CHARS), (batch, 5))
            assert torch.equal(compiled_generate(model, idx, 6, temperature=0), model.generate(idx, 6, temperature=0))
    finally:
        torch._dynamo.reset()
    assert symbolic == [False, False]


def test_cuda_graphs_are_counted_on_cuda_only():
    assert sample.cuda_graphs_recorded(torch.device("cpu")) == 0  # a CPU never records one


def test_compiled_generate_after_the_model_is_cast_to_bfloat16(monkeypatch):
    """The static cache follows the model's dtype (a cache kept from its fp32 use would be fed bf16 keys), and the
    one compiled function is captured again for the bf16 weights (aot_eager: no C++ to build)."""
    graphs = compile_with_aot_eager(monkeypatch)
    try:
        model = tiny_model(vocab_size=len(CHARS))
        idx = torch.randint(0, len(CHARS), (2, 5))
        assert torch.equal(compiled_generate(model, idx, 8, temperature=0), model.generate(idx, 8, temperature=0))
        model.to(torch.bfloat16)
        out = compiled_generate(model, idx, 8, temperature=0)
        # the same fixed-shape decoding, uncompiled, on a new bf16 cache: bf16 rounds like it, not like generate()
        cache = sample.StaticKVCache(model, 2)
        eager = model.generate_stream(idx, 8, temperature=0, step=sample.static_step(model, cache), cache=cache)
        assert torch.equal(out, torch.cat([idx, *eager], dim=1))
        assert len(graphs) == 2
    finally:
        torch._dynamo.reset()


@pytest.mark.skipif(not os.environ.get("SMALLGPT_SLOW_TESTS"),
                    reason="compiles with inductor (~40 s on 2 CPU cores): set SMALLGPT_SLOW_TESTS=1")
def test_compiled_decoding_gives_generate_tokens(char_run, capsys):
    model = tiny_model(vocab_size=len(CHARS))
    idx = torch.randint(0, len(CHARS), (2, 5))
    for kwargs in (dict(temperature=0), dict(temperature=1.0, top_k=10)):  # twice: the cache is reused
        expected = model.generate(idx, 45, generator=torch.Generator().manual_seed(2), **kwargs)
        assert torch.equal(compiled_generate(model, idx, 45, generator=torch.Generator().manual_seed(2), **kwargs),
                           expected)
    args = [f"--out_dir={char_run}", "--num_samples=2", "--max_new_tokens=40", "--stop=xy"]
    assert run(capsys, *args, "--compile=true")[0] == run(capsys, *args)[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_compiled_generate_gives_generate_tokens(monkeypatch):
    """sample.py --compile on a GPU: inductor, CUDA graphs (mode="reduce-overhead") and a CUDA generator. In fp32
    the tokens are generate()'s, greedy and sampled; in bf16 the fixed-shape attention rounds differently and may
    pick another token where two nearly tie, so most tokens must agree, not all."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # bench.main turns TF32 on for the process
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch._dynamo.reset()
    try:
        model = tiny_model(vocab_size=len(CHARS)).cuda()
        idx = torch.randint(0, len(CHARS), (8, 5), generator=torch.Generator().manual_seed(0)).cuda()
        for dtype in (torch.float32, torch.bfloat16):
            model.to(dtype)
            for kwargs in (dict(temperature=0), dict(temperature=1.0, top_k=10)):  # the second reuses the cache
                expected = model.generate(idx, 45, generator=torch.Generator("cuda").manual_seed(2), **kwargs)
                out = compiled_generate(model, idx, 45, generator=torch.Generator("cuda").manual_seed(2), **kwargs)
                assert out.device == expected.device and out.shape == expected.shape == (8, 50)
                if dtype == torch.float32:
                    assert torch.equal(out, expected), kwargs
                else:
                    agreement = (out[:, 5:] == expected[:, 5:]).float().mean().item()
                    assert agreement >= 0.9, (kwargs, agreement)
    finally:
        torch._dynamo.reset()


def test_greedy_with_several_samples_warns_that_they_are_identical(char_run, capsys):
    out, err = run(capsys, f"--out_dir={char_run}", "--temperature=0", "--num_samples=2", "--max_new_tokens=5")
    first, second = out.split(f"\n{SEPARATOR}\n")[:2]
    assert first == second
    assert "warning: temperature=0 is greedy, so the 2 samples will be identical" in err
    _, err = run(capsys, f"--out_dir={char_run}", "--temperature=0", "--num_samples=1", "--max_new_tokens=5")
    assert "warning" not in err


def test_compile_without_a_cpp_compiler_is_one_line(char_run, monkeypatch, tmp_path):
    """On a CPU inductor builds C++: with no compiler, sample.py's and bench.py's --compile (and train.py's, through
    the same check) stop in one line before any work; inductor's own report is a 100-line traceback."""
    import bench
    from torch._inductor import cpp_builder

    import config

    def no_compiler() -> str:
        raise RuntimeError("No working C++ compiler found in torch._inductor.config.cpp.cxx: (None, 'g++')")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    for call in (lambda: sample.main([f"--out_dir={char_run}", "--compile=true", "--device=cpu"]),
                 lambda: bench.main(["--model=tiny", "--what=decode", "--compile=true", "--device=cpu",
                                     f"--out={tmp_path / 'r.jsonl'}"]),
                 lambda: config.check_compiler(torch.device("cpu"))):
        with pytest.raises(SystemExit) as e:
            call()
        assert "install g++" in str(e.value.code) and "\n" not in str(e.value.code)
    config.check_compiler(torch.device("cuda"))  # a GPU's kernels are Triton's: nothing to check here


def test_a_new_static_cache_is_the_one_a_frozen_step_writes():
    """Under inductor's freezing (the int8 step's setting) dynamo makes static-address inputs graph constants: on a
    CPU the static cache is not marked so, or a second cache of the same shape would be ignored for the first's."""
    import torch._inductor.config as inductor_config

    from model import KVCache

    model = tiny_model().eval()
    torch._dynamo.reset()
    compiled = torch.compile(sample.forward_static, backend=lambda gm, example_inputs: gm.forward, dynamic=False)
    try:
        with inductor_config.patch({"freezing": True}), torch.no_grad():
            for start in (1, 5):  # two caches of one shape, in turn
                cache, eager = sample.StaticKVCache(model, 1, 16), KVCache.for_model(model, 1)
                step = sample.static_step(model, cache, lambda idx, c: compiled(model, idx, c))
                prompt = torch.tensor([[start, start + 1, start + 2]])
                torch.testing.assert_close(step(prompt), model(prompt, kv_cache=eager)[0])
                for t in range(start, start + 4):
                    tok = torch.tensor([[t]])
                    torch.testing.assert_close(step(tok), model(tok, kv_cache=eager)[0])
    finally:
        torch._dynamo.reset()
