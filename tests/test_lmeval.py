"""lm-evaluation-harness's two ways in: serve.py as `--model local-completions` (echo with logprobs, token-id prompts,
the remote tokenizer's endpoints; shapes pinned here as lm-eval 0.4.13 sends and reads them), and eval.py's
`--docs=lm_eval` (its rolling windows, prefix and metrics) against the model computed directly. Where lm-eval is
installed, it scores two task files through the server and, as `--model hf`, from the checkpoint folder as saved
(char-level and GPT-2 BPE), and its figures are compared with each other's and eval.py's."""

import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("starlette", reason="serve.py's extra is not installed: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="serve.py's extra is not installed: pip install -e '.[serve]'")

import eval as evaluate  # noqa: E402
from checkpoint import load_model  # noqa: E402
from hf import tokenizer_files  # noqa: E402
from sample import decode  # noqa: E402
from test_sample import bpe_run, char_run  # noqa: E402,F401 (fixtures)
from test_serve import request, serving, stream_events  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from lmeval_tasks import main as tasks_main, make_tasks, write_tasks  # noqa: E402

BLOCK = 32  # the tiny models' block_size
PREFILL_CHUNK = 16  # so that a full-context prompt is prefilled in chunks
DOCS = ["To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\nThe slings and "
        "arrows of outrageous fortune,\nOr to take arms against a sea of troubles", "ROMEO:\nBut, soft! what light?",
        "Now is the winter of our discontent\nMade glorious summer by this sun of York;\nAnd all the clouds that lour'd "
        "upon our house\nIn the deep bosom of the ocean buried.", "A"]
MC = [{"question": "To be, or not to", "choices": ["be", "go", "sing"], "label": 0},
      {"question": "ROMEO: But, soft! what light", "choices": ["through", "under"], "label": 1},
      {"question": "Now is the winter of our discontent made glorious summer by this sun", "choices": ["of York",
       "in June", "at noon", "by day"], "label": 0}]


@pytest.fixture(scope="module", params=["char", "bpe"])
def run(request) -> Path:
    """A checkpoint folder of the tiny char model, and of the tiny GPT-2 BPE model."""
    return request.getfixturevalue(f"{request.param}_run")


@pytest.fixture(scope="module")
def served(run):
    model, tokenizer, _ = load_model(run)
    with serving(model, tokenizer, prefill_chunk=PREFILL_CHUNK) as (port, _):
        yield port, model, tokenizer


def direct_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[i + 1] | ids[:i + 1]) for each i: one plain forward, (len(ids) - 1,)."""
    with torch.no_grad():
        logp = model(torch.tensor([ids[:-1]]))[0][0].float().log_softmax(-1)  # (T - 1, vocab)
    return logp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def lm_eval_payload(prompts: list[list[int]]) -> dict:
    """What lm-eval's local-completions sends for loglikelihood requests (openai_completions.py, _create_payload)."""
    return {"model": "tiny", "prompt": prompts, "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
            "echo": True}


def lm_eval_parse(answer: dict, ctxlens: list[int]) -> list[tuple[float, bool]]:
    """lm-eval's parse_logprobs: the continuation's log-probability and whether each of its tokens was the top one."""
    out = []
    for choice, ctxlen in zip(sorted(answer["choices"], key=lambda c: c["index"]), ctxlens):
        lp = choice["logprobs"]
        scored, top = lp["token_logprobs"][ctxlen:-1], lp["top_logprobs"][ctxlen:-1]
        out.append((sum(scored), all(t == max(alternatives.values()) for t, alternatives in zip(scored, top))))
    return out


# ---------------------------------------------------------------------------------------------------------- serve.py


