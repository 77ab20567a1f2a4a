"""One request must never hurt another (issue 8): knobs that cannot be sampled, per-row failures,
one client's many requests, and prefixes cached for one client offered to another."""
from __future__ import annotations

import math
import time

import pytest
import torch

import picochat.engine.scheduler as scheduler_mod
from picochat.engine.engine import Engine, SamplingParams
from picochat.engine.sampling import Unsampleable, apply_repetition_penalty, check_sampling, sample_next
from picochat.engine.scheduler import QueueFull, Request, Scheduler
from picochat.errors import PicochatError
from tests.engine.test_scheduler import Collector, tiny

# each of these turned the logits into NaN; the scheduler then failed every running request
BAD_KNOBS = [dict(temperature=1e-300), dict(temperature=1.0, top_p=1e-300),
             dict(temperature=1.0, repetition_penalty=1e-40), dict(temperature=1e-40, top_p=1e-300, min_p=1.0)]


def test_sampling_is_nan_safe_at_any_knob_value():
    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 5
    greedy = logits.argmax(-1)
    assert torch.equal(sample_next(logits, temperature=1e-300), greedy)   # below the floor: greedy
    assert torch.equal(sample_next(logits, temperature=1e-6), greedy)
    assert torch.equal(sample_next(logits, temperature=1.0, top_p=1e-300), greedy)  # the top token stays
    seen = torch.zeros(3, 50, dtype=torch.bool)
    seen[:, :10] = True
    penalised = apply_repetition_penalty(logits, seen, 1e-40)  # positive seen logits overflow to +inf
    assert torch.isinf(penalised).any()
    picks = sample_next(penalised, temperature=1.0)
    for row, t in enumerate(picks.tolist()):  # the limit of softmax: one of the +inf tokens
        assert torch.isposinf(penalised[row, t]), (row, t)
    with_nan = logits.clone()
    with_nan[1, :5] = float("nan")
    assert not math.isnan(float(sample_next(with_nan, temperature=0.7)[1]))
    dead = logits.clone()
    dead[2] = float("nan")
    with pytest.raises(Unsampleable) as e:
        sample_next(dead, temperature=0.7)
    assert e.value.rows == [2]
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(PicochatError):
            check_sampling(bad, None, None)
    with pytest.raises(PicochatError):
        check_sampling(1.0, None, None, repetition_penalty=float("nan"))


def test_bad_knobs_never_hurt_a_running_request():
    """A long greedy answer runs while requests with every bad knob come and go: it ends exactly as
    it would alone, and the bad requests get an answer (greedy-like), not an error."""
    m = tiny()
    long_prompt = [5, 6, 7, 8, 9]
    alone = Engine(m).generate([long_prompt], max_tokens=80, temperature=0)[0].token_ids
    s = Scheduler(m, None, max_batch=4, prefill_chunk=16).start()
    c = Collector(1 + len(BAD_KNOBS))
    try:
        s.submit(Request(long_prompt, SamplingParams(max_tokens=80, temperature=0), c.cb(0)))
        for i, knobs in enumerate(BAD_KNOBS, 1):
            s.submit(Request([1, 2, 3 + i], SamplingParams(max_tokens=4, **knobs), c.cb(i)))
        c.wait()
    finally:
        s.stop()
    assert c.tokens[0] == alone and c.finish[0] == "length"
    assert all(c.finish[i] == "length" and len(c.tokens[i]) == 4 for i in range(1, len(BAD_KNOBS) + 1)), c.finish


def test_a_row_that_fails_to_sample_ends_alone(monkeypatch):
    """Whatever breaks one row's sampling (here: a sampler that raises for one temperature) ends that
    row with an error; the rows batched with it, seeded or not, carry on."""
    real = scheduler_mod.next_distribution

    def flaky(logits, temperature, *a, **kw):
        if temperature == 0.5:
            raise Unsampleable([0])
        return real(logits, temperature, *a, **kw)
    monkeypatch.setattr(scheduler_mod, "next_distribution", flaky)
    m = tiny()
    alone = Engine(m).generate([[9, 9, 9]], max_tokens=40, temperature=0)[0].token_ids
    s = Scheduler(m, None, max_batch=4).start()
    c = Collector(4)
    try:
        s.submit(Request([9, 9, 9], SamplingParams(max_tokens=40, temperature=0), c.cb(0)))
        s.submit(Request([4, 4], SamplingParams(max_tokens=40, temperature=0.5), c.cb(1)))
        s.submit(Request([4, 4], SamplingParams(max_tokens=40, temperature=0.5, seed=3), c.cb(2)))
        s.submit(Request([3, 3], SamplingParams(max_tokens=40, temperature=0.9), c.cb(3)))
        c.wait()
    finally:
        s.stop()
    assert c.finish == {0: "length", 1: "error", 2: "error", 3: "length"}
    assert c.tokens[0] == alone and len(c.tokens[3]) == 40


