"""The encoder-decoder transformer: masks, padding, the decoder's KV cache, greedy and beam search, and
learning a small task (reverse a sequence) from scratch."""
import itertools
import time

import pytest
import torch

from picochat.errors import PicochatError
from picochat.model.seq2seq import Seq2Seq, Seq2SeqConfig, cross_mask, decoder_mask, encoder_mask

PAD, BOS, EOS = 0, 1, 2


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**kw) -> Seq2Seq:
    torch.manual_seed(0)
    cfg = dict(src_vocab_size=20, tgt_vocab_size=23, n_embd=32, n_head=4, dropout=0.0) | kw
    return Seq2Seq(Seq2SeqConfig(**cfg)).eval()


def test_mask_shapes_and_values():
    keep = torch.tensor([[True, True, True, False], [True, True, False, False]])
    enc, dec, cross = encoder_mask(keep), decoder_mask(keep), cross_mask(keep)
    assert enc.shape == (2, 1, 4, 4) and dec.shape == (2, 1, 4, 4) and cross.shape == (2, 1, 1, 4)
    assert enc[1, 0].tolist() == [[True, True, False, False]] * 4  # every query, real keys only
    assert dec[0, 0].tolist() == [[True, False, False, False], [True, True, False, False],
                                  [True, True, True, False], [True, True, True, False]]  # causal, no padding
    m = tiny()
    src = torch.tensor([[5, 6, 7, EOS], [8, EOS, PAD, PAD]])
    tgt = torch.tensor([[BOS, 4, 5, EOS, PAD], [BOS, 6, EOS, PAD, PAD]])
    logits, loss = m(src, tgt, return_weights=True)
    assert logits.shape == (2, 4, 23) and loss.ndim == 0
    for w in m.cross_attention_maps():  # (B, nh, T, S): rows are distributions over the real source tokens
        assert w.shape == (2, 4, 4, 4)
        assert torch.allclose(w.sum(-1), torch.ones(2, 4, 4), atol=1e-5)
        assert w[1, :, :, 2:].abs().max() == 0


@pytest.mark.parametrize("pos,norm,shared", [("sinusoidal", "post", False), ("learned", "pre", True),
                                             ("rope", "post", True), ("rope", "pre", False)])
def test_source_padding_never_changes_an_unpadded_row(pos, norm, shared):
    m = tiny(pos=pos, norm_position=norm, shared_vocab=shared, tgt_vocab_size=20 if shared else 23)
    rows = [[5, 6, 7, 8, 9, EOS], [11, 3, EOS], [4, EOS]]
    batch = torch.zeros(3, 6, dtype=torch.long)
    for i, r in enumerate(rows):
        batch[i, :len(r)] = torch.tensor(r)
    tgt = torch.tensor([[BOS, 4, 5, 6, 7]] * 3)
    together, _ = m(batch, tgt)
    for i, r in enumerate(rows):
        alone, _ = m(torch.tensor([r]), tgt[i:i + 1])
        assert torch.allclose(alone[0], together[i], atol=1e-5), i
    assert m.greedy(batch, max_len=8) == [m.greedy(torch.tensor([r]), max_len=8)[0] for r in rows]


@pytest.mark.parametrize("pos,norm,shared", list(itertools.product(("sinusoidal", "learned", "rope"),
                                                                   ("post", "pre"), (False, True))))
def test_cached_decoder_equals_full_recompute(pos, norm, shared):
    m = tiny(pos=pos, norm_position=norm, shared_vocab=shared, tgt_vocab_size=20 if shared else 23)
    src = torch.tensor([[5, 6, 7, EOS, PAD, PAD], [8, 9, 10, 11, 12, EOS]])
    tgt = torch.cat([torch.full((2, 1), BOS), torch.randint(3, 20, (2, 8))], dim=1)
    memory, keep = m.encode(src)
    full = m.decode(tgt, memory, keep)  # (B, T, V), every position recomputed from scratch
    cache = m.new_cache(memory)
    steps = torch.cat([m.decode(tgt[:, t:t + 1], None, keep, cache=cache, start_pos=t) for t in range(tgt.size(1))], 1)
    assert cache.pos == tgt.size(1) and cache.k[0].shape == (2, 4, tgt.size(1), 8)
    assert cache.cross_kv[0][0].shape == (2, 4, 6, 8)  # computed once, from the encoder output
    assert (full - steps).abs().max() < 1e-5
    # a prefix at once, then steps: the same numbers again
    cache = m.new_cache(memory)
    head = m.decode(tgt[:, :5], None, keep, cache=cache)
    tail = torch.cat([m.decode(tgt[:, t:t + 1], None, keep, cache=cache, start_pos=t) for t in range(5, 9)], 1)
    assert (torch.cat([head, tail], 1) - full).abs().max() < 1e-5


