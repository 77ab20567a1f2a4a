"""Continuous batching: requests that join and leave a running batch get exactly what they would alone."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from picochat.engine.engine import Engine, SamplingParams
from picochat.engine.scheduler import QueueFull, Request, Scheduler
from picochat.errors import PicochatError
from picochat.model.config import ModelConfig
from picochat.model.gpt import GPT




def tiny(pos="rope", seed=0):
    torch.manual_seed(seed)
    return GPT(ModelConfig(vocab_size=300, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, block_size=256,
                           pos=pos)).eval()


class Collector:
    def __init__(self, n):
        self.tokens = {i: [] for i in range(n)}
        self.finish = {}
        self.cached = {}
        self.done = threading.Event()
        self.n = n

    def cb(self, i):
        def f(ev):
            self.tokens[i].extend(ev.token_ids)
            if ev.finish_reason:
                self.finish[i] = ev.finish_reason
                self.cached[i] = ev.cached_tokens
                if len(self.finish) == self.n:
                    self.done.set()
        return f

    def wait(self, timeout=60):
        assert self.done.wait(timeout), f"only {len(self.finish)} of {self.n} requests finished"


@pytest.mark.parametrize("pos", ["rope", "learned", "sinusoidal", "alibi"])
def test_staggered_requests_equal_engine_alone(pos):
    m = tiny(pos)
    prompts = [[(7 * i + j) % 300 for j in range(5 + 13 * i)] for i in range(6)]
    lengths = [40, 25, 60, 10, 33, 47]
    ref = [Engine(m).generate([p], max_tokens=n, temperature=0)[0].token_ids for p, n in zip(prompts, lengths)]
    s = Scheduler(m, None, max_batch=4, prefill_chunk=16).start()  # small chunks: prefills interleave decodes
    c = Collector(6)
    try:
        for i, (p, n) in enumerate(zip(prompts, lengths)):
            s.submit(Request(p, SamplingParams(max_tokens=n, temperature=0), c.cb(i)))
            time.sleep(0.005 * i)  # join while others are mid-generation
        c.wait()
    finally:
        s.stop()
    assert [c.tokens[i] for i in range(6)] == ref
    assert all(r == "length" for r in c.finish.values())
    assert s.cache.n == 0 and not s.running


def test_seeded_sampling_in_a_batch_equals_alone():
    m = tiny()
    sp = dict(max_tokens=30, temperature=1.0, top_k=50, top_p=0.9, repetition_penalty=1.3)
    alone = Collector(1)
    s = Scheduler(m, None, max_batch=4).start()
    try:
        s.submit(Request([1, 2, 3], SamplingParams(seed=7, **sp), alone.cb(0)))
        alone.wait()
        c = Collector(3)
        s.submit(Request([9, 8, 7, 6, 5], SamplingParams(temperature=0.7, max_tokens=30), c.cb(0)))
        s.submit(Request([1, 2, 3], SamplingParams(seed=7, **sp), c.cb(1)))
        s.submit(Request([4] * 20, SamplingParams(seed=1, min_p=0.1, max_tokens=30), c.cb(2)))
        c.wait()
    finally:
        s.stop()
    assert c.tokens[1] == alone.tokens[0]


def test_cancel_frees_the_slot_and_queue_is_bounded():
    m = tiny()
    s = Scheduler(m, None, max_batch=1, max_queue=2)
    c = Collector(2)
    r0 = s.submit(Request([1, 2], SamplingParams(max_tokens=200, temperature=0), c.cb(0)))
    s.submit(Request([3, 4], SamplingParams(max_tokens=5, temperature=0), c.cb(1)))
    with pytest.raises(QueueFull):
        s.submit(Request([5], SamplingParams(max_tokens=5), lambda ev: None))
    s.start()
    try:
        while not c.tokens[0]:
            time.sleep(0.001)
        s.cancel(r0)
        c.wait()
    finally:
        s.stop()
    assert c.finish == {0: "cancelled", 1: "length"}
    assert len(c.tokens[0]) < 200 and len(c.tokens[1]) == 5


def test_bad_requests_are_refused():
    s = Scheduler(tiny(), None, max_batch=2, max_context=64)
    with pytest.raises(PicochatError, match="context"):
        s.submit(Request(list(range(64)), SamplingParams(), lambda ev: None))
    with pytest.raises(PicochatError, match="empty"):
        s.submit(Request([], SamplingParams(), lambda ev: None))
    with pytest.raises(PicochatError):
        s.submit(Request([1], SamplingParams(temperature=-1), lambda ev: None))


def test_context_limit_ends_with_length():
    s = Scheduler(tiny(), None, max_batch=2, max_context=32).start()
    c = Collector(1)
    try:
        s.submit(Request(list(range(1, 21)), SamplingParams(max_tokens=100, temperature=0), c.cb(0)))
        c.wait()
    finally:
        s.stop()
    assert c.finish[0] == "length" and 20 + len(c.tokens[0]) == 32


def test_next_turn_reuses_the_cached_prefix_and_gives_the_same_tokens():
    m = tiny()
    first = [(3 * j) % 300 for j in range(40)]
    s = Scheduler(m, None, max_batch=2).start()
    try:
        a = Collector(1)
        s.submit(Request(first, SamplingParams(max_tokens=10, temperature=0), a.cb(0)))
        a.wait()
        answer = a.tokens[0]
        second = first + answer + [7, 8, 9, 10]  # the conversation goes on: history + answer + new turn
        events = []
        b = Collector(1)

        def cb(ev):
            events.append(ev)
            b.cb(0)(ev)
        s.submit(Request(second, SamplingParams(max_tokens=12, temperature=0), cb))
        b.wait()
        other, other_events = Collector(1), []  # an unrelated prompt reuses nothing

        def cb2(ev):
            other_events.append(ev)
            other.cb(0)(ev)
        s.submit(Request([299 - j for j in range(30)], SamplingParams(max_tokens=3, temperature=0), cb2))
        other.wait()
    finally:
        s.stop()
    # every token of the first request's prompt and answer but the last sampled one has cached K/V
    assert events[-1].cached_tokens == len(first) + len(answer) - 1
    assert other_events[-1].cached_tokens == 0
    assert b.tokens[0] == Engine(m).generate([second], max_tokens=12, temperature=0)[0].token_ids


def test_shared_prefixes_under_batch_pressure_stay_exact():
    """Many requests share a long "system prompt"; slots are retained, reused and evicted while the
    batch fills and drains. Every answer must still be what the engine gives the prompt alone."""
    m = tiny()
    system = [(11 * j) % 300 for j in range(50)]
    prompts = [system + [(5 * i + j) % 300 for j in range(3 + i)] for i in range(8)]
    prompts += [prompts[2] + [1, 2, 3], system[:30] + [9, 9]]
    ref = [Engine(m).generate([p], max_tokens=15, temperature=0)[0].token_ids for p in prompts]
    s = Scheduler(m, None, max_batch=3, prefill_chunk=16).start()
    c = Collector(len(prompts))
    try:
        for i, p in enumerate(prompts):
            s.submit(Request(p, SamplingParams(max_tokens=15, temperature=0), c.cb(i)))
            time.sleep(0.003 * (i % 3))
        c.wait()
        assert s.cache.retained  # finished sequences stay available for reuse
    finally:
        s.stop()
    assert [c.tokens[i] for i in range(len(prompts))] == ref
    assert sum(n > 0 for n in c.cached.values()) >= 3  # the shared prefix was reused, not recomputed
