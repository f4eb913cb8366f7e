"""serve.py against 127.0.0.1: completions equal model.generate (greedy) and sample.py (seeded sampling), streaming
equals non-streaming, OpenAI-style errors, the bounded queue, disconnects, a bounded load test, the openai client,
curl, /v1/attention against attention.attention_maps, and the playground in headless Chromium (skips without one)."""

import asyncio
import contextlib
import gc
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

pytest.importorskip("starlette", reason="serve.py's extra is not installed: pip install -e '.[serve]'")
uvicorn = pytest.importorskip("uvicorn", reason="serve.py's extra is not installed: pip install -e '.[serve]'")

from attention import attention_maps  # noqa: E402
from checkpoint import load_model, save_checkpoint  # noqa: E402
from model import GPT, GPTConfig, KVCache  # noqa: E402
from sample import SampleConfig, decode, generate_samples  # noqa: E402
import serve  # noqa: E402
from serve import ServeConfig, create_app, read_playground  # noqa: E402
from test_sample import CHARS, bpe_run, char_run  # noqa: E402,F401 (fixtures)
from tokens import Tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 60  # seconds a client waits for any answer: a hang fails the test instead of stalling it
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def char(char_run):
    model, tokenizer, _ = load_model(char_run)
    return model, tokenizer


# Every architecture switch of model.py at once (grouped-query attention: 2 query heads share a key/value head).
MODERN = dict(pos_embedding="rope", norm="rmsnorm", embed_norm=True, qk_norm=True, mlp="relu2", n_kv_head=1,
              tie_embeddings=False, logit_softcap=15.0, bias=False)


@pytest.fixture(scope="module", params=["gpt2", "modern"])
def any_char(request, char, tmp_path_factory):
    """The char model, and a char model with every switch, loaded from its checkpoint as serve.py loads it."""
    if request.param == "gpt2":
        return char
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=len(CHARS), n_layer=2, n_head=2, n_embd=16, **MODERN))
    out = tmp_path_factory.mktemp("modern") / "out"
    save_checkpoint(out, model, {"tokenizer": Tokenizer.char(CHARS).to_meta()}, {"iter_num": 1}, iter_num=1,
                    is_best=True)
    model, tokenizer, _ = load_model(out)
    assert model.config.n_kv_head == 1 and model.config.pos_embedding == "rope"
    return model, tokenizer


@pytest.fixture(scope="module")
def bpe(bpe_run):
    model, tokenizer, _ = load_model(bpe_run)
    return model, tokenizer


@contextlib.contextmanager
def serving(model, tokenizer, **settings) -> Iterator[tuple[int, object]]:
    """A uvicorn server for model on 127.0.0.1, on a free port, in a thread; yields (port, app)."""
    app = create_app(model, tokenizer, ServeConfig(**settings), "tiny")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="error"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    assert server.started, "the server did not start"
    try:
        yield sock.getsockname()[1], app
    finally:
        server.should_exit = True
        thread.join(TIMEOUT)
        sock.close()
        assert not thread.is_alive()
        assert not app.state.scheduler.thread.is_alive()  # the lifespan stopped the decode worker


@pytest.fixture(scope="module")
def char_server(char):
    with serving(*char) as (port, _):
        yield port


def request(port: int, method: str, path: str, body: object = None, raw: bytes | None = None) -> tuple[int, object]:
    """(status, parsed JSON or text) of one request."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    conn.request(method, path, body=data, headers=JSON)
    response = conn.getresponse()
    text = response.read().decode()
    conn.close()
    try:
        return response.status, json.loads(text)
    except json.JSONDecodeError:
        return response.status, text


def complete(port: int, **body) -> dict:
    status, answer = request(port, "POST", "/v1/completions", body)
    assert status == 200, answer
    return answer


def stream_events(port: int, **body) -> list:
    """The data payloads of a streamed completion, parsed, up to and including "[DONE]"."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    conn.request("POST", "/v1/completions", body=json.dumps({**body, "stream": True}), headers=JSON)
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("Content-Type").startswith("text/event-stream")
    events = []
    for line in response:
        if line.startswith(b"data: "):
            payload = line[6:].strip().decode()
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    conn.close()
    return events


def streamed_texts(events: list, choices: int) -> tuple[list[str], list[str]]:
    """Each choice's concatenated text and finish reason."""
    texts, reasons = [""] * choices, [None] * choices
    for event in events[:-1]:
        for c in event["choices"]:
            assert reasons[c["index"]] is None, "a chunk after the choice's finish reason"
            texts[c["index"]] += c["text"]
            reasons[c["index"]] = c["finish_reason"]
    return texts, reasons


def greedy(model, tokenizer, prompt: str, max_tokens: int) -> str:
    """The text model.generate adds to prompt, greedily, alone."""
    idx = torch.tensor([tokenizer.encode(prompt)])
    return decode(tokenizer, model.generate(idx, max_tokens, temperature=0.0)[0, idx.size(1):].tolist())


# ---------------------------------------------------------------------------------------------------------- results


def test_greedy_completions_are_model_generate(any_char):
    model, tokenizer = any_char
    with serving(model, tokenizer) as (port, _):
        for prompt, max_tokens in (("ROMEO:", 10), ("a", 1), ("But soft, what light through yon", 40)):  # past block
            check_greedy(port, model, tokenizer, prompt, max_tokens)


def check_greedy(port: int, model, tokenizer, prompt: str, max_tokens: int) -> None:
    answer = complete(port, prompt=prompt, max_tokens=max_tokens, temperature=0)
    assert answer["object"] == "text_completion" and answer["model"] == "tiny"
    assert answer["choices"] == [{"text": greedy(model, tokenizer, prompt, max_tokens), "index": 0,
                                  "logprobs": None, "finish_reason": "length"}]
    assert answer["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": max_tokens,
                               "total_tokens": len(prompt) + max_tokens}


