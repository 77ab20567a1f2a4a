"""Logprobs: of the distribution actually drawn from, checked against a full forward pass computed here by
hand (log softmax of the penalised logits over tau, top-k applied and renormalised), for the engine alone,
batched, streamed, and the scheduler."""
from __future__ import annotations

import math

import pytest
import torch

from picochat.engine.engine import Engine, SamplingParams
from picochat.engine.sampling import token_logprobs
from picochat.engine.scheduler import Request, Scheduler
from picochat.errors import PicochatError
from tests.engine.test_scheduler import tiny

PROMPTS = [[5, 6, 7, 8, 9], [11, 3, 250, 17, 40, 41, 2, 99]]


def by_hand(model, prompt, tokens, temperature=1.0, top_k=None, frequency_penalty=0.0):
    """Per generated token: (its logprob, the alternatives sorted) from a full forward of prompt + tokens."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens]))[0][0].double()  # (T, V)
    out = []
    for k, t in enumerate(tokens):
        z = logits[len(prompt) - 1 + k].clone()
        for u in tokens[:k]:  # OpenAI's frequency penalty: each earlier generated occurrence
            z[u] -= frequency_penalty
        if temperature:
            z = z / temperature
        if top_k:
            z[z < torch.topk(z, top_k).values[-1]] = -math.inf
        lp = torch.log_softmax(z, -1)
        out.append((float(lp[t]), sorted(lp.tolist(), reverse=True)))
    return out


@pytest.mark.parametrize("knobs", [dict(temperature=1.0), dict(temperature=0.7, top_k=5),
                                   dict(temperature=0.0), dict(temperature=1.3, frequency_penalty=1.5)])
def test_engine_logprobs_are_those_of_the_distribution_sampled(knobs):
    m = tiny()
    eng = Engine(m)
    for batch in ([PROMPTS[0]], PROMPTS):  # alone (kept cache) and batched (left padding)
        res = eng.generate(batch, max_tokens=12, logprobs=3, seed=1, **knobs)
        for p, r in zip(batch, res):
            assert len(r.logprobs) == len(r.token_ids) == 12
            want = by_hand(m, p, r.token_ids, **knobs)
            for lp, (chosen, ranked) in zip(r.logprobs, want):
                assert lp.token in r.token_ids and abs(lp.logprob - chosen) < 1e-4
                assert len(lp.top) == 3 and all(math.isfinite(v) for _, v in lp.top)
                assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)
                assert max(abs(a - b) for (_, a), b in zip(lp.top, ranked)) < 1e-4
                if knobs["temperature"] == 0:  # greedy picks the top one
                    assert lp.top[0][0] == lp.token
    # top-k 5 renormalised: the five listed alternatives are the whole distribution
    top5 = eng.generate([PROMPTS[0]], max_tokens=4, temperature=0.7, top_k=5, logprobs=20, seed=2)[0]
    assert all(len(lp.top) == 5 and abs(sum(math.exp(v) for _, v in lp.top) - 1) < 1e-5 for lp in top5.logprobs)
    # without the field nothing is computed; streamed chunks carry their token's logprob
    assert eng.generate([PROMPTS[0]], max_tokens=3, seed=1)[0].logprobs is None
    streamed = [lp for c in eng.stream(PROMPTS[1], max_tokens=12, logprobs=3, seed=1, **knobs) for lp in c.logprobs]
    whole = eng.generate([PROMPTS[1]], max_tokens=12, logprobs=3, seed=1, **knobs)[0].logprobs
    assert [lp.token for lp in streamed] == [lp.token for lp in whole]  # (the kept cache: equal to float noise)
    assert max(abs(a.logprob - b.logprob) for a, b in zip(streamed, whole)) < 1e-5


def test_scheduler_logprobs_equal_the_engine_alone():
    m = tiny()
    ref = [Engine(m).generate([p], max_tokens=10, temperature=0, logprobs=2)[0].logprobs for p in PROMPTS]
    got = {0: [], 1: []}
    done = []
    s = Scheduler(m, None, max_batch=4).start()
    try:
        for i, p in enumerate(PROMPTS):
            def cb(ev, i=i):
                got[i].extend(ev.logprobs)
                assert len(ev.logprobs) == len(ev.token_ids)
                if ev.finish_reason:
                    done.append(i)
            s.submit(Request(p, SamplingParams(max_tokens=10, temperature=0, logprobs=2), cb))
        # a third request without logprobs, batched with them, gets none
        plain = []
        s.submit(Request(PROMPTS[0], SamplingParams(max_tokens=10, temperature=0), lambda ev: plain.append(ev)))
        for _ in range(600):
            if len(done) == 2 and plain and plain[-1].finish_reason:
                break
            import time
            time.sleep(0.05)
    finally:
        s.stop()
    for i in range(2):
        assert [lp.token for lp in got[i]] == [lp.token for lp in ref[i]]
        assert all(abs(a.logprob - b.logprob) < 1e-4 for a, b in zip(got[i], ref[i]))
    assert all(ev.logprobs == [] for ev in plain)


def test_by_hand_values_and_limits():
    z = torch.tensor([[0.0, math.log(3.0), -math.inf]])  # p = 1/4, 3/4, 0
    (lp,) = token_logprobs(z, torch.tensor([0]), 5)
    assert abs(lp.logprob - math.log(0.25)) < 1e-6
    assert [t for t, _ in lp.top] == [1, 0] and abs(lp.top[0][1] - math.log(0.75)) < 1e-6  # the 0 is never listed
    with pytest.raises(PicochatError, match="logprobs"):
        SamplingParams(logprobs=21).check()
