"""Turning logits into the next token: temperature, top-k, top-p (nucleus) and greedy decoding.

    p_i = softmax(z / tau)_i;  top-k keeps the k largest z_i;  top-p keeps the smallest set whose
    probabilities sum to at least p (Holtzman et al. 2020);  tau = 0 means argmax (greedy).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..errors import PicochatError


def check_sampling(temperature: float, top_k: Optional[int], top_p: Optional[float]) -> None:
    if temperature < 0:
        raise PicochatError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 0:
        raise PicochatError(f"top_k must be >= 1 (or 0 for off), got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise PicochatError(f"top_p must be in (0, 1], got {top_p}")


def filter_logits(logits: torch.Tensor, top_k: Optional[int] = None, top_p: Optional[float] = None) -> torch.Tensor:
    """Set the logits outside top-k / top-p to -inf. logits: (B, V)."""
    if top_k:
        k = min(top_k, logits.size(-1))
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the top one always stays)
        drop = probs.cumsum(dim=-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """logits (B, V) -> next ids (B,)."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits / temperature, top_k, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class Utf8Stream:
    """Accumulate token bytes and release only complete UTF-8 characters.

    A byte-level BPE token can end in the middle of a multi-byte character (an emoji is 4 bytes,
    often 2-3 tokens); printing it eagerly would show replacement characters. We hold back an
    incomplete tail of at most 3 bytes until the next token completes it.
    """

    def __init__(self):
        self.pending = b""

    def push(self, data: bytes) -> str:
        self.pending += data
        cut = len(self.pending)
        # walk back over at most 3 trailing bytes to find the start of a possibly incomplete char
        for back in range(1, min(4, len(self.pending)) + 1):
            b = self.pending[-back]
            if b & 0xC0 == 0x80:  # continuation byte: keep looking for the lead byte
                continue
            need = 2 if b & 0xE0 == 0xC0 else 3 if b & 0xF0 == 0xE0 else 4 if b & 0xF8 == 0xF0 else 1
            if need > back:
                cut = len(self.pending) - back
            break
        text, self.pending = self.pending[:cut].decode("utf-8", errors="replace"), self.pending[cut:]
        return text

    def flush(self) -> str:
        text, self.pending = self.pending.decode("utf-8", errors="replace"), b""
        return text