def test_seeded_samples_are_sample_py_samples(char, char_server):
    """n completions with a seed are sample.py's num_samples with that seed (top_k none), streamed or not."""
    model, tokenizer = char
    cfg = SampleConfig(num_samples=3, max_new_tokens=20, temperature=0.9, top_k=None, top_p=0.9, seed=5)
    generator = torch.Generator().manual_seed(cfg.seed)
    expected, _ = generate_samples(model, tokenizer, tokenizer.encode("KING:"), cfg, generator)
    body = dict(prompt="KING:", n=3, max_tokens=20, temperature=0.9, top_p=0.9, seed=5)
    assert [c["text"] for c in complete(char_server, **body)["choices"]] == expected
    texts, reasons = streamed_texts(stream_events(char_server, **body), 3)
    assert texts == expected and reasons == ["length"] * 3
    other = complete(char_server, **{**body, "seed": 6})["choices"]
    assert [c["text"] for c in other] != expected


def test_several_prompts_each_as_alone_with_echo_and_token_ids(char, char_server):
    model, tokenizer = char
    answer = complete(char_server, prompt=["to be", "or not"], n=2, max_tokens=6, temperature=0, echo=True,
                      return_token_ids=True)
    choices = answer["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    for c, prompt in zip(choices, ["to be", "to be", "or not", "or not"]):
        assert c["text"] == prompt + greedy(model, tokenizer, prompt, 6)
        assert c["prompt_token_ids"] == tokenizer.encode(prompt)
        assert decode(tokenizer, c["token_ids"]) == c["text"][len(prompt):]
    assert answer["usage"]["prompt_tokens"] == 5 + 6 and answer["usage"]["completion_tokens"] == 4 * 6
    ids = complete(char_server, prompt=tokenizer.encode("to be"), max_tokens=6, temperature=0)["choices"][0]["text"]
    assert ids == greedy(model, tokenizer, "to be", 6)  # a prompt given as token ids


def test_stream_equals_non_stream_with_stops_and_usage(bpe):
    """GPT-2 BPE with characters split across tokens and end-of-text: the deltas never hold half a character or a
    piece of a stop string, and add up to the non-streamed text; usage comes last when asked for."""
    model, tokenizer = bpe
    with serving(model, tokenizer) as (port, _):
        for stop in (None, "\ufffd", ["語", "🙂"]):
            body = dict(prompt="Hello", n=4, max_tokens=12, temperature=1.0, seed=3, stop=stop)
            answer = complete(port, **body)
            events = stream_events(port, **body, stream_options={"include_usage": True})
            assert events[-1] == "[DONE]" and events[-2]["choices"] == [] and events[-2]["usage"] == answer["usage"]
            texts, reasons = streamed_texts(events[:-1], 4)
            assert texts == [c["text"] for c in answer["choices"]]
            assert reasons == [c["finish_reason"] for c in answer["choices"]]
            assert "stop" in reasons  # end-of-text (p ~0.06 a step) or a stop string ended some
            for event in events[:-2]:
                for c in event["choices"]:
                    if c["finish_reason"] is None:
                        assert not c["text"].endswith("\ufffd")  # half a character is held back
                        assert not any(s in c["text"] for s in ([stop] if isinstance(stop, str) else stop or []))


# ---------------------------------------------------------------------------------------------------------- errors

BAD = [
    (b'{"prompt": "a",', 400, None),  # malformed JSON
    (b"\xff\xfe garbage", 400, None),
    (b'["prompt"]', 400, None),
    (b'{"max_tokens": 3}', 400, "prompt"),
    (b'{"prompt": 5}', 400, "prompt"),
    (b'{"prompt": "a", "max_tokens": -1}', 400, "max_tokens"),
    (b'{"prompt": "a", "max_tokens": 100000}', 400, "max_tokens"),
    (b'{"prompt": "a", "max_tokens": "5"}', 400, "max_tokens"),
    (b'{"prompt": "a", "max_tokens": 5.0}', 400, "max_tokens"),
    (b'{"prompt": "a", "max_tokens": true}', 400, "max_tokens"),
    (b'{"prompt": "a", "temperature": "hot"}', 400, "temperature"),
    (b'{"prompt": "a", "temperature": NaN}', 400, "temperature"),
    (b'{"prompt": "a", "temperature": 2.5}', 400, "temperature"),
    (b'{"prompt": "a", "top_p": 0}', 400, "top_p"),
    (b'{"prompt": "a", "n": 0}', 400, "n"),
    (b'{"prompt": "a", "n": 1000}', 400, "n"),
    (b'{"prompt": "a", "stream": "yes"}', 400, "stream"),
    (b'{"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}', 400, "stop"),
    (b'{"prompt": "a", "stop": ""}', 400, "stop"),
    (b'{"prompt": "a", "seed": -1}', 400, "seed"),
    (b'{"prompt": "a", "stream_options": {"x": 1}}', 400, "stream_options"),
    (b'{"prompt": "a", "foo": 1}', 400, "foo"),  # a field the API does not have
    (b'{"prompt": "a", "logprobs": 21}', 400, "logprobs"),
    (b'{"prompt": "' + b"a" * 33 + b'", "logprobs": 1, "echo": true}', 400, "prompt"),  # past block_size: unscored
    (b'{"prompt": "a", "suffix": "b"}', 400, "suffix"),  # a field the API has, that this server cannot honour
    (b'{"prompt": "a", "presence_penalty": 0.5}', 400, "presence_penalty"),
    (b'{"prompt": "\\u00e9t\\u00e9"}', 400, "prompt"),  # not in the char vocabulary
    (b'{"prompt": ""}', 400, "prompt"),  # a char model has no end-of-text to start from
    (b'{"prompt": [1, 2, 999]}', 400, "prompt"),  # a token id past the vocabulary
    (b'{"prompt": []}', 400, "prompt"),
    (b'{"prompt": "a", "seed": 1' + b"0" * 5000 + b"}", 400, None),  # json.loads: past Python's 4,300 digits
    (b"[" * 200_000 + b"]" * 200_000, 400, None),  # json.loads: RecursionError
    (b'{"prompt": "a", "temperature": 1' + b"0" * 400 + b"}", 400, "temperature"),  # an int no float can hold
    (b'{"prompt": "a", "top_p": 1e400}', 400, "top_p"),  # a float that overflows: inf
    (b'{"prompt": "a", "best_of": true}', 400, "best_of"),  # true == 1 in Python: a bool is not a number
    (b'{"prompt": "a", "presence_penalty": false}', 400, "presence_penalty"),
    (b'{"prompt": "a", "top_k": -2}', 400, "top_k"),
    (b'{"prompt": "a", "top_k": true}', 400, "top_k"),
]


@pytest.mark.parametrize("raw,status,param", BAD, ids=[b.decode(errors="replace")[:40] for b, _, _ in BAD])
def test_bad_requests_get_openai_error_bodies(char_server, raw, status, param):
    got, body = request(char_server, "POST", "/v1/completions", raw=raw)
    assert got == status
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["param"] == param
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["message"]


def test_other_errors_and_the_server_lives_on(char, char_server):
    assert request(char_server, "GET", "/nope")[0] == 404
    status, body = request(char_server, "GET", "/v1/completions")
    assert status == 405 and "error" in body
    status, body = request(char_server, "POST", "/v1/completions", raw=b'{"prompt": "' + b"a" * (1 << 21) + b'"}')
    assert status == 413 and "error" in body
    long = "But soft, what light through yonder window breaks"  # 49 tokens, block_size 32: as sample.py, the model
    answer = complete(char_server, prompt=long, max_tokens=3, temperature=0)  # sees the last 32, and usage says so
    assert answer["choices"][0]["text"] == greedy(*char, long, 3) == greedy(*char, long[-32:], 3)
    assert answer["usage"] == {"prompt_tokens": 49, "completion_tokens": 3, "total_tokens": 52,
                               "prompt_tokens_dropped": 17}
    assert complete(char_server, prompt="ab", max_tokens=3, temperature=0)["choices"][0]["text"] == \
        greedy(*char, "ab", 3)
    status, models = request(char_server, "GET", "/v1/models")
    assert status == 200 and models["data"][0]["id"] == "tiny" and models["data"][0]["object"] == "model"


# ---------------------------------------------------------------------------------------------------------- queue


class Gate:
    """Wraps a scheduler's sampling: counts the tokens the worker takes, and holds it before each while closed."""

    def __init__(self, scheduler) -> None:
        self.scheduler, self.original, self.open, self.tokens = scheduler, scheduler._sampled, threading.Event(), 0
        self.open.set()

    def __enter__(self) -> "Gate":
        def gated(job, logits):
            assert self.open.wait(TIMEOUT)
            self.tokens += 1
            return self.original(job, logits)
        self.scheduler._sampled = gated
        return self

    def __exit__(self, *exc) -> None:
        del self.scheduler._sampled  # back to the class's method
        self.open.set()


def health(port: int) -> dict:
    return request(port, "GET", "/health")[1]


def wait_for(condition, what: str) -> None:
    for _ in range(400):
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def open_stream(port: int, **body) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    conn.request("POST", "/v1/completions", body=json.dumps({**body, "stream": True}), headers=JSON)
    return conn, conn.getresponse()


def test_full_queue_answers_503_at_once_and_a_gone_client_frees_its_rows(char):
    model, tokenizer = char
    with serving(model, tokenizer, max_sequences=2, max_waiting=1) as (port, app), Gate(app.state.scheduler) as gate:
        first, response = open_stream(port, prompt="ab", n=2, max_tokens=2000, temperature=0)
        response.readline()  # the first chunk: the job holds both rows
        gate.open.clear()  # the worker stops before its next token
        waiting = open_stream(port, prompt="cd", max_tokens=3, temperature=0)
        wait_for(lambda: health(port)["waiting_prompts"] == 1, "the second request to queue")
        status, body = request(port, "POST", "/v1/completions", {"prompt": "ef", "max_tokens": 3})
        assert status == 503 and body["error"]["code"] == "overloaded"  # answered while the worker is held
        first.sock.shutdown(socket.SHUT_RDWR)  # the first client goes away mid-stream
        first.close()
        gate.open.set()
        texts, _ = streamed_texts(read_all(waiting[1]), 1)
        assert texts == [greedy(model, tokenizer, "cd", 3)]  # the queued request ran once the rows were free
        wait_for(lambda: health(port) == {"status": "ok", "active_sequences": 0, "waiting_prompts": 0}, "idle")
        assert gate.tokens < 100  # the gone client's 2000 tokens were not all generated


def read_all(response: http.client.HTTPResponse, seconds: float | None = None) -> list:
    """Every data event of a stream; with seconds, fail rather than read on past them (a stream that never ends)."""
    end, events = None if seconds is None else time.monotonic() + seconds, []
    for line in response:
        if end is not None and time.monotonic() > end:
            raise AssertionError(f"the stream went on for more than {seconds} s")
        if line.startswith(b"data: "):
            events.append(json.loads(line[6:]) if line[6:].strip() != b"[DONE]" else "[DONE]")
    return events


def test_a_gone_client_of_a_non_streamed_request_frees_its_rows(char):
    model, tokenizer = char
    with serving(model, tokenizer) as (port, app), Gate(app.state.scheduler) as gate:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
        conn.request("POST", "/v1/completions", body=json.dumps({"prompt": "ab", "max_tokens": 2000}), headers=JSON)
        wait_for(lambda: gate.tokens > 0, "the first token")
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        wait_for(lambda: health(port)["active_sequences"] == 0, "the rows to be freed")
        assert gate.tokens < 2000


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read())[1]) / 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the resident set size from /proc")
def test_load_test_well_formed_garbage_and_gone_clients(char):
    """8 clients at once, 3 rounds: well-formed requests (streamed or not) get exactly their tokens alone, garbage
    gets 400, clients that leave mid-stream leave nothing behind; no client hangs; memory returns to its level."""
    model, tokenizer = char
    prompts = ["ROMEO:", "a", "What light through yonder", "KING HENRY:\nNo"]
    expected = {p: greedy(model, tokenizer, p, 30) for p in prompts}

    def well_formed(port: int, prompt: str, streamed: bool) -> str:
        body = dict(prompt=prompt, max_tokens=30, temperature=0)
        if streamed:
            return streamed_texts(stream_events(port, **body), 1)[0][0]
        return complete(port, **body)["choices"][0]["text"]

    def garbage(port: int, i: int) -> int:
        return request(port, "POST", "/v1/completions", raw=[b"\x00{]", b'{"prompt": "a", "n": -3}'][i])[0]

    def gone(port: int) -> None:
        conn, response = open_stream(port, prompt="Hello", max_tokens=2000, temperature=0.7)
        response.readline()
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()

    with serving(model, tokenizer, max_sequences=4, max_waiting=16) as (port, app):
        scheduler = app.state.scheduler
        caches = {id(o) for o in gc.get_objects() if type(o) is KVCache}  # the servers' own: a row per sequence
        levels = []
        for round in range(3):
            results: dict = {}
            jobs = [(f"ok{i}", well_formed, (port, p, i % 2 == 0)) for i, p in enumerate(prompts)]
            jobs += [(f"garbage{i}", garbage, (port, i)) for i in range(2)]
            jobs += [(f"gone{i}", gone, (port,)) for i in range(2)]
            threads = [threading.Thread(target=lambda k=k, f=f, a=a: results.__setitem__(k, f(*a))) for k, f, a in jobs]
            for t in threads:
                t.start()
            for t in threads:
                t.join(TIMEOUT)
                assert not t.is_alive(), "a client hangs"
            assert [results[f"ok{i}"] for i in range(4)] == [expected[p] for p in prompts]
            assert results["garbage0"] == results["garbage1"] == 400
            wait_for(lambda: health(port)["active_sequences"] == health(port)["waiting_prompts"] == 0, "idle")
            gc.collect()
            assert {id(o) for o in gc.get_objects() if type(o) is KVCache} <= caches, "a prefill's cache outlived it"
            assert scheduler.slots == [] and scheduler.jobs == [], "a row outlived its request"
            levels.append(rss_mb())
        assert levels[2] < levels[0] + 20, f"resident memory grows from round to round: {levels} MB"


