"""Mixture of experts (model/moe.py): routing, dispatch, the auxiliary losses, and the paths that refuse MoE."""
import math

import pytest
import torch
import torch.nn.functional as F

from picochat.errors import PicochatError
from picochat.model.config import ModelConfig
from picochat.model.gpt import GPT
from picochat.model.moe import MoEFeedForward, balance_loss, moe_layers, pop_aux_loss, pop_load, z_loss

ACTS = {"swiglu": dict(activation="swiglu"), "gelu": dict(activation="gelu", bias=True),
        "relu": dict(activation="relu")}


def make_moe(n_experts=4, top_k=2, d=16, act="swiglu", seed=0, **kw) -> MoEFeedForward:
    torch.manual_seed(seed)
    cfg = ModelConfig(n_embd=d, n_head=2, ffn_hidden=24, moe_experts=n_experts, moe_top_k=top_k, **ACTS[act], **kw)
    moe = MoEFeedForward(cfg)
    for p in moe.parameters():  # spread the router logits and the experts, so gates are far from uniform
        torch.nn.init.normal_(p, std=0.5)
    return moe


def explicit_loop(moe: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """The definition, one token at a time: y = sum over its top-k experts of gate * FFN_e(x)."""
    out = torch.zeros_like(x)
    for t in range(x.size(0)):
        logits = moe.router.weight @ x[t]                                # (N,)
        top, idx = logits.topk(moe.top_k)
        gates = F.softmax(top, dim=0) if moe.top_k > 1 else F.softmax(logits, dim=0)[idx]
        for g, e in zip(gates, idx.tolist()):
            out[t] += g * moe.experts[e](x[t:t + 1])[0]
    return out


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_each_token_goes_to_exactly_k_experts(top_k):
    moe = make_moe(n_experts=5, top_k=top_k)
    x = torch.randn(2, 13, 16)  # (B, T, d): distinct rows, so each expert input row names its token
    seen: dict[int, list[torch.Tensor]] = {}
    for e, expert in enumerate(moe.experts):
        expert.register_forward_hook(lambda m, inp, out, e=e: seen.setdefault(e, []).append(inp[0].detach()))
    with torch.no_grad():
        moe(x)
    flat = x.reshape(-1, 16)
    experts_of = {t: [] for t in range(flat.size(0))}
    for e, chunks in seen.items():
        for row in torch.cat(chunks):
            (t,) = torch.nonzero((flat == row).all(dim=1)).flatten().tolist()  # exactly one token matches
            experts_of[t].append(e)
    want = (flat @ moe.router.weight.T).topk(top_k, dim=-1).indices        # (T, k)
    for t, es in experts_of.items():
        assert len(es) == top_k and sorted(es) == sorted(want[t].tolist())  # k dispatches, k distinct experts
    assert sum(moe.last_load.tolist()) == flat.size(0) * top_k
    assert moe.last_load.tolist() == [sum(e in es for es in experts_of.values()) for e in range(5)]


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("top_k", [1, 2])
def test_output_equals_an_explicit_loop_over_experts(act, top_k):
    moe = make_moe(act=act, top_k=top_k).eval()
    x = torch.randn(3, 7, 16)
    with torch.no_grad():
        got = moe(x)
        want = explicit_loop(moe, x.reshape(-1, 16)).view_as(x)
    assert got.shape == x.shape and got.abs().max() > 0.1
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_balance_and_z_loss_hand_computed():
    # N = 4 experts, top-2, 2 tokens with router logits log(counts), so the softmax is counts / 8:
    #   token 0: log[4,2,1,1] -> p = [.5, .25, .125, .125], top-2 = {0, 1}
    #   token 1: log[4,1,2,1] -> p = [.5, .125, .25, .125], top-2 = {0, 2}
    # f (fraction of the 4 token-slots): expert 0 gets 2, experts 1 and 2 one each, expert 3 none
    #   f = [.5, .25, .25, 0];  P = mean p = [.5, .1875, .1875, .125]
    #   sum f*P = .25 + .046875 + .046875 + 0 = .34375;   L_bal = N * .34375 = 1.375
    # z: logsumexp of log(counts) = log(sum counts) = log 8 for both tokens: L_z = (log 8)^2 = 9 (ln 2)^2
    logits = torch.log(torch.tensor([[4., 2., 1., 1.], [4., 1., 2., 1.]]))
    moe = make_moe(n_experts=4, top_k=2, d=4)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[:, :2] = logits.T  # x = e_0, e_1 (one-hot) -> router logits = the rows above
    moe(torch.eye(4)[:2])
    assert moe.last_balance_loss.item() == pytest.approx(1.375, abs=1e-6)
    assert moe.last_z_loss.item() == pytest.approx(9 * math.log(2) ** 2, abs=1e-5)
    assert moe.last_load.tolist() == [2, 1, 1, 0]
    # a uniform router (P_i = 1/N) gives exactly 1 whatever the choices: N * sum_i f_i / N = sum_i f_i = 1;
    # here ties send all 3 top-1 tokens to one expert: f = [1, 0, 0, 0], P = [1/4]*4 -> 4 * (1 * 1/4) = 1
    # and L_z = (log sum of four e^0)^2 = (ln 4)^2
    uniform = torch.zeros(3, 4)
    assert balance_loss(uniform.softmax(-1), uniform.topk(1).indices, 4).item() == pytest.approx(1.0, abs=1e-7)
    assert z_loss(uniform).item() == pytest.approx(math.log(4) ** 2, abs=1e-6)
    # the worst case for top-1: every token to expert 0 with probability 1: f = P = [1, 0, 0, 0] -> N = 4
    collapsed = torch.tensor([[100., 0., 0., 0.]] * 3)
    assert balance_loss(collapsed.softmax(-1), collapsed.topk(1).indices, 4).item() == pytest.approx(4.0)


@pytest.mark.parametrize("top_k", [1, 2])
def test_gradient_reaches_router_and_the_chosen_experts(top_k):
    moe = make_moe(top_k=top_k).train()
    moe.collect = True
    x = torch.randn(4, 9, 16, requires_grad=True)
    moe(x).square().sum().backward()  # the model's loss alone, no auxiliary loss
    assert moe.router.weight.grad.abs().sum() > 0  # through the gates (top-1: Switch's p_e)
    used = moe.last_load.tolist()
    for e, expert in enumerate(moe.experts):
        g = sum(p.grad.abs().sum() for p in expert.parameters() if p.grad is not None)
        assert (g > 0) == (used[e] > 0)
    assert x.grad.abs().sum() > 0
    # the balance loss alone reaches the router through P (f is a count, so it has no gradient)
    moe.zero_grad()
    pop_aux_loss([moe])  # drop the first forward's terms
    moe.z_coef = 0.0
    moe(x.detach())
    aux, stats = pop_aux_loss([moe])
    assert set(stats) == {"moe/balance_loss", "moe/z_loss"}
    aux.backward()  # = 0.01 * L_bal
    assert moe.router.weight.grad.abs().sum() > 0
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in moe.experts.parameters())


