"""Rollouts for PPO and GRPO: prompts, sampled answers, their scores, and the advantages to train on.

One rollout: the policy answers a batch of prompts through the KV-cache engine (sampled at the
configured temperature, from a seed fixed by the iteration, so a resumed run samples the same answers);
the answers are scored (reward model, or the task's exact-answer check); then, in the minibatches the
first PPO epoch will use (same rows, same shapes: so its first ratio is exactly 1), the policy's,
reference's and value model's numbers are computed once, without gradients:

    PPO   r_t = -beta KL_t (+ score - eos penalty at the last token);  A, R = GAE(r, V);  A whitened
    GRPO  A_i = (s_i - mean(s_group)) / (std(s_group) + eps)  on every token of answer i; KL in the loss
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..errors import PicochatError
from .rl_data import answer_logprobs, pad_batch
from .rl_losses import gae, group_advantages, kl_estimate, masked_mean, masked_whiten, token_rewards


def rl_prompts(spec: str, seed: int = 0) -> list[dict]:
    """[{"prompt": messages, "answer": str or None, "task": name or None}] from a chat data spec: task
    names (training split, with their checkable answers) and other sets or .jsonl files (prompts only)."""
    from ..data.chat_data import check_spec, load_mixture
    from ..data.chat_tasks import TASKS
    from ..eval.chat_eval import _prompt
    out = []
    for name, n in check_spec(spec):
        if name in TASKS:
            for it in TASKS[name].generate("train", 2000 if n is None else n, seed=seed):
                out.append({"prompt": _prompt(it["messages"]), "answer": it["answer"], "task": name})
        elif Path(name).is_file() and _is_preferences(Path(name)):  # `picochat feedback export`'s rows
            from ..data.preferences import read_preferences
            pairs, report = read_preferences(name)
            for problem in report["problems"][:5]:
                print(f"skipped: {problem}")
            seen = set()
            for pair in pairs[:n]:
                if repr(pair["prompt"]) not in seen:
                    seen.add(repr(pair["prompt"]))
                    out.append({"prompt": pair["prompt"], "answer": None, "task": None})
        else:
            convs, _ = load_mixture(name if n is None else f"{name}:{n}", split="train", seed=seed)
            for c in convs:
                msgs = list(c)
                while msgs and msgs[-1]["role"] == "assistant":
                    msgs.pop()
                if msgs and msgs[-1]["role"] == "user":
                    out.append({"prompt": msgs, "answer": None, "task": None})
    if not out:
        raise PicochatError(f"--prompts {spec!r} holds no prompt: give chat sets (addition2:2000), .jsonl files of "
                            f'{{"messages": [...]}} ending in a user turn, or preference rows ({{"prompt": [...]}})')
    random.Random(seed).shuffle(out)
    return out


def _is_preferences(path: Path) -> bool:
    """A JSONL file whose first row has a "prompt" (preference pairs) rather than "messages"."""
    import json
    for line in path.read_text("utf-8", errors="replace").splitlines():
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                return False
            return isinstance(row, dict) and "prompt" in row and "messages" not in row
    return False


class Checker:
    """The reward of RL from verifiable rewards: 1 if the task's rule finds the right answer, else 0."""
    kind = "check"

    def __call__(self, ids, last, texts: list[str], items: list[dict]) -> torch.Tensor:
        from ..data.chat_tasks import TASKS
        for it in items:
            if it["task"] is None or not TASKS[it["task"]].checkable:
                raise PicochatError("--reward check needs prompts from checkable tasks (e.g. --prompts addition2)")
        return torch.tensor([float(TASKS[it["task"]].check(t, it["answer"])) for t, it in zip(texts, items)])


class RewardModelScorer:
    """The reward of RLHF: a reward model's (normalised) score of the whole answer, at its last token."""
    kind = "model"

    def __init__(self, model):
        self.model = model

    @torch.no_grad()
    def __call__(self, ids, last, texts, items) -> torch.Tensor:
        device = next(self.model.parameters()).device
        return self.model.score_at(ids.to(device), last.to(device)).float().cpu()


@dataclass
class Rollout:
    ids: torch.Tensor          # (N, T) prompt + answer, right-padded
    mask: torch.Tensor         # (N, T-1) answer tokens, in target space
    old_logp: torch.Tensor     # (N, T-1) the policy's log-probs when it sampled
    ref_logp: torch.Tensor     # (N, T-1) the reference's
    values: torch.Tensor       # (N, T-1) the value model's (0 for GRPO)
    advantages: torch.Tensor   # (N, T-1)
    returns: torch.Tensor      # (N, T-1)
    order: torch.Tensor        # (epochs, N): each epoch's row order (minibatches are slices of it)
    stats: dict = field(default_factory=dict)
    samples: list = field(default_factory=list)  # (prompt, answer, score) for the table


