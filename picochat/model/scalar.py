"""A transformer with a scalar head: the reward model and PPO's value model.

    h = GPT(x)[:, t]                 the final hidden state (after the last norm) at position t
    r(x) = w^T h_last + b            reward: one number for a whole answer, read at its last token
    V_t  = w^T h_t + b               value: one number per position (the expected return from there)

The body is an ordinary picochat GPT (initialised from the SFT model, as InstructGPT did), so everything
that loads, adapts (LoRA) or quantizes a GPT works on it. On disk a scalar model is a picochat checkpoint
(or LoRA adapter) plus ``score_head.safetensors`` ({"weight": (1, d), "bias": (1,)}) and ``scalar.json``
saying what it is; ``load_scalar_model`` reads both back, and refuses a plain checkpoint by name.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import PicochatError

HEAD_FILE, META_FILE = "score_head.safetensors", "scalar.json"


class ScalarModel(nn.Module):
    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body
        self.config = body.config
        self.score = nn.Linear(body.config.n_embd, 1)
        nn.init.normal_(self.score.weight, std=1 / (body.config.n_embd + 1) ** 0.5)  # as trl's reward head
        nn.init.zeros_(self.score.bias)
        self.freeze_unused()

    def freeze_unused(self) -> None:
        """The body's LM head is never run (the scalar head reads the hidden states): an untied one, or
        LoRA adapters on it, would be parameters without gradients (DDP refuses those). Call again after
        adding LoRA."""
        tied = self.body.config.tie_embeddings
        for name, p in self.body.lm_head.named_parameters():
            if not (tied and name == "weight"):
                p.requires_grad_(False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T) scalar per position (right padding is harmless: attention is causal)."""
        h = self.body(idx, return_hidden=True)  # (B, T, d)
        return self.score(h.float() if h.dtype != self.score.weight.dtype else h).squeeze(-1).float()

    def score_at(self, idx: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """(B,) the scalar at position last[b] of each row: the reward of an answer ending there."""
        return self(idx)[torch.arange(idx.size(0), device=idx.device), last]

    def num_params(self) -> int:
        return self.body.num_params() + self.score.weight.numel() + 1


def head_files(model: ScalarModel, meta: dict) -> dict:
    """extra_files for a checkpoint writer: the head's weights and what the model is."""
    from safetensors.torch import save_file
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.score.state_dict().items()}
    return {HEAD_FILE: lambda p: save_file(state, str(p)), META_FILE: json.dumps(meta, indent=1).encode()}


def load_head(model: ScalarModel, ckpt: Path, normalise: bool = True) -> dict:
    """Read a checkpoint's head into model.score; returns its scalar.json. normalise: subtract the
    recorded offset from the bias (a reward model's SFT answers then score 0 on average); training
    resumes with normalise=False, on the raw head."""
    from ..checkpoints.io import load_state
    if not (ckpt / HEAD_FILE).is_file():
        raise PicochatError(f"{ckpt} is a language model, not a reward model (no {HEAD_FILE}); "
                            f"train one with `picochat reward SFT_MODEL --data pairs.jsonl`")
    state = load_state(ckpt / HEAD_FILE)
    if tuple(state["weight"].shape) != tuple(model.score.weight.shape):
        raise PicochatError(f"{ckpt}/{HEAD_FILE} has shape {tuple(state['weight'].shape)}, the body needs "
                            f"{tuple(model.score.weight.shape)}; the checkpoint is damaged")
    meta = json.loads((ckpt / META_FILE).read_text("utf-8")) if (ckpt / META_FILE).is_file() else {}
    if normalise and meta.get("offset"):
        state["bias"] = state["bias"] - float(meta["offset"])
    model.score.load_state_dict({k: v.to(model.score.weight.dtype) for k, v in state.items()})
    return meta


def load_scalar_model(path: str | Path, device: str | torch.device = "cpu"):
    """-> (ScalarModel, tokenizer, meta) from a reward-model run or checkpoint (plain or LoRA)."""
    from ..checkpoints.io import load_model, resolve_checkpoint
    ckpt = resolve_checkpoint(path)
    if not (ckpt / HEAD_FILE).is_file():
        raise PicochatError(f"{path} is a language model, not a reward model (no {HEAD_FILE}); "
                            f"train one with `picochat reward SFT_MODEL --data pairs.jsonl`")
    body, tokenizer, _ = load_model(ckpt)
    model = ScalarModel(body)
    meta = load_head(model, ckpt)
    return model.to(device), tokenizer, meta