def test_pop_aux_loss_weights_averages_and_resets():
    moe = make_moe().train()
    x = torch.randn(2, 5, 16)
    moe(x)
    assert pop_aux_loss([moe]) == (None, {})  # not collecting (the default): nothing kept but last_*
    assert moe_layers(moe, collect=True) == [moe] and moe.collect
    moe(x)
    b1, z1 = moe.last_balance_loss.item(), moe.last_z_loss.item()
    moe(x * 2)
    b2, z2 = moe.last_balance_loss.item(), moe.last_z_loss.item()
    loss, stats = pop_aux_loss([moe])
    assert loss.item() == pytest.approx(0.01 * (b1 + b2) / 2 + 0.001 * (z1 + z2) / 2, rel=1e-5)
    assert stats["moe/balance_loss"] == pytest.approx((b1 + b2) / 2, rel=1e-5)
    assert pop_aux_loss([moe]) == (None, {})
    assert pop_load([moe]).sum().item() == 2 * 10 * 2  # two forwards of 10 tokens, 2 slots each
    assert pop_load([moe]).sum().item() == 0
    with torch.no_grad():  # inference forwards are measured (last_*) but not accumulated for training
        moe(x)
    assert pop_aux_loss([moe]) == (None, {}) and moe.last_load.sum() == 20