def test_echo_logprobs_are_the_prompts_own_from_one_batched_prefill(served):
    port, model, tokenizer = served
    text = DOCS[0] + DOCS[2]
    ids = tokenizer.encode(text)
    prompts = [ids[:5], ids[40:52], ids[:BLOCK]]  # the last is longer than prefill_chunk: prefilled in chunks
    status, answer = request(port, "POST", "/v1/completions", lm_eval_payload(prompts))
    assert status == 200, answer
    for choice, prompt in zip(answer["choices"], prompts):
        lp = choice["logprobs"]
        assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(prompt) + 1
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        direct = direct_logprobs(model, prompt)
        assert torch.allclose(torch.tensor(lp["token_logprobs"][1:-1]), direct, atol=1e-5)
        with torch.no_grad():
            logp = model(torch.tensor([prompt]))[0][0].float().log_softmax(-1)  # (T, vocab)
        best = logp.max(-1)
        for i, alternatives in enumerate(lp["top_logprobs"][1:]):  # the generated token's too
            assert len(alternatives) == 1 and abs(max(alternatives.values()) - best.values[i].item()) < 1e-5
        assert abs(lp["token_logprobs"][-1] - best.values[-1].item()) < 1e-5  # temperature 0: the top token
        assert choice["text"] == decode(tokenizer, prompt) + lp["tokens"][-1]
        assert lp["tokens"][:-1] == [decode(tokenizer, [t]) for t in prompt]
        assert lp["text_offset"] == tokenizer.offsets(prompt) + [len(decode(tokenizer, prompt))]
        (ll, greedy), = lm_eval_parse({"choices": [{**choice, "index": 0}]}, [2])
        assert abs(ll - direct[1:].sum().item()) < 1e-4
        assert greedy == bool((logp[1:-1].argmax(-1) == torch.tensor(prompt[2:])).all())
    for i, prompt in enumerate(prompts):  # each as alone: batching changes nothing
        status, alone = request(port, "POST", "/v1/completions", lm_eval_payload([prompt]))
        assert alone["choices"][0]["logprobs"]["token_logprobs"] == pytest.approx(
            answer["choices"][i]["logprobs"]["token_logprobs"], abs=1e-5)


def test_echo_with_max_tokens_0_and_streamed(served):
    port, model, tokenizer = served
    ids = tokenizer.encode(DOCS[1])
    answer = request(port, "POST", "/v1/completions", {**lm_eval_payload(ids), "max_tokens": 0, "logprobs": 0})[1]
    choice, = answer["choices"]
    assert choice["text"] == DOCS[1] and choice["finish_reason"] == "length"
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(ids) and lp["top_logprobs"][1:] == [{}] * (len(ids) - 1)
    assert torch.allclose(torch.tensor(lp["token_logprobs"][1:]), direct_logprobs(model, ids), atol=1e-5)
    body = {**lm_eval_payload(ids), "max_tokens": 4, "logprobs": 2}
    whole = request(port, "POST", "/v1/completions", body)[1]["choices"][0]
    merged = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    text = ""
    for event in stream_events(port, **body)[:-1]:
        for c in event["choices"]:
            text += c["text"]
            for key in merged:
                merged[key] += c["logprobs"][key]
    assert text == whole["text"] and merged == whole["logprobs"]
    assert merged["text_offset"][len(ids)] == len(DOCS[1])  # generated tokens count from the prompt's start


def test_a_prompt_longer_than_the_context_with_echo_is_one_line_400(served):
    port, _, tokenizer = served
    status, body = request(port, "POST", "/v1/completions", lm_eval_payload([[1] * (BLOCK + 1)]))
    assert status == 400 and body["error"]["param"] == "prompt"
    assert f"max_length={BLOCK + 1}" in body["error"]["message"] and "\n" not in body["error"]["message"]
    assert request(port, "POST", "/v1/completions", {**lm_eval_payload([[1] * BLOCK])})[0] == 200