# ---------------------------------------------------------------------------------------------------------- clients


def test_openai_client(char, char_server):
    openai = pytest.importorskip("openai", reason="the openai client is not installed: pip install openai")
    model, tokenizer = char
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{char_server}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny"]
    answer = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=12, temperature=0, stop=["\n\n"])
    assert answer.choices[0].text == greedy(model, tokenizer, "ROMEO:", 12).split("\n\n")[0]
    assert answer.usage.prompt_tokens == 6
    chunks = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=12, temperature=0, stop=["\n\n"],
                                       stream=True)
    assert "".join(c.choices[0].text for c in chunks) == answer.choices[0].text
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=-1)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl(char, char_server):
    url = f"http://127.0.0.1:{char_server}/v1/completions"
    body = json.dumps({"prompt": "ab", "max_tokens": 5, "temperature": 0, "stream": True})
    out = subprocess.run(["curl", "-sN", url, "-H", "Content-Type: application/json", "-d", body],
                         capture_output=True, text=True, timeout=TIMEOUT).stdout
    events = [line[6:] for line in out.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == greedy(*char, "ab", 5)


# ---------------------------------------------------------------------------------------------------------- attention


def test_attention_endpoint_is_attention_maps(any_char):
    model, tokenizer = any_char
    with serving(model, tokenizer) as (port, _):
        check_attention(port, model, tokenizer)


def check_attention(port: int, model, tokenizer) -> None:
    ids = tokenizer.encode("But soft, what light through yonder window breaks")  # 49 tokens, block_size 32
    status, answer = request(port, "POST", "/v1/attention", {"token_ids": ids, "position": 5})
    assert status == 200 and answer["start"] == 0 and answer["tokens"] == list("But soft, what light through "
                                                                             "yonder window breaks")
    expected = attention_maps(model, torch.tensor(ids[:6]))[:, 0, :, -1]  # (n_layer, n_head, 6)
    assert torch.allclose(torch.tensor(answer["weights"]), expected, atol=1e-4)
    status, answer = request(port, "POST", "/v1/attention", {"token_ids": ids})  # the last: a full window
    assert answer["position"] == 48 and answer["start"] == 48 + 1 - 32
    expected = attention_maps(model, torch.tensor(ids[17:]))[:, 0, :, -1]
    assert torch.allclose(torch.tensor(answer["weights"]), expected, atol=1e-4)
    status, answer = request(port, "POST", "/v1/attention", {"prompt": "abc"})
    assert status == 200 and answer["token_ids"] == tokenizer.encode("abc")
    for bad in ({"token_ids": ids, "position": 49}, {"token_ids": []}, {"prompt": "a", "token_ids": [1]},
                {"token_ids": [1, -1]}, {"prompt": "a", "layer": 0}, "text"):
        status, answer = request(port, "POST", "/v1/attention", bad)
        assert status == 400 and "error" in answer, bad


def test_attention_context_limit(char):
    with serving(*char, max_attention_tokens=8) as (port, _):
        assert request(port, "POST", "/v1/attention", {"prompt": "abcdefgh"})[0] == 200
        status, answer = request(port, "POST", "/v1/attention", {"prompt": "abcdefghi"})
        assert status == 400 and "max_attention_tokens" in answer["error"]["message"]


# ------------------------------------------------------------------------------------------------- command line


def test_without_the_serve_extra_one_line_says_what_to_install():
    code = "import sys, runpy; sys.modules['uvicorn'] = None; sys.argv = ['serve.py']; " \
           "runpy.run_path('serve.py', run_name='__main__')"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == ["serve.py needs starlette and uvicorn: pip install -e '.[serve]'"]


def test_bad_settings_exit_with_one_line():
    for argv, words in ((["--max_sequences=0"], "max_sequences"), (["--port=70000"], "port"),
                        (["--out_dir=/nonexistent"], "does not exist"), (["--threads=-1"], "threads=-1"),
                        (["--drain_seconds=-1"], "drain_seconds"), (["--allow_origins=a,,b"], "allow_origins")):
        with pytest.raises(SystemExit, match=words) as e:
            serve.main(argv)
        assert "\n" not in str(e.value.code)


def test_a_port_in_use_exits_with_one_line(char_run):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit, match=f"cannot listen on 127.0.0.1:{port} .*pass another --port"):
            serve.main([f"--out_dir={char_run}", f"--port={port}"])


