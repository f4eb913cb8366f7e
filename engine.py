"""The decode worker of serve.py: one thread owns the model and advances every request's completions."""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from model import GPT
from sample import Continuation

if TYPE_CHECKING:
    from serve import Completion

try:  # glibc keeps freed heap pages for reuse, so an idle server would hold its busiest moment's memory
    _malloc_trim = ctypes.CDLL(None).malloc_trim
except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to hand back this way
    _malloc_trim = None


@dataclass(eq=False)
class Job:
    """One prompt continued n times: one model.generate_stream, created when the job gets its rows."""
    request: Completion
    prompt_index: int
    events: asyncio.Queue  # (choice index, text, token ids, finish reason or None) or ("error", message)
    loop: asyncio.AbstractEventLoop
    texts: list[Continuation]
    generated: list[int] = field(default_factory=list)  # tokens sampled per row, for usage
    sent: list[int] = field(default_factory=list)  # characters of each row's text already sent
    sent_ids: list[int] = field(default_factory=list)  # token ids of each row already sent
    stream: Iterator[torch.Tensor] | None = None
    cancelled: bool = False  # set by the request's handler when its client has gone

    @property
    def rows(self) -> int:
        return self.request.n

    def emit(self, event: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop has closed: the server is shutting down
            self.cancelled = True


class Scheduler:
    """The worker thread that owns the model: it decodes active jobs one token each per round, in turn, and runs
    other model calls (attention maps) between rounds. Jobs wait in a bounded queue for rows."""

    def __init__(self, model: GPT, max_sequences: int, max_waiting: int) -> None:
        self.model = model
        self.max_sequences, self.max_waiting = max_sequences, max_waiting
        self.device = model.transformer.wte.weight.device
        self.waiting: deque[Job] = deque()
        self.active: list[Job] = []
        self.calls: deque[tuple[Callable[[], Any], concurrent.futures.Future]] = deque()
        self.cond = threading.Condition()
        self.stopping = False
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
        """Drop jobs whose client has gone: queued ones now, active ones before their next step."""
        with self.cond:
            for job in jobs:
                job.cancelled = True
                if job in self.waiting:
                    self.waiting.remove(job)
            self.cond.notify()

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future | None:
        """Run fn on the worker between two decoding rounds (a forward hook must not see another job's forward);
        None when max_waiting calls are queued already."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self.cond:
            if len(self.calls) >= self.max_waiting:
                return None
            self.calls.append((fn, future))
            self.cond.notify()
        return future

    def load(self) -> dict[str, int]:
        with self.cond:
            return {"active_sequences": sum(j.rows for j in self.active), "waiting_prompts": len(self.waiting)}

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join()

    def _run(self) -> None:
        while True:
            with self.cond:
                while not (self.stopping or self.active or self.waiting or self.calls):
                    self.cond.wait()
                if self.stopping:
                    return
                calls, self.calls = list(self.calls), deque()
                for job in self.active:
                    if job.cancelled:
                        job.stream = None  # frees its KV cache now, not when the handler lets go of the job
                self.active = [j for j in self.active if not j.cancelled]
                rows = sum(j.rows for j in self.active)
                while self.waiting and rows + self.waiting[0].rows <= self.max_sequences:
                    job = self.waiting.popleft()
                    self.active.append(job)
                    rows += job.rows
                active = list(self.active)
            for fn, future in calls:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except Exception as e:  # noqa: BLE001 (handed to the request that asked)
                        future.set_exception(e)
            finished = []
            for job in active:
                try:
                    if job.cancelled or self._step(job):
                        finished.append(job)
                except Exception as e:  # noqa: BLE001 (a failing request must not stop the server)
                    job.emit(("error", f"generation failed: {type(e).__name__}: {e}"))
                    finished.append(job)
            with self.cond:
                self.active = [j for j in self.active if j not in finished]
                idle = not (self.active or self.waiting or self.calls)
            for job in finished:
                job.stream = None
            if idle and _malloc_trim is not None:
                _malloc_trim(0)  # ~1 ms, once the last request has gone: memory returns to its level before

    def _step(self, job: Job) -> bool:
        """Advance one job by a token; send the text that settled; True when the job has ended."""
        r = job.request
        if job.stream is None:
            idx = torch.tensor([r.prompts[job.prompt_index]] * r.n, dtype=torch.long, device=self.device)
            generator = torch.Generator(device=self.device).manual_seed(r.seed)
            job.stream = self.model.generate_stream(idx, r.max_tokens, r.temperature, r.top_k, r.top_p, generator)
        token = next(job.stream, None)  # (n, 1); the first call prefills the prompt; None: max_tokens was 0
        tokens = token[:, 0].tolist() if token is not None else None
        for row, text in enumerate(job.texts):
            if job.sent[row] < 0:
                continue  # ended and reported
            if tokens is not None and not text.done:
                job.generated[row] += 1
                text.add(tokens[row])
            ended = tokens is None or text.done or job.generated[row] == r.max_tokens
            new_text = text.text if ended else text.settled()
            delta, ids = new_text[job.sent[row]:], text.ids[job.sent_ids[row]:]
            if delta or ids or ended:
                reason = ("stop" if text.done else "length") if ended else None
                job.emit((job.prompt_index * r.n + row, delta, ids, reason))
                job.sent[row], job.sent_ids[row] = len(new_text), len(text.ids)
            if ended:
                text.done, job.sent[row] = True, -1  # -1: the finish reason has been sent
        return all(s < 0 for s in job.sent)
