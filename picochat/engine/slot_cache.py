"""A KV cache with one slot per running sequence, for continuous batching.

Unlike `KVCache` (all rows share one column counter and ragged rows are left-padded), every slot here
has its own length: column c of slot b holds the K/V of that sequence's position c. A sequence can
therefore join a running batch at any step, and leave it, without touching the others:

    join:   prefill the prompt straight into a free slot (columns 0..L-1)
    step:   rows 0..n-1 each write their new K/V at their own column, attention masks keys > length
    leave:  the last running row is copied into the freed slot, so rows 0..n-1 stay contiguous and
            the decode step runs on plain views (no gather of the cache every step)
    reuse:  a finished sequence's K/V stays in a free slot, remembered with its tokens; the next turn of
            that conversation (same tokens, plus the answer, plus a new question) copies the shared
            prefix instead of recomputing it. A growing batch takes those slots back first.
            A kept prefix carries its request's scope (who made it: an API key, a conversation) and
            is reused only by requests of the same scope: whether a prompt's prefix is cached, which
            shows in cached_tokens and in the time to the first token, must not tell one client
            what another one wrote. The "tokens" compared are keys (engine.PromptEmbeds.keys): an
            embedded position (an image token) is its embedding's digest, not its marker id, so a
            picture's K/V are offered only to a prompt holding the same picture at the same place.
"""
from __future__ import annotations

from typing import Hashable, Optional

import torch

from ..errors import PicochatError
from ..model.attention import causal_mask
from .kv_cache import cache_dtype, grow_columns, new_stores