def test_a_bpe_that_cannot_load_offline_stops_the_start_in_one_line(char_run, monkeypatch):
    """tiktoken loads its files at first use: serve.py uses them before it listens, so that offline it says what to
    do at once rather than failing the first request."""
    import tiktoken

    model, _, config = load_model(char_run)
    monkeypatch.setattr(serve, "load_for_inference", lambda *a: (model, Tokenizer.tiktoken("gpt2"), config, char_run))
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: (_ for _ in ()).throw(ConnectionError("offline")))
    monkeypatch.setattr(serve, "create_app", lambda *a: pytest.fail("the server was set up before the BPE loaded"))
    with pytest.raises(SystemExit, match="could not load the tiktoken encoding 'gpt2'.*TIKTOKEN_CACHE_DIR") as e:
        serve.main([f"--out_dir={char_run}", "--port=0"])
    assert "\n" not in str(e.value.code)


class Process:
    """python serve.py ARGS in a process of its own, as a user starts it; its stderr lines collected as they come."""

    def __init__(self, run: Path, *args: str, ignore_sigint: bool = False) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        # SIGINT as a user's terminal gives it, whatever pytest inherited (a background job's is ignored)
        ignore = lambda: signal.signal(signal.SIGINT, signal.SIG_IGN if ignore_sigint else signal.SIG_DFL)  # noqa: E731
        self.process = subprocess.Popen([sys.executable, "serve.py", f"--out_dir={run}", "--port=0", *args], cwd=REPO,
                                        env=env, stderr=subprocess.PIPE, text=True, preexec_fn=ignore)
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.process.stderr), daemon=True).start()
        wait_for(lambda: any(line.startswith("serving") for line in self.lines) or self.process.poll() is not None,
                 "the server to start")
        serving = next(line for line in self.lines if line.startswith("serving"))
        self.port = int(re.search(r":(\d+)$", serving.strip())[1])

    def signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    def wait(self) -> int:
        code = self.process.wait(TIMEOUT)
        time.sleep(0.1)  # the reader thread takes the last lines
        return code

    def text(self) -> str:
        return "".join(self.lines)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(TIMEOUT)