def test_tokenizer_endpoints_as_lm_evals_remote_tokenizer_reads_them(served):
    port, model, tokenizer = served
    status, info = request(port, "GET", "/tokenizer_info")
    assert status == 200 and "eos_token" in info and info["model_max_length"] == BLOCK
    prefix = tokenizer.prefix_token
    assert request(port, "POST", "/tokenize", {"prompt": info["bos_token"], "add_special_tokens": False})[1][
        "tokens"] == [prefix]
    if tokenizer.eot_token is None:  # a char model: its newline stands in for end-of-text, and nothing claims it
        assert info["eos_token"] is None and info["bos_token"] == "\n"
    else:
        assert info["eos_token"] == "<|endoftext|>" and prefix == tokenizer.eot_token
    text = DOCS[2]
    status, answer = request(port, "POST", "/tokenize", {"prompt": text, "add_special_tokens": False})
    assert status == 200 and answer["tokens"] == tokenizer.encode(text) and answer["count"] == len(answer["tokens"])
    assert request(port, "POST", "/detokenize", {"tokens": answer["tokens"]})[1] == {"prompt": text}
    assert request(port, "POST", "/tokenize", {"text": text})[0] == 400
    assert request(port, "POST", "/detokenize", {"tokens": [model.config.vocab_size]})[0] == 400
    lm_utils = pytest.importorskip("lm_eval.utils", reason="lm-eval is not installed")
    base = f"http://127.0.0.1:{port}/v1/completions"
    assert lm_utils.check_remote_tokenizer_support(base)
    remote = lm_utils.RemoteTokenizer(base)
    assert remote.encode(text) == tokenizer.encode(text) and remote.decode(remote.encode(text)) == text
    assert remote.eos_token_id == tokenizer.eot_token and remote.bos_token_id == prefix


# ---------------------------------------------------------------------------------------------------------- eval.py


