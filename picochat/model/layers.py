"""The parts a transformer block is made of: norms and the position-wise feed-forward network."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * g  (Zhang & Sennrich 2019). Computed in fp32 like Llama."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.size(-1),), eps=self.eps).to(x.dtype) * self.weight


def make_norm(config: ModelConfig) -> nn.Module:
    """LayerNorm: (x - mean) / sqrt(var + eps) * g + b; RMSNorm drops the mean and the bias."""
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


class FeedForward(nn.Module):
    """FFN(x) = W_2 act(W_1 x), or with SwiGLU: W_2 (SiLU(W_gate x) * W_up x) (Shazeer 2020)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        d, h = config.n_embd, config.ffn_hidden
        self.activation = config.activation
        # SwiGLU's gate and up projections are fused into one matmul (rows: gate, then up)
        self.gated = config.activation == "swiglu"
        self.up_proj = nn.Linear(d, 2 * h if self.gated else h, bias=config.bias)
        self.down_proj = nn.Linear(h, d, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            gate, up = self.up_proj(x).chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.activation == "relu":
            h = F.relu(self.up_proj(x))
        else:
            h = F.gelu(self.up_proj(x), approximate="tanh" if self.activation == "gelu_tanh" else "none")
        return self.dropout(self.down_proj(h))