def test_serves_a_checkpoint_from_the_command_line(char_run, char):
    """python serve.py --out_dir=RUN: one access line per request, a Ctrl-C when idle stops at once with 130."""
    server = Process(char_run, "--threads=1")
    try:
        port = server.port
        assert complete(port, prompt="ab", max_tokens=4, temperature=0)["choices"][0]["text"] == \
            greedy(*char, "ab", 4)
        status, page = request(port, "GET", "/")
        assert status == 200 and page.startswith("<!doctype html>")
        wait_for(lambda: " GET / " in server.text(), "the access line")  # the request has left the server too
        server.signal(signal.SIGINT)
        assert server.wait() == 130
    finally:
        server.close()
    text = server.text()
    assert re.search(r"^127\.0\.0\.1 POST /v1/completions 200 2 \+ 4 tokens, \d+\.\d\d s$", text, re.M), text
    assert re.search(r"^127\.0\.0\.1 GET / 200 \d+\.\d\d s$", text, re.M), text
    assert text.endswith("stopped after 2 requests\n") and "draining" not in text and "Traceback" not in text


def test_the_drain_deadline_ends_a_stream_whose_reader_is_behind():
    """A slow reader's queue can hold many tokens ahead of the deadline's event: end_all must end the reply at its next
    event, not after the queue (under load the server once streamed 10M tokens past its deadline)."""
    async def run() -> list:
        reply = serve.Reply.__new__(serve.Reply)
        reply.events, reply.choices, reply.ending = asyncio.Queue(), 1, None
        served = serve.Served.__new__(serve.Served)
        served.replies = {reply}
        for _ in range(1000):
            reply.events.put_nowait((0, "a", [1], None, None))
        seen = []
        with pytest.raises(serve.ApiError) as e:
            async for event in reply.events_until_done(60.0):
                seen.append(event)
                if len(seen) == 3:
                    served.end_all("stopping")
        assert e.value.body()["error"]["code"] == "shutting_down"
        return seen

    assert len(asyncio.run(run())) == 3


