"""The key/value cache: past keys and values of every layer, so each decode step only computes the new token.

Without it, token t re-runs attention projections for all t previous tokens (O(T^2) work per sequence);
with it, a step costs one token's projections plus one attention read over the cached K/V.

Layout per layer: K and V of shape (B, n_kv_head, capacity, head_dim), preallocated in `cache_dtype`
(the activations' dtype but for quantized models when compiled) on the model's device and written in
place. `pos` counts the filled columns; it advances once per forward pass (when the last layer writes),
not once per layer. All rows share `pos`: ragged batches are left-padded by the engine, which hides the
padding with an attention mask.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..errors import PicochatError
from ..hostmem import huge_block, wants_huge
from ..model.quant import is_quantized


def cache_dtype(model, compiled: bool = False) -> torch.dtype:
    """The dtype K/V are stored in: the activations' dtype, except bf16 under the compiled decode step
    (engine/compiled.py) for a model with int8/int4 weights and fp32 activations. Its K and V come out of
    the kernels in bf16 already (V exactly, from a quantized qkv_proj without bias; K rounded after RoPE,
    which fp32 would keep to 16 more bits), and attention reads them back as fp32. Half the bytes to keep
    and to read at every step (at 512 keys ~25 MB a row for SmolLM2, the size of its int8 LM head):
    `python benchmarks/kv_cache_dtype.py`, SmolLM2 int4 in one process, 10.0 against 10.7 ms a step at
    batch 1 (1.07x in three runs; batch 8: 1.00-1.09x), the same next token at 127/128 and 1003/1024 steps
    of Brown text. The compiled loops cast as they read; the eager step would copy every layer's cache to
    fp32 first (`kv_cache_dtype.py --plain`: slower on bf16), so it keeps fp32."""
    p = next(model.parameters())
    if compiled and p.dtype == torch.float32 and p.device.type == "cpu" and is_quantized(model):
        return torch.bfloat16
    return p.dtype


def new_stores(count: int, shape: tuple, dtype: torch.dtype, device=None,
               huge: Optional[bool] = None) -> list[torch.Tensor]:
    """`count` zero tensors of `shape`, one block of memory under them all. On a CPU, a block of 2 MB or
    more is asked to be backed by 2 MB pages (madvise MADV_HUGEPAGE: Linux's transparent huge pages, via
    hostmem.py) where the kernel allows it (huge=None; True insists, False never asks). Why: decode attention
    walks every row's cached K/V each step (SmolLM2 at 8 rows x 545 keys: ~100 MB of bf16), and over 4 KB
    pages the walk misses the TLB. The attention kernel alone took 13-17% less time on 2 MB pages (30 layers
    at 8 rows: 3.71 against 4.49 ms, 3.67 against 4.24; a prototype harness, benchmarks/README.md), the whole
    compiled step 2-3% (benchmarks/hugepages.py: 1.02x at batch 1, 1.03-1.08x at batch 8).
    One block means one storage: a view of one layer keeps them all, and growing holds the old and the new
    block of K (then of V) at once."""
    device = torch.device(device or "cpu")
    nbytes = count * math.prod(shape) * dtype.itemsize
    if not wants_huge(nbytes, device.type == "cpu", huge):
        return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(count)]
    return list(huge_block(nbytes).view(dtype).view(count, *shape).unbind(0))


def grow_columns(stores, new: int, keep: int, dtype: Optional[torch.dtype] = None) -> None:
    """Replace every (B, nkv, T, hs) tensor in the lists `stores` by one with `new` columns, the first
    `keep` copied over (the caches grow geometrically instead of preallocating a whole long context);
    dtype: the new tensors' (cast on the way), else the old ones'."""
    for store in stores:
        t = store[0]
        grown = new_stores(len(store), (t.size(0), t.size(1), new, t.size(3)), dtype or t.dtype, t.device)
        for g, t in zip(grown, store):
            g[:, :, :keep] = t[:, :, :keep]
        del t  # (the old block goes with the list's references)
        store[:] = grown


class KVCache:
    def __init__(self, n_layer: int, batch: int, n_kv_head: int, head_dim: int, capacity: int,
                 max_len: Optional[int] = None, dtype: torch.dtype = torch.float32, device=None):
        self.n_layer, self.max_len = n_layer, max_len or capacity
        if capacity > self.max_len:
            raise PicochatError(f"KV cache capacity {capacity} is larger than its limit {self.max_len}")
        shape = (batch, n_kv_head, capacity, head_dim)  # (B, nkv, T_max, hs)
        self.k = new_stores(n_layer, shape, dtype, device)
        self.v = new_stores(n_layer, shape, dtype, device)
        self.pos = 0

    @classmethod
    def for_model(cls, model, batch: int, capacity: Optional[int] = None, compiled: bool = False) -> "KVCache":
        """A cache shaped for `model` (a GPT); capacity defaults to its whole context, and can grow up to it.
        compiled: for the compiled decode step (its dtype: `cache_dtype`)."""
        c = model.config
        return cls(c.n_layer, batch, c.n_kv_head, c.head_dim, capacity or c.block_size, max_len=c.block_size,
                   dtype=cache_dtype(model, compiled), device=next(model.parameters()).device)

    @property
    def batch(self) -> int:
        return self.k[0].size(0)

    @property
    def capacity(self) -> int:
        return self.k[0].size(2)

    def reserve(self, n: int) -> None:
        """Make room for n columns in total. Grows geometrically (so a long chat reallocates O(log T) times)
        but never past max_len: a short prompt on a long-context model does not pay for the whole context."""
        if n <= self.capacity:
            return
        if n > self.max_len:
            raise PicochatError(f"the KV cache needs {n} positions but the model's context is {self.max_len}")
        grow_columns((self.k, self.v), min(self.max_len, max(n, 2 * self.capacity)), keep=self.pos)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write this step's k, v (B, nkv, T, hs) at pos and return all K/V so far, (B, nkv, pos + T, hs)."""
        T = k.size(2)
        end = self.pos + T
        if end > self.capacity:
            self.reserve(end)
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        if layer == self.n_layer - 1:  # the forward pass is done with this position range
            self.pos = end
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def reset(self) -> None:
        self.pos = 0

    def advance(self, n: int) -> None:
        """n columns were written outside update() (the compiled decode step writes them itself)."""
        if self.pos + n > self.capacity:
            raise PicochatError(f"advancing the KV cache to {self.pos + n} positions past its capacity {self.capacity}")
        self.pos += n

    def truncate(self, n: int) -> None:
        """Forget everything after the first n positions (keep a shared prefix, recompute the rest)."""
        if not 0 <= n <= self.pos:
            raise PicochatError(f"cannot truncate a KV cache holding {self.pos} positions to {n}")
        self.pos = n

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only the given batch rows (finished sequences leave the batch so they cost nothing)."""
        self.k = [t.index_select(0, rows) for t in self.k]
        self.v = [t.index_select(0, rows) for t in self.v]
