"""AdamW with weight decay on matrices only, and the warmup + cosine learning-rate schedule."""
from __future__ import annotations

import math

import torch


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                   device_type: str) -> torch.optim.AdamW:
    """Decay only >=2-D tensors (matmul weights, embeddings); biases and norm gains stay undecayed,
    since shrinking a gain or a bias towards 0 is not a sensible prior."""
    seen, decay, no_decay = set(), [], []
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:  # tied weights appear twice
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # the fused kernel is ~3x faster than the foreach one on CPU and GPU (DESIGN.md §4)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device_type in ("cpu", "cuda"))


def lr_at(step: int, max_steps: int, lr: float, warmup: int, min_lr_frac: float) -> float:
    """Linear warmup to lr over `warmup` steps, then cosine decay to min_lr_frac * lr at max_steps."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return lr * (min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))
