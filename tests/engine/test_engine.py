"""The KV-cache engine: it must give exactly what recomputing the whole sequence gives, row by row."""
import pytest
import torch

from picochat.engine.engine import Engine
from picochat.engine.kv_cache import KVCache
from picochat.engine.sampling import apply_repetition_penalty, filter_logits
from picochat.errors import PicochatError
from picochat.model.config import ModelConfig
from picochat.model.gpt import GPT
from picochat.tokenizer import Tokenizer

V = 257  # the byte tokenizer below: 256 bytes + <|endoftext|>
CONFIGS = {
    # Llama-like: RoPE, RMSNorm, SwiGLU, grouped-query attention (4 query heads share 2 K/V heads)
    "gqa_rope": dict(pos="rope", n_kv_head=2),
    # GPT-2-like: learned absolute positions, LayerNorm, GELU, biases (positions must be per row)
    "learned": dict(pos="learned", norm="layernorm", activation="gelu", bias=True, tie_embeddings=False),
    "alibi": dict(pos="alibi"),
    "sinusoidal": dict(pos="sinusoidal", norm="layernorm", activation="relu"),
}


def make_model(kind: str, block_size: int = 160) -> GPT:
    torch.manual_seed(0)
    # a large init_std spreads the logits, so greedy choices are not near-ties that rounding could flip
    cfg = ModelConfig(vocab_size=V, block_size=block_size, n_layer=2, n_embd=64, n_head=4, init_std=0.2,
                      **CONFIGS[kind])
    return GPT(cfg).eval()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    # no merges: every byte is its own token, so multi-byte characters always span several tokens
    return Tokenizer({bytes([b]): b for b in range(256)}, {"<|endoftext|>": 256}, [])


@torch.no_grad()
def uncached_greedy(model, prompt, max_tokens, stop_ids=()):
    """The reference: re-run the model on the whole sequence for every new token."""
    ids, out = list(prompt), []
    while len(out) < max_tokens and len(ids) < model.config.block_size:
        logits, _ = model(torch.tensor([ids]))
        t = int(logits[0, -1].argmax())
        if t in stop_ids:
            break
        out.append(t)
        ids.append(t)
    return out


PROMPTS = [[10, 20, 30], list(range(40, 47)), [99], [5, 6, 7, 8, 9]]


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_cached_equals_uncached_for_100_greedy_steps(kind):
    model = make_model(kind)
    engine = Engine(model)
    single = engine.generate([PROMPTS[1]], max_tokens=100, temperature=0)[0]
    assert single.token_ids == uncached_greedy(model, PROMPTS[1], 100)
    assert single.finish_reason == "length"
    batch = Engine(model).generate(PROMPTS, max_tokens=100, temperature=0)  # ragged: left-padded
    for p, r in zip(PROMPTS, batch):
        assert r.token_ids == uncached_greedy(model, p, 100)
        assert r.finish_reason == "length" and r.prompt_tokens == len(p)


@pytest.mark.parametrize("kind", ["gqa_rope", "learned"])
def test_batch_equals_each_prompt_alone_with_rows_finishing_apart(kind):
    model = make_model(kind)
    alone = [Engine(model).generate([p], max_tokens=40, temperature=0)[0].token_ids for p in PROMPTS]
    stop = alone[1][5]  # row 1 stops early on a stop token; others stop when (and if) they meet it
    near_full = list(range(150))  # 10 tokens from the end of the context: finishes "length" early
    prompts = PROMPTS + [near_full]
    want = [uncached_greedy(model, p, 40, stop_ids=(stop,)) for p in prompts]
    got = Engine(model).generate(prompts, max_tokens=40, temperature=0, stop_token_ids=(stop,))
    assert [r.token_ids for r in got] == want
    assert got[1].finish_reason == "stop" and len(got[1].token_ids) == 5
    assert len(got[4].token_ids) == 10 and got[4].finish_reason == "length"
    assert [Engine(model).generate([p], max_tokens=40, temperature=0, stop_token_ids=(stop,))[0].token_ids
            for p in prompts] == want


