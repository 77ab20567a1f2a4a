"""Weight-only int8 and int4 quantization for inference: each Linear's W becomes small integers plus scales.

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

Activation-aware scales (AWQ, Lin et al. 2023): a row's grid is set by its largest weight, so the
weights that meet large inputs round as coarsely as the rest. Scaling input channel k of W up by
s_k = mean_t |x_tk|^alpha before rounding, and the input down by the same s_k at run time, gives those
weights a finer share of the grid: y = (x diag(s)^-1)(Q s_i) ~= x W^T, exactly so before rounding. The
mean |x_tk| of every layer comes from the model itself reading a calibration text (`calibration_ids`:
512 tokens of Brown corpus excerpts shipped with picochat); load_model does this when it quantizes.
Measured on SmolLM2 over 2,035 positions of eight texts the calibration never read (`python
benchmarks/quant_agreement.py`, plain rows in the same run, through PyTorch's kernels; the VNNI kernels'
figures are in the README): next-token agreement with fp32 0.955 -> 0.963, KL 0.0048 -> 0.0032 nats (KL lower on all eight texts; agreement
on one, the tests' 57-token paragraph, falls from 0.947 to 0.930). alpha = 0.25 was the best of
0.2, 0.25, 0.3 and 0.4 on 6,000 positions of 20 other Brown documents (0.9585, 0.9592, 0.9552, 0.9567;
plain rows 0.9487); a per-layer search of alpha on the calibration activations' squared error did no
better. The LM head keeps plain rows (`_block_means`). Without a tokenizer (quantize_int8(model)): s = 1.

Kernels: on CPUs with AVX-512 VNNI (and a C++ compiler), int8 and int4 layers keep their weights in the
layouts of picochat's own kernels (model/vnni.py: activations rounded to int8 in blocks of 32, as
llama.cpp does; 3.2-3.8x PyTorch's on warm caches, 1 row or 8: benchmarks/quant_kernels.py) and `kernel` says which a layer runs; elsewhere
PyTorch's weight-only kernels below. The cached quantized models (checkpoints/gguf_cache.py) are keyed by it.

Inference only: the int8 weights have no gradients, so a quantized model refuses to train. Quantize a
trained fp32/bf16 model, never the other way round.

    model, tok, _ = load_model("smollm2", quantize="int8")     # or: quantize_int8(model)

int4 (`quantize="int4"`, Int4Linear) halves the bytes again: each group of G = 32 consecutive weights of a
row gets its own scale and minimum (asymmetric, as llama.cpp's Q4_1 and gpt-fast's int4):

    s_g = (max_g - min_g) / 15,   Q = round((W - min_g) / s_g) in [0, 15],   W ~= Q * s_g + min_g

run by `aten._weight_int4pack_mm_for_cpu`, which reads two weights per byte and dequantises in registers.
A model imported from a Q4_1 GGUF, as SmolLM2 is, was already rounded to such a grid with G = 32: its
int4 copy of the blocks is close to lossless (up to the bf16 rounding of the scales), and closer to the
original than int8's per-row grid (next-token agreement with fp32 over 2,035 positions 0.969, KL 0.0021,
against int8's 0.963, KL 0.0032).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import PicochatError
from ..hostmem import in_huge_pages
from . import vnni
from .calibration import activation_means, calibration_ids  # (re-exported: callers import them from here)

QUANTIZE_CHOICES = ("int8", "int4")
# the LM head's inputs are rounded twice under the VNNI kernels (`fine_inputs`): every logit goes through it.
# SmolLM2 over quant_agreement.py's 2,035 positions, int8 (AWQ) / int4: next-token agreement with fp32 95.3 /
# 95.9% and KL 0.0043 / 0.0040 with the head's inputs rounded once, 96.3 / 96.2% and 0.0040 / 0.0036 with them
# in bf16 (PyTorch's kernel for the head, 1.1 ms a step slower at batch 1)
HEAD = "lm_head"
# ... and only near each row's top: in the 16-logit tiles within HEAD_MARGIN nats of the row's top logit
# (vnni.int8_linear's `margin`; 7.7% of SmolLM2's tiles, benchmarks/head_margin.py). The others keep the first
# rounding: off by 0.05 nats on average, 0.56 at most, where the int4 model's log-probabilities of those far
# tokens already stand 0.12 from fp32's (0.42 at the 99th percentile). Noticed only where a far token comes
# into play: temperature above 1 (8 nats become 8/T), logit_bias, top_logprobs. quant_agreement.py: the same
# agreement with fp32 on every text, KL +0.00003-0.00004; head_margin.py: the head 2.07 -> 1.62 ms at 8 rows
HEAD_MARGIN = 8.0
# raise it whenever quantize_rows_int8 / quantize_groups_int4 / the calibration round differently: cached
# quantized weights (checkpoints/gguf_cache.py) are keyed by it
QUANT_VERSION = 2
AWQ_ALPHA = 0.25  # s_k = mean |x_k|^alpha (see the module docstring for the measured choice)
INT4_GROUP = 32  # weights per scale/minimum: llama.cpp's Q4 block size
KERNEL_DTYPE = torch.bfloat16
PREFILL_ROWS = 64  # from this many rows on, dequantize + GEMM beats PyTorch's int8 matrix-vector kernel (measured)
# VNNI_PROMPTS: the VNNI kernels take prompts as well, so prompt and decode round alike; benchmarks/decode.py's
# 512-token prefill: int4 1,253 tokens/s through them against 1,252 dequantizing for a bf16 GEMM, int8 1,131
# against 1,039


def quantize_rows_int8(weight: torch.Tensor, scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float weight -> (N, K) int8 Q and (N,) scales with weight ~= Q * scale[:, None].

    The scales are rounded to `scale_dtype` before Q is computed, so Q matches the scale the kernel
    will really use (a bf16 scale is off by up to 0.4%, as much as the int8 rounding itself)."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)  # an all-zero row must not divide by 0
    scale = scale.to(scale_dtype)
    q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def awq_scales(act_mean: torch.Tensor, alpha: float = AWQ_ALPHA) -> torch.Tensor:
    """(K,) mean |x_k| of a layer's inputs -> (K,) s_k = mean|x_k|^alpha, centred on 1 (geometrically)."""
    s = act_mean.detach().float().clamp(min=1e-5) ** alpha
    return s / (s.max() * s.min()).sqrt()


