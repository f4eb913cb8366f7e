"""bench.py: one tiny run of every measurement writes well-formed results (speed itself is never asserted)."""

import json
import warnings

import pytest
import torch

import bench
import config
from tokens import padded_vocab_size

TINY = ["--model=tiny", "--block_size=32", "--batch_size=2", "--vocab_size=128", "--train_steps=2", "--repeats=2",
        "--warmup=1", "--decode_tokens=3", "--prompt_len=4", "--decode_batch=1,2", "--device=cpu"]


def test_bench_writes_one_json_line_per_measurement(tmp_path, capsys):
    pytest.importorskip("transformers")  # --baselines=true times transformers' generate
    out = tmp_path / "results.jsonl"
    results = bench.main(TINY + [f"--out={out}", "--baselines=true", "--peak_flops=1e12"])
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines == results
    assert [(r["what"], r.get("method"), r["batch_size"]) for r in lines] == [
        ("train", None, 2), ("decode", "kv-cache", 1), ("decode", "kv-cache", 2),
        ("decode", "recompute (nanoGPT)", 1), ("decode", "transformers", 1)]
    train = lines[0]
    assert train["seq_len"] == 32 and train["tokens_per_sec"] > 0 and 0 < train["mfu"] < 1
    assert all(r["device"] == "cpu" and r["torch"] and r["date"] for r in lines)
    # the CPU knows only the process's peak (ru_maxrss): the train row, measured first, has it; decode rows none
    assert train["peak_memory_mb"] > 0 and all(r["peak_memory_mb"] is None for r in lines[1:])
    assert "tokens_per_sec" in capsys.readouterr().out  # the table


def test_rows_are_written_as_they_are_measured(tmp_path, monkeypatch):
    """A run stopped part-way (a timeout, an error) keeps the rows measured before it on disk."""
    real = bench.bench_decode

    def failing_at_batch_2(cfg, gpt, batch, *args):
        if batch == 2:
            raise RuntimeError("stopped here")
        return real(cfg, gpt, batch, *args)

    monkeypatch.setattr(bench, "bench_decode", failing_at_batch_2)
    out = tmp_path / "r.jsonl"
    with pytest.raises(RuntimeError):
        bench.main(TINY + [f"--out={out}"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["what"], r["batch_size"]) for r in rows] == [("train", 2), ("decode", 1)]


def test_decode_rows_say_whether_a_cuda_graph_ran(tmp_path, monkeypatch):
    """cuda_graphs: False for eager decoding, and for compiled decoding on a CPU (aot_eager: no C++ to build)."""
    import sample

    torch._dynamo.reset()
    monkeypatch.setitem(sample._compiled, "default",
                        torch.compile(sample.forward_static, backend="aot_eager", dynamic=False))
    try:
        rows = bench.main(TINY + ["--what=decode", "--compile=both", "--decode_batch=1",
                                  f"--out={tmp_path / 'r.jsonl'}"])
    finally:
        torch._dynamo.reset()
    assert [(r["compile"], r["cuda_graphs"]) for r in rows] == [(False, False), (True, False)]
    assert all(r["warmup_s"] >= 0 for r in rows)


def test_bench_reads_a_training_config(tmp_path):
    toml = tmp_path / "small.toml"
    toml.write_text("n_layer = 1\nn_head = 2\nn_embd = 16\nblock_size = 8\nbatch_size = 3\n")
    gpt, batch = bench.model_config(bench.BenchConfig(model=str(toml), vocab_size=40))
    assert (gpt.n_layer, gpt.n_head, gpt.n_embd, gpt.block_size, gpt.vocab_size, batch) == (1, 2, 16, 8, 40, 3)


@pytest.mark.parametrize("kind, vocab, model_vocab", [("char", 65, 65), ("tiktoken", 50257, 50304),
                                                     ("tiktoken", 100277, 100288)])  # cl100k_base
def test_bench_measures_the_vocabulary_train_builds(tmp_path, kind, vocab, model_vocab):
    data = tmp_path / "data"
    data.mkdir()
    (data / "meta.json").write_text(json.dumps({"tokenizer": {"kind": kind}, "vocab_size": vocab}))
    toml = tmp_path / "small.toml"
    toml.write_text(f"n_layer = 1\nn_head = 2\nn_embd = 16\nblock_size = 8\ndataset = '{data}'\n")
    gpt, _ = bench.model_config(bench.BenchConfig(model=str(toml)))
    assert gpt.vocab_size == model_vocab == padded_vocab_size(vocab, char=kind == "char")  # train.py's one rule


@pytest.mark.parametrize("arg, words", [
    ("--what=fly", "--what takes train, decode, serve and/or long, got ['fly']"),
    ("--compile=maybe", "--compile takes false, true or both, got 'maybe'"),
    ("--repeats=0", "--repeats, --decode_tokens and --prompt_len must be at least 1"),
    ("--model=gpt5", "--model=gpt5: give one of tiny, gpt2"),
])
def test_bench_rejects_bad_settings(arg, words, tmp_path):
    with pytest.raises(SystemExit) as e:
        bench.main(TINY + [arg, f"--out={tmp_path / 'r.jsonl'}"])
    assert words in str(e.value.code) and "\n" not in str(e.value.code)


