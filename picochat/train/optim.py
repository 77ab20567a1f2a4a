"""AdamW with weight decay on matrices only, and the warmup + cosine learning-rate schedule."""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                   device_type: str, lr_mult: Optional[Callable[[str], float]] = None) -> torch.optim.AdamW:
    """Decay only >=2-D tensors (matmul weights, embeddings); biases and norm gains stay undecayed,
    since shrinking a gain or a bias towards 0 is not a sensible prior.

    lr_mult(parameter name) -> a factor on the schedule's lr for that parameter (e.g. 0.1 for a pretrained
    vision encoder, as nanoVLM trains its backbone); the groups' "lr_mult" is what the Trainer multiplies by.
    The groups at factor 1 come first, so param_groups[0]["lr"] is the schedule's own."""
    seen, groups = set(), {}
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:  # tied weights appear twice
            continue
        seen.add(id(p))
        mult = 1.0 if lr_mult is None else float(lr_mult(name))
        groups.setdefault((mult != 1.0, mult, p.dim() < 2), []).append(p)
    if lr_mult is None:  # the two groups every checkpoint written before lr_mult has
        groups = {k: groups.get(k, []) for k in ((False, 1.0, False), (False, 1.0, True))}
    param_groups = [{"params": params, "weight_decay": 0.0 if no_decay else weight_decay}
                    | ({} if lr_mult is None else {"lr_mult": mult})
                    for (_, mult, no_decay), params in sorted(groups.items(), key=lambda kv: kv[0])]
    # the fused kernel is ~3x faster than the foreach one on CPU and GPU (DESIGN.md §4)
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas, fused=device_type in ("cpu", "cuda"))


def lr_at(step: int, max_steps: int, lr: float, warmup: int, min_lr_frac: float) -> float:
    """Linear warmup to lr over `warmup` steps, then cosine decay to min_lr_frac * lr at max_steps."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return lr * (min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))
