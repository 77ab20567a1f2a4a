"""Scaled dot-product attention, its masks, and the positional schemes that live inside it.

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k) + M) V

M is 0 where a query may look and -inf where it may not (causal: keys after the query).
RoPE rotates Q and K by position-dependent angles; ALiBi adds -m_h * (i - j) to the scores.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from . import vnni
from .layers import Linear


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None,
              scale: Optional[float] = None, return_weights: bool = False):
    """softmax(Q K^T * scale + M) V, written out so textbook examples can be checked by hand.

    q: (..., T_q, d_k), k: (..., T_k, d_k), v: (..., T_k, d_v).
    mask: bool (True = may attend) or float (added to the scores), broadcastable to (..., T_q, T_k).
    A query row whose keys are all masked gets zero weights (and a zero output), never NaN.
    """
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale  # (..., T_q, T_k)
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask
    # subtracting the row max keeps exp() in range; all -inf rows are handled below
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    denom = weights.sum(dim=-1, keepdim=True)
    weights = weights / torch.where(denom > 0, denom, torch.ones_like(denom))
    out = weights @ v
    return (out, weights) if return_weights else out


def single_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Decode-step attention, one new query per row: q (B, nh, 1, hs), k/v (B, nkv, T_k, hs) -> (B, nh, 1, hs).

    Two small matmuls and a softmax. For T_q = 1 this beats PyTorch's CPU SDPA, whose flash kernel is
    built for long query blocks: in bf16 it costs ~0.4 ms per layer at batch 1 and ~3 ms at batch 8
    (SmolLM2 shapes, 576 keys), against ~0.1 and ~0.2-0.5 ms here; in fp32 the two are even.
    GQA without repeating K/V per query head: the nh query heads are grouped as (nkv, rep), query head g*rep + r
    reads K/V head g (the repeat_interleave order SDPA's enable_gqa uses), so one batched matmul per
    K/V head covers its whole group. mask: bool (True = may attend) or additive float, broadcastable to
    (B, nh, 1, T_k). Scores and softmax in fp32, like SDPA's accumulators.
    """
    B, nh, _, hs = q.shape
    nkv = k.size(1)
    qg = (q * (1.0 / math.sqrt(hs))).reshape(B, nkv, nh // nkv, hs)     # (B, nkv, rep, hs)
    if torch.compiler.is_compiling():
        # compiled (engine/compiled.py): products summed over hs, which TorchInductor turns into one loop
        # over the cache as it lies (a strided view of a longer store); bmm on that view copies it first
        # (products and sums in fp32, rounded to q's dtype once, as the eager matmul's are)
        scores = (qg.float().unsqueeze(3) * k.float().unsqueeze(2)).sum(-1).to(q.dtype).float()  # (B, nkv, rep, T_k)
    else:
        scores = torch.matmul(qg, k.transpose(-2, -1)).float()           # (B, nkv, rep, T_k)
    if mask is not None:
        if mask.dim() == 4 and mask.size(1) != 1:  # per-head mask: split its heads like the queries
            mask = mask.expand(B, nh, 1, mask.size(-1)).reshape(B, nkv, nh // nkv, mask.size(-1))
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    weights = torch.softmax(scores, dim=-1).to(v.dtype)
    if torch.compiler.is_compiling():
        return (weights.float().unsqueeze(-1) * v.float().unsqueeze(2)).sum(-2).to(v.dtype).view(B, nh, 1, hs)
    return torch.matmul(weights, v).view(B, nh, 1, hs)


def causal_mask(t_q: int, t_k: int, device=None) -> torch.Tensor:
    """(T_q, T_k) bool, True where key j is not in the future of query i.

    With a cache the T_q queries are the *last* T_q positions of T_k, so query i sits at t_k - t_q + i.
    """
    i = torch.arange(t_q, device=device)[:, None] + (t_k - t_q)
    j = torch.arange(t_k, device=device)[None, :]
    return j <= i


def sinusoidal_table(n_pos: int, d: int) -> torch.Tensor:
    """PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(p / 10000^(2i/d)); shape (n_pos, d)."""
    p = torch.arange(n_pos, dtype=torch.float64)[:, None]
    inv = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    pe = torch.zeros(n_pos, d, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(p * inv)
    pe[:, 1::2] = torch.cos(p * inv)
    return pe.float()


def rope_cos_sin(n_pos: int, head_dim: int, base: float, device=None):
    """cos/sin tables (n_pos, head_dim) for RoPE in the half-split layout (dims i and i + d/2 pair up)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    angles = torch.arange(n_pos, dtype=torch.float32, device=device)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)  # (n_pos, head_dim)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x_i, x_{i+d/2}) by its angle: x*cos + rotate_half(x)*sin. x: (B, nh, T, hs)."""
    half = x.size(-1) // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def alibi_slopes(n_head: int) -> torch.Tensor:
    """Per-head slopes m_h = 2^(-8h/n) for h = 1..n (Press et al. 2022; geometric for non-powers of 2)."""
    def pow2_slopes(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (h + 1) for h in range(n)]
    if math.log2(n_head).is_integer():
        return torch.tensor(pow2_slopes(n_head))
    closest = 2 ** math.floor(math.log2(n_head))
    extra = pow2_slopes(2 * closest)[0::2][: n_head - closest]
    return torch.tensor(pow2_slopes(closest) + extra)


def alibi_bias(slopes: torch.Tensor, t_q: int, t_k: int, device=None) -> torch.Tensor:
    """(nh, T_q, T_k) additive bias -m_h * (i - j), with -inf on future keys (causal)."""
    i = torch.arange(t_q, device=device)[:, None] + (t_k - t_q)
    j = torch.arange(t_k, device=device)[None, :]
    dist = (i - j).float()
    bias = -slopes.to(device)[:, None, None] * dist
    return bias.masked_fill(j > i, float("-inf"))


class Attention(nn.Module):
    """Causal multi-head / grouped-query / multi-query self-attention.

    n_kv_head < n_head: each K/V head is shared by n_head / n_kv_head query heads (GQA, Ainslie 2023).
    """

    def __init__(self, config: ModelConfig, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.pos = config.pos
        d, hd = config.n_embd, config.head_dim
        # Q, K and V come from one fused matmul (rows: nh*hs for Q, then nkv*hs for K, then V):
        # one big GEMM is faster than three small ones, especially on CPUs
        self.qkv_proj = Linear(d, (self.n_head + 2 * self.n_kv_head) * hd, bias=config.bias)
        self.o_proj = Linear(self.n_head * hd, d, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.last_weights: Optional[torch.Tensor] = None  # (B, nh, T, T) when maps are requested

    def forward(self, x: torch.Tensor, rope: Optional[tuple] = None, alibi: Optional[torch.Tensor] = None,
                kv_cache=None, start_pos: int = 0, return_weights: bool = False,
                positions: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """positions: optional (B, T) per-row positions (left-padded batches in the engine), used by RoPE
        instead of start_pos. attn_mask: optional (B, 1, T, T_k) bool (True = may attend), replacing the
        plain causal mask; it must already be causal and hide padding."""
        B, T, _ = x.shape
        nh, nkv = self.n_head, self.n_kv_head
        qkv = self.qkv_proj(x).view(B, T, nh + 2 * nkv, self.head_dim).transpose(1, 2)  # (B, nh + 2 nkv, T, hs)
        qk, v = qkv[:, :nh + nkv], qkv[:, nh + nkv:]  # Q heads then K heads; V heads (B, nkv, T, hs)
        # RoPE rotates the Q and K heads in one go: half the small ops of a decode step's rotation
        if rope is not None and positions is not None:  # per-row positions: (B, 1, T, hs) tables
            qk = apply_rope(qk, rope[0][positions].unsqueeze(1), rope[1][positions].unsqueeze(1))
        elif rope is not None:
            qk = apply_rope(qk, rope[0][start_pos:start_pos + T], rope[1][start_pos:start_pos + T])
        q, k = qk[:, :nh], qk[:, nh:]  # (B, nh, T, hs), (B, nkv, T, hs)
        if kv_cache is not None:  # the engine keeps past K/V; we get back everything up to now
            k, v = kv_cache.update(self.layer_idx, k, v)
        # a bf16 cache, one query per row: one hand-written loop reads it in place (model/vnni.py), for fp32
        # queries (quantized models under the compiled step: engine/kv_cache.py's cache_dtype) and, compiled
        # only, bf16 ones (rounding where single_query_attention's bf16 path does; the eager step stays the
        # reference)
        kernel = (kv_cache is not None and T == 1 and alibi is None and not return_weights and not self.training
                  and (q.dtype == torch.float32 or torch.compiler.is_compiling())
                  and vnni.decode_attention_fits(q, k, v, attn_mask))
        if k.dtype != q.dtype and not kernel:  # that cache where the kernel does not run: cast it;
            k, v = k.to(q.dtype), v.to(q.dtype)  # compiled, the casts fuse into attention's loops
        T_k = k.size(2)
        gqa = self.n_kv_head != self.n_head
        if gqa and return_weights:  # the textbook path wants one K/V head per query head
            rep = self.n_head // self.n_kv_head
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        # SDPA shares each K/V head across its group of queries itself (enable_gqa): no copy of the
        # cache per step, which is ~3x faster for decode attention than repeat_interleave
        dropout_p = self.dropout if self.training else 0.0
        sdpa = functools.partial(F.scaled_dot_product_attention, dropout_p=dropout_p, enable_gqa=gqa)
        if kernel:
            y = vnni.decode_attention(q, k, v, attn_mask)
        elif (T == 1 and alibi is None and not return_weights and dropout_p == 0.0
                and (q.dtype != torch.float32 or torch.compiler.is_compiling())):
            # a bf16/fp16 decode step (every cached key is in the query's past; attn_mask, if any, hides
            # padding). In fp32, eager SDPA is as fast as the plain matmuls, so eager keeps the paths below;
            # compiled (engine/compiled.py), these matmuls and a fused softmax beat SDPA's flash kernel,
            # which costs ~0.3 ms per layer for a batch of 8 single queries
            y = single_query_attention(q, k, v, attn_mask)
        elif attn_mask is not None:  # padded batch: the caller's mask already encodes causality and padding
            mask = attn_mask if alibi is None else alibi.masked_fill(~attn_mask, float("-inf"))
            if return_weights:
                y, w = attention(q, k, v, mask=mask, return_weights=True)
                self.last_weights = w.detach()
            else:
                y = sdpa(q, k, v, attn_mask=mask if mask.dtype == torch.bool else mask.to(q.dtype))
        elif return_weights:
            mask = alibi if alibi is not None else causal_mask(T, T_k, x.device)
            y, w = attention(q, k, v, mask=mask, return_weights=True)
            self.last_weights = w.detach()
        elif alibi is not None:
            y = sdpa(q, k, v, attn_mask=alibi.to(q.dtype))
        elif T == T_k:
            y = sdpa(q, k, v, is_causal=True)
        elif T == 1:  # one new query after the cache: every key is in its past, no mask needed
            y = sdpa(q, k, v)
        else:  # several new queries after a cache: the causal mask is offset by the cached length
            y = sdpa(q, k, v, attn_mask=causal_mask(T, T_k, x.device))
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * self.head_dim)  # (B, T, nh*hs)
        return self.resid_dropout(self.o_proj(y))
