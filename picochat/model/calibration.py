"""AWQ's calibration (model/quant.py): the text a model reads before its int8 rows are rounded, and the mean
|x_k| of every Linear's input over it."""
from __future__ import annotations

import torch
import torch.nn as nn

CALIBRATION_TOKENS = 512


def calibration_ids(tokenizer, tokens: int = CALIBRATION_TOKENS) -> torch.Tensor:
    """(1, T) token ids of AWQ's calibration text: the opening 400 characters of Brown documents 25, 75,
    125, ... (one in 50, across the corpus's genres), at most `tokens` of them."""
    from ..data.corpus import brown_documents
    text = "\n\n".join(d["text"][:400] for d in brown_documents()[25::50])
    return torch.tensor([tokenizer.encode(text)[:tokens]])


@torch.no_grad()
def activation_means(model: nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """{name: (K,) mean_t |x_tk|} for the input of every nn.Linear of `model`, reading `ids` (1, T) in eval
    mode (dropout off); ids past the model's vocabulary or context are left out."""
    config = getattr(model, "config", None)
    if config is not None:
        ids = ids[:, ids[0] < config.vocab_size][:, :config.block_size]
    sums, counts, hooks = {}, {}, []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            def keep(mod, inp, out, name=name):  # summed over calls: a MoE expert may see a few rows, or none
                x = inp[0].detach().float().abs().reshape(-1, inp[0].size(-1))
                sums[name] = sums.get(name, 0) + x.sum(0)
                counts[name] = counts.get(name, 0) + x.size(0)
            hooks.append(m.register_forward_hook(keep))
    training = model.training
    try:
        model.eval()
        model(ids.to(next(model.parameters()).device))
    finally:
        model.train(training)
        for h in hooks:
            h.remove()
    return {name: sums[name] / counts[name] for name in sums if counts[name]}
