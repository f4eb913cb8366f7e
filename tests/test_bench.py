"""bench.py: one tiny run of every measurement writes well-formed results (speed itself is never asserted)."""

import json

import pytest

import bench

TINY = ["--model=tiny", "--block_size=32", "--batch_size=2", "--vocab_size=128", "--train_steps=2", "--repeats=2",
        "--warmup=1", "--decode_tokens=3", "--prompt_len=4", "--decode_batch=1,2"]


def test_bench_writes_one_json_line_per_measurement(tmp_path, capsys):
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
    assert "tokens_per_sec" in capsys.readouterr().out  # the table


def test_bench_reads_a_training_config(tmp_path):
    toml = tmp_path / "small.toml"
    toml.write_text("n_layer = 1\nn_head = 2\nn_embd = 16\nblock_size = 8\nbatch_size = 3\n")
    gpt, batch = bench.model_config(bench.BenchConfig(model=str(toml), vocab_size=40))
    assert (gpt.n_layer, gpt.n_head, gpt.n_embd, gpt.block_size, gpt.vocab_size, batch) == (1, 2, 16, 8, 40, 3)


@pytest.mark.parametrize("arg", ["--what=fly", "--compile=maybe", "--repeats=0", "--model=gpt5"])
def test_bench_rejects_bad_settings(arg, tmp_path):
    with pytest.raises(SystemExit):
        bench.main(TINY + [arg, f"--out={tmp_path / 'r.jsonl'}"])
