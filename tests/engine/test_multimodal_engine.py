"""A prompt with a picture in the engine and the scheduler: cached decode equals the uncached forward, chunked
prefill places the right slice of the picture, and prefix reuse never serves one picture's K/V for another."""
import pytest
import torch

from picochat.engine.engine import Engine, PromptEmbeds, SamplingParams
from picochat.engine.scheduler import Request, Scheduler
from picochat.errors import PicochatError
from picochat.model.config import ModelConfig
from picochat.model.gpt import GPT
from tests.engine.test_scheduler import Collector

MARK, N, D = 63, 4, 32


def tiny(pos="rope"):
    torch.manual_seed(0)
    # init std 0.3: a random model whose greedy answer depends on what it reads (at 0.02 it repeats one token)
    return GPT(ModelConfig(vocab_size=64, block_size=96, n_layer=2, n_head=4, n_kv_head=2, n_embd=D, pos=pos,
                           init_std=0.3)).eval()


def prompt(head=10, tail=6, start=1):
    """head text tokens, N markers, tail text tokens."""
    return [(start + 7 * i) % 60 for i in range(head)] + [MARK] * N + [(start + 5 * i) % 60 for i in range(tail)]


def picture(seed):
    return torch.randn(N, D, generator=torch.Generator().manual_seed(seed))


def uncached_greedy(m, ids, values, steps):
    """Recompute everything from scratch for every new token: the oracle."""
    ids, n = list(ids), len(ids)
    out = []
    with torch.no_grad():
        for _ in range(steps):
            x = torch.tensor([ids])
            mask = x == MARK
            mask[:, n:] = False  # a generated marker token is just a token: the picture is the prompt's
            logits, _ = m(x, embeds=values, embeds_mask=mask)
            t = int(logits[0, -1].argmax())
            out.append(t)
            ids.append(t)
    return out


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_cached_decode_with_a_picture_equals_the_uncached_forward(pos):
    m = tiny(pos)
    p, z = prompt(), picture(1)
    got = Engine(m).generate([p], embeds=[PromptEmbeds.at_markers(p, MARK, z)], max_tokens=12, temperature=0)
    assert got[0].token_ids == uncached_greedy(m, p, z, 12)
    assert got[0].token_ids != Engine(m).generate([p], max_tokens=12, temperature=0)[0].token_ids  # it sees


def test_a_left_padded_batch_places_each_rows_picture():
    m = tiny()
    p1, p2, p3 = prompt(10, 6), prompt(3, 2, start=4), prompt(7, 0, start=9)[:-1] + [5]
    z1, z3 = picture(1), picture(3)
    e1, e3 = PromptEmbeds.at_markers(p1, MARK, z1), PromptEmbeds.at_markers(p3, MARK, z3[:N - 1])
    alone = [Engine(m).generate([p], embeds=[e], max_tokens=8, temperature=0)[0].token_ids
             for p, e in ((p1, e1), (p2, None), (p3, e3))]
    batch = Engine(m).generate([p1, p2, p3], embeds=[e1, None, e3], max_tokens=8, temperature=0)
    assert [r.token_ids for r in batch] == alone
    assert alone[0] == uncached_greedy(m, p1, z1, 8)


def test_the_kept_cache_of_a_chat_is_reused_only_for_the_same_picture():
    m = tiny()
    p = prompt()
    eng = Engine(m)
    e1, e2 = PromptEmbeds.at_markers(p, MARK, picture(1)), PromptEmbeds.at_markers(p, MARK, picture(2))
    first = eng.generate([p], embeds=[e1], max_tokens=6, temperature=0)[0].token_ids
    second = eng.generate([p], embeds=[e2], max_tokens=6, temperature=0)[0].token_ids  # same ids, other picture
    assert eng.last_prefill_tokens == len(p) - p.index(MARK)  # the text before the picture only was reused
    assert second == Engine(m).generate([p], embeds=[e2], max_tokens=6, temperature=0)[0].token_ids
    answer = [t for t in second if t != MARK]  # (a chat re-renders the answer's text: no special tokens)
    longer = p + answer + [7, 8, 9]  # the next turn about the same picture reuses it all
    third = eng.generate([longer], embeds=[PromptEmbeds.at_markers(longer, MARK, picture(2))], max_tokens=6,
                         temperature=0)[0].token_ids
    assert eng.last_prefill_tokens <= 3 + 1 + (len(second) - len(answer))  # the new question (+ the last answer
    # token, whose K/V were never computed, + any dropped marker token: the prefix ends there)
    assert third == uncached_greedy(m, longer, picture(2), 6)
    assert first != second


def test_chunked_prefill_gives_each_chunk_its_slice_of_the_picture():
    m = tiny()
    p, z = prompt(9, 5), picture(1)  # markers at 9..12: chunks of 3 cut the picture twice
    want = uncached_greedy(m, p, z, 10)
    s = Scheduler(m, None, max_batch=2, prefill_chunk=3).start()
    c = Collector(2)
    try:
        s.submit(Request(p, SamplingParams(max_tokens=10, temperature=0), c.cb(0),
                         embeds=PromptEmbeds.at_markers(p, MARK, z)))
        s.submit(Request(prompt(2, 1, start=3), SamplingParams(max_tokens=10, temperature=0), c.cb(1)))
        c.wait()
    finally:
        s.stop()
    assert c.tokens[0] == want
    assert c.tokens[1] == Engine(m).generate([prompt(2, 1, start=3)], max_tokens=10, temperature=0)[0].token_ids


def test_prefix_reuse_never_serves_one_pictures_kv_for_another():
    m = tiny()
    p = prompt(12, 6)
    first_mark = p.index(MARK)
    s = Scheduler(m, None, max_batch=4, prefill_chunk=64).start()  # room to keep both pictures' K/V
    try:
        runs = []
        for seed, ids in ((1, p), (2, p), (1, p + [3, 4]), (2, p + [5])):
            c = Collector(1)
            e = PromptEmbeds.at_markers(ids, MARK, picture(seed))
            s.submit(Request(ids, SamplingParams(max_tokens=6, temperature=0), c.cb(0), embeds=e))
            c.wait()
            runs.append((c.tokens[0], c.cached[0], uncached_greedy(m, ids, picture(seed), 6)))
    finally:
        s.stop()
    for tokens, _, want in runs:
        assert tokens == want
    (_, c1, _), (_, c2, _), (_, c3, _), (_, c4, _) = runs
    assert c1 == 0
    assert c2 == first_mark          # picture 2 after picture 1, same ids: only the text before the picture
    assert c3 > first_mark + N       # picture 1 again: its K/V are reused
    assert c4 > first_mark + N       # and picture 2's, kept from the second request


def test_bad_embeds_are_refused_before_anything_runs():
    m = tiny()
    p = prompt()
    with pytest.raises(PicochatError, match="marker tokens but"):
        PromptEmbeds.at_markers(p, MARK, picture(1)[:3])
    with pytest.raises(PicochatError, match="width"):
        Engine(m).generate([p], embeds=[PromptEmbeds.at_markers(p, MARK, torch.zeros(N, D + 1))], max_tokens=2)
    with pytest.raises(PicochatError, match="past the prompt"):
        Engine(m).generate([p[:5]], embeds=[PromptEmbeds([7], torch.zeros(1, D))], max_tokens=2)
    s = Scheduler(m, None)
    with pytest.raises(PicochatError, match="width"):
        s.submit(Request(p, SamplingParams(max_tokens=2), lambda ev: None,
                         embeds=PromptEmbeds.at_markers(p, MARK, torch.zeros(N, 8))))
