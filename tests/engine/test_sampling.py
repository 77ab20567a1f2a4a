"""Sampling filters and the UTF-8-safe stream."""
import pytest
import torch

from picochat.engine import sampling
from picochat.engine.sampling import Utf8Stream, check_sampling, draw, filter_logits, sample_next
from picochat.errors import PicochatError


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 3.0, 2.9], [5.0, -1.0, 0.0]])
    assert sample_next(logits, temperature=0).tolist() == [1, 0]


def test_top_k_keeps_exactly_k():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    kept = torch.isfinite(filter_logits(logits, top_k=2))
    assert kept.tolist() == [[False, True, True, False]]


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    assert torch.isfinite(filter_logits(logits, top_p=0.5)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.79)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.81)).tolist() == [[True, True, True, False]]
    shuffled = logits[:, [2, 0, 3, 1]]  # order of the vocabulary must not matter
    assert torch.isfinite(filter_logits(shuffled, top_p=0.79)).tolist() == [[False, True, False, True]]


def nucleus_by_sorting(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """The textbook nucleus (sort the whole vocabulary, keep until the mass reaches p): the oracle."""
    keep = torch.zeros_like(logits, dtype=torch.bool)
    for b, row in enumerate(logits.double()):
        order = torch.argsort(row, descending=True)
        mass = 0.0
        for i in order.tolist():
            keep[b, i] = True
            mass += float(torch.softmax(row, 0)[i])
            if mass >= top_p:
                break
    return keep


@pytest.mark.parametrize("top_p", [0.3, 0.9, 0.99])
def test_top_p_over_a_large_vocabulary_matches_sorting_it(top_p):
    """filter_logits looks at the 128 most likely tokens first and sorts a row whole only when its nucleus
    is larger: peaked rows (the fast path), flat rows (the fallback) and a mixed batch keep what sorting
    keeps."""
    g = torch.Generator().manual_seed(0)
    V = 3000
    peaked = torch.randn(4, V, generator=g) * 4   # nucleus of a few tokens
    flat = torch.randn(3, V, generator=g) * 0.2   # nucleus of hundreds: more than the 128 candidates
    for logits in (peaked, flat, torch.cat([flat[:1], peaked, flat[1:]])):
        kept = torch.isfinite(filter_logits(logits, top_p=top_p))
        want = nucleus_by_sorting(logits, top_p)
        assert torch.equal(kept, want), (kept.sum(-1), want.sum(-1))
        kept_logits = filter_logits(logits, top_p=top_p)
        assert torch.equal(kept_logits[kept], logits[kept])  # the kept logits are untouched
    assert nucleus_by_sorting(flat, 0.9).sum(-1).min() > sampling.TOP_P_CANDIDATES  # (the fallback ran)


def test_top_p_sorts_only_rows_whose_nucleus_is_past_the_candidates(monkeypatch):
    g = torch.Generator().manual_seed(0)
    peaked, flat = torch.randn(4, 3000, generator=g) * 4, torch.randn(2, 3000, generator=g) * 0.2
    sorted_rows = []
    real_sort = torch.sort
    monkeypatch.setattr(torch, "sort", lambda x, *a, **k: sorted_rows.append(x.size(0)) or real_sort(x, *a, **k))
    filter_logits(peaked, top_p=0.5)
    assert sorted_rows == []  # the fast path alone
    want = nucleus_by_sorting(torch.cat([peaked, flat]), 0.9)
    assert torch.equal(torch.isfinite(filter_logits(torch.cat([peaked, flat]), top_p=0.9)), want)
    assert sorted_rows == [2]  # the two flat rows, and only they
    # any shape (..., V), as before: a (2, 3, V) batch keeps what its rows keep
    x = torch.cat([peaked, flat]).view(2, 3, 3000)
    assert torch.equal(torch.isfinite(filter_logits(x, top_p=0.9)).view(6, 3000), want)


def test_draw_follows_the_distribution_and_never_picks_an_impossible_token():
    """Inverse transform sampling (draw) against the probabilities, on a 40,000-row batch whose rows
    alternate between two distributions: every frequency within 4 standard errors of its own row's
    distribution, and a -inf logit (filtered out) or zero-probability token never drawn."""
    a = torch.tensor([0.5, 0.25, 0.15, 0.1, 0.0]).log()
    a[2] = float("-inf")  # filtered, e.g. by top-k: the rest renormalised
    b = torch.tensor([0.05, 0.0, 0.15, 0.3, 0.5]).log()
    z = torch.stack([a, b]).repeat(20000, 1)  # rows a, b, a, b, ...
    ids = draw(z, 1.0, torch.Generator().manual_seed(1))
    for row, want in ((0, torch.tensor([0.5, 0.25, 0.0, 0.1, 0.0]) / 0.85),
                      (1, torch.tensor([0.05, 0.0, 0.15, 0.3, 0.5]))):
        picks = ids[row::2]
        freq = torch.bincount(picks, minlength=5).double() / len(picks)
        se = (want.double() * (1 - want.double()) / len(picks)).sqrt()
        assert (freq - want).abs().le(4 * se + 1e-12).all(), (row, freq, want)
        assert freq[want == 0].eq(0).all()
    assert torch.equal(ids, draw(z, 1.0, torch.Generator().manual_seed(1)))  # seeded: the same draws


def test_draw_refuses_a_nan_row_and_falls_back_when_u_reaches_the_total(monkeypatch):
    with pytest.raises(RuntimeError):  # (multinomial's refusal: callers sanitize first, a NaN row must fail)
        draw(torch.tensor([[0.0, float("nan"), 1.0]]), 1.0)
    # u = the total (a rounding that inverse transform sampling can meet): the pick is still a real token
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.ones(*a[:2], dtype=k.get("dtype")))
    z = torch.tensor([[1.0, 2.0, float("-inf"), float("-inf")]])
    assert draw(z, 1.0).item() in (0, 1)