@pytest.mark.parametrize("kind", ["gqa_rope", "learned"])
def test_conversation_reuse_prefills_only_new_tokens(kind):
    model = make_model(kind)
    engine = Engine(model)
    turn1 = [1, 2, 3, 4, 5, 6]
    r1 = engine.generate([turn1], max_tokens=12, temperature=0)[0]
    assert engine.last_prefill_tokens == len(turn1)
    user2 = [70, 71, 72]
    turn2 = turn1 + r1.token_ids + user2
    r2 = engine.generate([turn2], max_tokens=12, temperature=0)[0]
    # the cache holds turn1 and all generated tokens but the last (sampled, never fed back)
    assert engine.last_prefill_tokens == 1 + len(user2)
    assert r2.token_ids == Engine(model).generate([turn2], max_tokens=12, temperature=0)[0].token_ids
    assert r2.token_ids == uncached_greedy(model, turn2, 12)
    # a prompt that diverges from what the cache holds keeps only the shared prefix
    turn3 = turn1[:4] + [200, 201]
    r3 = engine.generate([turn3], max_tokens=12, temperature=0)[0]
    assert engine.last_prefill_tokens == 2
    assert r3.token_ids == uncached_greedy(model, turn3, 12)
    # the same prompt again: one token must still run to produce the next-token logits
    engine.generate([turn3], max_tokens=3, temperature=0)
    assert engine.last_prefill_tokens == 1


class Scripted(torch.nn.Module):
    """A real GPT (so the cache is really used) whose logits are pushed towards a fixed script:
    after the token at absolute position p comes script[p + 1]."""

    def __init__(self, model, script):
        super().__init__()
        self.gpt, self.config, self.script = model, model.config, script

    def forward(self, idx, targets=None, *, start_pos=0, **kwargs):
        logits, _ = self.gpt(idx, start_pos=start_pos, **kwargs)
        first = idx.size(1) - logits.size(1)  # a prefill may ask for the last position's logits only
        for t in range(logits.size(1)):
            p = start_pos + first + t + 1
            if p < len(self.script):
                logits[:, t, self.script[p]] += 1000.0
        return logits, None


def scripted(tok, prompt: str, continuation: str, extra_ids=()):
    ids = tok.encode(prompt)
    return Scripted(make_model("gqa_rope"), ids + tok.encode(continuation) + list(extra_ids)), ids


TEXT = "Héllo wörld 😀, ENTER the END. more"


def run_stream(engine, prompt, **kw):
    chunks = list(engine.stream(prompt, temperature=0, **kw))
    assert all(c.finish_reason is None for c in chunks[:-1])
    return chunks, "".join(c.text for c in chunks), chunks[-1].finish_reason


def test_stream_is_utf8_safe_and_concatenates_to_the_decode(tok):
    model, prompt = scripted(tok, "Hi", TEXT)
    engine = Engine(model, tok)
    chunks, text, reason = run_stream(engine, prompt, max_tokens=len(TEXT.encode()))
    assert text == TEXT and reason == "length"
    assert all("\ufffd" not in c.text for c in chunks)
    assert sum(c.text == "" for c in chunks) == 1 + 1 + 3  # é and ö wait 1 byte, the emoji 3
    ids = [t for c in chunks for t in c.token_ids]
    assert tok.decode(ids) == TEXT


@pytest.mark.parametrize("stops,want", [
    (("END",), "Héllo wörld 😀, ENTER the "),      # "EN" of ENTER is held back, then released
    (("😀",), "Héllo wörld "),                      # a multi-byte stop string
    (("the END", "wörld"), "Héllo "),               # the earliest match wins
    (("ENDX", "xyz"), TEXT),                        # near misses: the held text comes out in the end
])
def test_stop_strings_cut_the_text_and_never_leak(tok, stops, want):
    model, prompt = scripted(tok, "Hi", TEXT)
    n = len(TEXT.encode())
    chunks, text, reason = run_stream(Engine(model, tok), prompt, max_tokens=n, stop_strings=stops)
    assert text == want and reason == ("stop" if want != TEXT else "length")
    res = Engine(model, tok).generate([prompt], max_tokens=n, temperature=0, stop_strings=stops)[0]
    assert res.text == want and res.finish_reason == reason


