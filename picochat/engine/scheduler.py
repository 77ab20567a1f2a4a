"""Continuous batching: many requests share one model, joining and leaving the batch between steps.

One thread owns the model. Each turn of its loop:

    1. admit   waiting requests into free slots (bounded queue; a full queue refuses new work)
    2. prefill one chunk of the prompt being admitted (chunks keep the running rows' latency bounded)
    3. decode  one token for every running row in a single forward pass, then sample per row
    4. retire  rows that stopped, hit their limit, or whose client went away (their slot is free at once)

Requests talk to the thread through callbacks (`on_event`), so the caller decides how to hand events
to its own world (the server puts them on an asyncio queue).
"""
from __future__ import annotations

import collections
import itertools
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..errors import PicochatError
from .engine import SamplingParams, _Row, _Text
from .sampling import apply_repetition_penalty, sample_next
from .slot_cache import SlotCache


class QueueFull(PicochatError):
    """The scheduler's waiting queue is full; try again later."""


@dataclass
class Event:
    text: str                        # UTF-8-safe text delta (may be "")
    token_ids: list[int]
    finish_reason: Optional[str]     # "stop" | "length" | "cancelled" | "error" on the last event
    prompt_tokens: int
    completion_tokens: int
    error: Optional[str] = None
    cached_tokens: int = 0           # prompt tokens whose K/V were reused from an earlier request


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams
    on_event: Callable[[Event], None]    # called from the scheduler thread
    id: int = field(default_factory=itertools.count().__next__)
    cancelled: bool = False


class _Running:
    """A request in a slot: its row state, its own RNG and repetition-penalty set."""

    def __init__(self, req: Request, tokenizer, device):
        self.req = req
        self.row = _Row(list(req.prompt), _Text(tokenizer, tuple(req.params.stop_strings)))
        self.gen = None
        if req.params.seed is not None:
            self.gen = torch.Generator(device=device).manual_seed(req.params.seed)
        self.seen: Optional[torch.Tensor] = None
        self.prefilled = 0  # prompt tokens already in the cache
        self.slot = -1      # the slot its prompt is being written to (while admitting)
        self.cached = 0     # prompt tokens reused from a retained slot
        self.fed: list[int] = []  # generated tokens already run through the model (their K/V are cached)
        self.last_token = -1


class ModelThread:
    """One OS thread that does all of a model's torch work: loading it, then running its scheduler loop.

    Why not load in the main thread and decode in another: once two threads have used torch's OpenMP
    pool, their worker teams compete for the cores. Measured on 2 cores: a 2-thread decode in a second
    thread ran at half the speed (22 vs 45 tok/s) of the same decode in the thread that loaded the model;
    benchmarks/serve_load.py's one-client level went from 22 to 33 tok/s when the server moved to this.
    """

    def __init__(self, name: str = "picochat-model"):
        self._jobs: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            fn, fut = self._jobs.get()
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as e:  # handed to the caller, who re-raises it
                fut.set_exception(e)

    def submit(self, fn) -> Future:
        fut: Future = Future()
        self._jobs.put((fn, fut))
        return fut

    def call(self, fn):
        """Run fn() on the model thread and return its result (or raise its exception) here."""
        return self.submit(fn).result()


