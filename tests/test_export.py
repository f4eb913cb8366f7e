"""Use a checkpoint elsewhere: the tokenizer files every checkpoint holds give transformers our ids and our greedy
text; export.py adds them to older folders and writes GGUF files that read back as the same model, or refuses."""

import dataclasses
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import export
from checkpoint import load_model, save_checkpoint
from conftest import CHARS, TINY, exit_message, gpt2_bpe
from hf import load_hf_state_dict, tokenizer_files
from model import GPT, GPTConfig
from test_hf import other_values
from test_switches import NANOCHAT, randomize
from tokens import Tokenizer

BPE_TINY = TINY | {"vocab_size": 50304}  # GPT-2's vocabulary, padded as train.py pads it
TOKENIZER_FILES = {"tiktoken": {"vocab.json", "merges.txt", "tokenizer_config.json"},
                   "char": {"tokenizer.json", "tokenizer_config.json"}}
GPT2_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"


def saved(tmp_path: Path, kind: str, seed: int = 0, **overrides: object) -> Path:
    """An out_dir holding one checkpoint of a tiny randomized model of `kind` ("tiktoken" or "char")."""
    tokenizer = gpt2_bpe() if kind == "tiktoken" else Tokenizer.char(CHARS)
    torch.manual_seed(seed)
    model = randomize(GPT(GPTConfig(**(BPE_TINY if kind == "tiktoken" else TINY | {"vocab_size": len(CHARS)})
                                    | overrides)).eval(), seed)
    with torch.no_grad():  # a trained model gives the padding ids no weight; an untrained one would pick them
        model.transformer.wte.weight[tokenizer.vocab_size:] = 0
    out_dir = tmp_path / f"{kind}-{seed}"
    save_checkpoint(out_dir, model, {"tokenizer": tokenizer.to_meta()}, {}, iter_num=1, is_best=False)
    return out_dir


# ---------------------------------------------------------------------------------------------- tokenizer files


def test_bpe_files_are_byte_for_byte_the_ones_gpt2_ships():
    gpt2_bpe()
    cache = Path(os.environ.get("TIKTOKEN_CACHE_DIR", "/nonexistent"))
    originals = {name: cache / hashlib.sha1((GPT2_URL + source).encode()).hexdigest()  # tiktoken's cache naming
                 for name, source in (("vocab.json", "encoder.json"), ("merges.txt", "vocab.bpe"))}
    if not all(p.is_file() for p in originals.values()):
        pytest.skip("the cached encoder.json and vocab.bpe are not in TIKTOKEN_CACHE_DIR")
    files = tokenizer_files(Tokenizer.tiktoken("gpt2"), block_size=1024)
    for name, path in originals.items():
        assert files[name].encode("utf-8") == path.read_bytes(), name


@pytest.mark.parametrize("kind", ["tiktoken", "char"])
def test_autotokenizer_gives_our_ids_and_text_over_tiny_shakespeare(kind, tmp_path, shakespeare_path):
    transformers = pytest.importorskip("transformers")
    folder = saved(tmp_path, kind) / "latest"
    assert TOKENIZER_FILES[kind] <= {p.name for p in folder.iterdir()}
    _, ours, _ = load_model(folder)
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    text = shakespeare_path.read_text(encoding="utf-8")
    ids = theirs.encode(text, add_special_tokens=False)
    assert ids == ours.encode(text)
    assert theirs.decode(ids) == text
    assert theirs.model_max_length == TINY["block_size"]
    assert theirs.eos_token_id == ours.eot_token  # 50256, or None for a char vocabulary
    if kind == "tiktoken":  # written in a text, end-of-text is text, as in tokens.py: no document forges a boundary
        assert theirs.encode("a<|endoftext|>b") == ours.encode("a<|endoftext|>b")