def test_stop_token_and_length_finish(tok):
    eot = tok.eot_id
    model, prompt = scripted(tok, "Hi", "abc", extra_ids=[eot, ord("z")])
    engine = Engine(model, tok)
    chunks, text, reason = run_stream(engine, prompt, max_tokens=10, stop_token_ids=(eot,))
    assert (text, reason) == ("abc", "stop")
    assert chunks[-1].token_ids == []  # the stop token itself is not output
    res = engine.generate([prompt], max_tokens=2, temperature=0, stop_token_ids=(eot,))[0]
    assert (res.text, res.token_ids, res.finish_reason) == ("ab", [97, 98], "length")
    # never past the model's context: a prompt 3 short of block_size gets 3 tokens, "length"
    long_prompt = [ord("a")] * (model.config.block_size - 3)
    res = Engine(model, tok).generate([long_prompt], max_tokens=50, temperature=0)[0]
    assert len(res.token_ids) == 3 and res.finish_reason == "length"
    assert Engine(model, tok).generate([prompt], max_tokens=0)[0].finish_reason == "length"


def test_bad_inputs_raise_picochat_errors(tok):
    engine = Engine(make_model("gqa_rope"))
    for bad in [dict(prompts=[[]]), dict(prompts=[[1] * 160]), dict(temperature=-1), dict(min_p=2.0),
                dict(repetition_penalty=0.0), dict(stop_strings=("x",))]:
        kw = {"prompts": [[1, 2]], "max_tokens": 3, **bad}
        with pytest.raises(PicochatError):
            engine.generate(kw.pop("prompts"), **kw)


def test_seeded_sampling_is_reproducible():
    model = make_model("gqa_rope")
    kw = dict(max_tokens=30, temperature=1.0, top_k=50, top_p=0.95, min_p=0.01, repetition_penalty=1.1)
    a = Engine(model).generate(PROMPTS, seed=7, **kw)
    b = Engine(model).generate(PROMPTS, seed=7, **kw)
    c = Engine(model).generate(PROMPTS, seed=8, **kw)
    assert [r.token_ids for r in a] == [r.token_ids for r in b] != [r.token_ids for r in c]
    engine = Engine(model)  # and with a kept cache (second call reuses the prefix)
    s1 = [t for ch in engine.stream(PROMPTS[0], seed=3, **kw) for t in ch.token_ids]
    s2 = [t for ch in engine.stream(PROMPTS[0], seed=3, **kw) for t in ch.token_ids]
    assert s1 == s2 and engine.last_prefill_tokens == 1


def test_min_p_keeps_tokens_within_a_fraction_of_the_top():
    probs = torch.tensor([[0.5, 0.3, 0.12, 0.08]])
    kept = lambda m: torch.isfinite(filter_logits(probs.log(), min_p=m)).tolist()[0]  # noqa: E731
    assert kept(0.2) == [True, True, True, False]   # threshold 0.1
    assert kept(0.5) == [True, True, False, False]  # threshold 0.25
    assert kept(1.0) == [True, False, False, False]
    assert kept(0.0) == [True, True, True, True]


