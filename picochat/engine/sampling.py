"""Turning logits into the next token: temperature, top-k, top-p (nucleus), min-p and greedy decoding.

    p_i = softmax(z / tau)_i;  top-k keeps the k largest z_i;  top-p keeps the smallest set whose
    probabilities sum to at least p (Holtzman et al. 2020);  min-p keeps tokens with p_i >= min_p * max_j p_j
    (Nguyen et al. 2024);  tau = 0 means argmax (greedy), and so does any tau < GREEDY_BELOW.
    Before all of that, on the raw logits and in this order (class Penalties):
      logit_bias (OpenAI's): z_i + b_i for the listed token ids, b_i in [-100, 100];
      frequency and presence penalties (OpenAI's definitions, over the tokens generated so far, not the
      prompt): z_i - c_i * alpha_frequency - [c_i > 0] * alpha_presence, c_i = times token i was generated;
      repetition penalty (CTRL, Keskar et al. 2019), over prompt and generated tokens: z_i / r if z_i > 0
      else z_i * r, so r > 1 always makes them less likely.
    So all three are divided by the temperature like the logits they change (as vLLM applies them).
Logprobs (token_logprobs) are those of the distribution a token was actually drawn from: log softmax of
the penalised logits over tau, with top-k / top-p / min-p applied and renormalised; under greedy decoding
(which draws nothing), of the penalised logits at tau = 1, whose argmax is the pick.

Sampling never produces NaN, whatever the knobs: NaN logits count as -inf, and a row with +inf logits
(a tiny repetition penalty overflows float32) samples among those tokens only, the limit of softmax.
A row with nothing left to sample (every logit -inf or NaN: a broken model) raises `Unsampleable`
naming the rows, so a batch can fail that row alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import PicochatError

# A temperature below this is greedy (vLLM's _SAMPLING_EPS is the same 1e-5): softmax(z / tau) is
# already one-hot in float32 there, and far below it z / tau overflows (1e-300 gave inf - inf = NaN).
GREEDY_BELOW = 1e-5


class Unsampleable(PicochatError):
    """Some rows have no token left to sample (every logit is -inf or NaN)."""

    def __init__(self, rows: list[int]):
        super().__init__(f"no token can be sampled for row(s) {rows}: every logit is -inf or NaN")
        self.rows = rows


def check_sampling(temperature: float, top_k: Optional[int], top_p: Optional[float],
                   min_p: Optional[float] = None, repetition_penalty: Optional[float] = None,
                   frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
                   logit_bias: tuple = (), logprobs: Optional[int] = None) -> None:
    # written as "not (x in range)" so that NaN, which fails every comparison, is refused too
    if not 0 <= temperature < math.inf:
        raise PicochatError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 0:
        raise PicochatError(f"top_k must be >= 1 (or 0 for off), got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise PicochatError(f"top_p must be in (0, 1], got {top_p}")
    if min_p is not None and not 0.0 <= min_p <= 1.0:
        raise PicochatError(f"min_p must be in [0, 1] (0 = off), got {min_p}")
    if repetition_penalty is not None and not 0 < repetition_penalty < math.inf:
        raise PicochatError(f"repetition_penalty must be > 0 (1 = off), got {repetition_penalty}")
    for name, v in (("frequency_penalty", frequency_penalty), ("presence_penalty", presence_penalty)):
        if not -2.0 <= v <= 2.0:
            raise PicochatError(f"{name} must be in [-2, 2] (0 = off), got {v}")
    if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
        raise PicochatError(f"logprobs (alternatives per token) must be in [0, {MAX_TOP_LOGPROBS}], got {logprobs}")
    for tok, b in logit_bias:
        if tok < 0 or not -100.0 <= b <= 100.0:
            raise PicochatError(f"logit_bias maps token ids >= 0 to biases in [-100, 100], got {tok}: {b}")


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: Optional[float]) -> torch.Tensor:
    """CTRL penalty on tokens already present. logits (B, V); seen (B, V) bool, True for tokens in the context."""
    if penalty is None or penalty == 1.0:
        return logits
    # dividing a negative logit would *raise* its probability, hence the two cases
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


class Penalties:
    """What changes a batch's raw logits before sampling: logit_bias, frequency/presence penalties and the
    repetition penalty (the module docstring has the formulas). Holds per row what they need: the tokens in
    the context (repetition) and the counts of generated tokens (frequency/presence). Nothing is held,
    and apply() returns the logits untouched, for the penalties that are off."""

    def __init__(self, sp, prompts: list[list[int]], vocab_size: int, device):
        B, V = len(prompts), vocab_size
        self.sp = sp
        self.seen = self.counts = self.bias = None
        if sp.repetition_penalty not in (None, 1.0):
            self.seen = torch.zeros(B, V, dtype=torch.bool, device=device)  # (B, V)
            for i, p in enumerate(prompts):
                self.seen[i, torch.tensor(p, device=device)] = True
        if sp.frequency_penalty or sp.presence_penalty:
            self.counts = torch.zeros(B, V, device=device)  # (B, V): the prompt does not count (OpenAI's rule)
        if sp.logit_bias:
            ids = [t for t, _ in sp.logit_bias]
            if max(ids) >= V:
                raise PicochatError(f"logit_bias names token {max(ids)}, but the vocabulary has {V} tokens")
            self.bias = torch.zeros(V, device=device)
            self.bias[torch.tensor(ids, device=device)] = torch.tensor([b for _, b in sp.logit_bias], device=device)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (B, V) float -> adjusted logits (B, V)."""
        if self.bias is not None:
            logits = logits + self.bias
        if self.counts is not None:
            logits = logits - self.counts * self.sp.frequency_penalty - (self.counts > 0) * self.sp.presence_penalty
        if self.seen is not None:
            logits = apply_repetition_penalty(logits, self.seen, self.sp.repetition_penalty)
        return logits

    def update(self, tokens: torch.Tensor) -> None:
        """Each row's newly generated token (B,)."""
        rows = torch.arange(tokens.numel(), device=tokens.device)
        if self.seen is not None:
            self.seen[rows, tokens] = True
        if self.counts is not None:
            self.counts[rows, tokens] += 1

    def keep(self, sel: torch.Tensor) -> None:
        """Only the rows sel (indices) go on."""
        self.seen = None if self.seen is None else self.seen[sel]
        self.counts = None if self.counts is None else self.counts[sel]