def lm_eval_windows(ids: list[int], prefix: int, max_seq_len: int) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) of each rolling window: lm_eval.utils' where installed, else the same rule
    restated (get_rolling_token_windows with context_len 1, then make_disjoint_window)."""
    try:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
    except ImportError:
        out, done = [], min(max_seq_len, len(ids))
        out.append(([prefix], ids[:done]))
        while done < len(ids):
            end = min(done + max_seq_len, len(ids))
            out.append((ids[end - max_seq_len - 1:done], ids[done:end]))
            done = end
        return out
    return [make_disjoint_window(w) for w in get_rolling_token_windows(ids, prefix, max_seq_len, 1)]


@pytest.mark.parametrize("max_seq_len", [BLOCK, 7])
def test_score_documents_is_lm_evals_rolling_loglikelihood(run, max_seq_len):
    model, tokenizer, _ = load_model(run)
    expected = 0.0
    for doc in DOCS:
        for context, continuation in lm_eval_windows(tokenizer.encode(doc), tokenizer.prefix_token, max_seq_len):
            whole = context + continuation
            assert len(whole) - 1 <= max_seq_len
            expected += direct_logprobs(model, whole)[-len(continuation):].sum().item()
    got = evaluate.score_documents(model, DOCS, tokenizer, max_seq_len)
    nbytes = sum(len(d.encode()) for d in DOCS)
    assert got["nats"] == pytest.approx(-expected, abs=1e-4)
    assert got["bpb"] == pytest.approx(-expected / nbytes / math.log(2), abs=1e-6)
    assert got["word_perplexity"] == pytest.approx(math.exp(-expected / sum(len(re.split(r"\s+", d)) for d in DOCS)))
    assert got["tokens"] == sum(len(tokenizer.encode(d)) for d in DOCS) and got["bytes"] == nbytes


def test_eval_docs_lm_eval_from_the_command_line(run, tmp_path, capsys):
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    record = evaluate.main([f"--out_dir={run}", f"--input={data}", "--docs=lm_eval", "--json=true", "--device=cpu"])
    assert json.loads(capsys.readouterr().out) == record
    model, tokenizer, _ = load_model(run)
    assert record["bpb"] == pytest.approx(evaluate.score_documents(model, DOCS, tokenizer, BLOCK)["bpb"], abs=1e-6)
    assert record["documents"] == len(DOCS) and record["max_seq_len"] == BLOCK and record["docs"] == "lm_eval"
    joined = evaluate.main([f"--out_dir={run}", f"--input={data}", "--json=true", "--device=cpu"])
    assert "docs" not in joined  # the joined mode's record is as before
    for bad in (["--stride=4"], [f"--max_seq_len={BLOCK + 1}"]):
        with pytest.raises(SystemExit) as e:
            evaluate.main([f"--out_dir={run}", f"--input={data}", "--docs=lm_eval", "--device=cpu", *bad])
        assert "\n" not in str(e.value) and "max_seq_len" in str(e.value)


# ---------------------------------------------------------------------------------------------------------- lm-eval


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    """A multiple-choice task scored by loglikelihood and a rolling-perplexity task, from local JSONL files."""
    folder = tmp_path_factory.mktemp("tasks")
    write_tasks(folder, DOCS, MC)
    return folder


def lm_eval_run(model: str, model_args: str, tasks: Path, **settings: object) -> dict:
    """lm_eval.simple_evaluate on the two local tasks with the hub switched off, every sample logged."""
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed")
    import huggingface_hub.constants
    from lm_eval.tasks import TaskManager

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # HF_HUB_OFFLINE=1, after the import
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        patch.setenv("HF_DATASETS_CACHE", str(tasks / "hf_datasets"))
        return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["tiny_mc", "tiny_ppl"],
                                       task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
                                       log_samples=True, **settings)


@pytest.fixture(scope="module")
def through_server(served, tasks) -> dict:
    """lm-eval's `--model local-completions` against serve.py, the model's own tokenizer through the server."""
    for package in ("lm_eval", "tenacity", "aiohttp", "requests"):
        pytest.importorskip(package, reason="lm-eval's API models need lm-eval[api]")
    port, _, tokenizer = served
    # max_length: lm-eval keeps one position for the token it asks for, and its windows one for the prefix.
    # custom_prefix_token_id: lm-eval takes `bos_token_id or eos_token_id`, so a prefix of id 0 (a char model's
    # newline) would read as none.
    return lm_eval_run("local-completions", f"model=tiny,base_url=http://127.0.0.1:{port}/v1/completions,"
                       f"tokenizer_backend=remote,max_length={BLOCK + 1},"
                       f"custom_prefix_token_id={tokenizer.prefix_token}", tasks)


def through_transformers(run: Path, tasks: Path, **model_args: object) -> dict:
    """lm-eval's `--model hf` on the checkpoint folder as save_checkpoint wrote it, no tokenizer argument. A char
    vocabulary has no start token for lm-eval's prefix (naming its newline bos would make it a special token, which
    transformers drops from decoded text), so its prefix is given as prefix_token_id."""
    pytest.importorskip("accelerate", reason="lm-eval's --model hf needs accelerate")
    folder = (run / "latest").resolve()
    tokenizer = load_model(folder)[1]
    if tokenizer.eot_token is None:
        model_args["prefix_token_id"] = tokenizer.prefix_token
    args = ",".join(f"{key}={value}" for key, value in {"pretrained": folder, **model_args}.items())
    return lm_eval_run("hf", args, tasks, device="cpu")


def test_lm_eval_through_the_server_equals_eval_py_and_the_model(run, served, through_server, tasks, capsys):
    _, model, tokenizer = served
    ppl = through_server["results"]["tiny_ppl"]
    record = evaluate.main([f"--out_dir={run}", f"--input={tasks / 'docs.jsonl'}", "--docs=lm_eval",
                            f"--max_seq_len={BLOCK - 1}", "--json=true", "--device=cpu"])
    capsys.readouterr()
    assert ppl["bits_per_byte,none"] == pytest.approx(record["bpb"], abs=1e-4)
    assert ppl["byte_perplexity,none"] == pytest.approx(record["byte_perplexity"], rel=1e-4)
    assert ppl["word_perplexity,none"] == pytest.approx(record["word_perplexity"], rel=1e-4)
    correct = 0
    for sample in through_server["samples"]["tiny_mc"]:
        doc = MC[sample["doc_id"]]
        lls = choice_loglikelihoods(model, tokenizer, doc, BLOCK)  # the server's prompt: max_length - 1 tokens
        assert [float(r[0]) for r in sample["filtered_resps"]] == pytest.approx(lls, abs=1e-4)
        correct += max(range(len(lls)), key=lls.__getitem__) == doc["label"]
    assert through_server["results"]["tiny_mc"]["acc,none"] == pytest.approx(correct / len(MC))


def choice_loglikelihoods(model, tokenizer, doc: dict, keep: int) -> list[float]:
    """lm-eval's multiple-choice scores: the tokens a choice adds after the context and a space, given the last
    `keep` tokens of the two."""
    lls = []
    for choice in doc["choices"]:
        whole = tokenizer.encode(doc["question"] + " " + choice)
        scored = len(whole) - len(tokenizer.encode(doc["question"]))
        lls.append(direct_logprobs(model, whole[-keep:])[-scored:].sum().item())
    return lls


def test_lm_eval_through_transformers_on_a_checkpoint_folder_equals_eval_py(run, tasks, capsys):
    """Its windows are the model's context, block_size, eval.py's default."""
    folder = (run / "latest").resolve()
    model, tokenizer, _ = load_model(folder)
    assert set(tokenizer_files(tokenizer, BLOCK)) <= {p.name for p in folder.iterdir()}  # written by the product
    out = through_transformers(run, tasks)
    record = evaluate.main([f"--out_dir={run}", f"--input={tasks / 'docs.jsonl'}", "--docs=lm_eval", "--json=true",
                            "--device=cpu"])
    capsys.readouterr()
    assert out["results"]["tiny_ppl"]["bits_per_byte,none"] == pytest.approx(record["bpb"], abs=1e-4)
    for sample in out["samples"]["tiny_mc"]:  # --model hf keeps max_length + 1 tokens: block_size of input
        lls = choice_loglikelihoods(model, tokenizer, MC[sample["doc_id"]], BLOCK + 1)
        assert [float(r[0]) for r in sample["filtered_resps"]] == pytest.approx(lls, abs=1e-4)


def test_lm_eval_scores_alike_through_transformers_and_through_the_server(run, through_server, tasks):
    """With max_length=block_size - 1, `--model hf` cuts the server's windows (the server's max_length is
    block_size + 1): the same accuracy and bits per byte, and the same score for every choice and document."""
    out = through_transformers(run, tasks, max_length=BLOCK - 1)
    for task, metric in (("tiny_mc", "acc,none"), ("tiny_ppl", "bits_per_byte,none")):
        assert out["results"][task][metric] == pytest.approx(through_server["results"][task][metric], abs=1e-3)
        theirs = {s["doc_id"]: s["filtered_resps"] for s in through_server["samples"][task]}
        for sample in out["samples"][task]:  # a choice's (loglikelihood, is greedy); a document's loglikelihood
            ours, other = sample["filtered_resps"], theirs[sample["doc_id"]]
            if task == "tiny_mc":
                assert [greedy for _, greedy in ours] == [greedy for _, greedy in other]
                ours, other = [ll for ll, _ in ours], [ll for ll, _ in other]
            assert ours == pytest.approx(other, abs=1e-4)


def test_lmeval_tasks_script_draws_passages_and_true_next_lines(tmp_path):
    lines = [f"Line number {i} of the play, long enough to ask." for i in range(60)]
    text = "cut passage\n\n" + "\n\n".join("\n".join(lines[i:i + 6]) for i in range(0, 60, 6))
    docs, questions = make_tasks(text, n_docs=4, n_questions=20, seed=1)
    assert docs == ["\n".join(lines[i:i + 6]) for i in range(0, 24, 6)]
    assert len(questions) == 20 and len({q["question"] for q in questions}) == 20
    for q in questions:
        assert len(q["choices"]) == 4 and q["choices"][q["label"]] == lines[lines.index(q["question"]) + 1]
    assert len({q["label"] for q in questions}) > 1  # the true line is not always first
    source = tmp_path / "play.txt"
    source.write_text(text)
    tasks_main([f"--input={source}", f"--out_dir={tmp_path / 'tasks'}", "--docs=4", "--questions=20", "--seed=1"])
    assert [json.loads(line)["text"] for line in (tmp_path / "tasks" / "docs.jsonl").read_text().splitlines()] == docs
    assert f"test: {tmp_path / 'tasks' / 'mc.jsonl'}" in (tmp_path / "tasks" / "tiny_mc.yaml").read_text()
    with pytest.raises(SystemExit) as e:
        tasks_main([f"--input={tmp_path / 'none.txt'}", f"--out_dir={tmp_path / 'x'}"])
    assert "not a file" in str(e.value)