def test_ctrl_c_drains_requests_in_flight_for_drain_seconds(char_run):
    """The first Ctrl-C says how many requests are still being answered and lets them run for drain_seconds; then
    their streams end with an error event, and the server exits with 130."""
    server = Process(char_run, "--drain_seconds=1", "--max_tokens=10000000")
    try:
        conn, response = open_stream(server.port, prompt="ab", max_tokens=10000000)  # hours of tokens
        response.readline()
        server.signal(signal.SIGINT)
        events = read_all(response, TIMEOUT)  # the stream goes on for a second, then ends
        assert events[-1]["error"]["code"] == "shutting_down" and len(events) > 1
        assert server.wait() == 130
    finally:
        server.close()
    text = server.text()
    assert "draining 1 request (Ctrl-C again to stop now)\n" in text
    assert "Traceback" not in text and "Error" not in text and text.endswith("stopped after 1 requests\n"), text


def test_a_second_ctrl_c_stops_at_once(char_run):
    server = Process(char_run, "--drain_seconds=600")
    try:
        conn, response = open_stream(server.port, prompt="ab", max_tokens=2000)
        response.readline()
        server.signal(signal.SIGINT)
        wait_for(lambda: "draining 1 request" in server.text(), "the drain to start")
        server.signal(signal.SIGINT)
        assert server.wait() == 130  # long before drain_seconds
    finally:
        server.close()
    assert "Traceback" not in server.text() and server.text().endswith("stopped now\n"), server.text()


def test_an_ignored_ctrl_c_stays_ignored_and_a_public_host_is_warned_about(char_run):
    """A script's background job inherits SIGINT ignored (it once aborted the server with SIGABRT): it stays
    ignored, SIGTERM stops the server. --host=0.0.0.0 is open to the network without authentication: one warning."""
    server = Process(char_run, "--host=0.0.0.0", ignore_sigint=True)
    try:
        assert health(server.port)["status"] == "ok"  # reached as 127.0.0.1: an address the server listens on
        server.signal(signal.SIGINT)
        time.sleep(0.5)
        assert server.process.poll() is None and health(server.port)["status"] == "ok"
        server.signal(signal.SIGTERM)
        assert server.wait() == 128 + signal.SIGTERM
    finally:
        server.close()
    text = server.text()
    assert "warning: --host=0.0.0.0 is not a loopback address: anyone who can reach this machine can use the server, " \
           "which has no authentication\n" in text
    assert "Traceback" not in text and "Fatal" not in text


def _answers(port: int) -> bool:
    try:
        return request(port, "GET", "/health")[0] == 200
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------------------- browser


def test_playground_page_is_a_tracked_file_beside_serve_py():
    """A fresh clone has it: serve.py reads it from beside itself at start-up."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    listed = subprocess.run(["git", "ls-files", "playground.html"], cwd=REPO, capture_output=True, text=True).stdout
    assert listed.strip() == "playground.html" and serve.PLAYGROUND == REPO / "playground.html"


def test_a_missing_playground_page_is_one_line(char, monkeypatch, tmp_path):
    monkeypatch.setattr(serve, "PLAYGROUND", tmp_path / "playground.html")
    with pytest.raises(SystemExit, match="playground.html: No such file.*git checkout playground.html") as e:
        create_app(*char, ServeConfig(), "tiny")
    assert "\n" not in str(e.value.code)


def test_playground_page_loads_nothing_from_elsewhere():
    PLAYGROUND = read_playground()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", PLAYGROUND)
    assert "import " not in PLAYGROUND and "@import" not in PLAYGROUND


def _browser() -> str | None:
    return next((path for name in ("chromium", "chromium-browser", "google-chrome", "chrome")
                 if (path := shutil.which(name))), None)


def test_playground_in_headless_chromium(any_char):
    """Type a prompt, generate, wait for the streamed text, click a token: the attention view shows that token's
    attention_maps weights (mean of the heads of layer 0), and a grid of every layer and head."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install playwright")
    executable = _browser()
    if executable is None:
        pytest.skip("no Chromium found: apt-get install chromium (see docs/serving.md)")
    model, tokenizer = any_char
    prompt, max_tokens = "ROMEO:", 10
    text = greedy(model, tokenizer, prompt, max_tokens)
    ids = tokenizer.encode(prompt + text)
    with serving(model, tokenizer) as (port, _), sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"http://127.0.0.1:{port}/")
            page.fill("#prompt", prompt)
            page.fill("#max_tokens", str(max_tokens))
            page.fill("#temperature", "0")
            page.click("#go")
            page.wait_for_function(f"document.querySelectorAll('#text .tok').length === {len(ids)}",
                                   timeout=TIMEOUT * 1000)
            assert page.inner_text("#text").replace("\u21b5", "") == prompt + text
            page.wait_for_function(f"document.getElementById('info').textContent.startsWith('token {len(ids) - 1} ')")
            before = page.inner_text("#info")
            assert page.locator("#grid canvas").count() == model.config.n_layer * model.config.n_head

            page.click("#text .tok[data-i='3']")
            page.wait_for_function("document.getElementById('info').textContent.startsWith('token 3 ')")
            assert page.inner_text("#info") != before
            shown = [float(page.get_attribute(f"#text .tok[data-i='{k}']", "data-w")) for k in range(4)]
            expected = attention_maps(model, torch.tensor(ids[:4]))[0, 0, :, 3].mean(dim=0)  # layer 0, head mean
            assert torch.allclose(torch.tensor(shown), expected, atol=2e-4)
            assert page.get_attribute("#text .tok[data-i='4']", "data-w") is None  # a later token: no weight
            assert not errors
        finally:
            browser.close()


