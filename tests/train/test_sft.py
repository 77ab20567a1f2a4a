"""Chat fine-tuning: packing, the loss mask, isolation of packed conversations, and numerical safety."""
from __future__ import annotations

import random

import pytest
import torch

from picochat.chat_template import render_conversation
from picochat.model.config import ModelConfig
from picochat.model.gpt import GPT
from picochat.tokenizer import Tokenizer
from picochat.train.sft import PackedRows, pack, sft_loss


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(["the cat sat on the mat. what is two plus two? it is four. " * 30], 320)


def tiny(pos="rope", seed=0, vocab=320):
    torch.manual_seed(seed)
    return GPT(ModelConfig(vocab_size=vocab, n_layer=2, n_head=2, n_embd=32, block_size=64, pos=pos))


def conv(q, a):
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def test_best_fit_packing_keeps_every_token_and_splits_only_what_cannot_fit():
    rng = random.Random(0)
    examples = [([i] * n, [1] * n) for i, n in enumerate(rng.randint(1, 20) for _ in range(200))]
    examples.append(([7] * 55, [1] * 55))  # alone longer than a row: cut into 24 + 24 + 7
    rows = pack(examples, 24)
    assert all(sum(len(ids) for ids, _ in row) <= 24 for row in rows)
    pieces = sorted(tuple(ids) for row in rows for ids, _ in row)
    want = sorted([tuple(ids) for ids, _ in examples[:-1]] + [(7,) * 24, (7,) * 24, (7,) * 7])
    assert pieces == want  # nothing lost, nothing split except the long one
    total = sum(len(e[0]) for e in examples)
    assert len(rows) <= total / 24 * 1.1 + 1  # best fit wastes little


def test_loss_mask_covers_the_answer_and_its_end_token_only(tok):
    ids, mask = render_conversation(conv("what is two plus two?", "it is four."), tok, "picochat")
    rows = PackedRows(pack([(ids, mask)], 40), 40, seed=0)
    x, y, positions, attn = rows.tensors(torch.tensor([0]))
    trained = [int(t) for t in y[0] if t >= 0]
    assert tok.decode(trained) == "it is four.<|assistant_end|>"


@pytest.mark.parametrize("pos", ["rope", "learned", "alibi"])
@torch.no_grad()
def test_a_packed_row_computes_what_each_conversation_would_alone(tok, pos):
    """Positions restart and attention is block-diagonal: packing changes nothing but speed."""
    model = tiny(pos).eval()
    convs = [conv("what is two plus two?", "it is four."), conv("the cat?", "sat on the mat."),
             conv("two?", "four.")]
    rendered = [render_conversation(c, tok, "picochat") for c in convs]
    packed = PackedRows(pack(rendered, 64), 64, seed=0)
    assert len(packed) == 1  # all three share one row
    batch = packed.tensors(torch.tensor([0]))
    packed_sum = float(model(batch[0], batch[1], positions=batch[2], attn_mask=batch[3], loss_reduction="sum")[1])
    alone_sum = 0.0
    for ids, mask in rendered:
        x = torch.tensor([ids[:-1]])
        y = torch.tensor([[t if m else -1 for t, m in zip(ids[1:], mask[1:])]])
        alone_sum += float(model(x, y, loss_reduction="sum")[1])
    assert packed_sum == pytest.approx(alone_sum, rel=1e-5)


def test_all_masked_micro_batches_and_long_conversations_give_finite_loss_and_gradients(tok):
    model = tiny()
    nothing = [(ids, [0] * len(ids)) for ids, _ in [render_conversation(conv("a", "b"), tok, "picochat")]]
    rows = PackedRows(pack(nothing, 32), 32, seed=0)
    loss = sft_loss(model, rows.batch(0, 2))
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.zero_grad()
    long_ids, long_mask = render_conversation(conv("the cat " * 40, "sat on the mat " * 40), tok, "picochat")
    assert len(long_ids) > 3 * 33
    rows = PackedRows(pack([(long_ids, long_mask)], 33), 33, seed=0)  # cut into pieces, some all prompt
    for i in range(len(rows)):
        loss = sft_loss(model, rows.tensors(torch.tensor([i])))
        loss.backward()
        assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_batches_are_a_pure_function_of_the_sample_index(tok):
    rendered = [render_conversation(conv(f"q{i}", "a " * (i % 5 + 1)), tok, "picochat") for i in range(40)]
    a = PackedRows(pack(rendered, 32), 32, seed=3)
    b = PackedRows(pack(rendered, 32), 32, seed=3)
    b.batch(100, 4)  # another position first: no hidden loader state
    for first in (0, 5, 37):
        assert all(torch.equal(u, v) for u, v in zip(a.batch(first, 4), b.batch(first, 4)))