def test_a_prompt_that_fails_to_prefill_ends_alone():
    m = tiny()

    class Picky(torch.nn.Module):  # the model fails on one prompt (as a real one would on a bad input)
        def __init__(self):
            super().__init__()
            self.m, self.config = m, m.config

        def forward(self, idx, **kw):
            if idx.size(1) > 1 and int(idx[0, 0]) == 77:
                raise RuntimeError("cannot run this prompt")
            return self.m(idx, **kw)
    s = Scheduler(Picky(), None, max_batch=4).start()
    c = Collector(2)
    try:
        s.submit(Request([1, 2, 3], SamplingParams(max_tokens=30, temperature=0), c.cb(0)))
        s.submit(Request([77, 2, 3], SamplingParams(max_tokens=30, temperature=0), c.cb(1)))
        c.wait()
    finally:
        s.stop()
    assert c.finish == {0: "length", 1: "error"} and len(c.tokens[0]) == 30


def test_one_client_holds_at_most_half_the_queue_and_n_that_never_fits_is_refused():
    s = Scheduler(tiny(), None, max_batch=1, max_queue=8)  # not started: everything stays queued
    sp = SamplingParams(max_tokens=2)
    s.submit_many([Request([1], sp, lambda ev: None, client="a") for _ in range(4)])
    with pytest.raises(QueueFull, match="per client"):
        s.submit(Request([1], sp, lambda ev: None, client="a"))
    s.submit_many([Request([1], sp, lambda ev: None, client="b") for _ in range(4)])  # b still gets its share
    assert len(s.waiting) == 8
    with pytest.raises(PicochatError, match="never"):  # 5 choices can never wait at once: 400, not 503
        Scheduler(tiny(), None, max_queue=8).submit_many(
            [Request([1], sp, lambda ev: None, client="c") for _ in range(5)])
    with pytest.raises(QueueFull):  # all or nothing: a refused batch leaves nothing behind
        s.submit_many([Request([1], sp, lambda ev: None, client="d") for _ in range(2)])
    assert len(s.waiting) == 8


def test_a_free_slot_goes_to_the_client_served_least():
    """Client a queues six requests, then b one: b's runs second, not seventh."""
    m = tiny()
    s = Scheduler(m, None, max_batch=1, max_queue=16)
    order = []

    def cb(name):
        def f(ev):
            if ev.finish_reason:
                order.append(name)
        return f
    for i in range(6):
        s.submit(Request([1, 2, 3], SamplingParams(max_tokens=3, temperature=0), cb(f"a{i}"), client="a"))
    s.submit(Request([1, 2, 3], SamplingParams(max_tokens=3, temperature=0), cb("b0"), client="b"))
    s.start()
    try:
        deadline = time.time() + 60
        while len(order) < 7 and time.time() < deadline:
            time.sleep(0.01)
    finally:
        s.stop()
    assert order[:2] == ["a0", "b0"], order


def test_cached_prefixes_are_reused_only_within_their_scope():
    m = tiny()
    secret = [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22]
    s = Scheduler(m, None, max_batch=4).start()  # room to keep every earlier prefix
    try:
        def run(prompt, scope):
            c = Collector(1)
            s.submit(Request(prompt, SamplingParams(max_tokens=2, temperature=0), c.cb(0), cache_scope=scope))
            c.wait()
            return c.cached[0]
        assert run(secret, ("alice", None)) == 0
        assert run(secret + [30], ("mallory", None)) == 0        # another principal learns nothing
        assert run(secret + [31], ("alice", "conv-2")) == 0      # another conversation of the same key
        assert run(secret + [32], ("alice", None)) == len(secret)  # the same scope: reused
    finally:
        s.stop()
    forgetful = Scheduler(m, None, max_batch=2, retain_prefixes=False).start()
    try:
        c = Collector(1)
        forgetful.submit(Request(secret, SamplingParams(max_tokens=2, temperature=0), c.cb(0)))
        c.wait()
        assert forgetful.cache.retained == {}  # --no-store: nothing outlives its request
    finally:
        forgetful.stop()
