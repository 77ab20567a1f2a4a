"""The losses and estimators of RLHF, as small pure functions on (B, T) tensors (issue 10's foundation).

Shapes: B answers of up to T tokens; ``mask`` (B, T) is 1 on the answer's tokens (prompt and padding 0).
Every mean is over the masked tokens only, so neither the prompt nor padding ever moves a loss.

    Bradley-Terry (reward model)   L = -log sigmoid(r_chosen - r_rejected)
    DPO                            L = -log sigmoid(beta [(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))])
    KL estimators (per token)      k1 = log pi - log ref;  k2 = (log pi - log ref)^2 / 2;  k3 = (rho - 1) - log rho,
                                   rho = ref / pi   (Schulman, "Approximating KL divergence"; k3 >= 0, unbiased)
    per-token reward               r_t = -beta * kl_t, plus the score at the answer's last token
    GAE                            delta_t = r_t + gamma V_{t+1} - V_t;  A_t = delta_t + gamma lambda A_{t+1}
    PPO policy loss                max(-A rho_t, -A clip(rho_t, 1-eps, 1+eps)),  rho_t = exp(log pi - log pi_old)
    PPO value loss                 1/2 max((V - R)^2, (V_old + clip(V - V_old, -eps_v, eps_v) - R)^2)
    GRPO advantage                 A_i = (s_i - mean(s_group)) [/ (std(s_group) + eps)]
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over mask == 1 (0 when the mask is empty, never NaN)."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries (advantage whitening); masked-out entries become 0."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(labels[b, t]) under logits[b, t]: (B, T, V), (B, T) -> (B, T)."""
    return torch.gather(F.log_softmax(logits.float(), dim=-1), -1, labels.unsqueeze(-1)).squeeze(-1)


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from the sampled tokens' log-probabilities."""
    diff = logp - ref_logp
    if kind == "k1":
        return diff
    if kind == "k2":
        return 0.5 * diff ** 2
    if kind == "k3":
        return torch.expm1(-diff) + diff  # (rho - 1) - log rho with rho = exp(-diff), exact near 0
    raise ValueError(f"unknown KL estimator {kind!r}; use k1, k2 or k3")


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float,
                  ended: torch.Tensor | None = None, missing_eos_penalty: float = 0.0) -> torch.Tensor:
    """r_t = -beta kl_t on the answer's tokens; the score (minus the penalty if the answer never ended)
    is added at the answer's last token. scores, ended: (B,)."""
    rewards = -beta * kl * mask
    last = (mask.cumsum(-1) * mask).argmax(-1)  # index of the last answer token in each row
    final = scores.float()
    if ended is not None:
        final = final - missing_eos_penalty * (~ended.bool()).float()
    rewards[torch.arange(len(rewards)), last] += final * (mask.sum(-1) > 0)
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), both (B, T), zero off the mask. The value after the answer's last token is 0
    (the episode ends there), so padding after it never leaks into the advantages."""
    rewards, values = rewards * mask, values * mask
    adv = torch.zeros_like(rewards)
    next_adv = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(values[:, 0])
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv[:, t] = (delta + gamma * lam * next_adv) * m
        # a masked position passes nothing back: the step before it sees the end of the episode
        next_adv, next_value = adv[:, t], values[:, t] * m
    return adv, (adv + values) * mask


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip: float = 0.2) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate loss and its diagnostics (trl's names): clipfrac, approxkl, ratio."""
    log_ratio = (logp - old_logp) * mask
    ratio = torch.exp(log_ratio)
    pg1 = -advantages * ratio
    pg2 = -advantages * ratio.clamp(1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(pg1, pg2), mask)
    stats = {"policy/clipfrac": masked_mean((pg2 > pg1).float(), mask).item(),
             "policy/approxkl": (0.5 * masked_mean(log_ratio ** 2, mask)).item(),
             "val/ratio": masked_mean(ratio, mask).item()}
    return loss, stats


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip: float = 0.2) -> tuple[torch.Tensor, dict]:
    """Clipped value loss (the larger of the clipped and unclipped squared errors), and its clip fraction."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    vf1, vf2 = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(vf1, vf2), mask)
    return loss, {"value/clipfrac": masked_mean((vf2 > vf1).float(), mask).item()}


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """-log sigmoid(r_c - r_r), mean over pairs; accuracy = share of pairs ranked right."""
    margin = r_chosen.float() - r_rejected.float()
    return F.softplus(-margin).mean(), {"accuracy": (margin > 0).float().mean().item(),
                                        "margin": margin.mean().item()}


def dpo_loss(pi_chosen: torch.Tensor, pi_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1) -> tuple[torch.Tensor, dict]:
    """DPO on summed answer log-probs (B,) each; metrics under trl's names."""
    chosen = beta * (pi_chosen - ref_chosen)
    rejected = beta * (pi_rejected - ref_rejected)
    loss = F.softplus(-(chosen - rejected)).mean()
    return loss, {"rewards/chosen": chosen.mean().item(), "rewards/rejected": rejected.mean().item(),
                  "rewards/margins": (chosen - rejected).mean().item(),
                  "rewards/accuracies": (chosen > rejected).float().mean().item()}


def group_advantages(scores: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO: (N,) scores of N = prompts x group_size answers, grouped by prompt (consecutive) -> (N,)
    advantages: each score minus its group's mean, over the group's (sample) std when scale."""
    group = scores.float().view(-1, group_size)
    adv = group - group.mean(1, keepdim=True)
    if scale:
        adv = adv / (group.std(1, keepdim=True) + eps)
    return adv.reshape(-1)
