"""Weight-only int8 quantization for inference: each Linear's W becomes int8 rows plus one scale per row.

    s_i = max_j |W_ij| / 127          per output channel (row), symmetric: no zero point
    Q_ij = round(W_ij / s_i)          in [-127, 127], stored as int8
    y = x W^T + b  ~=  (x Q^T) * s + b

Why: decoding one token at a time is bound by memory traffic, not arithmetic. Every step reads every
weight once, so the time per token is roughly bytes of weights / memory bandwidth; int8 weights are a
quarter of fp32 and half of bf16. The matmuls run on PyTorch's CPU kernel ``aten._weight_int8pack_mm``,
which multiplies by the int8 rows and applies the scales in one pass. Its fast path takes bf16 inputs
(with fp32 inputs it is ~10x slower here), so each layer casts its input to bf16 and its output back.
The rest of the model (residual stream, norms, attention, KV cache) stays fp32 by default: on the
project's machine that decodes faster than a bf16 model (bf16 decode attention copies the cache
slices it reads) and keeps the logits closer to the original. Rounding each weight to 1/254 of its
row's range costs little: on SmolLM2-135M the next-token choice almost always agrees with the fp32
model (tests/model/test_quant.py measures it).

Inference only: the int8 weights have no gradients, so a quantized model refuses to train. Quantize a
trained fp32/bf16 model, never the other way round.

    model, tok, _ = load_model("smollm2", quantize="int8")     # or: quantize_int8(model)
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import PicochatError

QUANTIZE_CHOICES = ("int8",)
KERNEL_DTYPE = torch.bfloat16
PREFILL_ROWS = 64  # from this many rows on, dequantize + GEMM beats the int8 matrix-vector kernel (measured)


def quantize_rows_int8(weight: torch.Tensor, scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float weight -> (N, K) int8 Q and (N,) scales with weight ~= Q * scale[:, None].

    The scales are rounded to `scale_dtype` before Q is computed, so Q matches the scale the kernel
    will really use (a bf16 scale is off by up to 0.4%, as much as the int8 rounding itself)."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)  # an all-zero row must not divide by 0
    scale = scale.to(scale_dtype)
    q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """A Linear whose weight is int8 rows and per-row scales (buffers: they have no gradients)."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        # the kernel's dtype: its inputs are cast to the scales' dtype (bf16 is its fast path on CPUs)
        q, scale = quantize_rows_int8(weight, KERNEL_DTYPE)
        self.register_buffer("weight_int8", q)
        self.register_buffer("scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_int8.to(self.scale.dtype) * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or (torch.is_grad_enabled() and x.requires_grad):
            raise PicochatError("this model is quantized to int8, which is for inference only (its weights have "
                                "no gradients); train or fine-tune the fp32/bf16 model and quantize it afterwards")
        if x.device.type == "cpu" and self.in_features % 16 == 0:
            # one fused pass over the int8 rows, scales applied on the way out. The kernel reads K in
            # blocks of 16 and returns garbage (or crashes) otherwise, so other widths take the path below
            x2 = x.reshape(-1, self.in_features).to(self.scale.dtype).contiguous()
            if x2.size(0) >= PREFILL_ROWS:
                # many rows (a prompt): the kernel is matrix-vector, its time grows with the rows (512 rows:
                # ~3x a bf16 GEMM); dequantizing the weight once and running one GEMM is faster
                y = F.linear(x2, self.dequantized_weight())
            else:
                y = torch.ops.aten._weight_int8pack_mm(x2, self.weight_int8, self.scale)
            y = y.view(*x.shape[:-1], self.out_features).to(x.dtype)
            return y if self.bias is None else y + self.bias
        # other devices and widths: dequantize on the fly (saves memory, not time)
        return F.linear(x, self.dequantized_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, Int8Linear) for m in model.modules())


@torch.no_grad()
def quantize_int8(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every nn.Linear of `model` (picochat's Linear, the LM head included; not a MoE router) by an
    Int8Linear, in place.

    The rest of the model (embeddings, norms; and so the KV cache and the activations) moves to `dtype`
    (fp32 by default; bf16 halves the cache but measured slower at batch 1 on a Zen 5 CPU).
    A tied LM head gets its own int8 copy of the embedding table, which stays in `dtype` for the lookups.
    Returns the model, in eval mode.
    """
    if is_quantized(model):
        raise PicochatError("this model is already quantized")
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise PicochatError(f"quantize_int8: activations dtype must be bf16, fp16 or fp32, not {dtype}")
    # a mixture-of-experts router (model/moe.py) stays in floating point: it is tiny (d x N), and rounding
    # its logits would flip near-tied top-k choices, a discrete change of which experts run
    from .moe import MoEFeedForward
    routers = {id(m.router) for m in model.modules() if isinstance(m, MoEFeedForward)}
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and id(m) not in routers]
    for name, m in targets:  # quantized from the weights as they are (fp32 from a checkpoint or GGUF)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear(m.weight, m.bias))
    model.to(dtype)  # floats only: int8 buffers stay int8; the scales go back to the kernel's dtype below
    for m in model.modules():
        if isinstance(m, Int8Linear):
            m.scale = m.scale.to(KERNEL_DTYPE)
    model.eval()
    return model


def quantize_model(model: nn.Module, method: Optional[str], dtype: Optional[torch.dtype] = None) -> nn.Module:
    """The one entry point the CLIs (generate, chat, serve) use: method None = unchanged, or 'int8'
    (activations in `dtype`, default fp32)."""
    if method in (None, "", "none"):
        return model
    if method == "int8":
        return quantize_int8(model, dtype or torch.float32)
    raise PicochatError(f"unknown quantization {method!r}; use one of: {', '.join(QUANTIZE_CHOICES)}")