@pytest.mark.parametrize("line, words", [
    ("n_embd = 1000000000001", "n_embd = 1000000000001 is out of range: use a number from 1 to 65536"),
    ("batch_size = 1000000000000000000", "batch_size = 1000000000000000000 is out of range"),
    ('n_embd = "wide"', "n_embd expects an integer, got 'wide'"),
])
def test_a_training_config_is_read_as_train_py_reads_it(line, words, tmp_path):
    toml = tmp_path / "bad.toml"
    toml.write_text(f"n_layer = 1\n{line}\n")
    with pytest.raises(SystemExit) as e:
        bench.main(TINY + [f"--model={toml}", f"--out={tmp_path / 'r.jsonl'}"])
    assert str(e.value.code).startswith(f"{toml}: {words}") and "\n" not in str(e.value.code)


def test_baselines_of_a_model_without_biases_exit_with_one_line(tmp_path):
    toml = tmp_path / "nobias.toml"
    toml.write_text("n_layer = 1\nn_head = 2\nn_embd = 16\nblock_size = 8\nbias = false\n")
    with pytest.raises(SystemExit) as e:
        bench.main(TINY + [f"--model={toml}", "--what=decode", "--baselines=true", f"--out={tmp_path / 'r.jsonl'}"])
    assert str(e.value.code) == "--baselines needs a model with biases (Hugging Face's GPT-2 has them)"
    assert not (tmp_path / "r.jsonl").exists()  # said before measuring anything


def test_numbered_cuda_devices_count_as_cuda(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(("synchronize", device)))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: calls.append(("peak", device)) or 2**21)
    config.synchronize("cuda:1")
    assert bench.peak_memory_mb("cuda:1") == 2.0
    assert calls == [("synchronize", "cuda:1"), ("peak", "cuda:1")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # without CUDA, autocast warns that it disables itself
        assert config.autocast_context("cuda:1", torch.bfloat16).device == "cuda"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_decode_rows_report_their_own_peak_memory(tmp_path):
    """After a training run the decode rows' peaks are the decoding's (train's activations and Adam states are far
    larger), as in a decode-only run; cuda:0 is a CUDA device for autocast and synchronisation too."""
    args = TINY + ["--device=cuda:0", "--dtype=bfloat16", "--batch_size=64", "--block_size=256", "--decode_batch=1",
                   f"--out={tmp_path / 'r.jsonl'}"]
    train, decode = bench.main(args + ["--what=train,decode"])
    (alone,) = bench.main(args + ["--what=decode"])
    assert train["device"] == "cuda:0" and train["tokens_per_sec"] > 0
    assert 0 < decode["peak_memory_mb"] < train["peak_memory_mb"]
    assert decode["peak_memory_mb"] == pytest.approx(alone["peak_memory_mb"], rel=0.1)


def test_default_model_fits_the_device(tmp_path, monkeypatch, capsys):
    """Without --model a CPU measures the quick start's model (GPT-2 124M would take ~40 minutes on 2 cores)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    results = bench.main(["--device=cpu", "--what=train", "--train_steps=1", "--repeats=1", "--warmup=0",
                          f"--out={tmp_path / 'r.jsonl'}"])
    assert results[0]["model"].endswith(bench.CPU_MODEL)
    assert (results[0]["batch_size"], results[0]["seq_len"]) == (12, 64)
    assert "measuring train: batch 12 x 64" in capsys.readouterr().out


def test_serve_rows_count_every_client_token(tmp_path, capsys):
    pytest.importorskip("uvicorn", reason="--what=serve needs the serve extra")
    rows = bench.main(TINY + ["--what=serve", "--serve_clients=1,3", f"--out={tmp_path / 'r.jsonl'}"])
    assert [(r["what"], r["clients"], r["tokens"]) for r in rows] == [("serve", 1, 3), ("serve", 3, 9)]
    assert all(r["tokens_per_sec"] > 0 and r["ttft_ms_max"] >= r["ttft_ms"] >= 0 for r in rows)
    assert "ttft_ms" in capsys.readouterr().out


def test_serve_rounds_whose_clients_get_no_tokens_stop_in_one_line(tmp_path, monkeypatch):
    pytest.importorskip("uvicorn", reason="--what=serve needs the serve extra")
    import engine

    def fail(self):
        raise RuntimeError("no step today")

    monkeypatch.setattr(engine.Scheduler, "_decode", fail)
    with pytest.raises(SystemExit, match=r"--what=serve: 1 of 1 clients got no tokens, e\.g\. .*no step today"):
        bench.main(TINY + ["--what=serve", "--serve_clients=1", f"--out={tmp_path / 'r.jsonl'}"])


def test_long_generation_rows(tmp_path):
    """--what=long: three methods at 1x, 4x and 16x block_size, each ratio against its own 1x."""
    rows = bench.main(TINY + ["--what=long", "--long_window=8", f"--out={tmp_path / 'r.jsonl'}"])
    assert [(r["method"], r["at"]) for r in rows] == [
        (m, x) for m in ("window (rolling cache)", "full (cache, then crop)", "full (nanoGPT loop)")
        for x in ("1x", "4x", "16x")]
    assert all(r["ratio"] > 0 and r["tokens_per_sec"] > 0 for r in rows) and rows[0]["window"] == 8


def test_long_generation_refuses_a_block_too_short_to_time(tmp_path):
    with pytest.raises(SystemExit, match=r"needs block_size >= 8 \(got 4\)"):  # its medians would be empty
        bench.main(TINY + ["--what=long", "--block_size=4", "--prompt_len=1", f"--out={tmp_path / 'r.jsonl'}"])
