"""Batched, streaming generation with a KV cache: prefill the prompt once, then one token per step.

    prefill:  logits, cache = model(prompt)                 one forward over all prompt tokens
    decode:   logits = model(last_token, cache)             one token per row per step, O(T) each

Ragged batches are left-padded so that every row's newest token sits in the same cache column; each
row gets its own positions (pos = column - pad) and a mask that hides its padding. Rows stop
independently (stop token, stop string, max_tokens, or the model's context) and leave the batch.

A batch of one keeps its cache between calls: when the next prompt extends the tokens the cache holds
(the next turn of a chat), only the new suffix is prefilled. Not thread-safe: one Engine per worker.

A prompt may carry embeddings for some of its positions (PromptEmbeds: a picture's N image tokens at its
<|image|> markers), placed at prefill. K/V are reused only for an identical prefix of *keys*: a token's
id, or for an embedded position the digest of its embedding, so one picture's K/V never serve another's.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Hashable, Iterator, Optional

import torch

from ..errors import PicochatError
from .compiled import decoder_for
from .grammar import Constraint, Grammar
from .kv_cache import KVCache, cache_dtype
from .sampling import Penalties, TokenLogprob, Utf8Stream, check_sampling, draw, next_distribution, token_logprobs


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0          # 0 = greedy
    top_k: Optional[int] = None       # None or 0 = off
    top_p: Optional[float] = None
    min_p: Optional[float] = None     # keep tokens with p >= min_p * p_max
    repetition_penalty: Optional[float] = None  # CTRL-style, over prompt and generated tokens; 1 = off
    frequency_penalty: float = 0.0    # OpenAI's, over generated tokens: - count * alpha
    presence_penalty: float = 0.0     # OpenAI's, over generated tokens: - [count > 0] * alpha
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    seed: Optional[int] = None
    stop_token_ids: tuple[int, ...] = ()  # ends the row; the token itself is not part of the output
    stop_strings: tuple[str, ...] = ()    # ends the row; the text is cut before the match
    logprobs: Optional[int] = None    # None: off; k: each token's logprob and the k likeliest alternatives
    grammar: Optional[Grammar] = None  # a grammar the output must follow (grammar.py: structured output)

    def check(self) -> None:
        check_sampling(self.temperature, self.top_k, self.top_p, self.min_p, self.repetition_penalty,
                       self.frequency_penalty, self.presence_penalty, self.logit_bias, self.logprobs)
        if self.max_tokens < 0:
            raise PicochatError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if any(not s for s in self.stop_strings):
            raise PicochatError("stop strings must be non-empty")


@dataclass
class PromptEmbeds:
    """Embeddings placed at some prompt positions instead of their tokens' (GPT.forward's embeds):
    positions, sorted prompt indices; values (len(positions), d), the rows in that order."""
    positions: list[int]
    values: torch.Tensor
    _digests: Optional[list[bytes]] = field(default=None, repr=False)

    def __post_init__(self):
        self.positions = [int(p) for p in self.positions]
        if self.values.dim() != 2 or self.values.size(0) != len(self.positions):
            raise PicochatError(f"{len(self.positions)} embedded positions need values of shape "
                                f"({len(self.positions)}, d), got {tuple(self.values.shape)}")
        if any(b <= a for a, b in zip(self.positions, self.positions[1:])) or min(self.positions, default=0) < 0:
            raise PicochatError("embedded positions must be distinct, sorted and >= 0")

    @classmethod
    def at_markers(cls, prompt: list[int], marker_id: int, values: torch.Tensor) -> "PromptEmbeds":
        """values' rows, in order, at the prompt's marker tokens (a picture's N tokens per <|image|> run)."""
        positions = [i for i, t in enumerate(prompt) if t == marker_id]
        if len(positions) != values.size(0):
            raise PicochatError(f"the prompt has {len(positions)} image marker tokens but {values.size(0)} image "
                                "embeddings were given for them")
        return cls(positions, values)

    def check(self, prompt_len: int, width: int) -> None:
        if self.positions and self.positions[-1] >= prompt_len:
            raise PicochatError(f"an embedded position ({self.positions[-1]}) is past the prompt's {prompt_len} tokens")
        if self.values.size(1) != width:
            raise PicochatError(f"embeddings of width {self.values.size(1)} for a model of width {width}")

    def keys(self, prompt: list[int]) -> list[Hashable]:
        """What prefix reuse compares: the ids, with each embedded position's id replaced by a digest of its
        embedding (two pictures' markers are the same ids; their K/V are not interchangeable)."""
        if self._digests is None:
            rows = self.values.detach().to("cpu", torch.float32).contiguous().numpy()
            self._digests = [hashlib.blake2b(r.tobytes(), digest_size=16).digest() for r in rows]
        keys: list[Hashable] = list(prompt)
        for p, d in zip(self.positions, self._digests):
            keys[p] = ("embed", d)
        return keys

    def window(self, start: int, end: int, device=None) -> dict:
        """GPT.forward's embeds/embeds_mask for prompt[start:end] (a prefill chunk), or {} if none falls in it."""
        sel = [j for j, p in enumerate(self.positions) if start <= p < end]
        if not sel:
            return {}
        mask = torch.zeros(1, end - start, dtype=torch.bool, device=device)
        mask[0, [self.positions[j] - start for j in sel]] = True
        return {"embeds": self.values[sel[0]:sel[-1] + 1].to(device), "embeds_mask": mask}


def new_constraint(sp: SamplingParams, tokenizer, vocab_size: int) -> Optional[Constraint]:
    """A row's grammar state, if sp asks for one; its end is the row's stop tokens."""
    if sp.grammar is None:
        return None
    if tokenizer is None:
        raise PicochatError("a grammar needs a tokenizer (Engine(model, tokenizer))")
    return Constraint(sp.grammar, tokenizer, vocab_size, sp.stop_token_ids)


def _check_embeds(embeds, prompts: list[list[int]], model) -> list[Optional[PromptEmbeds]]:
    if embeds is None:
        return [None] * len(prompts)
    if len(embeds) != len(prompts):
        raise PicochatError(f"{len(embeds)} embeds for {len(prompts)} prompts: give one (or None) per prompt")
    for e, p in zip(embeds, prompts):
        if e is not None:
            e.check(len(p), model.config.n_embd)
    return list(embeds)


@dataclass
class GenerationResult:
    token_ids: list[int]   # generated tokens (a stop token is left out)
    text: str              # their text, cut before a stop string ("" without a tokenizer)
    finish_reason: str     # "stop" or "length"
    prompt_tokens: int
    stop_token: Optional[int] = None  # the stop token that ended the row, if one did (RL trains on it)
    logprobs: Optional[list[TokenLogprob]] = None  # one per token of token_ids, if SamplingParams.logprobs


@dataclass
class StreamChunk:
    text: str                                       # complete characters only; may be ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: Optional[str] = None             # set on the last chunk only
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of token_ids, if asked for


class _Text:
    """One row's text: UTF-8-safe, and holding back any tail that could be the start of a stop string."""

    def __init__(self, tokenizer, stop_strings: tuple[str, ...]):
        if stop_strings and tokenizer is None:
            raise PicochatError("stop strings need a tokenizer (Engine(model, tokenizer))")
        self.tokenizer, self.stops = tokenizer, stop_strings
        # special tokens are markup, not text: a generated <|user_end|> is never shown (vLLM's default)
        self.special = set(tokenizer.special_tokens.values()) if tokenizer is not None else set()
        self.longest = max((len(s) for s in stop_strings), default=0)
        self.utf8, self.text, self.emitted = Utf8Stream(), "", 0

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token; return (the text now safe to show, whether a stop string matched)."""
        if self.tokenizer is None or token in self.special:
            return "", False
        return self._add(self.utf8.push(self.tokenizer.token_bytes(token)))

    def finish(self) -> str:
        """The row ended without a stop-string match: release the held-back text."""
        if self.tokenizer is None:
            return ""
        delta, hit = self._add(self.utf8.flush())
        return delta if hit else delta + self._emit(len(self.text))

    def _add(self, new: str) -> tuple[str, bool]:
        before = len(self.text)
        self.text += new
        if self.stops:
            # a match must end in the new text, so it starts at most longest-1 characters before it
            start = max(0, before - self.longest + 1)
            hits = [i for s in self.stops if (i := self.text.find(s, start)) >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                return self._emit(len(self.text)), True
        hold = 0
        for k in range(min(self.longest - 1, len(self.text) - self.emitted), 0, -1):
            if any(s.startswith(self.text[-k:]) for s in self.stops):
                hold = k
                break
        return self._emit(len(self.text) - hold), False

    def _emit(self, upto: int) -> str:
        out, self.emitted = self.text[self.emitted:upto], max(self.emitted, upto)
        return out


class _Row:
    def __init__(self, prompt: list[int], text: _Text, constraint: Optional[Constraint] = None):
        self.prompt, self.tokens, self.text, self.constraint = prompt, [], text, constraint
        self.finish_reason: Optional[str] = None
        self.stop_token: Optional[int] = None
        self.logprobs: list[TokenLogprob] = []

    def push(self, token: int, sp: SamplingParams, block_size: int,
             logprob: Optional[TokenLogprob] = None) -> tuple[Optional[int], str]:
        """Record a sampled token (and its logprob, if asked for); returns (the token, or None if it was a
        stop token; text delta)."""
        if token in sp.stop_token_ids:
            self.finish_reason, self.stop_token = "stop", token
            return None, self.text.finish()
        self.tokens.append(token)
        if logprob is not None:
            self.logprobs.append(logprob)
        delta, hit = self.text.push(token)
        if self.constraint is not None:
            self.constraint.advance(token)
        if hit or (self.constraint is not None and self.constraint.complete):  # (the grammar's end: done)
            self.finish_reason = "stop"
            delta += "" if hit else self.text.finish()
        elif len(self.tokens) >= sp.max_tokens or len(self.prompt) + len(self.tokens) >= block_size:
            self.finish_reason = "length"
            delta += self.text.finish()
        return token, delta


class Engine:
    def __init__(self, model, tokenizer=None, fast: str = "auto"):
        """fast: the decode step's path (compiled.py): "auto" compiles it (in the background from now on;
        the first decode step waits for it) where the model and the machine allow; "compile" insists and
        waits now; "plain" never compiles."""
        self.model, self.tokenizer, self.fast = model, tokenizer, fast
        self.device = next(model.parameters()).device
        self.decoder = decoder_for(model, fast)
        self._cache: Optional[KVCache] = None  # batch-of-one cache, kept across calls
        self._ids: list[Hashable] = []         # the keys (PromptEmbeds.keys) of the tokens whose K/V self._cache holds
        self.last_prefill_tokens = 0           # tokens the last call actually ran through prefill

    def reset(self) -> None:
        """Drop the kept cache (e.g. after the model's weights changed)."""
        self._cache, self._ids = None, []

    def generate(self, prompts: list[list[int]], params: Optional[SamplingParams] = None,
                 embeds: Optional[list[Optional[PromptEmbeds]]] = None, **kwargs) -> list[GenerationResult]:
        """Complete every prompt; keyword arguments are SamplingParams fields (max_tokens, temperature, ...).
        embeds: one PromptEmbeds (or None) per prompt."""
        sp = params or SamplingParams(**kwargs)
        rows = []
        for rows, _ in self._run(prompts, sp, embeds=embeds):
            pass
        return [GenerationResult(r.tokens, r.text.text, r.finish_reason or "length", len(r.prompt), r.stop_token,
                                 None if sp.logprobs is None else r.logprobs) for r in rows]

    def stream(self, prompt_ids: list[int], params: Optional[SamplingParams] = None,
               embeds: Optional[PromptEmbeds] = None, **kwargs) -> Iterator[StreamChunk]:
        """One chunk per generated token, UTF-8-safe text; the last chunk carries finish_reason."""
        sp = params or SamplingParams(**kwargs)
        for rows, events in self._run([prompt_ids], sp, embeds=None if embeds is None else [embeds]):
            (_, token, delta), row = events[0], rows[0]
            yield StreamChunk(delta, [] if token is None else [token], row.finish_reason,
                              row.logprobs[-1:] if token is not None and sp.logprobs is not None else [])

    def generate_tokens(self, prompt_ids: list[int], params: Optional[SamplingParams] = None,
                        generator: Optional[torch.Generator] = None, embeds: Optional[PromptEmbeds] = None,
                        **kwargs) -> Iterator[int]:
        """Just the new token ids (no tokenizer needed); stops like stream()."""
        sp = params or SamplingParams(**kwargs)
        for _, events in self._run([prompt_ids], sp, generator, None if embeds is None else [embeds]):
            if events[0][1] is not None:
                yield events[0][1]

    # -- the loop ------------------------------------------------------------------------------------

    @torch.no_grad()
    def _run(self, prompts: list[list[int]], sp: SamplingParams, generator: Optional[torch.Generator] = None,
             embeds: Optional[list[Optional[PromptEmbeds]]] = None):
        """Yields (rows, events) once per decode step; events: (row index, token or None, text delta)
        for every row still running at that step."""
        sp.check()
        if self.decoder is not None and not self.decoder.fits(self.model):  # changed since: its guards do not look
            self.decoder = decoder_for(self.model, self.fast)
        block = self.model.config.block_size
        if not prompts:
            return
        for p in prompts:
            if not p:
                raise PicochatError("a prompt is empty: it needs at least one token (e.g. <|endoftext|>)")
            if len(p) >= block:
                raise PicochatError(f"the prompt is {len(p)} tokens but the model's context is {block}; "
                                    "shorten the prompt")
        embeds = _check_embeds(embeds, prompts, self.model)
        V = self.model.config.vocab_size
        rows = [_Row(list(p), _Text(self.tokenizer, tuple(sp.stop_strings)), new_constraint(sp, self.tokenizer, V))
                for p in prompts]
        if sp.max_tokens == 0:
            for r in rows:
                r.finish_reason = "length"
            yield rows, [(i, None, "") for i in range(len(rows))]
            return
        if generator is None and sp.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(sp.seed)
        shared = len(prompts) == 1
        if shared:
            cache, logits, pad = *self._prefill_shared(prompts[0], sp.max_tokens, embeds[0]), None
        else:
            cache, logits, pad = self._prefill_batch(prompts, sp.max_tokens, embeds)
        penalties = Penalties(sp, prompts, logits.size(-1), self.device)
        active = list(range(len(prompts)))  # row index of each batch row still running
        while True:
            last = penalties.apply(logits[:, -1, :].float())  # (B_active, V)
            if sp.grammar is not None:
                last = torch.stack([rows[r].constraint.mask(last[j]) for j, r in enumerate(active)])
            z = next_distribution(last, sp.temperature, sp.top_k or None, sp.top_p, sp.min_p)
            nxt = draw(z, sp.temperature, generator)  # (B_active,)
            lps = [None] * len(active) if sp.logprobs is None else token_logprobs(z, nxt, sp.logprobs)
            events, keep = [], []
            for j, (r, t) in enumerate(zip(active, nxt.tolist())):
                token, delta = rows[r].push(t, sp, block, lps[j])
                events.append((r, token, delta))
                if rows[r].finish_reason is None:
                    keep.append(j)
            yield rows, events
            if not keep:
                return
            if len(keep) < len(active):  # finished rows leave the batch
                sel = torch.tensor(keep, device=self.device)
                cache.keep_rows(sel)
                nxt, active = nxt[sel], [active[j] for j in keep]
                penalties.keep(sel)
                pad = None if pad is None else pad[sel]
            penalties.update(nxt)
            logits = self._step(nxt.view(-1, 1), cache, pad)
            if shared:
                self._ids.append(int(nxt[0]))

    def _prefill_shared(self, prompt: list[int], max_tokens: int, embeds: Optional[PromptEmbeds] = None):
        """Batch of one: reuse the longest prefix of keys the kept cache shares with the prompt."""
        block = self.model.config.block_size
        need = min(block, len(prompt) + max_tokens)
        compiled = self.decoder is not None
        if self._cache is None or self._cache.k[0].dtype != cache_dtype(self.model, compiled):  # (a new step, or none)
            self._cache, self._ids = KVCache.for_model(self.model, 1, need, compiled=compiled), []
        keys = prompt if embeds is None else embeds.keys(prompt)
        n = 0
        for a, b in zip(self._ids, keys):
            if a != b:
                break
            n += 1
        n = min(n, len(prompt) - 1)  # at least one token must run, to get the next-token logits
        self._cache.truncate(n)
        self._ids = self._ids[:n]
        self._cache.reserve(need)
        idx = torch.tensor([prompt[n:]], dtype=torch.long, device=self.device)  # (1, T_new)
        extra = {} if embeds is None else embeds.window(n, len(prompt), self.device)
        logits, _ = self.model(idx, start_pos=n, kv_cache=self._cache, last_logits_only=True, **extra)
        self._ids = list(keys)
        self.last_prefill_tokens = len(prompt) - n
        return self._cache, logits

    def _prefill_batch(self, prompts: list[list[int]], max_tokens: int, embeds: list[Optional[PromptEmbeds]]):
        """Left-pad to the longest prompt; a fresh cache sized for the longest possible run."""
        block = self.model.config.block_size
        lens = torch.tensor([len(p) for p in prompts], device=self.device)
        B, L = len(prompts), int(lens.max())
        steps = max(min(max_tokens, block - len(p)) for p in prompts)
        c, dtype = self.model.config, cache_dtype(self.model, compiled=self.decoder is not None)
        # columns = pad + position, so a padded row may need columns past block_size: size by L + steps
        cache = KVCache(c.n_layer, B, c.n_kv_head, c.head_dim, L + steps, dtype=dtype, device=self.device)
        pad = L - lens  # (B,)
        idx = torch.zeros(B, L, dtype=torch.long, device=self.device)  # pad id is irrelevant: masked out
        for i, p in enumerate(prompts):
            idx[i, L - len(p):] = torch.tensor(p, device=self.device)
        self.last_prefill_tokens = int(lens.sum())
        extra = {}
        if any(e is not None for e in embeds):  # each row's positions move right by its padding
            where = torch.zeros(B, L, dtype=torch.bool, device=self.device)
            for i, e in enumerate(embeds):
                if e is not None:
                    where[i, [L - len(prompts[i]) + q for q in e.positions]] = True
            values = [e.values for e in embeds if e is not None and e.positions]
            extra = {"embeds": torch.cat(values).to(self.device), "embeds_mask": where} if values else {}
        if int(pad.max()) == 0:  # equal lengths: the ordinary causal path
            return cache, self.model(idx, kv_cache=cache, last_logits_only=True, **extra)[0], None
        col = torch.arange(L, device=self.device)
        positions = (col[None, :] - pad[:, None]).clamp(min=0)  # (B, L)
        i, j = col[:, None], col[None, :]
        # causal, and no real key in the padding; a pad query sees only itself, so its row is never all
        # masked (some attention backends turn such a row into NaNs, which a zero weight cannot cancel)
        mask = (j <= i) & ((j >= pad[:, None, None]) | (j == i))  # (B, L, L)
        logits, _ = self.model(idx, kv_cache=cache, positions=positions, attn_mask=mask.unsqueeze(1),
                               last_logits_only=True, **extra)
        return cache, logits, pad

    def _step(self, idx: torch.Tensor, cache: KVCache, pad: Optional[torch.Tensor]) -> torch.Tensor:
        """One decode step: idx (B, 1) -> logits (B, 1, V)."""
        if self.decoder is not None and not self.decoder.usable():
            self.decoder = None  # compiling failed (it warned): plain from now on, caches in the activations' dtype
        if self.decoder is not None:  # the compiled step, on tensors only
            B, pos = idx.size(0), cache.pos
            cache.reserve(pos + 1)
            cols = torch.full((B,), pos, dtype=torch.long, device=self.device)
            if pad is None:  # (B, 1, 1, T_k): every key so far; with padding, a row's padding hidden
                mask = torch.ones(B, 1, 1, pos + 1, dtype=torch.bool, device=self.device)
            else:
                mask = (torch.arange(pos + 1, device=self.device)[None, :] >= pad[:, None]).view(B, 1, 1, -1)
            logits = self.decoder(idx, (cols if pad is None else cols - pad).view(B, 1), mask, cache.k, cache.v, cols)
            cache.advance(1)
            return logits
        if pad is None:
            return self.model(idx, start_pos=cache.pos, kv_cache=cache)[0]
        positions = (cache.pos - pad).view(-1, 1)  # (B, 1)
        keys = torch.arange(cache.pos + 1, device=self.device)
        mask = (keys[None, :] >= pad[:, None]).view(idx.size(0), 1, 1, -1)  # (B, 1, 1, T_k)
        return self.model(idx, start_pos=cache.pos, kv_cache=cache, positions=positions, attn_mask=mask)[0]