# ---------------------------------------------------------------------------------------------------------- stops


def test_stop_matching_equals_the_naive_search():
    """Continuation's incremental matcher against the plain rule: the text ends before the earliest stop string, and
    while streaming, everything is shown except an ending that may still grow into a stop string."""
    import random
    from sample import Continuation
    tokenizer, rng = Tokenizer.char(CHARS), random.Random(0)
    for _ in range(400):
        stops = tuple("".join(rng.choice("ab") for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 4)))
        text = "".join(rng.choice("ab") for _ in range(40))
        c = Continuation(tokenizer, None, stops)
        for t in range(1, len(text) + 1):
            c.add(tokenizer.encode(text[t - 1])[0])
            cuts = [i for s in stops if (i := text[:t].find(s)) >= 0]
            if cuts:
                assert c.done and c.text == c.settled() == text[:min(cuts)], (stops, text[:t])
                break
            held = max((n for s in stops for n in range(1, len(s)) if text[:t].endswith(s[:n])), default=0)
            assert not c.done and c.settled() == text[:t - held], (stops, text[:t])


class CountingStr(str):
    """A stop string that counts the characters read from it by indexing or slicing."""
    reads = 0

    def __getitem__(self, key):
        value = super().__getitem__(key)
        CountingStr.reads += len(value)
        return value


def test_stop_matching_is_linear_in_the_stop_length():
    """The work per token does not grow with the stop strings: a step may not rescan them (four 250k-character stop
    strings with n=4 once held every other request for 36 s)."""
    from sample import Continuation
    tokenizer = Tokenizer.char(CHARS)
    stop = CountingStr("ab" * 2000 + "c")  # 4,001 characters; the text "abab..." keeps matching a growing prefix
    c = Continuation(tokenizer, None, (stop,))
    CountingStr.reads = 0
    for _ in range(500):
        for ch in "ab":
            c.add(tokenizer.encode(ch)[0])
            c.settled()
    assert not c.done and c.settled() == ""  # all 1,000 characters may still begin the stop string
    assert CountingStr.reads < 8 * (len(stop) + 1000)  # the table once, then a few reads per character


def test_long_stop_strings_are_bounded_and_do_not_hold_other_requests(char, char_server):
    status, body = request(char_server, "POST", "/v1/completions",
                           {"prompt": "a", "stop": ["x" * (serve.MAX_STOP_CHARS + 1)]})
    assert status == 400 and body["error"]["param"] == "stop" and str(serve.MAX_STOP_CHARS) in body["error"]["message"]
    stops = [c * serve.MAX_STOP_CHARS for c in "wxyz"]  # the bound, four times, n=4: a long stream meanwhile
    conn, response = open_stream(char_server, prompt="ab", n=4, max_tokens=2000, temperature=1.0, stop=stops)
    response.readline()
    try:
        assert complete(char_server, prompt="ab", max_tokens=1, temperature=0)["choices"][0]["text"] == \
            greedy(*char, "ab", 1)
        assert health(char_server)["active_sequences"] >= 4  # answered while the long stream runs
    finally:
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()


# ---------------------------------------------------------------------------------------------------------- API


def test_top_k_is_sample_py_top_k(char, char_server):
    """top_k as vLLM and llama.cpp take it: sample.py's top_k; 0 and -1 mean no limit."""
    model, tokenizer = char
    body = dict(prompt="KING:", n=2, max_tokens=12, temperature=1.0, seed=7)
    for top_k in (1, 5, 0, -1):
        cfg = SampleConfig(num_samples=2, max_new_tokens=12, temperature=1.0, top_k=top_k if top_k > 0 else None,
                           top_p=None, seed=7)
        expected, _ = generate_samples(model, tokenizer, tokenizer.encode("KING:"), cfg,
                                       torch.Generator().manual_seed(7))
        assert [c["text"] for c in complete(char_server, **body, top_k=top_k)["choices"]] == expected, top_k
    assert expected != generate_samples(model, tokenizer, tokenizer.encode("KING:"),
                                        SampleConfig(num_samples=2, max_new_tokens=12, temperature=1.0, top_k=1,
                                                     top_p=None, seed=7), torch.Generator().manual_seed(7))[0]


def test_chat_completions_says_this_is_a_base_model(char_server):
    openai = pytest.importorskip("openai", reason="the openai client is not installed: pip install openai")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{char_server}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError, match="base model.*POST /v1/completions"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])


# ---------------------------------------------------------------------------------------------------------- web pages