def test_beam_search_is_exhaustive_when_the_beam_holds_every_hypothesis():
    """max_len 2 and beam = every real token: step 1 ranks every hypothesis of length <= 2, so beam search must
    return the brute-force best under its ranking rule, for summed (0) and per-token mean (1) log-probs."""
    m = tiny(tgt_vocab_size=7, pos="rope", tie_embeddings=False)  # real tokens: EOS and 3..6
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # large random weights: next-token distributions that vary with the source and prefix
        for p in m.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    src = torch.randint(3, 20, (8, 5), generator=torch.Generator().manual_seed(0))
    memory, keep = m.encode(src)
    banned = torch.tensor([PAD, BOS])

    def logp(prefix):  # (B, V) log p(next | BOS prefix), PAD and BOS never produced
        logits = m.decode(torch.tensor([[BOS] + prefix] * len(src)), memory, keep)[:, -1].float()
        return torch.log_softmax(logits.index_fill(-1, banned, float("-inf")), -1)
    real = [EOS, 3, 4, 5, 6]
    wants = {}
    for lp in (0.0, 1.0):
        wants[lp] = []
        for b in range(len(src)):
            hyps = {(EOS,): logp([])[b, EOS].item()}
            for a in real[1:]:
                for c in real:
                    hyps[(a, c)] = logp([])[b, a].item() + logp([a])[b, c].item()
            best = max(hyps, key=lambda h: hyps[h] / len(h) ** lp)
            wants[lp].append([t for t in best if t != EOS])
        assert m.beam_search(src, beam=5, length_penalty=lp, max_len=2) == wants[lp]
    assert wants[0.0] != wants[1.0]  # the two rules disagree somewhere, so both were really checked


def reference_beam_search(m, src_row, beam, length_penalty, max_len):
    """One sentence, no cache, no batching: every step recomputes the decoder over the whole prefix."""
    memory, keep = m.encode(src_row[None])
    real = [EOS] + list(range(3, m.config.tgt_vocab_size))
    hyps = [([], 0.0, False)]  # (tokens, summed log-prob, ended with EOS)
    for _ in range(max_len):
        cands = []
        for toks, score, done in hyps:
            if done:  # a finished hypothesis stays, its score frozen
                cands.append((toks, score, True))
                continue
            logits = m.decode(torch.tensor([[BOS] + toks]), memory, keep)[0, -1].float()
            logp = torch.log_softmax(logits.index_fill(0, torch.tensor([PAD, BOS]), float("-inf")), -1)
            cands += [(toks + [t], score + logp[t].item(), t == EOS) for t in real]
        hyps = sorted(cands, key=lambda h: h[1] / len(h[0]) ** length_penalty, reverse=True)[:beam]
        if all(done for _, _, done in hyps):
            break
    return [t for t in hyps[0][0] if t != EOS]


@pytest.mark.parametrize("beam,lp,norm,pos", [(2, 0.0, "pre", "rope"), (3, 1.0, "post", "rope"),
                                              (4, 0.6, "pre", "learned"), (3, 1.0, "post", "learned")])
def test_batched_cached_beam_search_equals_a_plain_one(beam, lp, norm, pos):
    """Hypotheses change rows between steps: the cache must follow them (reorder), row by row in a batch."""
    m = tiny(tgt_vocab_size=9, tie_embeddings=False, norm_position=norm, pos=pos)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random weights large enough that the next token depends on the whole prefix
        for p in m.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)
    src = torch.randint(3, 20, (5, 6), generator=g)
    want = [reference_beam_search(m, row, beam, lp, max_len=7) for row in src]
    assert m.beam_search(src, beam=beam, length_penalty=lp, max_len=7) == want