@pytest.mark.parametrize("kind", ["tiktoken", "char"])
def test_transformers_pipeline_greedy_text_is_sample_pys(kind, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    import sample

    out_dir = saved(tmp_path, kind, seed=3)
    prompt, n = "ROMEO:\nAy", 24
    sample.main([f"--out_dir={out_dir}", f"--start={prompt}", "--temperature=0", "--num_samples=1",
                 f"--max_new_tokens={n}", "--device=cpu", "--stream=false"])
    ours = capsys.readouterr().out.removesuffix(sample.SEPARATOR + "\n").removesuffix("\n")
    pipe = transformers.pipeline("text-generation", model=str(out_dir / "latest"), device="cpu")
    theirs = pipe(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)[0]["generated_text"]
    assert len(ours) > len(prompt) and theirs == ours


def test_export_hf_adds_the_missing_files_to_an_older_folder_and_never_its_weights(tmp_path):
    transformers = pytest.importorskip("transformers")
    folder = saved(tmp_path, "char") / "latest"
    expected = {name: (folder / name).read_text() for name in TOKENIZER_FILES["char"]}
    for name in expected:  # as saved by an older version
        (folder / name).unlink()
    weights = folder.resolve() / "model.safetensors"
    before = weights.stat()
    export.main([f"--out_dir={folder.parent}", "--format=hf"])
    assert {name: (folder / name).read_text() for name in expected} == expected
    after = weights.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert export.add_files(folder.resolve(), tokenizer_files(Tokenizer.char(CHARS), TINY["block_size"])) == []
    assert not [p for p in folder.resolve().iterdir() if p.name.startswith(".tmp")]

    copy = tmp_path / "exported"
    export.main([f"--out_dir={folder.parent}", "--format=hf", f"--output={copy}"])
    assert {p.name for p in copy.iterdir()} == {"config.json", "model.safetensors"} | TOKENIZER_FILES["char"]
    assert (copy / "model.safetensors").read_bytes() == weights.read_bytes()
    assert transformers.AutoTokenizer.from_pretrained(copy).encode("ROMEO") == Tokenizer.char(CHARS).encode("ROMEO")
    assert "already a folder" in exit_message(export.main, [f"--out_dir={folder.parent}", "--format=hf",
                                                            f"--output={copy}"])


def test_a_tokenizer_transformers_cannot_reproduce_saves_without_files_and_says_so_once(tmp_path, monkeypatch,
                                                                                       capsys):
    import checkpoint

    def refuse(tokenizer: Tokenizer, block_size: int) -> dict[str, str]:
        raise ValueError("tiktoken encoding 'cl100k_base' does not split text as GPT-2 does")

    monkeypatch.setattr(checkpoint, "tokenizer_files", refuse)
    model = GPT(GPTConfig(**TINY | {"vocab_size": len(CHARS)}))
    for step in (1, 2):
        folder = save_checkpoint(tmp_path, model, {"tokenizer": Tokenizer.char(CHARS).to_meta()}, {}, iter_num=step,
                                 is_best=False)
    assert {p.name for p in folder.iterdir()} == set(checkpoint.FILES)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "export.py" in line]
    assert len(warnings) == 1 and "cl100k_base" in warnings[0] and "--format=hf" in warnings[0]


def test_bad_export_requests_are_one_line_each(tmp_path):
    out_dir = saved(tmp_path, "char")
    assert "--format=hf" in exit_message(export.main, [f"--out_dir={out_dir}", "--format=onnx"])
    assert "--output" in exit_message(export.main, [f"--out_dir={out_dir}", "--format=gguf"])
    assert "gguf_type" in exit_message(export.main, [f"--out_dir={out_dir}", "--format=gguf", "--output=x.gguf",
                                                     "--gguf_type=q4_0"])
    assert "does not exist" in exit_message(export.main, [f"--out_dir={tmp_path / 'none'}", "--format=hf"])


# ------------------------------------------------------------------------------------------------------------ GGUF


def gguf_model(reader) -> GPT:
    """A GPT with GPT-2's maths (what llama.cpp's gpt2 architecture computes) holding a GGUF's tensors, dequantized:
    the reference the file is checked against, with or without transformers."""
    gguf = pytest.importorskip("gguf")
    meta = {f.name: f.contents() for f in reader.fields.values() if f.name.startswith("gpt2.")}
    tensors = {t.name: torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
               for t in reader.tensors}
    return gpt2_holding(tensors, meta["gpt2.context_length"], meta["gpt2.attention.head_count"])