def filter_logits(logits: torch.Tensor, top_k: Optional[int] = None, top_p: Optional[float] = None,
                  min_p: Optional[float] = None) -> torch.Tensor:
    """Set the logits outside top-k / top-p / min-p to -inf. logits: (B, V)."""
    if top_k:
        k = min(top_k, logits.size(-1))
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        logits = _top_p(logits, top_p)
    if min_p:
        # p_i >= min_p * p_max  <=>  z_i >= z_max + log(min_p): no softmax needed
        z_max = logits.amax(dim=-1, keepdim=True)
        logits = logits.masked_fill(logits < z_max + math.log(min_p), float("-inf"))
    return logits


# how a seed becomes tokens: 2 = inverse transform draws (1 was torch.multinomial); the server's
# system_fingerprint names it, so a client can tell a seed may give another answer than before
SAMPLER_VERSION = 2

# top-p looks at the most likely TOP_P_CANDIDATES tokens first: sorting a whole 49k vocabulary costs ~1.8 ms a
# row on the project's CPU, topk(128) ~0.07 ms, and a nucleus is nearly always smaller than that; a row
# whose nucleus is larger (a flat distribution) is sorted whole
TOP_P_CANDIDATES = 128


def _top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """logits (..., V) with every token outside each row's nucleus set to -inf."""
    if logits.dim() != 2:
        return _top_p(logits.reshape(-1, logits.size(-1)), top_p).view(logits.shape)
    k = min(TOP_P_CANDIDATES, logits.size(-1))
    top, order = torch.topk(logits, k, dim=-1)  # (B, k), most likely first
    probs = torch.softmax(logits, dim=-1).gather(-1, order)
    out, mass = _keep_nucleus(logits, top, order, probs, top_p)
    short = (mass < top_p).nonzero().flatten()  # the nucleus is not within the k candidates: sort the row whole
    if short.numel():
        ranked, order = torch.sort(logits[short], descending=True, dim=-1)
        out[short] = _keep_nucleus(logits[short], ranked, order, torch.softmax(ranked, dim=-1), top_p)[0]
    return out


def _keep_nucleus(logits, ranked, order, probs, top_p: float):
    """ranked: logits in descending order (all, or the first k), order: their ids, probs: their probabilities
    -> (logits with only the nucleus among them kept, the probability mass the ranked ones hold)."""
    before = probs.cumsum(dim=-1) - probs
    drop = before >= top_p  # the tokens ranked above it already reach top_p (the top one always stays)
    drop[..., 0] = False  # even when top_p rounds to 0 in float32 (1e-300 did, dropping every token)
    kept = torch.full_like(logits, float("-inf")).scatter(-1, order, ranked.masked_fill(drop, float("-inf")))
    return kept, before[:, -1] + probs[:, -1]


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None, generator: Optional[torch.Generator] = None,
                min_p: Optional[float] = None) -> torch.Tensor:
    """logits (B, V) -> next ids (B,). Apply Penalties before, if wanted."""
    return draw(next_distribution(logits, temperature, top_k, top_p, min_p), temperature, generator)


