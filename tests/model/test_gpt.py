"""The decoder: causality for every architectural option, exact formulas, and config validation."""
import itertools
import math

import pytest
import torch

from picochat.errors import PicochatError
from picochat.model.attention import alibi_slopes, apply_rope, attention, rope_cos_sin, sinusoidal_table
from picochat.model.config import ModelConfig, PRESETS, preset
from picochat.model.gpt import GPT

OPTIONS = list(itertools.product(["learned", "sinusoidal", "rope", "alibi", "none"],
                                 ["layernorm", "rmsnorm"], ["pre", "post"], ["gelu", "relu", "swiglu"]))


def tiny(**kw):
    base = dict(vocab_size=97, block_size=24, n_layer=2, n_head=4, n_embd=32)
    return ModelConfig(**(base | kw))


@pytest.mark.parametrize("pos,norm,where,act", OPTIONS)
def test_future_tokens_never_change_past_logits(pos, norm, where, act):
    torch.manual_seed(0)
    model = GPT(tiny(pos=pos, norm=norm, norm_position=where, activation=act, n_kv_head=2, bias=True)).eval()
    x = torch.randint(0, 97, (2, 24))
    t = 11
    x2 = x.clone()
    x2[:, t:] = torch.randint(0, 97, (2, 24 - t))
    with torch.no_grad():
        a, _ = model(x)
        b, _ = model(x2)
    assert torch.equal(a[:, :t], b[:, :t]) or (a[:, :t] - b[:, :t]).abs().max() < 1e-6
    assert (a[:, t:] - b[:, t:]).abs().max() > 1e-4  # and the future does matter


@pytest.mark.parametrize("kv", [4, 2, 1])
def test_mha_gqa_mqa_attention_maps_are_causal_distributions(kv):
    torch.manual_seed(0)
    model = GPT(tiny(n_kv_head=kv)).eval()
    x = torch.randint(0, 97, (1, 10))
    with torch.no_grad():
        fast, _ = model(x)
        slow, _ = model(x, return_attention=True)
    assert (fast - slow).abs().max() < 1e-5  # the SDPA path equals the textbook path
    for w in model.attention_maps():
        assert w.shape == (1, 4, 10, 10)
        assert torch.allclose(w.sum(-1), torch.ones(1, 4, 10))
        assert torch.all(w.triu(1) == 0)


def test_sinusoidal_table_equals_formula():
    n, d = 50, 16
    pe = sinusoidal_table(n, d)
    for p in range(n):
        for i in range(d // 2):
            assert pe[p, 2 * i].item() == pytest.approx(math.sin(p / 10000 ** (2 * i / d)), abs=1e-6)
            assert pe[p, 2 * i + 1].item() == pytest.approx(math.cos(p / 10000 ** (2 * i / d)), abs=1e-6)


def test_attention_textbook_example_by_hand():
    # Q = K = V = I (2x2), scale 1: scores [[1,0],[0,1]] -> softmax rows [e/(e+1), 1/(e+1)]
    eye = torch.eye(2)
    out, w = attention(eye, eye, eye, scale=1.0, return_weights=True)
    e = math.e
    assert torch.allclose(w, torch.tensor([[e / (e + 1), 1 / (e + 1)], [1 / (e + 1), e / (e + 1)]]))
    assert torch.allclose(out, w)  # V = I
    # causal mask: the first query only sees itself
    mask = torch.tensor([[True, False], [True, True]])
    out, w = attention(eye, eye, torch.tensor([[1.0, 2.0], [3.0, 4.0]]), mask=mask, scale=1.0, return_weights=True)
    assert torch.allclose(out[0], torch.tensor([1.0, 2.0]))
    # default scale is 1/sqrt(d_k)
    q = torch.tensor([[2.0, 0.0, 0.0, 0.0]])
    k = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    _, w = attention(q, k, k, return_weights=True)
    assert w[0, 0].item() == pytest.approx(math.exp(1) / (math.exp(1) + 1))  # 2*1/sqrt(4) = 1


def test_fully_masked_row_gives_zeros_not_nan():
    q = torch.randn(3, 4)
    mask = torch.tensor([[False, False, False], [True, False, False], [True, True, True]])
    out, w = attention(q, q, q, mask=mask, return_weights=True)
    assert not torch.isnan(out).any() and not torch.isnan(w).any()
    assert torch.all(out[0] == 0) and torch.all(w[0] == 0)
    float_mask = torch.zeros(3, 3).masked_fill(~mask, float("-inf"))
    out2 = attention(q, q, q, mask=float_mask)
    assert torch.allclose(out, out2)


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    cos, sin = rope_cos_sin(64, 8, 10000.0)
    q, k = torch.randn(8), torch.randn(8)

    def score(m, n):
        qm = apply_rope(q.view(1, 1, 1, 8), cos[m:m + 1], sin[m:m + 1]).flatten()
        kn = apply_rope(k.view(1, 1, 1, 8), cos[n:n + 1], sin[n:n + 1]).flatten()
        return (qm @ kn).item()
    assert score(5, 2) == pytest.approx(score(40, 37), rel=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 4), rel=1e-3)


def test_alibi_slopes_match_paper():
    assert torch.allclose(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    assert len(alibi_slopes(12)) == 12


def test_param_count_formula_matches_model_for_presets():
    for name in ["tiny", "small", "gpt2"]:
        cfg = preset(name)
        assert GPT(cfg).num_params() == cfg.num_params()
    assert preset("gpt2").num_params() == 124_439_808  # GPT-2 small, the published count


def test_tied_embeddings_share_storage():
    m = GPT(tiny(tie_embeddings=True))
    assert m.lm_head.weight is m.tok_emb.weight
    assert GPT(tiny(tie_embeddings=False)).lm_head.weight is not GPT(tiny(tie_embeddings=False)).tok_emb.weight


def test_ignore_index_and_loss_at_init_is_log_vocab():
    torch.manual_seed(0)
    m = GPT(tiny()).eval()
    x = torch.randint(0, 97, (4, 24))
    y = torch.randint(0, 97, (4, 24))
    y[:, :12] = -1
    logits, loss = m(x, y)
    manual = torch.nn.functional.cross_entropy(logits[:, 12:].reshape(-1, 97), y[:, 12:].reshape(-1))
    assert loss.item() == pytest.approx(manual.item(), rel=1e-5)  # -1 targets are ignored
    assert abs(loss.item() - math.log(97)) < 0.3  # small init: near-uniform predictions


def test_config_errors_are_clear():
    with pytest.raises(PicochatError, match="divisible"):
        ModelConfig(n_embd=30, n_head=4)
    with pytest.raises(PicochatError, match="multiple of n_kv_head"):
        ModelConfig(n_head=4, n_kv_head=3)
    with pytest.raises(PicochatError, match="unknown preset"):
        preset("nope")
    with pytest.raises(PicochatError, match="unknown fields"):
        ModelConfig.from_dict({"n_layer": 2, "bogus": 1})
    with pytest.raises(PicochatError, match="longer than the model's context"):
        GPT(tiny())(torch.zeros(1, 25, dtype=torch.long))
    assert set(PRESETS) >= {"tiny", "gpt2", "smollm2-135m"}
