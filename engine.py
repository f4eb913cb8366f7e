"""The decode worker of serve.py: one thread owns the model and decodes every request's rows together, one token per
step for all of them (continuous batching; docs/serving.md says what can differ from sample.py)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from model import GPT, KVCache, causal_mask, slot_positions
from sample import Continuation, decode
from sampling import sample_next

if TYPE_CHECKING:
    from serve import Completion
    from tokens import Tokenizer

try:  # glibc keeps freed heap pages for reuse, so an idle server would hold its busiest moment's memory
    _malloc_trim = ctypes.CDLL(None).malloc_trim
except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to hand back this way
    _malloc_trim = None


@dataclass(eq=False)
class Job:
    """One prompt continued n times: n rows of the batch, from its prefill until every row has ended."""
    request: Completion
    prompt_index: int
    events: asyncio.Queue  # (choice index, text, token ids, finish reason or None, logprobs) or ("error", message)
    loop: asyncio.AbstractEventLoop
    texts: list[Continuation]
    generated: list[int] = field(default_factory=list)  # tokens sampled per row, for usage
    sent: list[int] = field(default_factory=list)  # characters of each row's text already sent
    sent_ids: list[int] = field(default_factory=list)  # token ids of each row already sent
    cancelled: bool = False  # set by the request's handler when its client has gone
    # the worker's
    submitted: float = field(default_factory=time.monotonic)
    contexts: list[list[int]] = field(default_factory=list)  # each row's tokens: the prompt's window, then sampled
    logprobs: list[list[tuple]] = field(default_factory=list)  # per row, per id of its text: see _logprobs
    prompt_logprobs: list[tuple] = field(default_factory=list)  # echo with logprobs: per prompt token, from prefill
    generator: torch.Generator | None = None
    length: int = 0  # positions of each row in the cache (rows of a job advance together)
    prefilled: int = 0  # prompt tokens prefilled so far
    prefill: KVCache | None = None  # a long prompt's cache while it is prefilled in chunks
    windowed: bool = False  # past block_size (full attention): each step recomputes the last block, outside the batch
    last_token: float = 0.0

    def __post_init__(self) -> None:
        self.logprobs = self.logprobs or [[] for _ in self.texts]

    @property
    def rows(self) -> int:
        return self.request.n

    @property
    def scores_prompt(self) -> bool:
        """echo with logprobs: the prompt's own log-probabilities are returned, from its prefill."""
        return self.request.echo and self.request.logprobs is not None

    @property
    def done(self) -> bool:
        return all(s < 0 for s in self.sent)  # every row's finish reason has been sent

    def emit(self, event: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop has closed: the server is shutting down
            self.cancelled = True


class RowCache:
    """The server's KV cache: row b is its own sequence, lengths[b] positions long, and a forward of B rows feeds
    rows 0..B-1 (B = len(lengths)). Follows model.py's KVCache protocol and rolls as it does (position p in slot
    p % max_len), so a window model's row stays in the batch past block_size. Rows of one length are fed as one
    sequence, without a mask (a mask costs a batch-1 step ~20%); rows of different lengths each at their own
    positions, under a mask."""

    def __init__(self, model: GPT, rows: int) -> None:
        c, p = model.config, model.transformer.wte.weight
        self.max_len = max(c.block_size, c.window) if c.rolling else c.block_size
        self.k = torch.empty(c.n_layer, rows, c.kv_heads, self.max_len, c.head_dim, device=p.device, dtype=p.dtype)
        self.v = torch.empty_like(self.k)  # (L, rows, n_kv_head, max_len, head_dim): untouched until rows use it
        self.lengths: list[int] = []  # positions of each row in use
        self.zeroed = 0  # slots zeroed in every row, see _zero_to
        self.q_pos, self.width = torch.zeros(0), 0  # this forward's positions, and the slots attended to

    def set_row(self, b: int, k: torch.Tensor, v: torch.Tensor, length: int) -> None:
        """Make row b (at most one past the last) the sequence of `length` positions whose slots k and v
        (n_layer, n_kv_head, slots, head_dim) hold."""
        T = k.size(2)
        self._zero_to(T)
        self.k[:, b, :, :T], self.v[:, b, :, :T] = k, v
        self.lengths[b:b + 1] = [length]

    def begin(self, T: int, window: int | None) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        starts, size, device = self.lengths, self.max_len, self.k.device
        end = max(starts) + T
        if end > size and (window is None or window > size - T + 1):
            raise ValueError(f"a row of the KV cache holds {size} positions: {end} asked")
        self.lengths = [n + T for n in starts]
        self.width = min(end, size)
        self._zero_to(self.width)  # before any key is written there: zeroing later would erase keys
        if min(starts) == max(starts) and end <= size:  # one sequence's positions
            self.q_pos = torch.arange(end - T, end, device=device)
            mask = None if window is None and T == 1 else causal_mask(self.q_pos, torch.arange(end, device=device),
                                                                      window)
            return self.q_pos, mask, end
        start = torch.tensor(starts, device=device)[:, None]  # (B, 1)
        self.q_pos = start + torch.arange(T, device=device)  # (B, T): each row after its own tokens
        k_pos = slot_positions(start + T, size, device)[:, :self.width]  # (B, width)
        return self.q_pos, causal_mask(self.q_pos, k_pos, window).unsqueeze(1), end  # mask (B, 1, T, width)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T = k.size(0), k.size(2)
        if self.q_pos.dim() == 1:
            self.k[layer, :B, :, self.width - T:self.width] = k
            self.v[layer, :B, :, self.width - T:self.width] = v
        else:  # each row at its own slots
            rows, slots = torch.arange(B, device=k.device)[:, None], self.q_pos % self.max_len  # (B, 1), (B, T)
            self.k[layer][rows, :, slots] = k.transpose(1, 2)  # (B, T, n_kv_head, head_dim)
            self.v[layer][rows, :, slots] = v.transpose(1, 2)
        return self.k[layer, :B, :, :self.width], self.v[layer, :B, :, :self.width]

    def _zero_to(self, end: int) -> None:
        # A row shorter than the longest reads keys past its end under a mask, and a masked key is still multiplied
        # by 0: never-written memory could hold NaN (0 * NaN = NaN). So every row is zeroed once up to the longest.
        if end > self.zeroed:
            self.k[:, :, :, self.zeroed:end] = 0
            self.v[:, :, :, self.zeroed:end] = 0
            self.zeroed = end


class Metrics:
    """The server's Prometheus instruments (GET /metrics), in a registry of its own."""

    def __init__(self, load: Callable[[], dict[str, int]]) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("smallgpt_requests", "HTTP requests answered, by status code", ["status"], registry=r)
        self.tokens = Counter("smallgpt_generated_tokens", "completion tokens sampled", registry=r)
        Gauge("smallgpt_active_rows", "rows decoding or prefilling", registry=r).set_function(
            lambda: load()["active_sequences"])
        Gauge("smallgpt_waiting_prompts", "prompts waiting for rows", registry=r).set_function(
            lambda: load()["waiting_prompts"])
        seconds = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.ttft = Histogram("smallgpt_time_to_first_token_seconds", "from a prompt's arrival to its first token",
                              buckets=seconds, registry=r)
        self.tpot = Histogram("smallgpt_time_per_output_token_seconds", "between two tokens of a prompt's rows",
                              buckets=seconds, registry=r)


class Scheduler:
    """The worker thread that owns the model. Each round it runs other model calls (attention maps), prefills
    waiting prompts (at most prefill_chunk tokens a round, so that a long prompt pauses the others only that
    long), then decodes one token for every row at once. Rows live in one KV cache of max_sequences rows, each at
    its own length; a job's rows are freed the round it ends. Jobs wait in a bounded queue for rows."""

    def __init__(self, model: GPT, max_sequences: int, max_waiting: int, prefill_chunk: int = 128) -> None:
        self.model = model
        self.max_sequences, self.max_waiting, self.prefill_chunk = max_sequences, max_waiting, prefill_chunk
        self.device = model.transformer.wte.weight.device
        self.block_size = model.config.block_size
        self.cache = RowCache(model, max_sequences)
        self.slots: list[tuple[Job, int]] = []  # cache row i holds (job, row of the job)
        self.jobs: list[Job] = []  # jobs holding rows: prefilling, decoding, or windowed
        self.waiting: deque[Job] = deque()
        self.calls: deque[tuple[Callable[[], Any], concurrent.futures.Future]] = deque()
        self.cond = threading.Condition()
        self.stopping = False
        try:
            self.metrics: Metrics | None = Metrics(self.load)
        except ImportError:  # prometheus_client is in the serve extra; GET /metrics says so
            self.metrics = None
        self.thread = threading.Thread(target=self._run, name="decode", daemon=True)
        self.thread.start()

    def submit(self, jobs: list[Job]) -> bool:
        """Queue all jobs of one request, or none when the queue has no room for them (the caller answers 503)."""
        with self.cond:
            if len(self.waiting) + len(jobs) > self.max_waiting:
                return False
            self.waiting.extend(jobs)
            self.cond.notify()
        return True

    def cancel(self, jobs: list[Job]) -> None:
        """Drop jobs whose client has gone: queued ones now, running ones (and their rows) before the next step."""
        with self.cond:
            for job in jobs:
                job.cancelled = True
                if job in self.waiting:
                    self.waiting.remove(job)
            self.cond.notify()

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future | None:
        """Run fn on the worker between two steps (a forward hook must not see another job's forward); None when
        max_waiting calls are queued already."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self.cond:
            if len(self.calls) >= self.max_waiting:
                return None
            self.calls.append((fn, future))
            self.cond.notify()
        return future

    def load(self) -> dict[str, int]:
        with self.cond:
            return {"active_sequences": sum(j.rows for j in self.jobs), "waiting_prompts": len(self.waiting)}

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join()

    # ------------------------------------------------------------------------------------------------ the loop

    def _run(self) -> None:
        while True:
            with self.cond:
                while not (self.stopping or self.jobs or self.waiting or self.calls):
                    self.cond.wait()
                if self.stopping:
                    return
                calls, self.calls = list(self.calls), deque()
                self._free([j for j in self.jobs if j.cancelled])
                rows = sum(j.rows for j in self.jobs)
                while self.waiting and rows + self.waiting[0].rows <= self.max_sequences:
                    job = self.waiting.popleft()
                    self.jobs.append(job)
                    rows += job.rows
            for fn, future in calls:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except (Exception, SystemExit) as e:  # noqa: BLE001 (handed to the request that asked)
                        future.set_exception(e)
            try:
                ended = self._prefill() + self._decode()
            except (Exception, SystemExit) as e:  # noqa: BLE001 (a failing step fails its requests, not the worker)
                for job in self.jobs:
                    job.emit(("error", f"generation failed: {type(e).__name__}: {e}"))
                ended = self.jobs
            with self.cond:
                self._free(ended)
                idle = not (self.jobs or self.waiting or self.calls)
            if idle and _malloc_trim is not None:
                _malloc_trim(0)  # ~1 ms, once the last request has gone: memory returns to its level before

    def _free(self, jobs: list[Job]) -> None:
        """Give the rows of ended jobs back, at once."""
        gone = set(jobs)
        self.jobs = [j for j in self.jobs if j not in gone]
        self._unslot(jobs)
        for job in gone:
            job.prefill = job.generator = None

    def _unslot(self, jobs: list[Job]) -> None:
        """Take the rows of jobs out of the cache, moving later rows down so that rows 0..B-1 stay the batch."""
        gone = set(jobs)
        keep = [s for s in self.slots if s[0] not in gone]
        kept = {id(s): i for i, s in enumerate(self.slots)}
        for i, s in enumerate(keep):
            old = kept[id(s)]
            if old != i:
                n = min(s[0].length, self.cache.max_len)
                self.cache.set_row(i, self.cache.k[:, old, :, :n], self.cache.v[:, old, :, :n], s[0].length)
        self.slots = keep
        del self.cache.lengths[len(keep):]

    def _prompt(self, job: Job) -> list[int]:
        prompt = job.request.prompts[job.prompt_index]  # as model.generate: a window model's whole, else the last block
        return prompt if self.model.config.rolling else prompt[-self.block_size:]

    # ------------------------------------------------------------------------------------------------ prefill

    @torch.no_grad()
    def _prefill(self) -> list[Job]:
        """Prefill prompts that have rows, prefill_chunk tokens at most: short prompts together (right-padded,
        so that causal attention never reaches the padding), a longer one alone, a chunk a round. Sample each
        finished prompt's first token, and give its rows cache rows. The jobs that ended."""
        todo = [j for j in self.jobs if j.prefilled < len(self._prompt(j))]
        if not todo:
            return []
        ended = []
        group = [j for j in todo if j.request.max_tokens == 0 and not j.scores_prompt]  # nothing to compute
        for job in group:
            job.prefilled = len(self._prompt(job))
            ended += [job] if self._sampled(job, None) else []
        todo = [j for j in todo if j not in group]
        if not todo:
            return ended
        first, failed = todo[0], []
        size = self.cache.max_len
        if first.prefill is not None or len(self._prompt(first)) > min(self.prefill_chunk, size):  # chunks, alone
            prompt, n = self._prompt(first), self.prefill_chunk
            if first.prefill is None:
                first.prefill = KVCache.for_model(self.model, 1, max_len=min(len(prompt), size))
            if min(first.prefilled + n, len(prompt)) > size:  # rolling on: every query of the chunk keeps its window
                n = min(n, size - self.model.config.window + 1)
            chunk = prompt[first.prefilled:first.prefilled + n]
            logits = self.model(self._tensor([chunk]), kv_cache=first.prefill,
                                logits_at=None if first.scores_prompt else -1)[0]  # (1, len(chunk) or 1, vocab)
            if first.scores_prompt and not self._scored(first, logits[0], first.prefilled):
                return ended + [first]
            first.prefilled += len(chunk)
            if first.prefilled < len(prompt):
                return ended
            group, cache, lasts = [first], first.prefill, logits[:, -1]
        else:  # as many short prompts as fit in prefill_chunk tokens, padded to the longest
            group, longest = [], 0
            for job in (j for j in todo if j.scores_prompt == first.scores_prompt):  # all positions' logits, or last
                n = len(self._prompt(job))
                if n > min(self.prefill_chunk, size) or (len(group) + 1) * max(longest, n) > self.prefill_chunk:
                    break
                group.append(job)
                longest = max(longest, n)
            prompts = [self._prompt(j) for j in group]
            cache = KVCache.for_model(self.model, len(group), max_len=longest)
            ends = torch.tensor([len(p) - 1 for p in prompts], device=self.device)  # each prompt's last position
            x = self._tensor([p + [0] * (longest - len(p)) for p in prompts])  # (jobs, longest)
            if first.scores_prompt:
                logits = self.model(x, kv_cache=cache)[0]  # (jobs, longest, vocab)
                failed = [id(job) for i, job in enumerate(group)
                          if not self._scored(job, logits[i, :len(prompts[i])], 0)]
                lasts = logits[torch.arange(len(group), device=self.device), ends]  # (jobs, vocab)
            else:
                lasts = self.model(x, kv_cache=cache, logits_at=ends)[0][:, 0]  # (jobs, vocab)
        for i, job in enumerate(group):
            if id(job) in failed:  # its error is sent; it takes no rows
                ended.append(job)
                continue
            prompt = self._prompt(job)
            job.prefill, job.prefilled, job.length = None, len(prompt), len(prompt)
            job.contexts = [list(prompt) for _ in range(job.rows)]
            job.generator = torch.Generator(device=self.device).manual_seed(job.request.seed)
            if self._sampled(job, lasts[i:i + 1].expand(job.rows, -1) if job.request.max_tokens else None):
                ended.append(job)
                continue
            n = min(job.length, size)
            for row in range(job.rows):  # the rows of a prompt start alike: one prefill, copied
                self.cache.set_row(len(self.slots), cache.k[:, i, :, :n], cache.v[:, i, :, :n], job.length)
                self.slots.append((job, row))
        return ended

    # ------------------------------------------------------------------------------------------------ decode

    @torch.no_grad()
    def _decode(self) -> list[Job]:
        """One token for every row: the batch of cache rows in one forward (a window model's rows roll on past
        block_size), and each windowed job recomputing its last block as model.generate does. The jobs that ended."""
        full = [j for j in self.jobs if j.length == self.block_size and not j.windowed
                and not self.model.config.rolling]
        for job in full:
            job.windowed = True  # no position left in its rows: from now on each step recomputes the window
        self._unslot(full)
        logits, where = {}, {}
        if self.slots:
            idx = self._tensor([[job.contexts[row][-1]] for job, row in self.slots])  # (B, 1)
            out = self.model(idx, kv_cache=self.cache)[0][:, -1]  # (B, vocab)
            for i, (job, row) in enumerate(self.slots):
                where.setdefault(job, [0] * job.rows)[row] = i
            for job, slots in where.items():
                job.length += 1
                logits[job] = out[slots] if len(slots) > 1 else out[slots[0]:slots[0] + 1]
        for job in self.jobs:
            if job.windowed and not job.done:  # the last block_size tokens from position 0, as model.generate
                window = self._tensor([c[-self.block_size:] for c in job.contexts])
                logits[job] = self.model(window, logits_at=-1)[0][:, -1]
        return [job for job, job_logits in logits.items() if self._sampled(job, job_logits)]

    # ------------------------------------------------------------------------------------------------ tokens

    def _sampled(self, job: Job, logits: torch.Tensor | None) -> bool:
        """_sample_and_send, but a failure of this job's own work (its sampling, logprobs, stop strings, text) ends
        this job alone with an error event: True, as for a job that has ended; the batch's other jobs go on."""
        try:
            return self._sample_and_send(job, logits)
        except (Exception, SystemExit) as e:  # noqa: BLE001 (handed to the request whose job failed)
            self._failed(job, e)
            return True

    def _scored(self, job: Job, logits: torch.Tensor, start: int) -> bool:
        """_prompt_logprobs, a failure of which ends this job alone as in _sampled: False when it failed."""
        try:
            self._prompt_logprobs(job, logits, start)
            return True
        except (Exception, SystemExit) as e:  # noqa: BLE001 (handed to the request whose job failed)
            self._failed(job, e)
            return False

    def _failed(self, job: Job, e: BaseException) -> None:
        job.emit(("error", f"generation failed: {type(e).__name__}: {e}"))
        job.sent = [-1] * len(job.sent)  # nothing more is sent for it

    def _sample_and_send(self, job: Job, logits: torch.Tensor | None) -> bool:
        """Sample a token for each row of job from its logits (rows, vocab), send the text that settled; True
        when the job has ended. None logits: max_tokens is 0."""
        r = job.request
        tokens, lp = None, None
        if logits is not None:
            tokens_t = sample_next(logits, r.temperature, r.top_k, r.top_p, job.generator)  # (rows, 1)
            tokens = tokens_t[:, 0].tolist()
            if r.logprobs is not None:
                lp = self._logprobs(job, logits, tokens_t, r.logprobs)
        now = time.monotonic()
        if self.metrics is not None and tokens is not None:
            if job.last_token:
                self.metrics.tpot.observe(now - job.last_token)
            else:
                self.metrics.ttft.observe(now - job.submitted)
        job.last_token = now
        for row, text in enumerate(job.texts):
            if tokens is not None:
                job.contexts[row].append(tokens[row])
            if job.sent[row] < 0:
                continue  # ended and reported
            if tokens is not None and not text.done:
                job.generated[row] += 1
                if self.metrics is not None:
                    self.metrics.tokens.inc()
                before = len(text.ids), len(text.text.rstrip("\ufffd"))
                text.add(tokens[row])
                if lp is not None and len(text.ids) > before[0]:
                    job.logprobs[row].append((*lp[row], before[1]))
            ended = tokens is None or text.done or job.generated[row] == r.max_tokens
            new_text = text.text if ended else text.settled()
            delta, ids = new_text[job.sent[row]:], text.ids[job.sent_ids[row]:]
            if delta or ids or ended:
                reason = ("stop" if text.done else "length") if ended else None
                logprobs = job.logprobs[row][job.sent_ids[row]:] if r.logprobs is not None else None
                job.emit((job.prompt_index * r.n + row, delta, ids, reason, logprobs))
                job.sent[row], job.sent_ids[row] = len(new_text), len(text.ids)
            if ended:
                text.done, job.sent[row] = True, -1  # -1: the finish reason has been sent
        return job.done

    def _logprobs(self, job: Job, logits: torch.Tensor, tokens: torch.Tensor, top: int) -> list[tuple]:
        """Per row: (token text, its log-probability, {text: log-probability} of the top alternatives), under the
        model's own distribution (before temperature and top_p, as OpenAI's and vLLM's)."""
        logp = logits.float().log_softmax(dim=-1)  # (rows, vocab)
        chosen = logp.gather(1, tokens)[:, 0].tolist()
        best = logp.topk(top, dim=-1) if top else None
        tokenizer = job.texts[0].tokenizer
        out = []
        for row, token in enumerate(tokens[:, 0].tolist()):
            alternatives = {} if best is None else {
                decode(tokenizer, [i]): v for i, v in zip(best.indices[row].tolist(), best.values[row].tolist())}
            out.append((decode(tokenizer, [token]), chosen[row], alternatives))
        return out

    def _prompt_logprobs(self, job: Job, logits: torch.Tensor, start: int) -> None:
        """Add to job.prompt_logprobs the entries (as _logprobs's, with the text offset) of the prompt tokens that
        logits (T, vocab), at prompt positions start.., predict; the first token has none (OpenAI's null)."""
        prompt, tokenizer, top = self._prompt(job), job.texts[0].tokenizer, job.request.logprobs
        if start == 0:
            job.prompt_logprobs = [(decode(tokenizer, prompt[:1]), None, None, 0)]
        targets = self._tensor([prompt[start + 1:start + 1 + logits.size(0)]])[0]  # the last position's: sampled
        logp = logits[:len(targets)].float().log_softmax(dim=-1)  # (targets, vocab)
        chosen = logp.gather(1, targets[:, None])[:, 0].tolist()
        best = logp.topk(top, dim=-1) if top else None
        offsets = _text_offsets(tokenizer, prompt)
        for j, token in enumerate(targets.tolist()):
            alternatives = {} if best is None else {
                decode(tokenizer, [i]): v for i, v in zip(best.indices[j].tolist(), best.values[j].tolist())}
            job.prompt_logprobs.append((decode(tokenizer, [token]), chosen[j], alternatives, offsets[start + 1 + j]))

    def _tensor(self, rows: list[list[int]]) -> torch.Tensor:
        return torch.tensor(rows, dtype=torch.long, device=self.device)


def _text_offsets(tokenizer: Tokenizer, ids: list[int]) -> list[int]:
    """Where each token's text starts in decode(ids), in characters."""
    if max(ids) < tokenizer.vocab_size:
        return tokenizer.offsets(ids)
    # an id of a padded embedding has no text: U+FFFD, as sample.decode shows it
    return list(itertools.accumulate((len(decode(tokenizer, [i])) for i in ids[:-1]), initial=0))