@pytest.mark.parametrize("top_k", [1, 2])
def test_dropless_when_every_token_picks_the_same_expert(top_k):
    moe = make_moe(n_experts=4, top_k=top_k).eval()
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0] = 10.0  # all-positive inputs: expert 0 wins for every token by far
        moe.router.weight[1, :8] = 1.0  # and expert 1 is everyone's second choice
    x = torch.rand(64, 16) + 0.1
    with torch.no_grad():
        got = moe(x)
        want = explicit_loop(moe, x)
    assert moe.last_load.tolist() == ([64, 0, 0, 0] if top_k == 1 else [64, 64, 0, 0])  # no capacity limit
    assert (got.abs().sum(dim=1) > 0).all()  # no token lost
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw, msg", [
    (dict(moe_experts=-1), "moe_experts must be >= 0"),
    (dict(moe_experts=1), "moe_experts=1"),
    (dict(moe_experts=4, moe_top_k=5), "moe_top_k=5 must be between 1 and moe_experts=4"),
    (dict(moe_experts=4, moe_top_k=0), "moe_top_k=0"),
    (dict(moe_experts=4, moe_aux_loss_coef=-0.1), "moe_aux_loss_coef must be"),
    (dict(moe_experts=4, moe_z_loss_coef=float("nan")), "moe_z_loss_coef must be"),
])
def test_config_validation(kw, msg):
    with pytest.raises(PicochatError, match=msg):
        ModelConfig(**kw)


def test_dense_default_and_config_round_trip():
    assert ModelConfig().moe_experts == 0 and not moe_layers(GPT(ModelConfig(vocab_size=64, n_layer=1, n_embd=32)))
    cfg = ModelConfig(vocab_size=64, n_layer=2, n_embd=32, n_head=2, moe_experts=4, moe_top_k=1)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    old = {k: v for k, v in cfg.to_dict().items() if not k.startswith("moe_")}  # a pre-MoE checkpoint
    assert ModelConfig.from_dict(old).moe_experts == 0


@pytest.mark.parametrize("act", list(ACTS))
def test_param_counts_total_and_active(act):
    cfg = ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, ffn_hidden=48,
                      moe_experts=8, moe_top_k=2, **ACTS[act])
    dense = ModelConfig(**{**cfg.to_dict(), "moe_experts": 0})
    model = GPT(cfg)
    assert model.num_params() == cfg.num_params()
    ffn = sum(p.numel() for p in GPT(dense).blocks[0].ffn.parameters())
    router = 32 * 8
    assert cfg.num_params() == dense.num_params() + 2 * (7 * ffn + router)
    assert cfg.num_params(active=True) == dense.num_params() + 2 * (ffn + router)
    assert len(moe_layers(model)) == 2


def tiny_gpt(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, moe_experts=4, **kw))


def test_paths_that_cannot_express_moe_refuse_it_by_name(tmp_path):
    from picochat.checkpoints.hf import export_hf
    from picochat.model.bert import config_to_bert
    from picochat.model.lora import LoraConfig, add_lora
    with pytest.raises(PicochatError, match="mixture-of-experts"):
        export_hf(tiny_gpt(), tmp_path / "hf")
    with pytest.raises(PicochatError, match="mixture-of-experts"):
        config_to_bert(ModelConfig(norm="layernorm", activation="gelu", bias=True, pos="learned", moe_experts=4),
                       "mlm")
    with pytest.raises(PicochatError, match="mixture-of-experts.*q,k,v,o"):
        add_lora(tiny_gpt(), LoraConfig(targets=("q", "up")))
    model = tiny_gpt()
    assert add_lora(model, LoraConfig(targets=("q", "v")))  # attention adapters are fine on a MoE model


def test_int8_quantizes_experts_and_keeps_the_router_in_float():
    from picochat.model.quant import Int8Linear, quantize_int8
    model = tiny_gpt(init_std=0.2).eval()
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(idx)[0]
        quantize_int8(model)
        got = model(idx)[0]
    assert isinstance(model.blocks[0].ffn.experts[0].up_proj, Int8Linear)
    assert isinstance(model.blocks[0].ffn.router, torch.nn.Linear)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9
