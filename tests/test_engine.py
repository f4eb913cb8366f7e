"""engine.py's continuous batching: a row's logits in a batch equal its logits alone, requests join and leave a
running batch and still get model.generate's greedy tokens, a seeded request's text does not depend on who else is
served, prefill chunks interleave with decode steps, rows are freed the step their client goes, logprobs in OpenAI's
format, GET /metrics, and many requests with disconnects leave no row and no memory behind."""

import http.client
import json
import os
import random
import socket
import threading
from pathlib import Path

import pytest
import torch

from conftest import tiny_model
from model import KVCache
from engine import RowCache
from sample import decode

pytest.importorskip("starlette", reason="serve.py's extra is not installed: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="serve.py's extra is not installed: pip install -e '.[serve]'")

from test_sample import CHARS, bpe_run, char_run  # noqa: E402,F401 (fixtures)
from test_serve import (MODERN, TIMEOUT, Gate, bpe, char, complete, greedy, health, open_stream,  # noqa: E402,F401
                        request, rss_mb, serving, stream_events, streamed_texts, wait_for)
from tokens import Tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def wide():
    """A char model (random weights) with a context long enough that a stream outlasts the requests beside it."""
    return tiny_model(vocab_size=len(CHARS), block_size=512), Tokenizer.char(CHARS)


@pytest.mark.parametrize("switches", [{}, MODERN], ids=["gpt2", "modern"])
def test_a_rows_logits_in_a_batch_equal_its_logits_alone(switches):
    """Rows at different lengths decode together, rows leave (the last moved into the hole) and join; each row's
    logits equal a forward of its whole sequence alone, in fp32, within 1e-4."""
    torch.manual_seed(0)
    model = tiny_model(**switches | {"vocab_size": 97})
    cache = RowCache(model, 4)
    seqs = [torch.randint(0, 97, (n,)).tolist() for n in (3, 9, 1, 20)]  # then (3, 20, 1) and (3, 20, 1, 5)

    def put(b: int, seq: list[int]) -> None:  # a prefill alone, as engine.py's, into row b
        alone = KVCache.for_model(model, 1, max_len=len(seq))
        model(torch.tensor([seq]), kv_cache=alone)
        cache.set_row(b, alone.k[:, 0], alone.v[:, 0], len(seq))

    with torch.no_grad():
        for b, seq in enumerate(seqs):
            put(b, seq)
        for step in range(6):
            if step == 2:  # row 1 leaves: the last row moves into its place
                n = len(seqs[3])
                cache.set_row(1, cache.k[:, 3, :, :n], cache.v[:, 3, :, :n], n)
                del cache.lengths[3:]
                seqs = [seqs[0], seqs[3], seqs[2]]
            if step == 4:  # a new row joins
                seqs.append(torch.randint(0, 97, (5,)).tolist())
                put(3, seqs[3])
            new = torch.randint(0, 97, (len(seqs), 1))
            logits = model(new, kv_cache=cache)[0][:, -1]  # (B, vocab)
            for b, seq in enumerate(seqs):
                seq.append(new[b, 0].item())
                alone = model(torch.tensor([seq]))[0][0, -1]
                assert (logits[b] - alone).abs().max() < 1e-4, (step, b)
        for b in range(2):  # rows of one length: one sequence's path, no mask
            put(b, seqs[0])
        del cache.lengths[2:]
        new = torch.randint(0, 97, (2, 1))
        logits = model(new, kv_cache=cache)[0][:, -1]
        for b in range(2):
            alone = model(torch.tensor([seqs[0] + [new[b, 0].item()]]))[0][0, -1]
            assert (logits[b] - alone).abs().max() < 1e-4, b
        assert cache.lengths == [len(seqs[0]) + 1] * 2 and cache.q_pos.dim() == 1  # no mask


class Trace:
    """Records the shapes of the worker's forwards: (B, 1) a decode step, (B, T > 1) a prefill."""

    def __init__(self, model) -> None:
        self.model, self.shapes = model, []

    def __enter__(self) -> "Trace":
        original = type(self.model).forward

        def traced(idx, *args, **kwargs):
            self.shapes.append(tuple(idx.shape))
            return original(self.model, idx, *args, **kwargs)
        self.model.forward = traced
        return self

    def __exit__(self, *exc) -> None:
        del self.model.forward

    def decode_batches(self) -> list[int]:
        return [b for b, t in self.shapes if t == 1]


def test_requests_join_and_leave_a_running_batch(wide):
    """A long stream runs; short requests join it mid-way and leave before it ends; every text is greedy alone."""
    model, tokenizer = wide
    with serving(model, tokenizer) as (port, app), Trace(model) as trace:
        conn, response = open_stream(port, prompt="ROMEO:", max_tokens=400, temperature=0)
        lines = [response.readline()]  # the long one has started
        shorts = {p: complete(port, prompt=p, max_tokens=5, temperature=0)["choices"][0]["text"]
                  for p in ("a", "What light through yon")}
        assert not health(port)["active_sequences"] == 0, "the long stream ended before the short ones: too short"
        texts, reasons = streamed_texts([json.loads(line[6:]) if b"[DONE]" not in line else "[DONE]"
                                         for line in [*lines, *response] if line.startswith(b"data: ")], 1)
        conn.close()
    assert texts == [greedy(model, tokenizer, "ROMEO:", 400)] and reasons == ["length"]
    assert shorts == {p: greedy(model, tokenizer, p, 5) for p in shorts}
    assert max(trace.decode_batches()) == 2  # the short ones decoded in the long one's steps
    assert trace.decode_batches()[-1] == 1  # and left before it


def test_many_clients_at_once_get_their_greedy_tokens_alone(char):
    """Past block_size too: a row that fills its context recomputes its window, as model.generate."""
    model, tokenizer = char
    prompts = ["ROMEO:", "a", "What light through yonder", "KING HENRY:\nNo", "To be, or not", "x"]
    with serving(model, tokenizer, max_sequences=8) as (port, _), Trace(model) as trace:
        results = {}
        threads = [threading.Thread(target=lambda p=p: results.__setitem__(p, complete(
            port, prompt=p, max_tokens=25, temperature=0)["choices"][0]["text"])) for p in prompts]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
    assert results == {p: greedy(model, tokenizer, p, 25) for p in prompts}
    assert max(trace.decode_batches()) >= 3  # they were batched


def test_a_seeded_request_gives_the_same_text_whoever_else_is_served(wide):
    model, tokenizer = wide
    body = dict(prompt="KING:", n=2, max_tokens=30, temperature=0.9, top_p=0.95, seed=11)
    with serving(model, tokenizer) as (port, _), Trace(model) as trace:
        alone = [c["text"] for c in complete(port, **body)["choices"]]
        others = [open_stream(port, prompt=p, max_tokens=450, temperature=1.0) for p in ("ab", "The ", "O")]
        for _, response in others:
            response.readline()
        wait_for(lambda: health(port)["active_sequences"] == 3, "the other clients")
        busy = [c["text"] for c in complete(port, **body)["choices"]]
        for conn, _ in others:
            conn.close()
    assert busy == alone
    assert max(trace.decode_batches()) == 5  # its 2 rows decoded with the 3 others


def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps(wide):
    model, tokenizer = wide
    prompt = "But soft, what light through"  # 28 tokens: 7 chunks of 4
    with serving(model, tokenizer, prefill_chunk=4) as (port, _), Trace(model) as trace:
        conn, response = open_stream(port, prompt="ab", max_tokens=450, temperature=0)
        response.readline()
        text = complete(port, prompt=prompt, max_tokens=6, temperature=0)["choices"][0]["text"]
        conn.close()
    assert text == greedy(model, tokenizer, prompt, 6)  # 7 chunks give generate's tokens
    chunks = [i for i, (b, t) in enumerate(trace.shapes) if b == 1 and t == 4]
    assert len(chunks) == 7
    assert all(trace.shapes[i + 1] == (1, 1) for i in chunks[:-1])  # the running stream's step after each chunk
    assert trace.shapes[chunks[-1] + 1] == (2, 1)  # then both in one step


def test_a_gone_client_frees_its_rows_at_the_next_step(wide):
    model, tokenizer = wide
    with serving(model, tokenizer) as (port, app), Gate(app.state.scheduler) as gate, Trace(model) as trace:
        scheduler = app.state.scheduler
        stay = open_stream(port, prompt="ab", max_tokens=400, temperature=0)
        stay[1].readline()
        gone, response = open_stream(port, prompt="cd", n=3, max_tokens=400, temperature=0)
        response.readline()
        wait_for(lambda: health(port)["active_sequences"] == 4, "both requests to decode")
        gate.open.clear()  # the worker holds before its next token
        gone.sock.shutdown(socket.SHUT_RDWR)
        gone.close()
        wait_for(lambda: any(j.cancelled for j in scheduler.jobs), "the server to notice")
        held = len(trace.shapes)  # the forward of the step the worker is held in
        gate.open.set()
        wait_for(lambda: len(trace.shapes) > held + 3, "more steps")
        assert trace.shapes[held - 1] == (4, 1) and set(trace.shapes[held:]) == {(1, 1)}  # the very next step: 1 row
        assert health(port)["active_sequences"] == 1
        stay[0].close()
    assert scheduler.slots == [] and scheduler.jobs == []


# ---------------------------------------------------------------------------------------------------------- logprobs


def test_logprobs_in_openai_format_streamed_or_not(char):
    model, tokenizer = char
    body = dict(prompt="ROMEO:", max_tokens=12, temperature=0, logprobs=3)
    with serving(model, tokenizer) as (port, _):
        answer = complete(port, **body)
        events = stream_events(port, **body)
        zero = complete(port, **body | {"logprobs": 0})["choices"][0]["logprobs"]
    choice = answer["choices"][0]
    lp = choice["logprobs"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert "".join(lp["tokens"]) == choice["text"] and len(lp["tokens"]) == 12
    assert lp["text_offset"] == list(range(12))  # one character a token
    ids = tokenizer.encode("ROMEO:" + choice["text"])
    expected = model(torch.tensor([ids]))[0][0, 5:-1].log_softmax(-1)  # (12, vocab): the model's distributions
    for i, (token, top) in enumerate(zip(ids[6:], lp["top_logprobs"])):
        assert abs(lp["token_logprobs"][i] - expected[i, token].item()) < 1e-4
        assert len(top) == 3 and max(top, key=top.get) == lp["tokens"][i]  # greedy: the chosen is the likeliest
        assert sorted(top.values(), reverse=True) == pytest.approx(expected[i].topk(3).values.tolist(), abs=1e-4)
    streamed = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for event in events[:-1]:
        for key in streamed:
            streamed[key] += event["choices"][0]["logprobs"][key]
    assert streamed == lp
    assert zero["token_logprobs"] == lp["token_logprobs"] and zero["top_logprobs"] == [{}] * 12


def test_logprobs_of_bpe_tokens_with_a_stop_string(bpe):
    """GPT-2 BPE: each logprob entry is one token of the text (the last one may reach into the cut stop string)."""
    model, tokenizer = bpe
    with serving(model, tokenizer) as (port, _):
        answer = complete(port, prompt="Hello", n=4, max_tokens=12, temperature=1.0, seed=3, logprobs=1, stop=" the",
                          return_token_ids=True)
    for c in answer["choices"]:
        lp = c["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"]) == len(c["token_ids"])
        assert lp["tokens"] == [decode(tokenizer, [t]) for t in c["token_ids"]]
        assert lp["text_offset"] == sorted(lp["text_offset"]) and all(x <= 0 for x in lp["token_logprobs"])
        assert all(len(top) == 1 for top in lp["top_logprobs"])


# ---------------------------------------------------------------------------------------------------------- metrics


def test_a_failing_step_fails_its_requests_and_the_worker_goes_on(char, monkeypatch):
    """Even a SystemExit (a tokenizer that cannot load its files) ends the requests of that step with an error, not
    the worker: the next request is answered."""
    model, tokenizer = char
    with serving(model, tokenizer) as (port, app):
        def fail(*args, **kwargs):
            raise SystemExit("could not load the tokenizer's files")

        monkeypatch.setattr(type(model), "forward", fail)
        status, answer = request(port, "POST", "/v1/completions", {"prompt": "ab", "max_tokens": 3})
        assert status == 500 and "could not load the tokenizer's files" in json.dumps(answer)
        monkeypatch.undo()
        assert complete(port, prompt="ab", max_tokens=3, temperature=0)["choices"][0]["text"] == \
            greedy(model, tokenizer, "ab", 3)


def test_a_failing_prompt_score_ends_its_job_alone(wide, monkeypatch):
    """echo with logprobs: scoring one prompt of a prefill group fails; that request gets its error, the prompt
    prefilled beside it gets the answer it gets alone, and the stream decoding meanwhile goes on."""
    import engine
    model, tokenizer = wide
    original = engine.Scheduler._prompt_logprobs

    def poisoned(self, job, logits, start):
        if job.request.seed == 666:
            raise RuntimeError("poisoned score")
        return original(self, job, logits, start)
    monkeypatch.setattr(engine.Scheduler, "_prompt_logprobs", poisoned)
    body = dict(prompt="ab", max_tokens=2, temperature=0, logprobs=1, echo=True)
    with serving(model, tokenizer) as (port, app):
        alone = request(port, "POST", "/v1/completions", body)
        with Gate(app.state.scheduler) as gate:
            gate.open.clear()  # the worker waits at the stream's first token while both requests queue
            conn, response = open_stream(port, prompt="ROMEO:", max_tokens=300, temperature=0)
            answers = {}
            threads = [threading.Thread(target=lambda k=k, b=b: answers.__setitem__(k, request(
                port, "POST", "/v1/completions", b))) for k, b in (("bad", {**body, "seed": 666}), ("good", body))]
            for t in threads:
                t.start()
            wait_for(lambda: len(app.state.scheduler.waiting) == 2, "both requests to queue")
            gate.open.set()
            for t in threads:
                t.join(TIMEOUT)
        events = [json.loads(line[6:]) if b"[DONE]" not in line else "[DONE]"
                  for line in response if line.startswith(b"data: ")]
        conn.close()
    assert answers["bad"][0] == 500 and "poisoned score" in answers["bad"][1]["error"]["message"]
    assert answers["good"][0] == 200 and answers["good"][1]["choices"] == alone[1]["choices"]
    assert events[-1] == "[DONE]" and streamed_texts(events, 1) == ([greedy(model, tokenizer, "ROMEO:", 300)],
                                                                    ["length"])


@pytest.mark.parametrize("poison", ["sampling", "logprobs"])
def test_one_failing_job_ends_alone_and_the_others_text_is_unchanged(wide, monkeypatch, poison):
    """A job whose own sampling (or logprobs: torch's topk past the vocabulary) raises mid-way gets its error; a
    stream decoding beside it goes on to its end, its text that of its run alone."""
    import engine
    model, tokenizer = wide
    calls = []
    if poison == "sampling":
        sample_next = engine.sample_next

        def poisoned(logits, temperature, *args):
            calls.append(temperature)
            if temperature == 0.5 and calls.count(0.5) == 3:
                raise RuntimeError("poisoned sampling")
            return sample_next(logits, temperature, *args)
        monkeypatch.setattr(engine, "sample_next", poisoned)
        body = dict(prompt="ab", max_tokens=20, temperature=0.5, seed=1)
    else:
        original = engine.Scheduler._logprobs

        def poisoned(self, job, logits, tokens, top):
            calls.append(top)
            return original(self, job, logits, tokens, logits.size(-1) + 1 if len(calls) == 3 else top)
        monkeypatch.setattr(engine.Scheduler, "_logprobs", poisoned)
        body = dict(prompt="ab", max_tokens=20, temperature=0, logprobs=2)
    with serving(model, tokenizer) as (port, app), Trace(model) as trace:
        conn, response = open_stream(port, prompt="ROMEO:", max_tokens=400, temperature=0)
        lines = [response.readline()]
        status, answer = request(port, "POST", "/v1/completions", body)
        wait_for(lambda: health(port)["active_sequences"] <= 1, "the poisoned job's rows to be freed")
        assert health(port)["active_sequences"] == 1, "the stream stopped with the poisoned job (or is too short)"
        events = [json.loads(line[6:]) if b"[DONE]" not in line else "[DONE]"
                  for line in [*lines, *response] if line.startswith(b"data: ")]
        conn.close()
        scheduler = app.state.scheduler
        wait_for(lambda: not scheduler.jobs, "the rows to be freed")
        assert scheduler.slots == []
    expected = {"sampling": "poisoned sampling", "logprobs": "selected index k out of range"}[poison]
    assert status == 500 and expected in answer["error"]["message"], answer
    assert events[-1] == "[DONE]"
    assert streamed_texts(events, 1) == ([greedy(model, tokenizer, "ROMEO:", 400)], ["length"])
    assert max(trace.decode_batches()) == 2  # the poisoned job decoded beside the stream


def test_logprobs_above_the_vocabulary_are_refused(monkeypatch):
    """A char model of 10 symbols: logprobs=11 is a 400 naming the vocabulary, logprobs=10 is answered."""
    symbols = "abcdefghij"
    model, tokenizer = tiny_model(vocab_size=len(symbols)), Tokenizer.char(symbols)
    with serving(model, tokenizer) as (port, _):
        status, answer = request(port, "POST", "/v1/completions", {"prompt": "ab", "max_tokens": 3, "logprobs": 11})
        assert status == 400 and answer["error"]["param"] == "logprobs"
        assert "vocabulary has 10 tokens" in answer["error"]["message"]
        status, answer = request(port, "POST", "/v1/completions", {"prompt": "ab", "max_tokens": 3, "logprobs": 21})
        assert status == 400  # and the OpenAI-style cap still holds above it
        top = complete(port, prompt="ab", max_tokens=3, temperature=0, logprobs=10)["choices"][0]["logprobs"]
    assert [len(t) for t in top["top_logprobs"]] == [10] * 3


def test_metrics_in_prometheus_text_format(char):
    pytest.importorskip("prometheus_client", reason="prometheus_client is not installed: pip install -e '.[serve]'")
    model, tokenizer = char
    with serving(model, tokenizer) as (port, app):
        complete(port, prompt="ab", n=2, max_tokens=7, temperature=0)
        request(port, "POST", "/v1/completions", {"prompt": "ab", "n": 0})
        wait_for(lambda: not app.state.scheduler.jobs, "the rows to be freed")  # the round after the answer
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        text = response.read().decode()
        assert response.status == 200 and response.getheader("Content-Type").startswith("text/plain")
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values['smallgpt_requests_total{status="200"}'] == 1 and values['smallgpt_requests_total{status="400"}'] == 1
    assert values["smallgpt_generated_tokens_total"] == 14
    assert values["smallgpt_active_rows"] == 0 and values["smallgpt_waiting_prompts"] == 0
    assert values["smallgpt_time_to_first_token_seconds_count"] == 1
    assert values["smallgpt_time_per_output_token_seconds_count"] == 6  # one per step after the first


def test_metrics_without_prometheus_client_say_what_to_install(char):
    with serving(*char) as (port, app):
        app.state.scheduler.metrics = None  # as when the import failed
        status, body = request(port, "GET", "/metrics")
    assert status == 501 and "pip install" in body["error"]["message"]
    assert "\n" not in body["error"]["message"]


# ---------------------------------------------------------------------------------------------------------- churn


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the resident set size from /proc")
def test_many_requests_with_disconnects_leave_no_row_and_flat_memory(char):
    """SMALLGPT_CHURN requests (default 90; the report's run: 1000), 6 clients at a time, a third of them leaving
    mid-stream at a random point: afterwards no row and no job is left, and resident memory is flat from the first
    third to the last."""
    model, tokenizer = char
    total = int(os.environ.get("SMALLGPT_CHURN", "90"))
    rng = random.Random(0)

    def one(port: int, i: int) -> None:
        body = dict(prompt=rng.choice(["ROMEO:", "a", "What light", "O"]), max_tokens=rng.randint(1, 60),
                    temperature=rng.choice([0, 0.8]), n=rng.choice([1, 1, 2]))
        if i % 3:
            complete(port, **body)
            return
        conn, response = open_stream(port, **body)
        for _ in range(rng.randint(0, 8)):
            response.readline()
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()

    levels = []
    with serving(model, tokenizer, max_sequences=8, max_waiting=64) as (port, app):
        scheduler = app.state.scheduler
        for third in range(3):
            batch = range(third * total // 3, (third + 1) * total // 3)
            for start in range(batch.start, batch.stop, 6):
                threads = [threading.Thread(target=one, args=(port, i)) for i in range(start, min(start + 6,
                                                                                                  batch.stop))]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(TIMEOUT)
                    assert not t.is_alive(), "a client hangs"
            wait_for(lambda: not scheduler.jobs and not scheduler.waiting, "idle")
            assert scheduler.slots == [] and health(port)["active_sequences"] == 0
            levels.append(rss_mb())
    print(f"RSS after each third of {total} requests: {levels} MB")
    assert levels[2] < levels[0] + 20, f"resident memory grows: {levels} MB"


def test_a_window_models_rows_roll_on_in_the_batch():
    """Past block_size a RoPE window model's rows stay in the batch (each rolls in its own slots): every text is
    model.generate's (which rolls too), a row joining mid-way decodes beside one already past the block, and no step
    recomputes a block. A prompt longer than the block is read whole."""
    model, tokenizer = tiny_model(vocab_size=len(CHARS), pos_embedding="rope", window=20, block_size=32), \
        Tokenizer.char(CHARS)
    long_prompt = "But soft, what light through yonder window breaks? It is the east"  # 65 > 32 tokens
    with serving(model, tokenizer) as (port, app), Trace(model) as trace:
        conn, response = open_stream(port, prompt="ROMEO:", max_tokens=150, temperature=0)
        lines = [response.readline() for _ in range(60)]  # the long one is past its block
        short = complete(port, prompt=long_prompt, max_tokens=20, temperature=0)["choices"][0]["text"]
        texts, _ = streamed_texts([json.loads(line[6:]) if b"[DONE]" not in line else "[DONE]"
                                   for line in [*lines, *response] if line.startswith(b"data: ")], 1)
        conn.close()
    assert texts == [greedy(model, tokenizer, "ROMEO:", 150)]
    assert short == greedy(model, tokenizer, long_prompt, 20)
    assert 2 in trace.decode_batches()  # the short one decoded beside the long one, past its block
    assert (1, 32) not in trace.shapes  # no step recomputed a block (a full-attention row's steps past block_size)
