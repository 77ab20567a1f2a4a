"""RLHF's losses on tiny tensors, each against values worked out by hand in the comments."""
import math

import pytest
import torch

from picochat.train.rl_losses import (bradley_terry_loss, dpo_loss, gae, kl_estimate, masked_mean, masked_whiten,
                                      ppo_policy_loss, ppo_value_loss, token_logprobs, token_rewards)

t = torch.tensor


def close(a, b, tol=1e-6):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), atol=tol)


def test_gae_by_hand():
    r, v, m = t([[0.0, 0.0, 1.0]]), t([[0.5, 0.2, 0.1]]), t([[1.0, 1.0, 1.0]])
    # gamma = lambda = 1: delta = [0.2-0.5, 0.1-0.2, 1-0.1] = [-0.3, -0.1, 0.9]; A = suffix sums
    adv, ret = gae(r, v, m, gamma=1.0, lam=1.0)
    assert close(adv, [[0.5, 0.8, 0.9]]) and close(ret, [[1.0, 1.0, 1.0]])
    # gamma = lambda = 0.5: delta = [0.5*0.2-0.5, 0.5*0.1-0.2, 0.9] = [-0.4, -0.15, 0.9]
    # A2 = 0.9, A1 = -0.15 + 0.25*0.9 = 0.075, A0 = -0.4 + 0.25*0.075 = -0.38125
    adv, ret = gae(r, v, m, gamma=0.5, lam=0.5)
    assert close(adv, [[-0.38125, 0.075, 0.9]]) and close(ret, [[0.11875, 0.275, 1.0]])


def test_gae_ignores_padding_after_the_answer():
    r, v, m = t([[0.0, 0.0, 1.0]]), t([[0.5, 0.2, 0.1]]), t([[1.0, 1.0, 1.0]])
    want, _ = gae(r, v, m, gamma=0.5, lam=0.5)
    padded, _ = gae(t([[0.0, 0.0, 1.0, 7.0, -3.0]]), t([[0.5, 0.2, 0.1, 9.0, 4.0]]),
                    t([[1.0, 1.0, 1.0, 0.0, 0.0]]), gamma=0.5, lam=0.5)
    assert close(padded[:, :3], want) and close(padded[:, 3:], [[0.0, 0.0]])


def test_clipped_policy_loss_inside_and_outside_the_clip_range():
    adv = t([[1.0, -1.0, 1.0, -1.0, 1.0]])
    ratio = t([[1.1, 1.1, 1.3, 0.7, 0.7]])
    old = torch.zeros(1, 5)
    mask = torch.ones(1, 5)
    loss, stats = ppo_policy_loss(ratio.log(), old, adv, mask, clip=0.2)
    # per token max(-A r, -A clip(r)):  inside: -1.1, 1.1;  A>0, r=1.3: max(-1.3, -1.2) = -1.2 (clipped)
    # A<0, r=0.7: max(0.7, 0.8) = 0.8 (clipped);  A>0, r=0.7: max(-0.7, -0.8) = -0.7 (not clipped: pessimistic)
    assert close(loss, (-1.1 + 1.1 - 1.2 + 0.8 - 0.7) / 5)
    assert stats["policy/clipfrac"] == pytest.approx(2 / 5)
    # masked tokens count for nothing
    loss2, _ = ppo_policy_loss(torch.cat([ratio.log(), t([[5.0]])], 1), torch.zeros(1, 6),
                               torch.cat([adv, t([[100.0]])], 1), torch.cat([mask, t([[0.0]])], 1))
    assert close(loss2, loss)


def test_first_minibatch_invariant():
    """The first minibatch of the first PPO epoch: pi == pi_old, so ratio 1, approx-KL 0, clip fraction 0."""
    logp = torch.randn(3, 4)
    loss, stats = ppo_policy_loss(logp, logp.clone(), torch.randn(3, 4), torch.ones(3, 4))
    assert stats["val/ratio"] == 1.0 and stats["policy/approxkl"] == 0.0 and stats["policy/clipfrac"] == 0.0


def test_clipped_value_loss_by_hand():
    v, old, ret, m = t([[0.9, 0.6]]), t([[0.5, 0.5]]), t([[1.0, 0.0]]), torch.ones(1, 2)
    # token 0: clipped V = 0.5 + 0.2 = 0.7 -> max(0.01, 0.09) = 0.09;  token 1: 0.6 within -> 0.36
    loss, stats = ppo_value_loss(v, old, ret, m, clip=0.2)
    assert close(loss, 0.5 * (0.09 + 0.36) / 2) and stats["value/clipfrac"] == pytest.approx(0.5)


