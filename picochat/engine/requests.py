"""What the scheduler (scheduler.py) exchanges with its callers, and what it keeps per running request:
a Request goes in, Events come out through its callback, and a _Running holds the row while it decodes."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Hashable, Optional

import torch

from ..errors import PicochatError
from .engine import PromptEmbeds, SamplingParams, _Row, _Text, new_constraint
from .sampling import Penalties, TokenLogprob


class QueueFull(PicochatError):
    """The scheduler's waiting queue is full; try again later."""


@dataclass
class Event:
    text: str                        # UTF-8-safe text delta (may be "")
    token_ids: list[int]
    finish_reason: Optional[str]     # "stop" | "length" | "cancelled" | "error" on the last event
    prompt_tokens: int
    completion_tokens: int
    error: Optional[str] = None
    cached_tokens: int = 0           # prompt tokens whose K/V were reused from an earlier request
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of token_ids, if the request asked


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams
    on_event: Callable[[Event], None]    # called from the scheduler thread
    id: int = field(default_factory=itertools.count().__next__)
    cancelled: bool = False
    client: Optional[str] = None       # who asked (API key name or address): fair sharing of the queue
    cache_scope: Hashable = None       # its prompt may reuse K/V only from requests of the same scope
    embeds: Optional[PromptEmbeds] = None  # e.g. a picture's image tokens at its <|image|> markers


class _Running:
    """A request in a slot: its row state, its own RNG and repetition-penalty set."""

    def __init__(self, req: Request, tokenizer, device, vocab_size: int):
        self.req = req
        self.row = _Row(list(req.prompt), _Text(tokenizer, tuple(req.params.stop_strings)),
                        new_constraint(req.params, tokenizer, vocab_size))
        self.gen = None
        if req.params.seed is not None:
            self.gen = torch.Generator(device=device).manual_seed(req.params.seed)
        self.penalties: Optional[Penalties] = None  # logit_bias, frequency/presence and repetition penalties
        self.prefilled = 0  # prompt tokens already in the cache
        self.slot = -1      # the slot its prompt is being written to (while admitting)
        self.cached = 0     # prompt tokens reused from a retained slot
        self.fed: list[int] = []  # generated tokens already run through the model (their K/V are cached)
        self.last_token = -1
        # what prefix reuse compares: ids, and at embedded positions the embedding's digest (engine.py)
        self.keys = list(req.prompt) if req.embeds is None else req.embeds.keys(req.prompt)


def _notify(req: Request, ev: Event) -> None:
    try:
        req.on_event(ev)
    except Exception:  # a broken callback (its client is gone) must not stop the others
        req.cancelled = True
