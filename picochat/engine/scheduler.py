"""Continuous batching: many requests share one model, joining and leaving the batch between steps.

One thread owns the model. Each turn of its loop:

    1. admit   waiting requests into free slots (bounded queue; a full queue refuses new work)
    2. prefill one chunk of the prompt being admitted (chunks keep the running rows' latency bounded)
    3. decode  one token for every running row in a single forward pass, then sample per row
    4. retire  rows that stopped, hit their limit, or whose client went away (their slot is free at once)

Requests talk to the thread through callbacks (`on_event`), so the caller decides how to hand events
to its own world (the server puts them on an asyncio queue).

Side jobs (`run_on_model(fn)`): other torch work on the same model (attention maps of a stored answer)
must run on the model's thread too, but the loop occupies it. The loop wakes for a side job and runs
it between two turns, so it never sees a half-done step; the running rows wait for it (a job should be
one forward pass, not a generation).

Pictures: a request may carry `embeds` (engine.PromptEmbeds: a picture's N image tokens at its <|image|>
markers, from checkpoints/vlm.embed_images); each prefill chunk gets the slice of them that falls inside
it, and a kept prefix is matched on keys in which an image token is its embedding's digest, so a picture's
K/V are never offered to a prompt with another picture at the same marker ids.

Sharing: a request names its `client`; one client may hold at most half the queue, and a free slot
goes to the waiting request whose client has the fewest rows running (oldest first among equals), so
one client's many requests (or one request's many choices) cannot starve the others. Failures stay
with their row: a row whose logits cannot be sampled, or whose prompt fails to prefill, ends alone
with an error; only a failed batched forward pass (which no row can be blamed for) fails them all.
"""
from __future__ import annotations

import collections
import threading
import time
from concurrent.futures import Future
from typing import Callable, Optional

import torch

from ..errors import PicochatError
from .compiled import decoder_for
from .kv_cache import cache_dtype
from .model_thread import ModelThread
from .requests import Event, QueueFull, Request, _notify, _Running  # noqa: F401 (QueueFull: importers' name)
from .sampling import Penalties, TokenLogprob, draw, next_distribution, token_logprobs
from .slot_cache import SlotCache