def test_repetition_penalty_is_ctrl_style():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    seen = torch.tensor([[True, True, False, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 1.0, 0.5]]
    assert torch.equal(apply_repetition_penalty(logits, seen, 1.0), logits)


def test_repetition_penalty_in_the_engine_matches_a_reference_loop():
    model = make_model("gqa_rope")
    prompt = [3, 4, 5]
    got = Engine(model).generate([prompt], max_tokens=25, temperature=0, repetition_penalty=1e6)[0].token_ids
    ids, want = list(prompt), []
    with torch.no_grad():
        for _ in range(25):
            logits = model(torch.tensor([ids]))[0][:, -1]
            seen = torch.zeros(1, V, dtype=torch.bool)
            seen[0, ids] = True
            want.append(int(apply_repetition_penalty(logits, seen, 1e6).argmax()))
            ids.append(want[-1])
    assert got == want
    assert len(set(prompt + got)) == len(prompt) + len(got)  # a huge penalty: nothing repeats


def test_kv_cache_positions_truncate_and_growth():
    model = make_model("gqa_rope")
    cache = KVCache.for_model(model, batch=1, capacity=4)
    x = torch.randint(0, V, (1, 10))
    with torch.no_grad():
        full, _ = model(x)
        model(x[:, :3], kv_cache=cache)
        assert cache.pos == 3  # advanced once per forward, not once per layer
        model(x[:, 3:9], start_pos=3, kv_cache=cache)  # grows past its initial capacity
        assert cache.pos == 9 and cache.capacity >= 9
        cache.truncate(5)
        step, _ = model(x[:, 5:], start_pos=5, kv_cache=cache)
    assert torch.allclose(step, full[:, 5:], atol=1e-4)
    with pytest.raises(PicochatError):
        cache.truncate(11)


def test_quantized_models_keep_a_bf16_cache_that_decodes_like_an_fp32_one():
    """int8/int4 weights with fp32 activations, decoded by the compiled step: K/V stored in bf16 (half the
    memory and the reads), read back as fp32; the plain step and every other model keep the activations'
    dtype. Teacher-forced through a bf16 and an fp32
    cache (eager forwards, as the engine's prefill runs), the logits of this tiny model part by less than
    quantizing the weights moved them, and the greedy choice is mostly the same. Measured: with PyTorch's
    kernels mean 0.014 against 0.044 for int8, 0.50 for int4, the same choice at 59 of 60 positions; with
    the VNNI kernels (int8 activations: a small change of input can move a whole rounding step) 0.032
    against 0.053 and 0.50, the same at 59 and 56 of 60. SmolLM2: benchmarks/kv_cache_dtype.py (the compiled step on both caches) and
    quant_agreement.py --compiled-cache (eager forwards on a bf16 cache)."""
    from picochat.engine.kv_cache import cache_dtype
    from picochat.engine.slot_cache import SlotCache
    from picochat.model.quant import quantize_int4, quantize_int8
    model = make_model("gqa_rope")
    assert cache_dtype(model, compiled=True) == torch.float32
    assert cache_dtype(make_model("learned").to(torch.bfloat16), compiled=True) == torch.bfloat16
    x = torch.randint(0, V, (1, 60), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(x)[0][0]
    for quantize in (quantize_int8, quantize_int4):
        q = quantize(make_model("gqa_rope"))
        assert cache_dtype(q) == torch.float32 and cache_dtype(q, compiled=True) == torch.bfloat16
        assert KVCache.for_model(q, 1, compiled=True).k[0].dtype == torch.bfloat16
        assert SlotCache.for_model(q, 2, compiled=True).k[0].dtype == torch.bfloat16
        assert KVCache.for_model(q, 1).k[0].dtype == SlotCache.for_model(q, 2).k[0].dtype == torch.float32
        c = q.config
        caches = {dt: KVCache(c.n_layer, 1, c.n_kv_head, c.head_dim, 64, dtype=dt)
                  for dt in (torch.bfloat16, torch.float32)}
        out = {}
        with torch.no_grad():
            for dt, cache in caches.items():  # a 20-token prompt, then one token at a time
                steps = [q(x[:, :20], kv_cache=cache)[0][0]]
                steps += [q(x[:, t:t + 1], start_pos=t, kv_cache=cache)[0][0] for t in range(20, 60)]
                out[dt] = torch.cat(steps)
        assert caches[torch.bfloat16].k[1].dtype == torch.bfloat16 and caches[torch.bfloat16].pos == 60
        cache_moved = float((out[torch.bfloat16] - out[torch.float32]).abs().mean())
        weights_moved = float((out[torch.float32] - ref).abs().mean())
        same = float((out[torch.bfloat16].argmax(-1) == out[torch.float32].argmax(-1)).float().mean())
        assert cache_moved < 0.8 * weights_moved and same >= 0.9, (quantize.__name__, cache_moved, weights_moved, same)
        engine = Engine(q, fast="plain")  # (the compiled engine's cache: tests/engine/test_fast_path.py)
        engine.generate([PROMPTS[1]], max_tokens=5, temperature=0)
        assert engine._cache.k[0].dtype == torch.float32


def test_special_tokens_are_not_shown_as_text():
    from picochat.chat_template import stop_token_ids
    from picochat.engine.engine import _Text
    t = Tokenizer({bytes([b]): b for b in range(256)},
                  {"<|endoftext|>": 256, "<|im_start|>": 257, "<|im_end|>": 258}, [])
    text = _Text(t, ())
    shown = [text.push(i)[0] for i in (ord("h"), 257, ord("i"))] + [text.finish()]
    assert "".join(shown) == "hi"
    # a model that opens a new turn has finished its own
    assert set(stop_token_ids(t, "chatml")) == {256, 257, 258}
