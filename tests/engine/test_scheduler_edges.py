"""Edge cases of the continuous-batching scheduler (regressions for bugs found in review).

The scheduler is driven turn by turn (`s._turn()`, no thread) so every interleaving is deterministic.
"""
from __future__ import annotations

import torch

from picochat.engine.engine import Engine, SamplingParams
from picochat.engine.scheduler import Request, Scheduler
from picochat.model.config import ModelConfig
from picochat.model.gpt import GPT




def tiny(seed=0):
    torch.manual_seed(seed)
    return GPT(ModelConfig(vocab_size=300, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, block_size=256,
                           pos="rope")).eval()


class Sink:
    def __init__(self):
        self.tokens, self.finish, self.events = [], None, 0

    def __call__(self, ev):
        self.events += 1
        self.tokens.extend(ev.token_ids)
        if ev.finish_reason:
            assert self.finish is None, "two finish events for one request"
            self.finish = ev.finish_reason


def ref_kv(m, prompt):
    """K/V of layer 0 for `prompt` prefilled alone into a fresh slot cache."""
    from picochat.engine.slot_cache import SlotCache
    c = SlotCache.for_model(m, 1, 256)
    with torch.no_grad():
        m(torch.tensor([prompt]), kv_cache=c.prefill_view(0))
    return c.k[0][0, :, :len(prompt)].clone()


def admit(s, req_sink, limit=100):
    """Turn until the request feeding `req_sink` is in the running batch; returns its row."""
    with torch.no_grad():
        for _ in range(limit):
            s._turn()
            rows = [i for i, r in enumerate(s.running) if r.req.on_event is req_sink]
            if rows:
                return rows[0]
    raise AssertionError("never admitted")


def run_turns(s, sinks, limit=500):
    with torch.no_grad():
        for _ in range(limit):
            if all(k.finish for k in sinks):
                return
            s._turn()
    raise AssertionError("requests did not finish")


# Regression (was a bug in scheduler.py _prefill_chunk): the slot of a multi-chunk prefill is recomputed every chunk as
# len(self.running). When a running row retires between two chunks, later chunks go to a different
# slot than the earlier ones, so the prompt's K/V are split across two slots (and the new slot's
# first columns hold another sequence's K/V). The admitted request then generates garbage.
def test_row_retiring_during_a_chunked_prefill_keeps_the_admitted_prompt():
    m = tiny()
    long_prompt = [(5 * j + 3) % 300 for j in range(40)]
    s = Scheduler(m, None, max_batch=4, prefill_chunk=8)
    a, b = Sink(), Sink()
    s.submit(Request([1, 2, 3], SamplingParams(max_tokens=3, temperature=0), a))   # retires on turn 2
    s.submit(Request(long_prompt, SamplingParams(max_tokens=8, temperature=0), b))  # 5 prefill chunks
    row = admit(s, b)
    # the admitted row's cached K/V must be those of its own prompt
    assert torch.allclose(s.cache.k[0][row, :, :len(long_prompt)], ref_kv(m, long_prompt), atol=1e-5)


# Same bug with a row *cancelled* while another request is mid-prefill (the stop button).
def test_cancel_during_a_chunked_prefill_keeps_the_admitted_prompt():
    m = tiny()
    long_prompt = [(11 * j + 1) % 300 for j in range(40)]
    s = Scheduler(m, None, max_batch=4, prefill_chunk=8)
    a, b = Sink(), Sink()
    ra = s.submit(Request([7, 8, 9], SamplingParams(max_tokens=100, temperature=0), a))
    s.submit(Request(long_prompt, SamplingParams(max_tokens=8, temperature=0), b))
    with torch.no_grad():
        s._turn()  # a admitted and decoding
        s._turn()  # b: first chunk in slot 1
    s.cancel(ra)
    row = admit(s, b)
    assert a.finish == "cancelled"
    assert torch.allclose(s.cache.k[0][row, :, :len(long_prompt)], ref_kv(m, long_prompt), atol=1e-5)


# Regression (was a bug in scheduler.py stats): with one sample in the 10 s window the span is `now - first sample`,
# clamped to 1 ms, so right after the first token the gauge reports ~1000 tokens/s for one token.
def test_tokens_per_second_is_not_inflated_by_a_single_sample():
    s = Scheduler(tiny(), None, max_batch=2)
    k = Sink()
    s.submit(Request([1, 2, 3], SamplingParams(max_tokens=1, temperature=0), k))
    run_turns(s, [k])
    tps = s.stats()["tokens_per_second"]
    assert tps < 50, f"1 token generated, gauge says {tps:.0f} tokens/s"


# Edge cases of slot bookkeeping that hold today (regression guards): max_tokens=1, a stop token as
# the very first token, n>1 alike requests, and a cancel while admitting.
def test_first_token_finishes_and_slots_stay_consistent():
    m = tiny()
    first = Engine(m).generate([[4, 5, 6]], max_tokens=1, temperature=0)[0].token_ids[0]
    s = Scheduler(m, None, max_batch=3, prefill_chunk=4)
    sinks = [Sink() for _ in range(5)]
    s.submit(Request([4, 5, 6], SamplingParams(max_tokens=1, temperature=0), sinks[0]))
    s.submit(Request([4, 5, 6], SamplingParams(max_tokens=9, temperature=0, stop_token_ids=(first,)), sinks[1]))
    r2 = s.submit(Request(list(range(1, 30)), SamplingParams(max_tokens=5, temperature=0), sinks[2]))
    s.submit(Request([9, 9], SamplingParams(max_tokens=4, temperature=0), sinks[3]))
    s.submit(Request([9, 9], SamplingParams(max_tokens=4, temperature=0), sinks[4]))
    with torch.no_grad():
        s._turn(); s._turn(); s._turn()
    s.cancel(r2)
    run_turns(s, sinks)
    assert sinks[0].finish == "length" and sinks[0].tokens == [first]
    assert sinks[1].finish == "stop" and sinks[1].tokens == []
    assert sinks[2].finish == "cancelled"
    assert sinks[3].tokens == sinks[4].tokens == Engine(m).generate([[9, 9]], max_tokens=4, temperature=0)[0].token_ids
    assert s.cache.n == 0 and not s.running and s.admitting is None and s.cache.lengths == [0, 0, 0]