class Scheduler:
    def __init__(self, model, tokenizer, max_batch: int = 16, max_queue: int = 64,
                 max_context: Optional[int] = None, prefill_chunk: int = 512,
                 worker: Optional[ModelThread] = None, retain_prefixes: bool = True, fast: str = "auto"):
        """retain_prefixes=False: a finished sequence's K/V are forgotten at once (nothing of a request
        outlives it; `picochat serve --no-store`). fast: the decode step's path, as Engine's
        (compiled.py; `picochat serve` compiles before it answers: load_host)."""
        self.model, self.tokenizer, self.fast = model, tokenizer, fast
        self.decoder = decoder_for(model, fast)
        if self.decoder is not None:  # prompts compiled too, once ready (fast="compile": before the first)
            self.decoder.start_prefill(wait=fast == "compile")
        self.compiled_chunks = 0  # prompt chunks that ran compiled
        self.device = next(model.parameters()).device
        self.vocab_size = model.config.vocab_size  # (grammars mask this many logits)
        if model.config.pos == "alibi":  # its bias is built from one shared query position
            max_batch = 1
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.retain_prefixes = retain_prefixes
        self._admitted: dict = {}  # client -> when it last got a slot (an admission counter)
        self._admissions = 0
        self.context = min(max_context or model.config.block_size, model.config.block_size)
        self.cache = SlotCache.for_model(model, max_batch, self.context, compiled=self.decoder is not None)
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
        self._side: collections.deque[tuple[Callable, Future]] = collections.deque()

    # -- the caller's side ---------------------------------------------------------------------------

    def start(self) -> "Scheduler":
        """Run the loop on the model thread (again after stop(): an app may run its lifespan twice)."""
        if self._running is not None and not self._running.done():
            return self
        with self.cv:
            self.stopped = False
            self._running = self.worker.submit(self._loop)  # under cv: run_on_model sees it or not, never half
        return self

    def run_on_model(self, fn: Callable[[], object]) -> Future:
        """Run fn() on the model thread between two decode turns; its result (or exception) is the Future's.

        Idle or busy, the loop wakes for it; before start() the model thread is free and runs it at once;
        after stop() the Future fails with a PicochatError (jobs still queued at stop() fail the same way)."""
        fut: Future = Future()
        with self.cv:
            if self.stopped:
                fut.set_exception(PicochatError("the scheduler is stopped"))
                return fut
            if self._running is None or self._running.done():  # no loop holds the thread
                return self.worker.submit(fn)
            self._side.append((fn, fut))
            self.cv.notify_all()
        return fut

    def stop(self) -> None:
        with self.cv:
            self.stopped = True
            self.cv.notify_all()
        if self._running is not None:
            try:
                self._running.result(timeout=30)
            except Exception:
                pass

    @property
    def client_share(self) -> int:
        """How many requests one client may have waiting: half the queue, so one never fills it."""
        return max(1, self.max_queue // 2)

    def submit(self, req: Request) -> Request:
        return self.submit_many([req])[0]

    def submit_many(self, reqs: list[Request]) -> list[Request]:
        """Queue requests all together or none of them (the n choices of one API request).
        PicochatError for a request that can never run; QueueFull when it cannot wait now."""
        for req in reqs:
            req.params.check()
            if not req.prompt:
                raise PicochatError("the prompt is empty")
            if req.params.max_tokens < 1:
                raise PicochatError("max_tokens must be at least 1")
            if len(req.prompt) >= self.context:
                raise PicochatError(f"the prompt is {len(req.prompt)} tokens but the context is {self.context}")
            if req.embeds is not None:
                req.embeds.check(len(req.prompt), self.model.config.n_embd)
        client = reqs[0].client if reqs else None
        share = self.client_share if client is not None else self.max_queue
        if len(reqs) > share:
            raise PicochatError(f"{len(reqs)} sequences can never wait at once: one client may queue at most "
                                f"{share} (ask for fewer choices)")
        with self.cv:
            if self.stopped:
                raise PicochatError("the scheduler is stopped")
            if len(self.waiting) + len(reqs) > self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting; try again shortly")
            if client is not None:
                mine = sum(q.client == client for q in self.waiting)
                if mine + len(reqs) > share:
                    raise QueueFull(f"you already have {mine} requests waiting (at most {share} per client); "
                                    "try again when they have started")
            self.waiting.extend(reqs)
            self.requests_total += len(reqs)
            self.cv.notify_all()
        return reqs

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
            d = self.decoder  # once: the model thread may drop a step that failed to compile
            return {"queue_depth": len(self.waiting) + (self.admitting is not None),
                    "active_sequences": len(self.running), "generated_tokens_total": self.generated_total,
                    "requests_total": self.requests_total, "tokens_per_second": recent / span,
                    "compiled_decode": int(d is not None and d.done.is_set() and d.error is None)}

    # -- the model thread ----------------------------------------------------------------------------

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self.cv:
                while (not self.stopped and not self._side and not self.waiting and not self.running
                       and self.admitting is None):
                    self.cv.wait()
                if self.stopped:
                    break
                side, self._side = list(self._side), collections.deque()
            for fn, fut in side:  # between two turns: no step is half done
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn())
                    except BaseException as e:  # handed to the caller, who re-raises it
                        fut.set_exception(e)
            try:
                self._turn()
            except Exception as e:  # the batched decode failed (or a bug): no row to blame, fail them all
                self._fail_all(f"{type(e).__name__}: {e}")
        with self.cv:
            side, self._side = list(self._side), collections.deque()
        for _, fut in side:
            if fut.set_running_or_notify_cancel():
                fut.set_exception(PicochatError("the scheduler is stopped"))
        self._fail_all("the server is shutting down", reason="cancelled")

    def _turn(self) -> None:
        self._drop_cancelled()
        if self.admitting is None and len(self.running) < self.max_batch:
            with self.cv:
                req = self._next_waiting()
            if req is not None:
                try:
                    self.admitting = _Running(req, self.tokenizer, self.device, self.vocab_size)
                except Exception as e:  # (a grammar that will not compile): this request fails alone
                    _notify(req, Event("", [], "error", len(req.prompt), 0, error=f"{type(e).__name__}: {e}"))
        if self.admitting is not None:
            try:
                self._prefill_chunk()
            except Exception as e:  # this prompt's failure is its own (the running rows are untouched)
                r = self.admitting
                if r is not None and r not in self.running:
                    self.admitting = None
                    if r.slot >= 0:
                        self.cache._forget(r.slot)  # half-written: never offer it for reuse
                    self._emit(r, "", [], "error", error=f"{type(e).__name__}: {e}")
                else:
                    raise
        if self.running:
            self._decode()

    def _next_waiting(self) -> Optional[Request]:
        """(Under self.cv.) The oldest waiting request of the client with the fewest running rows."""
        if not self.waiting:
            return None
        busy = collections.Counter(r.req.client for r in self.running)
        last = self._admitted  # among equals, the client served longest ago goes first (round robin)
        best = min(range(len(self.waiting)),
                   key=lambda i: (busy[self.waiting[i].client], last.get(self.waiting[i].client, -1), i))
        req = self.waiting[best]
        del self.waiting[best]
        self._admissions += 1
        last[req.client] = self._admissions
        if len(last) > 4 * (self.max_queue + self.max_batch):  # forget clients long gone
            present = {q.client for q in self.waiting} | set(busy) | {req.client}
            self._admitted = {c: n for c, n in last.items() if c in present}
        return req

    def _prefill_chunk(self) -> None:
        r, slot = self.admitting, len(self.running)  # the admitted row always takes the next free slot
        p = r.req.prompt
        if r.slot < 0:  # first chunk: start after the longest prefix an earlier request left behind
            if self.decoder is not None and not self.decoder.fits(self.model):  # (~1 ms, once a request)
                self.decoder = decoder_for(self.model, self.fast)
                self.cache.set_dtype(cache_dtype(self.model, compiled=self.decoder is not None))
            if self.decoder is not None:  # never beside a compile: tracing holds the GIL, and dynamo puts
                self.decoder.start_prefill(wait=True)  # back the RNG state it found (unseeded draws repeated)
            r.prefilled = r.cached = self.cache.claim(slot, r.keys, r.req.cache_scope)
        elif r.slot != slot:  # a row left between two chunks: move what is written so far
            self.cache.move_partial(r.slot, slot, r.prefilled)
        r.slot = slot
        end = min(len(p), r.prefilled + self.prefill_chunk)
        idx = torch.tensor([p[r.prefilled:end]], dtype=torch.long, device=self.device)
        # this chunk's share of the prompt's embeddings (an image may straddle two chunks)
        extra = {} if r.req.embeds is None else r.req.embeds.window(r.prefilled, end, self.device)
        # only the last chunk's last position is sampled from: the LM head runs on it alone
        logits = None
        # compiled (no pictures; T_k = 1, a one-token prompt, would be a graph of its own: eager)
        if self.decoder is not None and not extra and end >= 2 and self.decoder.prefill_ready():
            try:
                logits = self._compiled_chunk(idx, slot, r.prefilled)
                self.compiled_chunks += 1
            except Exception as e:  # the graph itself failed: this chunk, and every prompt after it, eager
                self.decoder.prefill_failed(f"{type(e).__name__}: {e}")
        if logits is None:
            logits, _ = self.model(idx, start_pos=r.prefilled, kv_cache=self.cache.prefill_view(slot, r.prefilled),
                                   last_logits_only=True, **extra)
        r.prefilled = end
        if end < len(p):
            return
        self.admitting = None
        self.cache.add_row(len(p))
        self.running.append(r)
        r.penalties = Penalties(r.req.params, [p], logits.size(-1), self.device)
        self._sample([(r, logits[0, -1])])

    def _compiled_chunk(self, idx: torch.Tensor, slot: int, start: int) -> torch.Tensor:
        """idx (1, T) written into `slot` from column `start` by the compiled prefill (T >= 2) or, a single
        token (a prompt whose prefix was all cached), the compiled decode step: logits (1, 1, V)."""
        T = idx.size(1)
        cols, mask, k, v = self.cache.chunk_inputs(slot, start, T)
        if T == 1:  # (a prefill graph for T = 1 would be a graph of its own: dynamo keeps sizes of 1 apart)
            return self.decoder(idx, cols, mask, k, v, cols.view(1))
        return self.decoder.prefill(idx, cols, mask, k, v, cols)

    def _decode(self) -> None:
        positions, mask = self.cache.step_inputs()
        idx = torch.tensor([[r.last_token] for r in self.running], dtype=torch.long, device=self.device)
        for r in self.running:
            r.fed.append(r.last_token)
        if self.decoder is not None and not self.decoder.usable():  # compiling failed (it warned): plain from
            self.decoder = None                                       # now on, on a cache of the activations' dtype
            self.cache.set_dtype(cache_dtype(self.model))
        if self.decoder is not None:  # compiled: each row at its own column
            # the running rows' stores only: a lone row on all the slots' would not fit the batch-1 graph (its
            # stores' first size is 1: dynamo keeps sizes of 1 apart), and dynamo would compile another
            n = len(self.running)
            k, v = [t[:n] for t in self.cache.k], [t[:n] for t in self.cache.v]
            logits = self.decoder(idx, positions, mask, k, v, positions.view(-1))
            self.cache.advance()
        elif len(self.running) == 1:  # alone: the plain single-query path (no mask, one start position)
            logits, _ = self.model(idx, start_pos=self.cache.lengths[0], kv_cache=self.cache)
        else:
            logits, _ = self.model(idx, start_pos=int(positions.min()), kv_cache=self.cache,
                                   positions=positions, attn_mask=mask)
        self._sample(list(zip(self.running, logits[:, -1])))

    def _sample(self, rows: list[tuple[_Running, torch.Tensor]]) -> None:
        now = time.monotonic()
        picks: dict[int, int] = {}
        lps: dict[int, TokenLogprob] = {}
        failed: dict[int, str] = {}
        groups: dict[tuple, list[int]] = {}  # rows that sample alike share one batched call
        lasts = []
        for j, (r, logits) in enumerate(rows):
            sp = r.req.params
            last = logits.float().unsqueeze(0)  # (1, V)
            if r.penalties is not None:
                last = r.penalties.apply(last)
            if r.row.constraint is not None:
                try:
                    last = r.row.constraint.mask(last)
                except Exception as e:
                    failed[j] = f"{type(e).__name__}: {e}"
            lasts.append(last)
            if j in failed:
                continue
            key = (sp.temperature, sp.top_k or None, sp.top_p, sp.min_p)
            groups.setdefault(key if r.gen is None else ("own", j), []).append(j)
        for key, js in groups.items():
            sp = rows[js[0]][0].req.params
            try:  # seeded rows: their own generator, alone
                self._draw(rows, js, torch.cat([lasts[j] for j in js]), rows[js[0]][0].gen, picks, lps)
            except Exception as e:  # one bad row must not take its group down: the others again, alone
                if len(js) == 1:
                    failed[js[0]] = f"{type(e).__name__}: {e}"
                    continue
                for j in js:
                    try:
                        self._draw(rows, [j], lasts[j], None, picks, lps)
                    except Exception as e1:
                        failed[j] = f"{type(e1).__name__}: {e1}"
        done = []
        for j, (r, _) in enumerate(rows):
            if j not in failed:
                try:
                    t = picks[j]
                    if r.penalties is not None:
                        r.penalties.update(torch.tensor([t], device=self.device))
                    r.last_token = t
                    token, delta = r.row.push(t, r.req.params, self.context, lps.get(j))
                except Exception as e:
                    failed[j] = f"{type(e).__name__}: {e}"
            if j in failed:
                r.row.finish_reason = "error"
                self._emit(r, "", [], "error", error=f"generation failed: {failed[j]}")
            else:
                with self.cv:  # counted before the client can see it: a /metrics read right after includes it
                    self.generated_total += 1
                self._emit(r, delta, [] if token is None else [token], r.row.finish_reason,
                           logprobs=[lps[j]] if token is not None and j in lps else [])
            if r.row.finish_reason is not None:
                done.append(r)
        with self.cv:
            self._recent.append((now, len(rows) - len(failed)))
            self._first_sample = self._first_sample or now
        for r in done:
            self._retire(r, keep=r.row.finish_reason != "error")

    @staticmethod
    def _draw(rows, js: list[int], last: torch.Tensor, gen, picks: dict, lps: dict) -> None:
        """Sample rows js (which share their sampling knobs) from their penalised logits last (len(js), V);
        the picks, and each asking row's logprobs, go into picks and lps by row index."""
        sp = rows[js[0]][0].req.params
        z = next_distribution(last, sp.temperature, sp.top_k or None, sp.top_p, sp.min_p)
        out = draw(z, sp.temperature, gen)
        picks.update(zip(js, out.tolist()))
        for k, j in enumerate(js):
            n_top = rows[j][0].req.params.logprobs
            if n_top is not None:
                lps[j] = token_logprobs(z[k:k + 1], out[k:k + 1], n_top)[0]

    def _emit(self, r: _Running, text: str, tokens: list[int], finish: Optional[str], error=None,
              logprobs: Optional[list] = None) -> None:
        _notify(r.req, Event(text, tokens, finish, len(r.row.prompt), len(r.row.tokens), error, r.cached,
                             logprobs or []))

    def _retire(self, r: _Running, keep: bool = True) -> None:
        """r leaves the batch: swapped to the last row (rows stay contiguous), then popped; its K/V stay
        behind for the conversation's next turn (see SlotCache), unless retain_prefixes is off or the
        row failed (keep=False)."""
        row, last = self.running.index(r), len(self.running) - 1
        if row != last:
            self.cache.swap_rows(row, last)
            self.running[row], self.running[last] = self.running[last], self.running[row]
        self.running.pop()
        busy = (self.admitting.slot,) if self.admitting is not None and self.admitting.slot >= 0 else ()
        keep = keep and self.retain_prefixes
        self.cache.pop_row(r.keys + r.fed if keep else None, busy, r.req.cache_scope)

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