def test_sampling_follows_the_distribution_and_seed():
    logits = torch.tensor([[0.0, 1.0, 2.0]]).repeat(20000, 1)
    g = torch.Generator().manual_seed(0)
    ids = sample_next(logits, temperature=1.0, generator=g)
    freq = torch.bincount(ids, minlength=3).float() / len(ids)
    assert torch.allclose(freq, torch.softmax(torch.tensor([0.0, 1.0, 2.0]), 0), atol=0.015)
    g2 = torch.Generator().manual_seed(0)
    assert torch.equal(ids, sample_next(logits, temperature=1.0, generator=g2))
    # low temperature sharpens towards the argmax
    cold = sample_next(logits, temperature=0.1, generator=g)
    assert (cold == 2).float().mean() > 0.99


def test_bad_sampling_parameters():
    for kwargs in [dict(temperature=-1, top_k=None, top_p=None), dict(temperature=1, top_k=-2, top_p=None),
                   dict(temperature=1, top_k=None, top_p=0.0), dict(temperature=1, top_k=None, top_p=1.5)]:
        with pytest.raises(PicochatError):
            check_sampling(**kwargs)


@pytest.mark.parametrize("text", ["héllo wörld", "emoji 🎉👍🏽 and 中文 and 👩‍👩‍👧", "plain"])
def test_utf8_stream_never_emits_half_a_character(text):
    data = text.encode("utf-8")
    for chunk in (1, 2, 3):
        s, out = Utf8Stream(), []
        for i in range(0, len(data), chunk):
            piece = s.push(data[i:i + chunk])
            assert "\ufffd" not in piece
            out.append(piece)
        out.append(s.flush())
        assert "".join(out) == text


def test_utf8_stream_invalid_bytes_are_replaced_not_held_forever():
    s = Utf8Stream()
    assert s.push(b"a\xff") == "a\ufffd"
    assert s.push(b"\xe2\x82") == ""  # an incomplete euro sign waits
    assert s.push(b"\xac!") == "\u20ac!"
    assert s.push(b"\xf0") == "" and s.flush() == "\ufffd"


def test_sanitize_logits_fast_and_full_paths():
    """Finite logits, or some -inf among them (filtered out), come back as they are (the one-pass check); a
    NaN becomes -inf, a row with +inf keeps only its +inf entries, an all -inf row is refused by index."""
    ok = torch.randn(3, 50)
    assert sampling.sanitize_logits(ok) is ok
    filtered = ok.masked_fill(ok < 0, float("-inf"))
    filtered[:, 0] = 1.0
    assert sampling.sanitize_logits(filtered) is filtered
    x = torch.tensor([[0.0, float("nan"), 1.0], [float("inf"), 2.0, float("inf")], [1.0, 2.0, 3.0]])
    out = sampling.sanitize_logits(x)
    assert out[0].tolist() == [0.0, float("-inf"), 1.0]
    assert out[1].tolist() == [0.0, float("-inf"), 0.0]  # softmax's limit: uniform over the two +inf
    assert out[2].tolist() == [1.0, 2.0, 3.0]
    big = torch.full((2, 4), 3e38)  # finite, though their sum is not
    assert sampling.sanitize_logits(big) is big
    with pytest.raises(sampling.Unsampleable) as e:
        sampling.sanitize_logits(torch.tensor([[0.0, 1.0], [float("-inf"), float("-inf")]]))
    assert e.value.rows == [1]