def raw_request(port: int, method: str, path: str, headers: dict, body: bytes | None = None,
                host: str | None = None) -> http.client.HTTPResponse:
    """A request with exactly these headers (and this Host); the response, read."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    conn.putrequest(method, path, skip_host=host is not None, skip_accept_encoding=True)
    if host is not None:
        conn.putheader("Host", host)
    for key, value in {**headers, "Content-Length": str(len(body or b""))}.items():
        conn.putheader(key, value)
    conn.endheaders(body)
    response = conn.getresponse()
    response.body = response.read()
    conn.close()
    return response


def test_only_json_bodies_are_read(char_server):
    """A web page may POST text/plain or a form to any address without asking (no CORS preflight): refused."""
    body = json.dumps({"prompt": "ab", "max_tokens": 1}).encode()
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        for path in ("/v1/completions", "/v1/attention"):
            response = raw_request(char_server, "POST", path, {"Content-Type": kind} if kind else {}, body)
            assert response.status == 415 and "application/json" in json.loads(response.body)["error"]["message"]
    assert raw_request(char_server, "POST", "/v1/completions", {"Content-Type": "Application/JSON; charset=utf-8"},
                       body).status == 200


def test_host_must_name_this_server(char_server):
    """DNS rebinding: a page of evil.example whose name now resolves to 127.0.0.1 sends Host: evil.example."""
    port = char_server
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}", "127.0.0.1", f"LOCALHOST:{port}"):
        assert raw_request(port, "GET", "/v1/models", {}, host=host).status == 200, host
    for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1:{port + 1}", f"127.0.0.1.evil.example:{port}",
                 "", f"localhost:{port}@evil.example"):
        for method, path in (("GET", "/"), ("GET", "/v1/models"), ("POST", "/v1/completions")):
            response = raw_request(port, method, path, {"Content-Type": "application/json"}, b'{"prompt": "a"}',
                                   host=host)
            assert response.status in (400, 421) and b"Host" in response.body, (host, path)


def test_no_cors_headers_unless_origins_are_allowed(char):
    origin = {"Origin": "http://evil.example"}
    preflight = {**origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    with serving(*char) as (port, _):
        for method, path, headers in (("GET", "/v1/models", origin), ("OPTIONS", "/v1/completions", preflight)):
            response = raw_request(port, method, path, headers)
            assert not [h for h in response.getheaders() if h[0].lower().startswith("access-control")], path
    with serving(*char, allow_origins="http://good.example, http://localhost:3000") as (port, _):
        response = raw_request(port, "OPTIONS", "/v1/completions", {**preflight, "Origin": "http://localhost:3000"})
        assert response.status == 200
        assert response.getheader("Access-Control-Allow-Origin") == "http://localhost:3000"
        response = raw_request(port, "GET", "/v1/models", {"Origin": "http://good.example"})
        assert response.getheader("Access-Control-Allow-Origin") == "http://good.example"
        for method, path, headers in (("GET", "/v1/models", origin), ("OPTIONS", "/v1/completions", preflight)):
            assert raw_request(port, method, path, headers).getheader("Access-Control-Allow-Origin") is None


@pytest.mark.parametrize("origins, hint", [
    ("http://localhost:3000/", "did you mean http://localhost:3000?"),  # a trailing slash: never sent by a browser
    ("localhost:3000", "e.g. http://localhost:3000"),  # no scheme
    ("https://example.com/app", "e.g. http://localhost:3000"),  # a path
    ("http://good.example, HTTPS://Example.com", "did you mean https://example.com?"),
    ("file://", "e.g. http://localhost:3000"),  # no host
])
def test_origins_that_can_never_match_are_refused(origins, hint):
    with pytest.raises(SystemExit, match=re.escape(hint)) as e:
        serve.main([f"--allow_origins={origins}"])
    assert "\n" not in str(e.value.code) and "is not an origin, which is scheme://host[:port]" in str(e.value.code)
    for good in ("http://localhost:3000", "https://example.com", "http://[::1]:8080", "http://127.0.0.1", "*"):
        assert ServeConfig(allow_origins=good).origins == [good]


def test_every_origin_is_warned_about(char_run):
    server = Process(char_run, "--allow_origins=*")
    try:
        response = raw_request(server.port, "GET", "/v1/models", {"Origin": "http://any.example"})
        assert response.getheader("Access-Control-Allow-Origin") == "*"
    finally:
        server.close()
    assert "warning: --allow_origins=* lets every web page its visitors open call this server and read its answers" \
        in server.text()


def test_streams_never_send_part_of_a_stop_string(char, char_server):
    """Streamed deltas add up to the non-streamed text, which ends before the stop string: a delta that had sent
    the stop string's first characters would make the sum longer."""
    for seed in range(4):
        body = dict(prompt="ab", max_tokens=40, temperature=1.0, seed=seed)
        free = complete(char_server, **body)["choices"][0]["text"]
        stop = free[20:23]  # three characters that this seed writes
        answer = complete(char_server, **body, stop=[stop, "never"])["choices"][0]
        assert answer["finish_reason"] == "stop" and answer["text"] == free[:free.index(stop)]
        texts, reasons = streamed_texts(stream_events(char_server, **body, stop=[stop, "never"]), 1)
        assert texts == [answer["text"]] and reasons == ["stop"]


def test_tiny_temperature_and_top_p_are_answered(char, char_server):
    """1e-300 is 0 in fp32 (and 1e-40 a subnormal): such a temperature or top_p is all but greedy, never a 500."""
    model, tokenizer = char
    for settings in (dict(temperature=1e-300), dict(temperature=1e-40), dict(top_p=1e-300),
                     dict(temperature=1e-300, top_p=1e-300)):
        for stream in (False, True):
            body = dict(prompt="ab", max_tokens=5, seed=1, **settings)
            texts = streamed_texts(stream_events(char_server, **body), 1)[0] if stream else \
                [complete(char_server, **body)["choices"][0]["text"]]
            assert texts == [greedy(model, tokenizer, "ab", 5)], settings
