"""Grammar-constrained decoding: at every step, tokens that would break the grammar are masked out, so the
answer always parses (structured outputs: a JSON schema, or any JSON object).

    z_i <- -inf  for every token i the grammar does not allow next;   then sample as usual

The grammar engine is llguidance (the one llama.cpp, vLLM and SGLang use), made for exactly this: it
takes the tokenizer's byte strings and, per step, computes the set of tokens whose bytes keep the output
a prefix of some sentence of the grammar (~1 ms for a JSON schema, measured in benchmarks/structured.py).
Writing that by hand would be a parser generator and a token trie: a project of its own, not the point of
this one. picochat's tokenizer is tiktoken-based, which llguidance reads directly.

A Constraint is per row and stateful (it follows the tokens generated so far); the end-of-turn token is
allowed only where the grammar can end, and once the grammar is complete it is the only token allowed.

JSON numbers get at most MAX_DIGITS digits in a row (integral part, fraction, exponent each), as llama.cpp's
JSON grammars allow: a float64 holds no more, and without the cap a small model can fall into writing
digits until max_tokens ("32.000000000000000084476...", seen with SmolLM2 at temperature 0.7), so the
answer never parses. Digits inside strings are not limited.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from ..errors import PicochatError

_cache: dict = {}
_lock = threading.Lock()


def key_of(tokenizer, n_vocab: int, eos: Sequence[int]) -> tuple:
    return id(tokenizer), n_vocab, tuple(eos)


def _lltokenizer(tokenizer, n_vocab: int, eos: Sequence[int]):
    """llguidance's view of our tokenizer, built once per (tokenizer, vocabulary, end tokens): ~1 s."""
    key = key_of(tokenizer, n_vocab, eos)
    with _lock:
        if key not in _cache:
            from llguidance.tiktoken import lltokenizer_from_encoding
            _cache[key] = (tokenizer, lltokenizer_from_encoding(tokenizer._enc, n_vocab=n_vocab, eos_token=list(eos)))
        return _cache[key][1]


@dataclass(frozen=True)
class Grammar:
    """An llguidance grammar (its JSON or Lark text); json: it is a JSON schema's (numbers are capped).
    compiled: a matcher check_grammar built (in the caller's thread), copied for each row, so the model's
    thread never compiles a grammar (a large schema takes a noticeable fraction of a second)."""
    source: str
    json: bool = False
    compiled: object = field(default=None, compare=False, repr=False)


# One space after ":" and ",", as Python's json.dumps writes it (the commonest JSON a model has read: SmolLM2
# looped more often on compact JSON), and no other whitespace (else a small model may pad with spaces or
# newlines until max_tokens)
JSON_STYLE = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}


def json_schema_grammar(schema: Optional[dict]) -> Grammar:
    """An llguidance grammar for JSON values valid under `schema` (None: any JSON object), in JSON_STYLE."""
    from llguidance import LLMatcher
    if schema is None:
        schema = {"type": "object"}
    try:
        return Grammar(LLMatcher.grammar_from_json_schema(schema, defaults=JSON_STYLE), json=True)
    except ValueError as e:
        raise PicochatError(f"not a usable JSON schema: {e}") from None


def check_grammar(grammar: Grammar, tokenizer, n_vocab: int, eos: Sequence[int]) -> None:
    """Raise PicochatError with llguidance's reason if the grammar cannot be compiled (before any generation);
    else keep the compiled matcher in `grammar`, which each row's Constraint then copies."""
    from llguidance import LLMatcher
    matcher = LLMatcher(_lltokenizer(tokenizer, n_vocab, eos), grammar.source, log_level=0)
    if matcher.is_error():
        raise PicochatError(f"the grammar cannot be compiled: {matcher.get_error()}")
    object.__setattr__(grammar, "compiled", (key_of(tokenizer, n_vocab, eos), matcher))


MAX_DIGITS = 16


def _leading_digits(tokenizer, n_vocab: int) -> torch.Tensor:
    """(V,) how many ASCII digits each token's bytes start with (0 for ids the tokenizer lacks)."""
    key = ("digits", id(tokenizer), n_vocab)
    with _lock:
        if key not in _cache:
            out = torch.zeros(n_vocab, dtype=torch.int16)
            for i in range(min(n_vocab, tokenizer.vocab_size)):
                try:
                    b = tokenizer.token_bytes(i)
                except PicochatError:  # (a gap in the ids)
                    continue
                out[i] = len(b) - len(b.lstrip(b"0123456789"))
            _cache[key] = (tokenizer, out)
        return _cache[key][1]


class Constraint:
    """One row's grammar state: allowed() is the mask of the next token, advance(t) follows the token."""

    def __init__(self, grammar: Grammar, tokenizer, n_vocab: int, eos: Sequence[int]):
        from llguidance import LLMatcher
        self.n_vocab, self.tokenizer = n_vocab, tokenizer
        if grammar.compiled is not None and grammar.compiled[0] == key_of(tokenizer, n_vocab, eos):
            self.matcher = grammar.compiled[1].deep_copy()  # (compiled by check_grammar, off this thread)
        else:
            self.matcher = LLMatcher(_lltokenizer(tokenizer, n_vocab, eos), grammar.source, log_level=0)
        if self.matcher.is_error():
            raise PicochatError(f"the grammar cannot be compiled: {self.matcher.get_error()}")
        self._bits = torch.arange(32, dtype=torch.int32)
        self.digits = _leading_digits(tokenizer, n_vocab) if grammar.json else None
        self.in_string = self.escaped = False
        self.run = 0  # digits in a row outside strings

    def allowed(self) -> torch.Tensor:
        """(V,) bool: the tokens that keep the output inside the grammar (the end token where it may end)."""
        packed = torch.frombuffer(bytearray(self.matcher.compute_bitmask()), dtype=torch.int32)  # (ceil(V/32),)
        keep = ((packed.unsqueeze(-1) >> self._bits) & 1).flatten()[:self.n_vocab].bool()
        if self.digits is not None and not self.in_string:
            capped = keep & ~((self.digits > 0) & (self.digits > MAX_DIGITS - self.run))
            if bool(capped.any()):  # (a grammar that needs more digits keeps its own mask)
                keep = capped
        return keep

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise PicochatError(f"token {token} breaks the grammar: {self.matcher.get_error()}")
        if self.digits is not None:
            for c in self.tokenizer.token_bytes(token):
                if self.in_string:
                    self.in_string = self.escaped or c != 0x22  # an unescaped quote ends it
                    self.escaped = not self.escaped and c == 0x5C
                else:
                    self.in_string = c == 0x22
                    self.run = self.run + 1 if 0x30 <= c <= 0x39 else 0

    @property
    def complete(self) -> bool:
        """The output is a whole sentence of the grammar and nothing may follow."""
        return self.matcher.is_stopped()

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """(1, V) or (V,) logits with every disallowed token at -inf."""
        keep = self.allowed().to(logits.device)
        return logits.masked_fill(~keep, float("-inf"))