def test_kl_estimators_by_hand():
    logp, ref = t([math.log(0.5)]), t([math.log(0.25)])
    assert close(kl_estimate(logp, ref, "k1"), [math.log(2)])
    assert close(kl_estimate(logp, ref, "k2"), [0.5 * math.log(2) ** 2])
    assert close(kl_estimate(logp, ref, "k3"), [(0.5 - 1) + math.log(2)])  # rho = 0.25 / 0.5
    assert close(kl_estimate(ref, ref, "k3"), [0.0])
    with pytest.raises(ValueError):
        kl_estimate(logp, ref, "k9")


def test_token_rewards_put_the_score_on_the_last_answer_token():
    kl = t([[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.5, 0.5]])
    mask = t([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    r = token_rewards(t([2.0, 1.0]), kl, mask, beta=0.5, ended=t([True, False]), missing_eos_penalty=3.0)
    # row 0 ends at token 2: -0.5*kl + 2 there, padding 0; row 1 never ended: score 1 - 3 at its last token
    assert close(r, [[-0.05, -0.1, -0.15 + 2.0, 0.0], [-0.25, -0.25, -0.25, -0.25 + 1.0 - 3.0]])


def test_bradley_terry_and_dpo_by_hand():
    loss, stats = bradley_terry_loss(t([2.0, 0.0]), t([0.0, 1.0]))
    # -log sigmoid(2) = log(1 + e^-2) = 0.126928;  -log sigmoid(-1) = log(1 + e) = 1.313262
    assert close(loss, (0.126928 + 1.313262) / 2) and stats["accuracy"] == 0.5
    loss, stats = dpo_loss(t([-1.0]), t([-5.0]), t([-2.0]), t([-4.0]), beta=0.1)
    # chosen 0.1*(−1+2) = 0.1, rejected 0.1*(−5+4) = −0.1: -log sigmoid(0.2) = log(1 + e^-0.2) = 0.598139
    assert close(loss, 0.598139)
    assert stats["rewards/chosen"] == pytest.approx(0.1) and stats["rewards/rejected"] == pytest.approx(-0.1)
    assert stats["rewards/margins"] == pytest.approx(0.2) and stats["rewards/accuracies"] == 1.0


def test_masked_helpers_and_logprobs():
    x, m = t([[1.0, 3.0, 100.0]]), t([[1.0, 1.0, 0.0]])
    assert close(masked_mean(x, m), 2.0) and close(masked_mean(x, torch.zeros_like(m)), 0.0)
    w = masked_whiten(x, m)
    assert close(w, [[-1.0, 1.0, 0.0]], tol=1e-4)  # mean 2, std 1; padding 0
    logits = t([[[0.0, math.log(3.0)]]])  # p = [1/4, 3/4]
    assert close(token_logprobs(logits, t([[1]])), [[math.log(0.75)]])


def test_group_advantages_by_hand():
    from picochat.train.rl_losses import group_advantages
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])  # two prompts, four answers each
    raw = group_advantages(scores, 4, scale=False)
    assert torch.allclose(raw, torch.tensor([0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0]))
    # group 1: std (unbiased) of [1, 0, 0, 1] = sqrt(1/3); a group whose answers all score alike gives 0, not NaN
    scaled = group_advantages(scores, 4, scale=True, eps=0.0 + 1e-12)
    s = (1 / 3) ** 0.5
    assert torch.allclose(scaled[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]) / s, atol=1e-5)
    assert torch.equal(scaled[4:], torch.zeros(4))


def test_adaptive_kl_controller_by_hand():
    from picochat.train.rollout import adaptive_kl
    assert adaptive_kl(0.1, 5.0, None, 10000, 64) == 0.1  # no target: fixed
    # KL 9 vs target 6: error clipped to 0.2; beta *= 1 + 0.2 * 64 / 10000
    assert adaptive_kl(0.1, 9.0, 6.0, 10000, 64) == pytest.approx(0.1 * (1 + 0.2 * 64 / 10000))
    # KL 5.4 vs target 6: error -0.1
    assert adaptive_kl(0.1, 5.4, 6.0, 1000, 100) == pytest.approx(0.1 * (1 - 0.1 * 0.1))