def gpt2_holding(tensors: dict[str, torch.Tensor], block_size: int, n_head: int) -> GPT:
    """A GPT with GPT-2's maths holding tensors named and laid out as in a GGUF (export.gguf_tensors)."""
    n_layer = 1 + max(int(name.split(".")[1]) for name in tensors if name.startswith("blk."))
    vocab_size, n_embd = tensors["token_embd.weight"].shape
    config = GPTConfig(block_size=block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=vocab_size,
                       tie_embeddings="output.weight" not in tensors)  # as llama.cpp: token_embd where none
    model = GPT(config).eval()
    weights = {}
    for ours, theirs in export.GGUF_NAMES.items():
        for i in range(config.n_layer):
            for part in ("weight", "bias"):
                if f"{theirs.format(i=i)}.{part}" in tensors:
                    w = tensors[f"{theirs.format(i=i)}.{part}"]
                    weights[f"{ours.format(i=i)}.{part}"] = w.t() if ours.startswith("h.") and w.dim() == 2 else w
    load_hf_state_dict(model, weights, source="the GGUF's tensors")
    return model


# (largest, mean) |logit| error allowed. The test model's logits span +-5 (std 0.9) and its attention is sharp, which
# amplifies rounding: measured 1.8e-2 / 9e-4 at f16 and 0.6 / 2.1e-2 at q8_0 (8-bit blocks of 32 values).
BOUNDS = {"f32": (1e-4, 1e-5), "f16": (1e-1, 5e-3), "q8_0": (1.0, 5e-2)}