def test_beam_one_is_greedy_and_bad_options_are_refused():
    m = tiny()
    src = torch.randint(3, 20, (6, 7))
    for lp in (0.0, 0.6, 1.0):
        assert m.beam_search(src, beam=1, length_penalty=lp, max_len=12) == m.greedy(src, max_len=12)
    with pytest.raises(PicochatError, match="beam"):
        m.beam_search(src, beam=0)
    with pytest.raises(PicochatError, match="beam"):
        m.beam_search(src, beam=22)  # more than the 21 tokens a hypothesis can be extended by
    with pytest.raises(PicochatError, match="max_len"):
        m.greedy(src, max_len=33)
    with pytest.raises(PicochatError, match="shared_vocab"):
        Seq2SeqConfig(src_vocab_size=20, tgt_vocab_size=23, shared_vocab=True)
    with pytest.raises(PicochatError, match="block_size"):
        m(torch.randint(3, 20, (1, 40)), torch.tensor([[BOS, EOS]]))


def test_shared_vocab_and_tied_head_are_honoured():
    shared, separate = tiny(shared_vocab=True, tgt_vocab_size=20), tiny(tie_embeddings=False)
    assert shared.src_emb.weight is shared.tgt_emb.weight is shared.lm_head.weight
    assert separate.src_emb.weight is not separate.tgt_emb.weight
    assert separate.lm_head.weight is not separate.tgt_emb.weight
    shared_untied = tiny(shared_vocab=True, tgt_vocab_size=20, tie_embeddings=False)
    assert shared_untied.src_emb.weight is shared_untied.tgt_emb.weight is not shared_untied.lm_head.weight
    assert shared.num_params() + 20 * 32 == shared_untied.num_params() < separate.num_params()


def reverse_batch(g: torch.Generator, n: int, vocab: int = 12):
    """Sources of 3..6 random symbols; the target is the source reversed: [BOS] reversed [EOS], padded."""
    lens = torch.randint(3, 7, (n,), generator=g)
    src = torch.zeros(n, 7, dtype=torch.long)
    tgt = torch.zeros(n, 8, dtype=torch.long)
    for i, L in enumerate(lens.tolist()):
        x = torch.randint(3, vocab, (L,), generator=g)
        src[i, :L + 1] = torch.cat([x, torch.tensor([EOS])])
        tgt[i, :L + 2] = torch.cat([torch.tensor([BOS]), x.flip(0), torch.tensor([EOS])])
    return src, tgt


@pytest.mark.slow
def test_teacher_forcing_learns_to_reverse_and_greedy_solves_it():
    """Reversing needs two layers a side (one finds the length, one reads the mirrored position): the loss sits
    near log(9) until step ~300, then drops to ~0 (measured over seeds 0-2: ~10 s on one thread)."""
    torch.manual_seed(0)
    m = Seq2Seq(Seq2SeqConfig(src_vocab_size=12, tgt_vocab_size=12, n_embd=32, n_head=4, n_enc_layer=2,
                              n_dec_layer=2, dropout=0.0, norm_position="pre"))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    t0, losses = time.time(), []
    for step in range(500):
        _, loss = m(*reverse_batch(g, 64))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    m.eval()
    src, tgt = reverse_batch(torch.Generator().manual_seed(123), 200)  # new sequences
    want = [[t for t in row if t > EOS] for row in tgt.tolist()]
    greedy = m.greedy(src)
    assert sum(losses[-20:]) / 20 < 0.1 * sum(losses[:20]) / 20
    assert sum(g == w for g, w in zip(greedy, want)) / len(want) >= 0.95
    assert m.beam_search(src, beam=1) == greedy
    beam = m.beam_search(src, beam=3)
    assert sum(b == w for b, w in zip(beam, want)) / len(want) >= 0.95
    assert time.time() - t0 < 60
