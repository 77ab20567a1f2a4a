"""OpenAI's logit_bias, frequency and presence penalties: hand-computed values, and the engine and the
scheduler (batched, cached) giving exactly the tokens of a naive loop that recomputes everything."""
from __future__ import annotations

import pytest
import torch

from picochat.engine.engine import Engine, SamplingParams
from picochat.engine.sampling import Penalties
from picochat.engine.scheduler import Request, Scheduler
from picochat.errors import PicochatError
from tests.engine.test_scheduler import Collector, tiny


def test_the_formulas_by_hand():
    sp = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25, logit_bias=((0, 2.0), (4, -100.0)))
    pen = Penalties(sp, [[1, 2, 3]], 5, "cpu")   # the prompt's tokens are not counted (OpenAI: generated only)
    z = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0]])
    assert torch.equal(pen.apply(z), torch.tensor([[3.0, 1.0, 1.0, 1.0, -99.0]]))
    for t in (1, 1, 3):
        pen.update(torch.tensor([t]))
    # token 1: generated twice -> 1 - 2 * 0.5 - 0.25 = -0.25; token 3 once -> 1 - 0.5 - 0.25 = 0.25
    assert torch.equal(pen.apply(z), torch.tensor([[3.0, -0.25, 1.0, 0.25, -99.0]]))
    # negative penalties encourage repeats, as OpenAI defines them
    neg = Penalties(SamplingParams(frequency_penalty=-1.0), [[0]], 3, "cpu")
    neg.update(torch.tensor([2]))
    assert torch.equal(neg.apply(torch.zeros(1, 3)), torch.tensor([[0.0, 0.0, 1.0]]))
    # with everything off nothing is held and the logits come back as they were
    off = Penalties(SamplingParams(), [[1]], 5, "cpu")
    assert off.seen is None and off.counts is None and off.bias is None and off.apply(z) is z


@pytest.mark.parametrize("field,value", [("frequency_penalty", 2.5), ("presence_penalty", -3.0),
                                         ("logit_bias", ((1, 101.0),)), ("logit_bias", ((-1, 1.0),))])
def test_out_of_range_is_refused(field, value):
    with pytest.raises(PicochatError, match=field):
        SamplingParams(**{field: value}).check()
    with pytest.raises(PicochatError, match="vocabulary"):
        Penalties(SamplingParams(logit_bias=((300, 1.0),)), [[1]], 300, "cpu")


def naive(model, prompt, sp: SamplingParams) -> list[int]:
    """Greedy with the penalties written out, the whole sequence recomputed at every step (no cache)."""
    ids, out = list(prompt), []
    bias = dict(sp.logit_bias)
    for _ in range(sp.max_tokens):
        z = model(torch.tensor([ids]))[0][0, -1].float().clone()
        for t, b in bias.items():
            z[t] += b
        for t in set(out):
            z[t] -= out.count(t) * sp.frequency_penalty + sp.presence_penalty
        nxt = int(z.argmax())
        out.append(nxt)
        ids.append(nxt)
    return out


SETTINGS = [dict(frequency_penalty=1.5), dict(presence_penalty=2.0), dict(logit_bias=((17, 4.0), (23, 3.0))),
            dict(frequency_penalty=0.7, presence_penalty=0.4, logit_bias=((5, -100.0), (17, 2.5)))]


@pytest.mark.parametrize("extra", SETTINGS)
def test_engine_and_scheduler_equal_the_naive_loop(extra):
    torch.set_num_threads(1)
    m = tiny()
    prompts = [[(7 * i + j) % 300 for j in range(4 + 9 * i)] for i in range(3)]
    sp = SamplingParams(max_tokens=24, temperature=0, **extra)
    with torch.no_grad():
        want = [naive(m, p, sp) for p in prompts]
        plain = [naive(m, p, SamplingParams(max_tokens=24, temperature=0)) for p in prompts]
    assert want != plain  # the setting changes what is generated, or this test proves nothing
    assert [r.token_ids for r in Engine(m).generate(prompts, sp)] == want          # batched, cached
    assert [Engine(m).generate([p], sp)[0].token_ids for p in prompts] == want       # one at a time
    s = Scheduler(m, None, max_batch=2, prefill_chunk=8).start()
    c = Collector(3)
    try:
        for i, p in enumerate(prompts):
            s.submit(Request(p, sp, c.cb(i)))
        c.wait()
    finally:
        s.stop()
    assert [c.tokens[i] for i in range(3)] == want
