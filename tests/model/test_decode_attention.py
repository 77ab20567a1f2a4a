"""The single-query decode attention (T_q = 1) against SDPA and the textbook formula: GQA, masks, bf16."""
import pytest
import torch
import torch.nn.functional as F

from picochat.model.attention import single_query_attention
from picochat.model.config import ModelConfig
from picochat.model.gpt import GPT
from picochat.engine.kv_cache import KVCache


@pytest.mark.parametrize("nh,nkv", [(4, 4), (6, 2), (4, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_single_query_matches_sdpa(nh, nkv, dtype):
    torch.manual_seed(0)
    B, T_k, hs = 3, 13, 16
    q = torch.randn(B, nh, 1, hs).to(dtype)
    k, v = torch.randn(B, nkv, T_k, hs).to(dtype), torch.randn(B, nkv, T_k, hs).to(dtype)
    mask = torch.rand(B, 1, 1, T_k) > 0.3
    mask[..., -1] = True  # the newest key (the query's own) is always visible
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for m in (None, mask, torch.zeros(B, 1, 1, T_k).masked_fill(~mask, float("-inf")),
              mask.expand(B, nh, 1, T_k)):
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=m, enable_gqa=nh != nkv)
        out = single_query_attention(q, k, v, m)
        assert out.shape == (B, nh, 1, hs) and out.dtype == dtype
        assert (out.float() - ref).abs().max() < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_steps_match_a_full_forward(dtype):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, block_size=32, n_layer=2, n_head=6, n_kv_head=2, n_embd=48,
                      pos="rope", norm="rmsnorm", activation="swiglu")
    model = GPT(cfg).eval().to(dtype)
    x = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        full, _ = model(x)
        cache = KVCache.for_model(model, 2)
        steps = [model(x[:, :8], kv_cache=cache)[0][:, -1]]
        for t in range(8, 12):
            steps.append(model(x[:, t:t + 1], start_pos=cache.pos, kv_cache=cache)[0][:, -1])
    tol = 1e-4 if dtype == torch.float32 else 0.1
    for i, s in enumerate(steps):
        assert (s.float() - full[:, 7 + i].float()).abs().max() < tol


def test_last_logits_only_is_the_last_row_of_the_full_logits():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32)
    model = GPT(cfg).eval()
    x = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        full, _ = model(x)
        last, _ = model(x, last_logits_only=True)
    assert last.shape == (2, 1, 97)
    assert torch.allclose(last, full[:, -1:], atol=1e-5)