class Int8Linear(nn.Module):
    """A Linear whose weight is int8 rows and per-row scales (buffers: they have no gradients).

    act_mean: optional (K,) mean |x_k| of the layer's inputs on a calibration text: the rows are rounded
    from W diag(s) with s = awq_scales(act_mean), and `in_scale` = 1/s scales the input at run time."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], act_mean: Optional[torch.Tensor] = None,
                 kernel: Optional[str] = None, fine_inputs: bool = False):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.fine_inputs = fine_inputs  # VNNI: inputs rounded twice (vnni.int8_linear's `fine`; the LM head)
        self.kernel = default_kernel(weight.device, *weight.shape, asked=kernel)
        w = weight.detach().float()
        s = torch.ones(self.in_features, device=w.device) if act_mean is None else awq_scales(act_mean.to(w.device))
        # torch's kernel casts its inputs to the scales' dtype (bf16 is its fast path on CPUs); VNNI's are fp32
        q, scale = quantize_rows_int8(w * s, torch.float32 if self.kernel == "vnni" else KERNEL_DTYPE)
        if self.kernel == "vnni":
            self.register_buffer("weight_q8", vnni.pack_int8(q))  # (N/16, K/32, 512) uint8 blocks
        else:
            self.register_buffer("weight_int8", q)
        self.register_buffer("scale", scale)
        self.register_buffer("in_scale", 1.0 / s)  # (ones without calibration: x * 1 is x, bit for bit)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def empty(cls, n: int, k: int, bias: bool, fine_inputs: bool = False) -> "Int8Linear":
        """Buffers of the right shapes, unfilled: for a saved state to be assigned into (`quantized_skeleton`)."""
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.out_features, m.in_features, m.fine_inputs = n, k, fine_inputs
        m.kernel = default_kernel(torch.device("cpu"), n, k)
        if m.kernel == "vnni":
            m.register_buffer("weight_q8", torch.empty(n // 16, k // 32, 512, dtype=torch.uint8))
            m.register_buffer("scale", torch.empty(n))
        else:
            m.register_buffer("weight_int8", torch.empty(n, k, dtype=torch.int8))
            m.register_buffer("scale", torch.empty(n, dtype=KERNEL_DTYPE))
        m.register_buffer("in_scale", torch.empty(k))
        m.bias = nn.Parameter(torch.empty(n), requires_grad=False) if bias else None
        return m

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"int8 ({self.kernel})")

    def rows(self) -> torch.Tensor:
        """(N, K) Q * s_i in bf16: what the kernel multiplies the scaled input by."""
        if self.kernel == "vnni":
            q = vnni.unpack_int8(self.weight_q8, self.out_features, self.in_features)
            return (q.float() * self.scale[:, None]).to(KERNEL_DTYPE)
        return self.weight_int8.to(self.scale.dtype) * self.scale[:, None]

    def dequantized_weight(self) -> torch.Tensor:
        """(N, K) ~= W: the rows with the activation-aware scales taken back out."""
        return self.rows() * self.in_scale.to(self.scale.dtype)[None, :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _refuse_training(self, x, "int8")
        if self.kernel == "vnni" and x.device.type == "cpu":  # prompts too: see VNNI_PROMPTS
            x2 = (x * self.in_scale).reshape(-1, self.in_features).float().contiguous()
            y = vnni.int8_linear(x2, self.weight_q8, self.scale.float(), self.fine_inputs,  # (float: a .to(bf16) casts it)
                                 HEAD_MARGIN if self.fine_inputs else None)
            y = y.view(*x.shape[:-1], self.out_features).to(x.dtype)
            return y if self.bias is None else y + self.bias
        if x.device.type == "cpu" and self.in_features % 16 == 0:
            # one fused pass over the int8 rows, scales applied on the way out. The kernel reads K in
            # blocks of 16 and returns garbage (or crashes) otherwise, so other widths take the path below
            x2 = (x * self.in_scale).reshape(-1, self.in_features).to(self.scale.dtype).contiguous()
            if x2.size(0) >= PREFILL_ROWS:
                # many rows (a prompt): the kernel is matrix-vector, its time grows with the rows (512 rows:
                # ~3x a bf16 GEMM); dequantizing the weight once and running one GEMM is faster
                y = F.linear(x2, self.rows())
            else:
                y = torch.ops.aten._weight_int8pack_mm(x2, self.weight_int8, self.scale)
            y = y.view(*x.shape[:-1], self.out_features).to(x.dtype)
            return y if self.bias is None else y + self.bias
        # other devices and widths: dequantize on the fly (saves memory, not time)
        return F.linear((x * self.in_scale).to(x.dtype), self.rows().to(x.dtype),
                        None if self.bias is None else self.bias.to(x.dtype))


def quantize_groups_int4(weight: torch.Tensor, group: int = INT4_GROUP,
                         scale_dtype: torch.dtype = KERNEL_DTYPE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) float weight -> Q (N, K) int32 in [0, 15], scales and minima (N, K / group) with
    weight ~= Q * scale + minimum per group. Scale and minimum are rounded to `scale_dtype` first, so Q is
    chosen against the values the kernel will really use."""
    N, K = weight.shape
    w = weight.detach().float().view(N, K // group, group)
    lo, hi = w.amin(-1), w.amax(-1)
    scale = ((hi - lo) / 15.0).clamp(min=1e-8).to(scale_dtype)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # (1e-8 is 0 in fp16: a flat group, Q = 0)
    lo = lo.to(scale_dtype)
    q = torch.round((w - lo.float()[..., None]) / scale.float()[..., None]).clamp(0, 15).to(torch.int32)
    return q.view(N, K), scale, lo


class Int4Linear(nn.Module):
    """A Linear whose weight is 4-bit groups (two per byte, in the CPU kernel's packed layout) plus a bf16
    scale and minimum per group of INT4_GROUP weights."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], group: int = INT4_GROUP,
                 kernel: Optional[str] = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.group = group
        self.kernel = default_kernel(weight.device, *weight.shape, group, asked=kernel)
        if self.kernel == "vnni":  # scale and minimum in fp16, as llama.cpp's Q4_1 keeps them
            q, scale, lo = quantize_groups_int4(weight, group, torch.float16)
            self.register_buffer("weight_q4", vnni.pack_int4(q, scale, lo))  # (N/16, K/32, 320) uint8 blocks
        else:
            q, scale, lo = quantize_groups_int4(weight, group)
            self.register_buffer("weight_int4", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))  # (N, K/2)
            # the kernel computes (Q - 8) * s + z: z = min + 8 s, in its (K / group, N, 2) layout
            zero = (lo.float() + 8 * scale.float()).to(KERNEL_DTYPE)
            self.register_buffer("scale_zero", torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def empty(cls, n: int, k: int, bias: bool, group: int = INT4_GROUP) -> "Int4Linear":
        """Buffers of the right shapes, unfilled: for a saved state to be assigned into (`quantized_skeleton`)."""
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.out_features, m.in_features, m.group = n, k, group
        m.kernel = default_kernel(torch.device("cpu"), n, k, group)
        if m.kernel == "vnni":
            m.register_buffer("weight_q4", torch.empty(n // 16, k // 32, 320, dtype=torch.uint8))
        else:
            m.register_buffer("weight_int4", torch.empty(n, k // 2, dtype=torch.uint8))
            m.register_buffer("scale_zero", torch.empty(k // group, n, 2, dtype=KERNEL_DTYPE))
        m.bias = nn.Parameter(torch.empty(n), requires_grad=False) if bias else None
        return m

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"int4 groups of {self.group} ({self.kernel})")

    def dequantized_weight(self) -> torch.Tensor:
        """(N, K) in bf16, Q * s + min ((Q - 8) * s + z in torch's layout), for prompts (PREFILL_ROWS+ rows:
        one GEMM)."""
        if self.kernel == "vnni":
            q, s, lo = vnni.unpack_int4(self.weight_q4, self.out_features, self.in_features)
            w = q.view(self.out_features, -1, self.group).float() * s[..., None] + lo[..., None]
            return w.view(self.out_features, self.in_features).to(KERNEL_DTYPE)
        q = unpack_int4(self.weight_int4, self.out_features, self.in_features)
        if q is None:  # a layout this code does not know: the kernel applied to the identity (slow, exact)
            return self.kernel_weight()
        N, K, G = self.out_features, self.in_features, self.group
        s, z = self.scale_zero[..., 0].t().float(), self.scale_zero[..., 1].t().float()  # (N, K / G)
        w = (q.view(N, K // G, G).float() - 8) * s[..., None] + z[..., None]
        return w.view(N, K).to(KERNEL_DTYPE)

    def kernel_weight(self) -> torch.Tensor:
        """(N, K) as the kernel sees it: the kernel applied to the identity matrix (K^2 N work: tests)."""
        if self.kernel == "vnni":  # each row of the identity rounds to int8 exactly (127 * 1/127)
            return vnni.int4_linear(torch.eye(self.in_features), self.weight_q4, self.out_features).t()
        eye = torch.eye(self.in_features, dtype=KERNEL_DTYPE, device=self.weight_int4.device)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.weight_int4, self.group, self.scale_zero).t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _refuse_training(self, x, "int4")
        vn = self.kernel == "vnni"
        x2 = x.reshape(-1, self.in_features).to(torch.float32 if vn else KERNEL_DTYPE).contiguous()
        if vn:  # prompts too: see VNNI_PROMPTS
            y = vnni.int4_linear(x2, self.weight_q4, self.out_features)
        elif x2.size(0) >= PREFILL_ROWS:  # a prompt: one dequantisation and a GEMM (as Int8Linear)
            y = F.linear(x2, self.dequantized_weight())
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight_int4, self.group, self.scale_zero)
        y = y.view(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias


def unpack_int4(packed: torch.Tensor, n: int, k: int) -> Optional[torch.Tensor]:
    """The (N, K) values 0..15 in `_convert_weight_to_int4pack_for_cpu`'s layout, or None where that layout
    is not the one read here. For N a multiple of 64 it is, per block of 64 rows, K runs of 32 bytes whose
    low nibbles are rows 0-31 and high nibbles rows 32-63 (found by packing one-hot matrices; checked
    once per process on a random one, since a future PyTorch may pack differently)."""
    if n % 64 or not _int4_layout_known():
        return None
    b = packed.view(n // 64, k, 32)
    return torch.cat([b & 15, b >> 4], dim=-1).transpose(1, 2).reshape(n, k)  # (N/64, K, 64) -> (N, K)


@functools.cache
def _int4_layout_known() -> bool:
    q = torch.randint(0, 16, (128, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    b = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1).view(2, 64, 32)
    return torch.equal(torch.cat([b & 15, b >> 4], dim=-1).transpose(1, 2).reshape(128, 64).int(), q)


def default_kernel(device: torch.device, n: int, k: int, group: int = INT4_GROUP,
                   asked: Optional[str] = None) -> str:
    """"vnni" (model/vnni.py: int8 activations, 3-4x faster) where it fits and runs; else "torch"
    (PyTorch's weight-only kernels, and the dequantising fallback on other devices). asked: a layer's
    `kernel` argument, honoured or refused."""
    usable = device.type == "cpu" and group == vnni.GROUP and vnni.fits(n, k) and vnni.available()
    if asked == "vnni" and not usable:
        raise PicochatError(f"the VNNI kernels cannot take this layer ({n} x {k}, {device}; they need a CPU with "
                            "AVX-512 VNNI, N a multiple of 16, K of 32, groups of 32)")
    if asked not in (None, "vnni", "torch"):
        raise PicochatError(f"unknown kernel {asked!r}; use 'vnni' or 'torch'")
    return asked or ("vnni" if usable else "torch")


def _refuse_training(m: nn.Module, x: torch.Tensor, kind: str) -> None:
    if m.training or (torch.is_grad_enabled() and x.requires_grad):
        raise PicochatError(f"this model is quantized to {kind}, which is for inference only (its weights have "
                            "no gradients); train or fine-tune the fp32/bf16 model and quantize it afterwards")


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (Int8Linear, Int4Linear)) for m in model.modules())


def int4_fits(m: nn.Linear, group: int = INT4_GROUP) -> bool:
    """The CPU int4 kernel needs K a multiple of the group, N a multiple of 16, and a CPU."""
    n, k = m.weight.shape
    return m.weight.device.type == "cpu" and k % group == 0 and n % 16 == 0


@torch.no_grad()
def quantize_int8(model: nn.Module, dtype: torch.dtype = torch.float32,
                  calibration: Optional[torch.Tensor] = None) -> nn.Module:
    """Replace every nn.Linear of `model` (picochat's Linear, the LM head included; not a MoE router) by an
    Int8Linear, in place. calibration: optional (1, T) token ids (`calibration_ids`) the fp32 model reads
    first, for activation-aware scales (module docstring); without, plain per-row rounding.

    The rest of the model (embeddings, norms; and so the KV cache and the activations) moves to `dtype`
    (fp32 by default; bf16 halves the cache but measured slower at batch 1 on a Zen 5 CPU).
    A tied LM head gets its own int8 copy of the embedding table, which stays in `dtype` for the lookups.
    Returns the model, in eval mode.
    """
    means = _block_means(model, calibration)
    return _quantize(model, dtype, lambda name, m: Int8Linear(m.weight, m.bias, means.get(name),
                                                              fine_inputs=name == HEAD))


@torch.no_grad()
def quantize_int4(model: nn.Module, dtype: torch.dtype = torch.float32, group: int = INT4_GROUP,
                  calibration: Optional[torch.Tensor] = None) -> nn.Module:
    """As quantize_int8, with Int4Linear (groups of `group` weights) in the blocks wherever the CPU kernel
    fits the shape, and Int8Linear for the LM head and any layer it does not fit (CPU only; the latter
    take the calibration's scales; int4 groups need none, see the module docstring).

    The LM head stays int8 as llama.cpp keeps its output matrix at 6-8 bits: every logit goes through
    it. Measured on SmolLM2 (178 positions of benchmarks/decode.py's text, one token at a time): next-
    token agreement with fp32 0.978, KL 0.002 nats; with an int4 head 0.82 and 0.062."""
    if next(model.parameters()).device.type != "cpu":
        raise PicochatError("int4 weights run on PyTorch's CPU kernel; on a GPU use int8 or bf16")
    misfits = [n for n, m in _linears(model) if not _takes_int4(n, m, group) and n != "lm_head"]
    means = _block_means(model, calibration if misfits else None)  # (none: nothing takes the scales)
    return _quantize(model, dtype, lambda name, m: Int4Linear(m.weight, m.bias, group)
                     if _takes_int4(name, m, group) else Int8Linear(m.weight, m.bias, means.get(name),
                                                                   fine_inputs=name == HEAD))


def _block_means(model: nn.Module, calibration: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
    """activation_means for the layers AWQ scales: all but the LM head, whose plain rows measured closer to
    fp32 (SmolLM2 int8, 6,000 positions of 20 Brown documents: agreement 0.959 against 0.955, KL 0.0034
    against 0.0037 with its inputs scaled too; int4's int8 head likewise)."""
    means = {} if calibration is None else activation_means(model, calibration)
    means.pop("lm_head", None)
    return means


def _takes_int4(name: str, m: nn.Linear, group: int = INT4_GROUP) -> bool:
    return int4_fits(m, group) and name != "lm_head"


def _linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(name, module) of every nn.Linear that quantizing replaces: all but a MoE router."""
    # a mixture-of-experts router (model/moe.py) stays in floating point: it is tiny (d x N), and rounding
    # its logits would flip near-tied top-k choices, a discrete change of which experts run
    from .moe import MoEFeedForward
    routers = {id(m.router) for m in model.modules() if isinstance(m, MoEFeedForward)}
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and id(m) not in routers]


def _swap_linears(model: nn.Module, make) -> None:
    """Each nn.Linear of `model` (not a MoE router: `_linears`) replaced by make(name, linear)."""
    for name, m in _linears(model):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(name, m))


def quantized_skeleton(model: nn.Module, method: str, group: int = INT4_GROUP) -> nn.Module:
    """`model` with the modules quantize_model(model, method) puts in, left empty (their buffers allocated,
    not filled): the frame a saved quantized state is assigned into (checkpoints/gguf_cache.py), so a
    cached int8/int4 model loads without the fp32 weights it was made from."""
    if method not in QUANTIZE_CHOICES:
        raise PicochatError(f"unknown quantization {method!r}; use one of: {', '.join(QUANTIZE_CHOICES)}")
    four = method == "int4"
    def make(name, m):
        if four and _takes_int4(name, m, group):
            return Int4Linear.empty(m.out_features, m.in_features, m.bias is not None)
        return Int8Linear.empty(m.out_features, m.in_features, m.bias is not None, fine_inputs=name == HEAD)
    _swap_linears(model, make)
    return model.eval()


def _quantize(model: nn.Module, dtype: torch.dtype, make) -> nn.Module:
    if is_quantized(model):
        raise PicochatError("this model is already quantized")
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise PicochatError(f"quantize: activations dtype must be bf16, fp16 or fp32, not {dtype}")
    _swap_linears(model, make)  # quantized from the weights as they are (fp32 from a checkpoint or GGUF)
    return finish_quantized(model, dtype)


def finish_quantized(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The rest of a quantized model (embeddings, norms, tables) cast to the activations' `dtype`; the
    scales stay in the kernels' dtype; the VNNI kernels' weights copied side by side into 2 MB pages
    (hostmem.py: a batch-1 step 1.06-1.17x faster than in 4 KB pages; for the moment of the copy both are
    in memory). In eval mode."""
    model.to(dtype)  # floats only: integer buffers stay; the scales go back to the kernel's dtype below
    packed = []
    for m in model.modules():
        if isinstance(m, Int8Linear):
            m.scale = m.scale.float() if m.kernel == "vnni" else m.scale.to(KERNEL_DTYPE)
            m.in_scale = m.in_scale.float()  # fp32 like the weights it was divided out of (a bf16 s_k is off by 0.4%)
        elif isinstance(m, Int4Linear) and m.kernel == "torch":
            m.scale_zero = m.scale_zero.to(KERNEL_DTYPE)
        if isinstance(m, (Int8Linear, Int4Linear)) and m.kernel == "vnni":
            packed.append((m, "weight_q8" if isinstance(m, Int8Linear) else "weight_q4"))
    for (m, name), t in zip(packed, in_huge_pages([getattr(m, n) for m, n in packed])):
        setattr(m, name, t)
    return model.eval()


def quantize_model(model: nn.Module, method: Optional[str], dtype: Optional[torch.dtype] = None,
                   tokenizer=None) -> nn.Module:
    """The one entry point the CLIs (generate, chat, serve) use: method None = unchanged, 'int8' or 'int4'
    (activations in `dtype`, default fp32); with the model's `tokenizer`, int8 rows are calibrated."""
    if method in (None, "", "none"):
        return model
    calibration = None if tokenizer is None else calibration_ids(tokenizer)
    if method == "int8":
        return quantize_int8(model, dtype or torch.float32, calibration)
    if method == "int4":
        return quantize_int4(model, dtype or torch.float32, calibration=calibration)
    raise PicochatError(f"unknown quantization {method!r}; use one of: {', '.join(QUANTIZE_CHOICES)}")