def assert_close_logits(got: torch.Tensor, expected: torch.Tensor, gguf_type: str) -> None:
    error = (got - expected).abs()
    largest, mean = BOUNDS[gguf_type]
    assert error.max() < largest and error.mean() < mean, f"{gguf_type}: {error.max():.2e}, mean {error.mean():.2e}"


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory) -> tuple[GPT, dict[str, Path], dict]:
    """One tiny GPT-2-BPE checkpoint written as a GGUF of each type, and each file read by gguf.GGUFReader: reading
    a 50304-token vocabulary takes seconds, so once per module."""
    gguf = pytest.importorskip("gguf")
    tmp_path = tmp_path_factory.mktemp("gguf")
    out_dir = saved(tmp_path, "tiktoken")
    paths = {t: tmp_path / f"model-{t}.gguf" for t in export.GGUF_TYPES}
    for gguf_type, path in paths.items():
        export.main([f"--out_dir={out_dir}", "--format=gguf", f"--output={path}", f"--gguf_type={gguf_type}"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
    return load_model(out_dir)[0], paths, {t: gguf.GGUFReader(path) for t, path in paths.items()}


@pytest.mark.parametrize("gguf_type", export.GGUF_TYPES)
def test_gguf_reads_back_with_llama_cpps_names_types_and_tokenizer(gguf_type, gguf_files):
    gguf = pytest.importorskip("gguf")
    model, _, readers = gguf_files
    reader = readers[gguf_type]
    meta = {f.name: f.contents() for f in reader.fields.values()}
    c = model.config
    assert meta["general.architecture"] == "gpt2" and meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.pre"] == "gpt-2"
    assert (meta["gpt2.context_length"], meta["gpt2.embedding_length"], meta["gpt2.block_count"],
            meta["gpt2.attention.head_count"], meta["gpt2.feed_forward_length"]) == \
           (c.block_size, c.n_embd, c.n_layer, c.n_head, 4 * c.n_embd)
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == c.vocab_size == 50304
    assert tokens[50256] == "<|endoftext|>" and types[50256] == gguf.TokenType.CONTROL
    assert tokens[50257:] == [f"[PAD{i}]" for i in range(50257, 50304)]
    assert set(types[50257:]) == {gguf.TokenType.UNUSED} and types[198] == gguf.TokenType.NORMAL  # "\n"
    assert len(meta["tokenizer.ggml.merges"]) == 50000 and meta["tokenizer.ggml.merges"][0] == "Ġ t"
    assert meta["tokenizer.ggml.bos_token_id"] == meta["tokenizer.ggml.eos_token_id"] == 50256
    expected = {"blk.0.attn_qkv.weight": [c.n_embd, 3 * c.n_embd], "blk.0.ffn_down.weight": [4 * c.n_embd, c.n_embd],
                "token_embd.weight": [c.n_embd, c.vocab_size],
                "position_embd.weight": [c.n_embd, c.block_size], "blk.1.attn_norm.bias": [c.n_embd]}
    found = {t.name: t for t in reader.tensors}
    assert len(found) == 4 + 12 * c.n_layer  # embeddings, positions, final norm and its bias; 12 per block
    assert "output.weight" not in found  # a tied head: llama.cpp reuses token_embd
    matrix = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
              "q8_0": gguf.GGMLQuantizationType.Q8_0}[gguf_type]
    for name, shape in expected.items():  # ggml's shapes list the fastest-moving axis first
        assert list(found[name].shape) == shape, name
        vector_or_positions = len(shape) == 1 or name.startswith("position_embd")
        assert found[name].tensor_type == (gguf.GGMLQuantizationType.F32 if vector_or_positions else matrix), name
    idx = torch.randint(0, 50257, (2, TINY["block_size"]), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close_logits(gguf_model(reader)(idx)[0], model(idx)[0], gguf_type)


@pytest.mark.parametrize("gguf_type", export.GGUF_TYPES)
def test_transformers_gguf_loader_gives_our_logits(gguf_type, gguf_files):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers' GGUF loader needs it
    model, paths, _ = gguf_files
    path = paths[gguf_type]
    idx = torch.randint(0, 50257, (2, TINY["block_size"]), generator=torch.Generator().manual_seed(0))
    # transformers reads gpt2.context_length as n_ctx and leaves n_positions at GPT-2's 1024: say it
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                               n_positions=model.config.block_size).eval()
    with torch.no_grad():
        expected, got = model(idx)[0], theirs(idx).logits
    assert_close_logits(got, expected, gguf_type)


def test_a_gguf_is_written_only_when_llama_cpps_gpt2_computes_the_same_model(tmp_path):
    """Every field's other values: refused in one line naming the field (nothing written), or tensors that, with
    GPT-2's maths, give the same logits. Walks dataclasses.fields, so a switch added later is covered."""
    pytest.importorskip("gguf")
    gpt2_bpe()
    base = GPTConfig(**TINY)  # the tensors do not depend on the vocabulary's size: a small one is quicker
    idx = torch.randint(0, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    written = refused = 0
    for field in dataclasses.fields(GPTConfig):
        for config in other_values(base, field):
            if config.block_size < idx.size(1) or config.vocab_size < TINY["vocab_size"]:
                continue  # no room for the test's tokens
            torch.manual_seed(0)
            model = randomize(GPT(config).eval())
            path = tmp_path / "x.gguf"
            why = export.gguf_refusal(config, Tokenizer.tiktoken("gpt2"))
            if why is not None:
                assert field.name in why and "\n" not in why
                with pytest.raises(SystemExit):
                    export.write_gguf(model, Tokenizer.tiktoken("gpt2"), path, "f32")
                assert not list(tmp_path.iterdir()), "nothing is written for a refused model"
                refused += 1
                continue
            # the tensors write_gguf writes (the file itself: the tests above): a file per variant takes minutes
            tensors = export.gguf_tensors(model)
            with torch.no_grad():
                torch.testing.assert_close(gpt2_holding(tensors, config.block_size, config.n_head)(idx)[0],
                                           model(idx)[0], atol=1e-5, rtol=1e-5,
                                           msg=f"{field.name}={getattr(config, field.name)!r}")
            written += 1
    assert written and refused


def test_gguf_refusals_name_the_reason_and_write_nothing(tmp_path):
    pytest.importorskip("gguf")
    out = tmp_path / "out.gguf"
    char_dir = saved(tmp_path, "char")
    assert "char-level" in exit_message(export.main, [f"--out_dir={char_dir}", "--format=gguf", f"--output={out}"])
    nanochat_dir = saved(tmp_path, "tiktoken", **NANOCHAT)
    message = exit_message(export.main, [f"--out_dir={nanochat_dir}", "--format=gguf", f"--output={out}"])
    for switch in ("pos_embedding", "norm", "qk_norm", "mlp", "n_kv_head", "logit_softcap"):
        assert f"{switch}=" in message
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_llama_cpp_greedy_tokens_are_sample_pys(tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    out_dir, path = saved(tmp_path, "tiktoken", n_embd=64, block_size=64), tmp_path / "model.gguf"
    export.main([f"--out_dir={out_dir}", "--format=gguf", f"--output={path}", "--gguf_type=f32"])
    model = load_model(out_dir)[0]
    prompt = Tokenizer.tiktoken("gpt2").encode("ROMEO: I")
    steps = model.generate_stream(torch.tensor([prompt]), 32, 0.0, None, None, torch.Generator())  # as sample.py
    ours = [int(token) for token in steps]
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, verbose=False, seed=0)
    theirs = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        theirs.append(token)
        if len(theirs) == len(ours):
            break
    assert theirs == ours
