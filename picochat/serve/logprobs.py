"""Log-probabilities in OpenAI's two shapes: chat's `logprobs.content` (per token: token, logprob, bytes,
top_logprobs) and the legacy completions' `logprobs` (tokens, token_logprobs, top_logprobs, text_offset).

The numbers are the engine's (sampling.token_logprobs): of the distribution each token was actually drawn
from, after logit_bias and the penalties, over the temperature, with top-k / top-p / min-p applied and
renormalised; at temperature 0, of the penalised logits at temperature 1. So at temperature 1 with no
other knob they are the model's own log softmax.

Streaming: a chunk carries the logprobs of the tokens whose text it brings. A token can bring no text yet
(half a UTF-8 character, or the possible start of a stop string); its logprob waits for the next chunk
with text, or the last one, so that joining the chunks gives exactly the non-streamed list.
"""
from __future__ import annotations

from typing import Optional

from ..engine.sampling import TokenLogprob, Utf8Stream


def _entry(tok, i: int, lp: float) -> dict:
    b = tok.token_bytes(i)
    return {"token": b.decode("utf-8", errors="replace"), "logprob": lp, "bytes": list(b)}


def chat_content(tok, lps: list[TokenLogprob]) -> list[dict]:
    """Chat's logprobs.content entries (ChatCompletionTokenLogprob)."""
    return [_entry(tok, t.token, t.logprob) | {"top_logprobs": [_entry(tok, i, v) for i, v in t.top]} for t in lps]


def chat_logprobs(tok, lps: Optional[list[TokenLogprob]]) -> Optional[dict]:
    return None if lps is None else {"content": chat_content(tok, lps), "refusal": None}


def completion_logprobs(tok, lps: Optional[list[TokenLogprob]], offset: int = 0) -> Optional[dict]:
    """The completions shape. text_offset: where each token's text starts in the choice's text, counting
    from `offset` (where these tokens' text starts); a special token (markup, never in the text) and the
    second half of a split character add no characters. top_logprobs always holds the chosen token too
    (OpenAI's "up to logprobs + 1 elements")."""
    if lps is None:
        return None
    special = set(tok.special_tokens.values())
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    text = Utf8Stream()
    for t in lps:
        raw = tok.token_bytes(t.token)
        name = raw.decode("utf-8", errors="replace")
        out["tokens"].append(name)
        out["token_logprobs"].append(t.logprob)
        top = {tok.token_bytes(i).decode("utf-8", errors="replace"): v for i, v in t.top}
        out["top_logprobs"].append(top | {name: t.logprob})
        out["text_offset"].append(offset)
        if t.token not in special:
            offset += len(text.push(raw))
    return out


class Pending:
    """Per choice, the logprobs of streamed tokens whose text has not been sent yet."""

    def __init__(self, n: int, wanted: bool):
        self.wanted = wanted
        self.held: list[list[TokenLogprob]] = [[] for _ in range(n)]
        self.offset = [0] * n  # completions: characters of text sent so far

    def take(self, i: int, new: list[TokenLogprob], release: bool) -> Optional[list[TokenLogprob]]:
        """Add a chunk's logprobs; if release (the chunk brings text or ends the choice), return all held."""
        if not self.wanted:
            return None
        self.held[i] += new
        if not release:
            return None
        out, self.held[i] = self.held[i], []
        return out
