"""The parts a transformer block is made of: linear layers, norms and the position-wise feed-forward network."""
from __future__ import annotations

import functools
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig


@functools.cache
def _onednn_linear_op():
    """oneDNN's fp32 linear (x W^T + b) if this PyTorch build has a working one, else None.

    PyTorch runs fp32 matmuls with MKL, which takes its AVX2 path on AMD CPUs; oneDNN (in every x86
    build, already behind bf16 matmuls) runs the same fp32 GEMMs with AVX-512: about 2x faster on
    the project's machine. Same maths in fp32; only the order of the sums differs.
    PICOCHAT_ONEDNN=0 turns it off.
    """
    if os.environ.get("PICOCHAT_ONEDNN", "1") == "0" or not torch.backends.mkldnn.is_available():
        return None
    try:
        op = torch.ops.mkldnn._linear_pointwise
        ok = torch.equal(op(torch.ones(2, 3), torch.ones(4, 3), None, "none", [], ""), torch.full((2, 4), 3.0))
    except (AttributeError, RuntimeError):
        return None
    return op if ok else None


def _onednn_mm_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b^T through oneDNN, which copies a transposed `a` to contiguous but reads a transposed `b` in place."""
    return _onednn_linear_op()(a, b, None, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_linear_op()(x, weight, bias, "none", [], "")

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        gx = gw = gb = None
        gy2 = gy.reshape(-1, gy.size(-1))
        if ctx.needs_input_grad[0]:
            gx = _onednn_mm_nt(gy, weight.t())  # gy W
        if ctx.needs_input_grad[1]:  # gy^T x, with the smaller of the two as oneDNN's (copied) input
            x2 = x.reshape(-1, x.size(-1))
            if x2.size(1) <= gy2.size(1):
                gw = _onednn_mm_nt(x2.t(), gy2.t()).t().contiguous()
            else:
                gw = _onednn_mm_nt(gy2.t(), x2.t())
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = gy2.sum(0)
        return gx, gw, gb


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state-dict names) whose fp32 CPU matmuls run on oneDNN.

    Autocast (bf16 matmuls already run on oneDNN), other devices and dtypes, and torch.compile
    (inductor picks its own kernels) take the plain F.linear path.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        if (x.device.type == "cpu" and x.dtype == torch.float32 and w.dtype == torch.float32
                and x.dim() >= 2 and x.numel() > 0 and not torch.is_autocast_enabled("cpu")
                and not torch.compiler.is_compiling() and _onednn_linear_op() is not None):
            if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad)):
                return _OneDNNLinear.apply(x, w, b)
            return _onednn_linear_op()(x, w, b, "none", [], "")
        return F.linear(x, w, b)


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
        self.up_proj = Linear(d, 2 * h if self.gated else h, bias=config.bias)
        self.down_proj = Linear(h, d, bias=config.bias)
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