class Scheduler:
    def __init__(self, model, tokenizer, max_batch: int = 16, max_queue: int = 64,
                 max_context: Optional[int] = None, prefill_chunk: int = 512,
                 worker: Optional[ModelThread] = None):
        self.model, self.tokenizer = model, tokenizer
        self.device = next(model.parameters()).device
        if model.config.pos == "alibi":  # its bias is built from one shared query position
            max_batch = 1
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.context = min(max_context or model.config.block_size, model.config.block_size)
        self.cache = SlotCache.for_model(model, max_batch, self.context)
        self.waiting: collections.deque[Request] = collections.deque()
        self.admitting: Optional[_Running] = None
        self.running: list[_Running] = []  # index = cache row
        self.cv = threading.Condition()
        self.stopped = False
        # metrics
        self.generated_total = 0
        self.requests_total = 0
        self._recent: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens)
        self._first_sample: Optional[float] = None
        self.worker = worker or ModelThread("picochat-scheduler")  # pass the thread that loaded the model
        self._running: Optional[Future] = None

    # -- the caller's side ---------------------------------------------------------------------------

    def start(self) -> "Scheduler":
        """Run the loop on the model thread (again after stop(): an app may run its lifespan twice)."""
        if self._running is not None and not self._running.done():
            return self
        with self.cv:
            self.stopped = False
        self._running = self.worker.submit(self._loop)
        return self

    def stop(self) -> None:
        with self.cv:
            self.stopped = True
            self.cv.notify_all()
        if self._running is not None:
            try:
                self._running.result(timeout=30)
            except Exception:
                pass

    def submit(self, req: Request) -> Request:
        req.params.check()
        if not req.prompt:
            raise PicochatError("the prompt is empty")
        if req.params.max_tokens < 1:
            raise PicochatError("max_tokens must be at least 1")
        if len(req.prompt) >= self.context:
            raise PicochatError(f"the prompt is {len(req.prompt)} tokens but the context is {self.context}")
        with self.cv:
            if self.stopped:
                raise PicochatError("the scheduler is stopped")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting; try again shortly")
            self.waiting.append(req)
            self.requests_total += 1
            self.cv.notify_all()
        return req

    def cancel(self, req: Request) -> None:
        """The client went away: the request leaves the queue or its slot at the next step."""
        req.cancelled = True
        with self.cv:
            self.cv.notify_all()

    def stats(self) -> dict:
        now = time.monotonic()
        with self.cv:
            while self._recent and self._recent[0][0] < now - 10:
                self._recent.popleft()
            recent = sum(n for _, n in self._recent)
            # over the last 10 s, or since the first token ever if that is sooner (but at least 1 s)
            span = min(10.0, max(1.0, now - self._first_sample)) if self._first_sample else 10.0
            return {"queue_depth": len(self.waiting) + (self.admitting is not None),
                    "active_sequences": len(self.running), "generated_tokens_total": self.generated_total,
                    "requests_total": self.requests_total, "tokens_per_second": recent / span}

    # -- the model thread ----------------------------------------------------------------------------

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self.cv:
                while not self.stopped and not self.waiting and not self.running and self.admitting is None:
                    self.cv.wait()
                if self.stopped:
                    break
            try:
                self._turn()
            except Exception as e:  # a bug must not leave clients hanging: fail everyone, keep serving
                self._fail_all(f"{type(e).__name__}: {e}")
        self._fail_all("the server is shutting down", reason="cancelled")

    def _turn(self) -> None:
        self._drop_cancelled()
        if self.admitting is None and len(self.running) < self.max_batch:
            with self.cv:
                req = self.waiting.popleft() if self.waiting else None
            if req is not None:
                self.admitting = _Running(req, self.tokenizer, self.device)
        if self.admitting is not None:
            self._prefill_chunk()
        if self.running:
            self._decode()

    def _prefill_chunk(self) -> None:
        r, slot = self.admitting, len(self.running)  # the admitted row always takes the next free slot
        p = r.req.prompt
        if r.slot < 0:  # first chunk: start after the longest prefix an earlier request left behind
            r.prefilled = r.cached = self.cache.claim(slot, p)
        elif r.slot != slot:  # a row left between two chunks: move what is written so far
            self.cache.move_partial(r.slot, slot, r.prefilled)
        r.slot = slot
        end = min(len(p), r.prefilled + self.prefill_chunk)
        idx = torch.tensor([p[r.prefilled:end]], dtype=torch.long, device=self.device)
        # only the last chunk's last position is sampled from: the LM head runs on it alone
        logits, _ = self.model(idx, start_pos=r.prefilled, kv_cache=self.cache.prefill_view(slot, r.prefilled),
                               last_logits_only=True)
        r.prefilled = end
        if end < len(p):
            return
        self.admitting = None
        self.cache.add_row(len(p))
        self.running.append(r)
        if r.req.params.repetition_penalty not in (None, 1.0):
            r.seen = torch.zeros(logits.size(-1), dtype=torch.bool, device=self.device)
            r.seen[torch.tensor(p, device=self.device)] = True
        self._sample([(r, logits[0, -1])])

    def _decode(self) -> None:
        positions, mask = self.cache.step_inputs()
        idx = torch.tensor([[r.last_token] for r in self.running], dtype=torch.long, device=self.device)
        for r in self.running:
            r.fed.append(r.last_token)
        if len(self.running) == 1:  # alone: the plain single-query path (no mask, one start position)
            logits, _ = self.model(idx, start_pos=self.cache.lengths[0], kv_cache=self.cache)
        else:
            logits, _ = self.model(idx, start_pos=int(positions.min()), kv_cache=self.cache,
                                   positions=positions, attn_mask=mask)
        self._sample(list(zip(self.running, logits[:, -1])))

    def _sample(self, rows: list[tuple[_Running, torch.Tensor]]) -> None:
        now = time.monotonic()
        picks: dict[int, int] = {}
        groups: dict[tuple, list[int]] = {}  # rows that sample alike share one batched call
        lasts = []
        for j, (r, logits) in enumerate(rows):
            sp = r.req.params
            last = logits.float().unsqueeze(0)  # (1, V)
            if r.seen is not None:
                last = apply_repetition_penalty(last, r.seen.unsqueeze(0), sp.repetition_penalty)
            lasts.append(last)
            if r.gen is not None:  # its own seeded generator: sampled alone, so it is reproducible
                picks[j] = int(sample_next(last, sp.temperature, sp.top_k or None, sp.top_p, r.gen, sp.min_p)[0])
            else:
                groups.setdefault((sp.temperature, sp.top_k or None, sp.top_p, sp.min_p), []).append(j)
        for (temp, top_k, top_p, min_p), js in groups.items():
            out = sample_next(torch.cat([lasts[j] for j in js]), temp, top_k, top_p, None, min_p)
            picks.update(zip(js, out.tolist()))
        done = []
        for j, (r, _) in enumerate(rows):
            t = picks[j]
            if r.seen is not None:
                r.seen[t] = True
            r.last_token = t
            token, delta = r.row.push(t, r.req.params, self.context)
            self._emit(r, delta, [] if token is None else [token], r.row.finish_reason)
            if r.row.finish_reason is not None:
                done.append(r)
        with self.cv:
            self.generated_total += len(rows)
            self._recent.append((now, len(rows)))
            self._first_sample = self._first_sample or now
        for r in done:
            self._retire(r)

    def _emit(self, r: _Running, text: str, tokens: list[int], finish: Optional[str], error=None) -> None:
        _notify(r.req, Event(text, tokens, finish, len(r.row.prompt), len(r.row.tokens), error, r.cached))

    def _retire(self, r: _Running) -> None:
        """r leaves the batch: swapped to the last row (rows stay contiguous), then popped; its K/V stay
        behind for the conversation's next turn (see SlotCache)."""
        row, last = self.running.index(r), len(self.running) - 1
        if row != last:
            self.cache.swap_rows(row, last)
            self.running[row], self.running[last] = self.running[last], self.running[row]
        self.running.pop()
        busy = (self.admitting.slot,) if self.admitting is not None and self.admitting.slot >= 0 else ()
        self.cache.pop_row(r.row.prompt + r.fed, busy)

    def _drop_cancelled(self) -> None:
        with self.cv:
            gone = [q for q in self.waiting if q.cancelled]
            for q in gone:
                self.waiting.remove(q)
        for q in gone:
            _notify(q, Event("", [], "cancelled", len(q.prompt), 0))
        if self.admitting is not None and self.admitting.req.cancelled:
            r, self.admitting = self.admitting, None
            self._emit(r, "", [], "cancelled")
        for r in [r for r in self.running if r.req.cancelled]:
            self._emit(r, "", [], "cancelled")
            self._retire(r)

    def _fail_all(self, message: str, reason: str = "error") -> None:
        with self.cv:
            waiting, self.waiting = list(self.waiting), collections.deque()
        rows = self.running + ([self.admitting] if self.admitting else [])
        self.running, self.admitting = [], None
        self.cache.clear()
        for r in rows:
            self._emit(r, "", [], reason, error=message)
        for q in waiting:
            _notify(q, Event("", [], reason, len(q.prompt), 0, error=message))


def _notify(req: Request, ev: Event) -> None:
    try:
        req.on_event(ev)
    except Exception:  # a broken callback (its client is gone) must not stop the others
        req.cancelled = True
