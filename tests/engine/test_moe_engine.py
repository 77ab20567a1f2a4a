"""A mixture-of-experts GPT through the KV-cache engine: MoE is only the feed-forward, and dropless routing
is per token, so cached, batched (left-padded) decoding must equal recomputing the whole sequence."""
import pytest
import torch

from picochat.checkpoints.io import load_model, save_model
from picochat.engine.engine import Engine
from picochat.engine.kv_cache import KVCache
from picochat.model.config import ModelConfig
from picochat.model.gpt import GPT
from picochat.tokenizer import Tokenizer

from tests.engine.test_engine import PROMPTS, V, uncached_greedy


def make_moe_gpt(top_k: int, **kw) -> GPT:
    torch.manual_seed(0)
    # large init_std: logits far from ties, so greedy choices do not hinge on rounding
    cfg = ModelConfig(vocab_size=V, block_size=160, n_layer=2, n_embd=64, n_head=4, init_std=0.2,
                      moe_experts=4, moe_top_k=top_k, **kw)
    return GPT(cfg).eval()


@pytest.mark.parametrize("top_k, kw", [(2, dict(pos="rope", n_kv_head=2)),
                                       (1, dict(pos="learned", norm="layernorm", activation="gelu", bias=True))])
def test_moe_cached_decode_equals_uncached_forward(top_k, kw):
    model = make_moe_gpt(top_k, **kw)
    single = Engine(model).generate([PROMPTS[1]], max_tokens=60, temperature=0)[0]
    assert single.token_ids == uncached_greedy(model, PROMPTS[1], 60)
    batch = Engine(model).generate(PROMPTS, max_tokens=60, temperature=0)  # ragged: left-padded rows
    for p, r in zip(PROMPTS, batch):
        assert r.token_ids == uncached_greedy(model, p, 60)
    # and the logits themselves: a prefill then one-token decodes through the cache vs one full forward
    ids = torch.tensor([PROMPTS[1] + single.token_ids[:20]])
    with torch.no_grad():
        full, _ = model(ids)
        cache = KVCache.for_model(model, batch=1)
        steps = [model(ids[:, :7], kv_cache=cache)[0]]
        for t in range(7, ids.size(1)):
            steps.append(model(ids[:, t:t + 1], kv_cache=cache, start_pos=t)[0])
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-4)

def test_moe_checkpoint_round_trip_and_sampled_generation(tmp_path):
    tok = Tokenizer({bytes([b]): b for b in range(256)}, {"<|endoftext|>": 256}, [])
    model = make_moe_gpt(2)
    save_model(model, tmp_path / "moe", tok)
    loaded, tok2, _ = load_model(tmp_path / "moe")
    assert loaded.config.moe_experts == 4
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    out = Engine(loaded, tok2).generate([tok.encode("Hello")], max_tokens=20, temperature=0.8, seed=0)[0]
    again = Engine(loaded, tok2).generate([tok.encode("Hello")], max_tokens=20, temperature=0.8, seed=0)[0]
    assert len(out.token_ids) == 20 and out.token_ids == again.token_ids
