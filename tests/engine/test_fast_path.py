"""The compiled decode step (picochat/engine/compiled.py) against the plain eager step it replaces.

Tiny models here (seconds to compile); tests/engine/test_fast_path_smollm2.py holds SmolLM2's token
agreement in every dtype and quantization.
"""
from __future__ import annotations

import copy
import threading
import types

import pytest
import torch

from picochat.engine import compiled
from picochat.engine.compiled import decoder_for, slower_compiled, unsupported
from picochat.engine.engine import Engine, SamplingParams
from picochat.engine.kv_cache import cache_dtype
from picochat.engine.scheduler import Request, Scheduler
from picochat.engine.slot_cache import SlotCache
from picochat.errors import PicochatError
from picochat.model.config import ModelConfig
from picochat.model.gpt import GPT
from picochat.model.quant import quantize_int4


def tiny(pos="rope", seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(ModelConfig(vocab_size=300, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, block_size=256,
                           pos=pos, **kw)).eval()


@pytest.fixture(scope="module")
def model():
    return tiny()


def test_compiled_engine_gives_the_plain_tokens(model):
    fast = Engine(model, fast="compile")
    assert fast.decoder is not None and fast.decoder.done.is_set() and fast.decoder.error is None
    plain = Engine(model, fast="plain")
    assert plain.decoder is None
    prompts = [[(5 * i + j) % 300 for j in range(4 + 9 * i)] for i in range(4)]
    for p in prompts:  # batch 1, then the next turn extends the kept cache
        assert fast.generate([p], max_tokens=30, temperature=0)[0].token_ids == \
            plain.generate([p], max_tokens=30, temperature=0)[0].token_ids
    longer = prompts[-1] + [1, 2, 3]
    assert fast.generate([longer], max_tokens=20, temperature=0)[0].token_ids == \
        plain.generate([longer], max_tokens=20, temperature=0)[0].token_ids
    # a ragged batch: left padding hidden by the mask; rows finish at different steps and leave
    sp = SamplingParams(max_tokens=25, temperature=0, stop_token_ids=(7,))
    assert [r.token_ids for r in fast.generate(prompts, sp)] == [r.token_ids for r in plain.generate(prompts, sp)]
    # sampled, with a seed: the same draws from the same logits
    sp = SamplingParams(max_tokens=25, temperature=0.9, top_k=20, seed=3)
    assert [r.token_ids for r in fast.generate(prompts[:2], sp)] == [r.token_ids for r in plain.generate(prompts[:2], sp)]


def test_the_decode_step_is_one_graph_per_batch_kind(model):
    """Every length and batch size after warm-up runs without recompiling (2 graphs: batch 1, batch > 1)."""
    step = decoder_for(model, "compile")
    c = model.config
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for B, t_k, cap in ((1, 40, 64), (3, 17, 32), (5, 100, 128), (1, 3, 8)):
        k = [torch.randn(B, c.n_kv_head, cap, c.head_dim) for _ in range(c.n_layer)]
        v = [torch.randn(B, c.n_kv_head, cap, c.head_dim) for _ in range(c.n_layer)]
        k2, v2 = [t.clone() for t in k], [t.clone() for t in v]
        cols = torch.full((B,), t_k - 1)
        mask = torch.rand(B, 1, 1, t_k) > 0.3
        mask[..., -1] = True
        idx = torch.randint(0, 300, (B, 1))
        out = step(idx, cols.view(B, 1), mask, k, v, cols)
        ref = compiled.decode_step(model, idx, cols.view(B, 1), mask, k2, v2, cols)  # the same, eager
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(k[1], k2[1])  # the new column written in place, nothing else
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == before


def test_the_prefill_step_writes_and_reads_as_the_eager_model(model):
    """The scheduler's compiled prompt chunk (compiled.prefill_step into one slot of a SlotCache) against the
    eager model on a prefill_view: the same logits and K/V, the other slots untouched, and one graph for
    every chunk length, start column, slot and capacity."""
    step = decoder_for(model, "compile").start_prefill(wait=True)
    assert step.prefill_ready(), step.prefill_error
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    c = model.config
    for slot, start, T, cap in ((1, 0, 12, 64), (0, 5, 3, 16), (2, 30, 40, 128), (1, 7, 2, 200)):
        eager, fast = (SlotCache(c.n_layer, 3, c.n_kv_head, c.head_dim, 256, capacity=cap) for _ in range(2))
        for a, b in zip(eager.k + eager.v, fast.k + fast.v):
            b.copy_(a.normal_())  # the same cached past (and garbage elsewhere) in both
        idx = torch.randint(0, 300, (1, T))
        with torch.no_grad():
            ref = model(idx, start_pos=start, kv_cache=eager.prefill_view(slot, start), last_logits_only=True)[0]
        cols, mask, k, v = fast.chunk_inputs(slot, start, T)
        torch.testing.assert_close(step.prefill(idx, cols, mask, k, v, cols), ref, atol=1e-5, rtol=1e-5)
        for a, b in zip(eager.k + eager.v, fast.k + fast.v):
            torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == before


def test_the_compiled_scheduler_never_recompiles_as_its_cache_grows(model):
    """Rows and prompt chunks ending at every column of a small cache as it grows (16, 33, 66 columns):
    the SlotCache keeps a spare column, so neither step ever sees T_k == capacity, which dynamo would give
    a graph of its own, compiled on the spot."""
    c = model.config
    s = Scheduler(model, None, max_batch=2, prefill_chunk=8, fast="compile")
    s.cache = SlotCache(c.n_layer, 2, c.n_kv_head, c.head_dim, 256, capacity=16,
                        dtype=cache_dtype(model, compiled=True))
    for n in range(1, 200):  # the spare column itself
        s.cache.reserve(n)
        assert s.cache.capacity > n
    s.cache = SlotCache(c.n_layer, 2, c.n_kv_head, c.head_dim, 256, capacity=16,
                        dtype=cache_dtype(model, compiled=True))
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    finished = []
    s.start()
    try:
        # a one-token prompt (T_k = 1: eager), then prompts of 2 chunks and more decoded through 32 and 64 columns
        for length in (1, 15, 16, 17, 31):
            done = threading.Event()

            def cb(ev, last=False):
                if ev.finish_reason:
                    finished.append(ev.finish_reason)
                    if last:
                        done.set()
            s.submit_many([Request([(3 * j + i) % 300 for j in range(length)],
                                   SamplingParams(max_tokens=40, temperature=0),
                                   (lambda ev: cb(ev, True)) if i else cb) for i in range(2)])
            assert done.wait(120)
    finally:
        s.stop()
    assert finished == ["length"] * 10  # every request ran to its limit (none failed)
    assert s.compiled_chunks > 0 and s.cache.capacity > 64
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == before


def test_a_prefill_graph_that_fails_at_run_time_leaves_prompts_eager():
    m = tiny(seed=3)
    prompt = [(5 * j) % 300 for j in range(20)]
    want = Engine(m, fast="plain").generate([prompt], max_tokens=6, temperature=0)[0].token_ids
    s = Scheduler(m, None, max_batch=2, fast="compile")
    assert s.decoder.prefill_ready()

    def broken(*a):
        raise RuntimeError("a kernel went wrong")
    s.decoder._prefill_fn = broken
    got, done = [], threading.Event()
    s.start()
    try:
        with pytest.warns(UserWarning, match="prompts run eager from now on"):
            s.submit(Request(prompt, SamplingParams(max_tokens=6, temperature=0),
                             lambda ev: (got.extend(ev.token_ids), ev.finish_reason and done.set())))
            assert done.wait(60)
    finally:
        s.stop()
    assert got == want and s.compiled_chunks == 0  # this request's chunk ran again, eager
    assert not s.decoder.prefill_ready() and "a kernel went wrong" in s.decoder.prefill_error


def test_compiled_scheduler_gives_the_plain_tokens(model):
    prompts = [[(7 * i + j) % 300 for j in range(5 + 13 * i)] for i in range(5)]
    lengths = [30, 12, 41, 8, 25]

    def run(fast):
        s = Scheduler(model, None, max_batch=3, prefill_chunk=16, fast=fast).start()
        out, done = {}, threading.Event()

        def cb(i):
            def f(ev):
                out.setdefault(i, []).extend(ev.token_ids)
                if ev.finish_reason:
                    finished.add(i)
                    if len(finished) == len(prompts):
                        done.set()
            return f
        finished: set = set()
        try:
            for i, (p, n) in enumerate(zip(prompts, lengths)):
                s.submit(Request(p, SamplingParams(max_tokens=n, temperature=0), cb(i)))
            assert done.wait(120)
            chunks = s.compiled_chunks
            # the same prompt again: all but its last token kept from before, a one-token chunk
            again, done2 = [], threading.Event()
            s.submit(Request(prompts[4], SamplingParams(max_tokens=10, temperature=0),
                             lambda ev: (again.extend(ev.token_ids), ev.finish_reason and done2.set())))
            assert done2.wait(120)
        finally:
            s.stop()
        assert again == out[4][:10]
        return [out.get(i, []) for i in range(len(prompts))], s, chunks

    fast, s, chunks = run("compile")
    assert s.decoder is not None and s.decoder.usable() and s.stats()["compiled_decode"] == 1
    assert chunks == sum(-(-len(p) // 16) for p in prompts)  # every chunk of every prompt ran compiled
    assert s.compiled_chunks == chunks + 1  # and the one-token chunk (on the decode step's graph)
    plain, s, chunks = run("plain")
    assert s.decoder is None and chunks == 0
    assert s.stats()["compiled_decode"] == 0  # (the /metrics gauge picochat_compiled_decode)
    assert fast == plain and [len(t) for t in fast] == lengths


def test_choices_and_what_cannot_be_compiled(model, monkeypatch):
    with pytest.raises(PicochatError, match="unknown decode path 'fastest'"):
        Engine(model, fast="fastest")
    monkeypatch.setenv("PICOCHAT_FAST", "plain")
    assert Engine(model).decoder is None  # auto follows the environment
    monkeypatch.setenv("PICOCHAT_FAST", "turbo")
    with pytest.raises(PicochatError, match="PICOCHAT_FAST='turbo'"):
        Engine(model)
    monkeypatch.setenv("PICOCHAT_FAST", "auto")
    alibi = tiny("alibi")
    assert "ALiBi" in unsupported(alibi)
    assert Engine(alibi).decoder is None  # auto: the plain step, quietly
    with pytest.raises(PicochatError, match="cannot compile.*ALiBi"):
        Engine(alibi, fast="compile")
    moe = tiny(moe_experts=4, moe_top_k=2)
    assert "mixture-of-experts" in unsupported(moe)
    assert decoder_for(model, "compile") is decoder_for(model, "compile")  # one per model, shared
    assert slower_compiled(model) and decoder_for(model, "auto") is None  # fp32: plain is faster
    assert not slower_compiled(quantize_int4(copy.deepcopy(model))) and not slower_compiled(tiny().to(torch.bfloat16))


def test_the_step_skips_the_models_guards_and_follows_its_changes():
    """The compiled step keeps no guards on the model (compiled._outside_the_model): new weight values
    still reach it (weights are read at each call), and a model changed in its layout gets a new step."""
    m = tiny(seed=5)
    engine = Engine(m, fast="compile")
    sched = Scheduler(m, None, max_batch=2, fast="compile")
    step = engine.decoder
    assert sched.decoder is step
    c, B, t_k = m.config, 2, 9

    def call(s):  # on caches of the dtype the step was warmed for (bf16 once m is quantized)
        torch.manual_seed(0)
        dt = cache_dtype(m, compiled=True)
        k = [torch.randn(B, c.n_kv_head, 16, c.head_dim).to(dt) for _ in range(c.n_layer)]
        v = [torch.randn(B, c.n_kv_head, 16, c.head_dim).to(dt) for _ in range(c.n_layer)]
        cols, idx = torch.full((B,), t_k - 1), torch.tensor([[3], [9]])
        mask = torch.ones(B, 1, 1, t_k, dtype=torch.bool)
        args = (idx, cols.view(B, 1), mask, k, v, cols)
        return s(*args), compiled.decode_step(m, *[a if not isinstance(a, list) else [t.clone() for t in a]
                                                   for a in args])
    with torch.no_grad():
        m.blocks[0].ffn.down_proj.weight.mul_(3.0)  # new values, same tensor
        out, ref = call(step)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert decoder_for(m, "compile") is step  # unchanged layout: the same step
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    m.train()  # with every guard, dynamo would trace again here (it guards each module's `training`)
    with torch.no_grad():
        out, ref = call(step)  # the old step does not look at the model: nothing is traced again...
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert decoder_for(m, "compile") is not step  # ...so decoder_for makes a new step for the changed model
    m.eval()
    quantize_int4(m)  # in place: Linears become Int4Linears
    prompt = [[3, 1, 4, 1, 5, 9, 2, 6]]
    got = engine.generate(prompt, max_tokens=12, temperature=0)[0].token_ids  # the engine asks for a new step
    assert engine.decoder is not step and engine.decoder.fits(m)
    plain = Engine(m, fast="plain")
    assert got == plain.generate(prompt, max_tokens=12, temperature=0)[0].token_ids
    # the compiled step keeps a quantized model's K/V in bf16 (kv_cache.cache_dtype), the plain one in fp32
    assert engine._cache.k[0].dtype == torch.bfloat16 and plain._cache.k[0].dtype == torch.float32
    assert Scheduler(m, None, max_batch=2, fast="compile").cache.k[0].dtype == torch.bfloat16
    with torch.no_grad():
        out, ref = call(engine.decoder)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    done, toks = threading.Event(), []
    sched.start()
    try:  # the scheduler asks too, before it reads a prompt
        sched.submit(Request(prompt[0], SamplingParams(max_tokens=12, temperature=0),
                             lambda ev: (toks.extend(ev.token_ids), ev.finish_reason and done.set())))
        assert done.wait(60)
    finally:
        sched.stop()
    assert sched.decoder.fits(m) and toks == got
    assert sched.cache.k[0].dtype == torch.bfloat16  # the scheduler's cache follows its new step's dtype


def test_a_failed_compile_decodes_plain_on_caches_of_the_activations_dtype(monkeypatch):
    """A quantized model's compiled step keeps K/V in bf16; when compiling fails, Engine and Scheduler
    drop the step and decode plain, the rest of the request on the cache it has, the next on fp32 ones."""
    m = quantize_int4(tiny(seed=7))
    prompt = [2, 7, 1, 8, 2, 8]
    want = Engine(m, fast="plain").generate([prompt], max_tokens=8, temperature=0)[0].token_ids
    failed = types.SimpleNamespace(usable=lambda: False, fits=lambda model: True, prefill_ready=lambda: False,
                                   start_prefill=lambda wait=False: None)
    engine = Engine(m, fast="plain")
    engine.decoder = failed  # as if compiling had failed after the engine was made
    assert engine.generate([prompt], max_tokens=8, temperature=0)[0].token_ids == want
    assert engine.decoder is None
    engine.generate([prompt + [3]], max_tokens=2, temperature=0)
    assert engine._cache.k[0].dtype == torch.float32
    sched = Scheduler(m, None, max_batch=2, fast="plain")
    sched.decoder, sched.cache = failed, SlotCache.for_model(m, 2, compiled=True)
    assert sched.cache.k[0].dtype == torch.bfloat16
    done, toks = threading.Event(), []
    sched.start()
    try:
        sched.submit(Request(prompt, SamplingParams(max_tokens=8, temperature=0),
                             lambda ev: (toks.extend(ev.token_ids), ev.finish_reason and done.set())))
        assert done.wait(60)
    finally:
        sched.stop()
    assert sched.decoder is None and sched.cache.k[0].dtype == torch.float32 and toks == want