class SlotCache:
    def __init__(self, n_layer: int, slots: int, n_kv_head: int, head_dim: int, max_len: int,
                 capacity: int = 256, dtype: torch.dtype = torch.float32, device=None):
        self.n_layer, self.slots, self.max_len = n_layer, slots, max_len
        capacity = min(capacity, max_len)
        shape = (slots, n_kv_head, capacity, head_dim)  # (S, nkv, T_max, hs)
        self.k = new_stores(n_layer, shape, dtype, device)
        self.v = new_stores(n_layer, shape, dtype, device)
        self.lengths = [0] * slots  # filled columns per slot
        self.n = 0                  # running rows: slots 0..n-1
        self.device = device
        self._len_t = None          # (n,) lengths as a tensor during one decode step
        self._rows = None           # arange(n), and T_k = longest length + 1, for the same step
        self._T_k = 0
        self.retained: dict[int, list[int]] = {}  # free slot -> the tokens whose K/V it still holds
        self.scopes: dict[int, Hashable] = {}     # free slot -> the scope of the request that left them
        self._age = 0
        self._used: dict[int, int] = {}           # slot -> when it was last retained or reused (LRU)

    @classmethod
    def for_model(cls, model, slots: int, max_len: int | None = None, compiled: bool = False) -> "SlotCache":
        """compiled: for the compiled decode step (kv_cache.cache_dtype)."""
        c, p = model.config, next(model.parameters())
        return cls(c.n_layer, slots, c.n_kv_head, c.head_dim, min(max_len or c.block_size, c.block_size),
                   dtype=cache_dtype(model, compiled), device=p.device)

    @property
    def capacity(self) -> int:
        return self.k[0].size(2)

    def set_dtype(self, dtype: torch.dtype) -> None:
        """Store K/V in `dtype` from now on (the decode step changed: kv_cache.cache_dtype); kept rows stay."""
        if self.k[0].dtype != dtype:
            grow_columns((self.k, self.v), self.capacity, keep=self.capacity, dtype=dtype)

    def reserve(self, n: int) -> None:
        """Room for n columns in every slot, and one spare; grows geometrically, never past max_len (+ 1).
        The spare: the compiled steps (engine/compiled.py) read the first T_k = n columns, and dynamo
        gives T_k == capacity a graph of its own, compiled on the spot (20-60 s in the middle of serving,
        once a process: measured on both steps before the spare)."""
        if n < self.capacity:
            return
        if n > self.max_len:
            raise PicochatError(f"a sequence needs {n} positions but the cache holds at most {self.max_len}")
        grow_columns((self.k, self.v), min(self.max_len + 1, max(n + 1, 2 * self.capacity)), keep=self.capacity)

    # -- joining and leaving -------------------------------------------------------------------------

    def prefill_view(self, slot: int, start: int = 0) -> "_PrefillView":
        """A KVCache-like object that writes (a chunk of) a prompt into `slot` from column `start`."""
        return _PrefillView(self, slot, start)

    # -- prefix reuse ---------------------------------------------------------------------------------

    MIN_REUSE = 8  # shorter shared prefixes are not worth a copy

    def match(self, prompt: list[int], scope: Hashable = None) -> tuple[Optional[int], int]:
        """The retained slot of the same scope sharing the longest prefix with `prompt`, and that
        prefix's length (at most len(prompt) - 1: the last prompt token must run to give the next
        token's logits)."""
        best, best_len = None, 0
        for slot, tokens in self.retained.items():
            if self.scopes.get(slot) != scope:
                continue
            n = 0
            for a, b in zip(tokens, prompt):
                if a != b:
                    break
                n += 1
            if n > best_len:
                best, best_len = slot, n
        best_len = min(best_len, len(prompt) - 1)
        return (best, best_len) if best_len >= self.MIN_REUSE else (None, 0)

    def claim(self, slot: int, prompt: list[int], scope: Hashable = None) -> int:
        """Prepare `slot` (always the next free one, n) for `prompt`: reuse the best retained prefix
        of the same scope. Returns how many leading prompt tokens already have their K/V in the slot."""
        src, n = self.match(prompt, scope)
        if src is not None and src != slot:
            self.copy_slot(src, slot, n)
        self._forget(slot)  # a running sequence writes here from now on
        if src is not None:
            self._age += 1
            self._used[src] = self._age
        return n

    def _forget(self, slot: int) -> None:
        self.retained.pop(slot, None)
        self.scopes.pop(slot, None)

    def _retain(self, slot: int, tokens: list[int], busy: tuple[int, ...], scope: Hashable) -> None:
        """`slot` has just left the batch holding the K/V of `tokens`: remember it for reuse. It moves to
        the highest empty free slot if there is one (the next request is admitted at the lowest free
        slot, which evicts whatever is kept there), else over the least recently used kept slot,
        else it stays where it is."""
        if len(tokens) < self.MIN_REUSE:
            return
        free = [s for s in range(self.n, self.slots) if s not in busy]
        empty = [s for s in free if s not in self.retained and s != slot]
        kept = [s for s in free if s in self.retained and s != slot]
        target = max(empty) if empty else (min(kept, key=lambda s: self._used.get(s, 0)) if kept else slot)
        if target != slot:
            self.copy_slot(slot, target, len(tokens))
        self.retained[target] = list(tokens)
        self.scopes[target] = scope
        self._age += 1
        self._used[target] = self._age

    def move_partial(self, src: int, dst: int, length: int) -> None:
        """A half-prefilled prompt moves down to the next free slot (a running row left meanwhile)."""
        self._forget(dst)
        self.copy_slot(src, dst, length)

    def add_row(self, length: int) -> int:
        """Claim the next slot (its K/V already written by a prefill_view); returns its row."""
        row = self.n
        self.lengths[row] = length
        self.n += 1
        return row

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` columns of slot src into slot dst."""
        for store in (self.k, self.v):
            for t in store:
                t[dst, :, :length] = t[src, :, :length]

    def swap_rows(self, a: int, b: int) -> None:
        """Exchange two running rows' K/V and lengths (a row about to leave is swapped to the end)."""
        L = max(self.lengths[a], self.lengths[b])
        for store in (self.k, self.v):
            for t in store:
                tmp = t[a, :, :L].clone()
                t[a, :, :L] = t[b, :, :L]
                t[b, :, :L] = tmp
        self.lengths[a], self.lengths[b] = self.lengths[b], self.lengths[a]

    def pop_row(self, tokens: Optional[list[int]] = None, busy: tuple[int, ...] = (),
                scope: Hashable = None) -> None:
        """The last running row leaves; with `tokens` (what its K/V hold) it is kept for reuse by
        requests of the same `scope`. busy: a slot that must not be touched (a prompt being prefilled there)."""
        self.n -= 1
        last = self.n
        self.lengths[last] = 0
        if tokens is not None:
            self._retain(last, tokens, busy, scope)

    def clear(self) -> None:
        """Forget every row and every kept prefix (after a failure: nothing in the slots is trusted)."""
        self.n, self.lengths, self.retained, self.scopes = 0, [0] * self.slots, {}, {}

    # -- one decode step -----------------------------------------------------------------------------

    def step_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (n, 1) and attention mask (n, 1, 1, T_k) for one new token per running row."""
        lens = self.lengths[:self.n]
        self._T_k = max(lens) + 1
        self.reserve(self._T_k)
        self._len_t = torch.tensor(lens, dtype=torch.long, device=self.device)
        self._rows = torch.arange(self.n, device=self.device)
        keys = torch.arange(self._T_k, device=self.device)
        mask = keys[None, :] <= self._len_t[:, None]  # a row sees its own past and the new token
        return self._len_t.view(-1, 1), mask.view(self.n, 1, 1, -1)

    def chunk_inputs(self, slot: int, start: int, T: int):
        """A compiled prompt chunk's (compiled.prefill_step) positions = columns (1, T), causal mask
        (1, 1, T, start + T) and the K/V stores of `slot` alone (views), for T tokens written from `start`."""
        self.reserve(start + T)
        cols = torch.arange(start, start + T, device=self.device).view(1, T)
        mask = causal_mask(T, start + T, self.device).view(1, 1, T, start + T)  # its past and itself
        return cols, mask, [t[slot:slot + 1] for t in self.k], [t[slot:slot + 1] for t in self.v]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """k, v: (n, nkv, 1, hs), written at each row's own column; returns (n, nkv, T_k, hs) views."""
        n, T_k = k.size(0), self._T_k
        # (n, nkv, hs): advanced indices first; cast, as index_put takes no other dtype (a bf16 cache)
        self.k[layer][self._rows, :, self._len_t] = k[:, :, 0].to(self.k[layer].dtype)
        self.v[layer][self._rows, :, self._len_t] = v[:, :, 0].to(self.v[layer].dtype)
        if layer == self.n_layer - 1:
            for i in range(n):
                self.lengths[i] += 1
        return self.k[layer][:n, :, :T_k], self.v[layer][:n, :, :T_k]

    def advance(self) -> None:
        """Every running row gained one column outside update() (the compiled decode step wrote it)."""
        for i in range(self.n):
            self.lengths[i] += 1


class _PrefillView:
    """Duck-types KVCache.update for a prompt written into one slot (batch of one, columns 0..T-1)."""

    def __init__(self, cache: SlotCache, slot: int, start: int = 0):
        self.cache, self.slot, self.pos = cache, slot, start

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        c, T = self.cache, k.size(2)
        end = self.pos + T
        c.reserve(end)
        c.k[layer][self.slot:self.slot + 1, :, self.pos:end] = k
        c.v[layer][self.slot:self.slot + 1, :, self.pos:end] = v
        if layer == c.n_layer - 1:
            self.pos = end
        return c.k[layer][self.slot:self.slot + 1, :, :end], c.v[layer][self.slot:self.slot + 1, :, :end]