def _chunks(order: torch.Tensor, size: int):
    return [order[s:s + size] for s in range(0, len(order), size)]


@torch.no_grad()
def make_rollout(cfg, policy, ref, value, scorer, items: list[dict], tokenizer, template: str, seed: int,
                 autocast, kl_coef: float, checkable: bool = False) -> Rollout:
    """Sample, score and prepare one rollout of ``items`` (already repeated G times for GRPO). checkable:
    every prompt of the run has a task answer, so the rollout's exact-match accuracy is reported."""
    from ..eval.chat_eval import greedy_results
    device = next(policy.parameters()).device
    policy.eval()
    with autocast():
        results = greedy_results(policy, tokenizer, template, [it["prompt"] for it in items],
                                 max_tokens=cfg.max_new_tokens, batch_size=len(items),
                                 temperature=cfg.temperature, seed=seed)
    seqs, plens, ended = [], [], []
    for it, r in zip(items, results):
        head = _prompt_ids(it["prompt"], tokenizer, template)
        # the stop token the policy sampled is part of its answer: it is how the policy learns to end
        seqs.append(head + list(r.token_ids) + ([r.stop_token] if r.stop_token is not None else []))
        plens.append(len(head))
        ended.append(r.stop_token is not None)
    ids, mask, last = pad_batch(seqs, plens)
    ended_t = torch.tensor(ended)
    scores = scorer(ids, last, [r.text for r in results], items).float()
    N, E = len(items), cfg.ppo_epochs
    g = torch.Generator().manual_seed(seed)
    order = torch.stack([torch.randperm(N, generator=g) for _ in range(E)])
    old_logp, ref_logp, values = (torch.zeros(N, ids.size(1) - 1) for _ in range(3))
    for rows in _chunks(order[0], cfg.minibatch_size):  # the first epoch's minibatches, as they will be
        x = ids[rows].to(device)
        with autocast():
            old_logp[rows] = answer_logprobs(policy, x, cfg.temperature).float().cpu()
            ref_logp[rows] = answer_logprobs(ref, x, cfg.temperature).float().cpu()
            if value is not None:
                values[rows] = value(x)[:, :-1].float().cpu()
    policy.train()
    kl = kl_estimate(old_logp, ref_logp, "k1") * mask  # per token, on the sampled answer
    penalised = scores - cfg.missing_eos_penalty * (~ended_t).float()  # the score an answer that never ended gets
    if cfg.algo == "ppo":
        rewards = token_rewards(scores, kl, mask, kl_coef, ended_t, cfg.missing_eos_penalty)
        advantages, returns = gae(rewards, values * mask, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
    else:
        adv = group_advantages(penalised, cfg.group_size, cfg.scale_rewards)
        advantages, returns = adv[:, None] * mask, torch.zeros_like(mask)
    kl_sum = kl.sum(1)
    stats = {"objective/kl": kl_sum.mean().item(),
             "objective/entropy": (-old_logp * mask).sum(1).mean().item(),
             "objective/non_score_reward": (-kl_coef * kl_sum).mean().item(),
             "objective/rlhf_reward": (penalised - kl_coef * kl_sum).mean().item(),
             "objective/scores": scores.mean().item(),
             "objective/kl_coef": kl_coef,
             "val/num_eos_tokens": float(ended_t.sum()),
             "val/answer_length": mask.sum(1).mean().item(),
             "val/advantage_std": masked_mean(advantages ** 2, mask).sqrt().item()}
    from ..data.chat_tasks import TASKS
    if checkable:
        ok = [TASKS[it["task"]].check(r.text, it["answer"]) for it, r in zip(items, results)]
        stats["objective/accuracy"] = sum(ok) / len(ok)
    samples = [(it["prompt"][-1]["content"], r.text, float(s)) for it, r, s in zip(items, results, scores)]
    return Rollout(ids, mask, old_logp, ref_logp, values * mask, advantages, returns, order, stats, samples)


def _prompt_ids(prompt, tokenizer, template) -> list[int]:
    from ..chat_template import render_conversation
    return render_conversation(prompt, tokenizer, template, add_generation_prompt=True)[0]


def adaptive_kl(kl_coef: float, kl: float, target: Optional[float], horizon: int, n: int) -> float:
    """Ziegler et al.'s controller: beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon."""
    if target is None:
        return kl_coef
    err = max(-0.2, min(0.2, kl / target - 1))
    return kl_coef * (1 + err * n / horizon)