def next_distribution(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                      top_p: Optional[float] = None, min_p: Optional[float] = None) -> torch.Tensor:
    """The logits the next token is drawn from, (B, V): z / tau with top-k / top-p / min-p applied (-inf
    outside), so log_softmax of them is the distribution actually sampled from. Greedy (tau ~ 0): the
    logits at tau = 1, unfiltered; their argmax is the pick and their log_softmax the model's own logprobs."""
    logits = sanitize_logits(logits.float())
    if temperature < GREEDY_BELOW:
        return logits
    return sanitize_logits(filter_logits(logits / temperature, top_k, top_p, min_p))


def draw(z: torch.Tensor, temperature: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next ids (B,) from next_distribution's logits: argmax if greedy, else a sample of softmax(z)."""
    if temperature < GREEDY_BELOW:
        return z.argmax(dim=-1)
    # inverse transform sampling: the first token whose cumulative probability passes u ~ U[0, total).
    # torch.multinomial draws from the same distribution ~40x slower at a 49k vocabulary (19 ms against
    # 0.5 for 16 rows on the project's CPU, where a 16-row serving step takes ~100 ms)
    probs = torch.softmax(z.float(), dim=-1)
    cdf = probs.cumsum(dim=-1)  # (B, V)
    u = torch.rand(z.size(0), 1, generator=generator, device=z.device, dtype=cdf.dtype) * cdf[:, -1:]
    # right=True: c > u, so a token of probability 0 (its c equals the one before) is never the first
    picks = torch.searchsorted(cdf, u, right=True).clamp_(max=z.size(-1) - 1)  # (B, 1)
    # u rounded up to the total (one in ~2^24 draws), or a NaN row, which multinomial refuses (Unsampleable's
    # callers sanitize first; a row that still gets here must fail, not yield a token)
    bad = ~(probs.gather(-1, picks).squeeze(-1) > 0)
    if bool(bad.any()):
        picks[bad] = torch.multinomial(probs[bad], 1, generator=generator)
    return picks.squeeze(-1)


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the distribution it was drawn from, and the `top` most
    likely tokens of that distribution as (id, logprob), most likely first (tokens outside top-k / top-p,
    whose probability is 0, are never listed)."""
    token: int
    logprob: float
    top: list[tuple[int, float]]


MAX_TOP_LOGPROBS = 20


def token_logprobs(z: torch.Tensor, chosen: torch.Tensor, n_top: int) -> list[TokenLogprob]:
    """z (B, V) from next_distribution, chosen (B,) the drawn ids -> one TokenLogprob per row."""
    lp = torch.log_softmax(z, dim=-1)  # (B, V)
    picked = lp.gather(-1, chosen.view(-1, 1)).squeeze(-1).tolist()
    if n_top > 0:
        vals, ids = torch.topk(lp, min(n_top, lp.size(-1)), dim=-1)  # (B, n_top), sorted descending
        tops = [[(i, v) for i, v in zip(ri, rv) if v != float("-inf")] for ri, rv in zip(ids.tolist(), vals.tolist())]
    else:
        tops = [[] for _ in picked]
    return [TokenLogprob(t, p, top) for t, p, top in zip(chosen.tolist(), picked, tops)]


def sanitize_logits(logits: torch.Tensor) -> torch.Tensor:
    """(B, V) float logits -> logits softmax can take: NaN -> -inf; a row holding +inf keeps only its
    +inf entries (at 0, the others -inf: softmax's limit, uniform over them). Raises Unsampleable for
    rows that are all -inf."""
    # the usual case in one pass: each row's max is finite, so no entry is NaN (amax propagates it) or +inf
    # and some entry is not -inf; the -inf that top-k / top-p put in stay as they are. The full path's five
    # passes over (B, V) took ~0.7 ms of a batch-8 decode step at a 49k vocabulary.
    if bool(torch.isfinite(logits.amax(dim=-1)).all()):
        return logits
    logits = logits.nan_to_num(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    pos = torch.isposinf(logits)
    if bool(pos.any()):
        rows = pos.any(dim=-1, keepdim=True)
        logits = torch.where(rows, torch.where(pos, 0.0, float("-inf")), logits)
    dead = torch.isneginf(logits).all(dim=-1)
    if bool(dead.any()):
        raise Unsampleable(dead.nonzero().flatten().tolist())
    return logits


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
