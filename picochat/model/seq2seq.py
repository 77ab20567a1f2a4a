"""The encoder-decoder Transformer of Vaswani et al. 2017 ("Attention Is All You Need"), for translation.

    Encoder:  h = Block(h)  x N_enc        self-attention sees the whole source (M = -inf on padding keys only)
    Decoder:  s = s + SelfAttn(s)           masked: position i sees target positions <= i (and no padding)
              s = s + CrossAttn(s, h)       queries from the decoder, keys and values from the encoder output h
              s = s + FFN(s)                x N_dec   (post-norm as in the paper: Norm(s + f(s)); pre-norm optional)
    logits = s W^T                          lm_head, over the target vocabulary

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k) + M) V;  in CrossAttn, Q = s W_Q, K = h W_K, V = h W_V

The encoder's blocks are picochat's own ``Block`` (model/gpt.py) with a padding mask, as in model/bert.py; the
decoder's self-attention is the GPT's ``Attention`` with its causal mask and KV cache. Only the cross-attention
is new: its K and V come from another sequence than its Q, so it has its own projections.

Training is teacher forcing: the decoder reads [BOS] y_1 .. y_{n} and predicts y_1 .. y_n [EOS] in one pass,
cross-entropy ignoring padding. Decoding is greedy or beam search and ends at [EOS]; a ``DecoderCache`` keeps
each layer's self-attention K/V (one more column per step) and the cross-attention K/V (computed once from
the encoder output), so a step costs one token's work.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import PicochatError
from .attention import Attention, attention, causal_mask, rope_cos_sin, sinusoidal_table
from .config import ModelConfig
from .gpt import Block
from .layers import FeedForward, Linear, make_norm


@dataclass
class Seq2SeqShape:
    """The architecture, without the vocabularies (a training command takes these as options)."""
    n_enc_layer: int = 2
    """Encoder blocks."""
    n_dec_layer: int = 2
    """Decoder blocks."""
    n_head: int = 4
    """Attention heads (self- and cross-attention)."""
    n_embd: int = 128
    """Model width d_model."""
    ffn_hidden: Optional[int] = None
    """Feed-forward hidden width. None = 4 * n_embd (8/3 * n_embd rounded to 64 with swiglu)."""
    block_size: int = 32
    """Longest source or target sequence, in tokens (positions the model is built for)."""
    pos: Literal["sinusoidal", "learned", "rope"] = "sinusoidal"
    """Positions: added sinusoids (the paper), added learned embeddings, or RoPE inside self-attention."""
    norm_position: Literal["post", "pre"] = "post"
    """post: Norm(x + f(x)) as in the paper; pre: x + f(Norm(x)) as in GPT-2 and later."""
    activation: Literal["relu", "gelu", "swiglu"] = "relu"
    """Feed-forward non-linearity (the paper: ReLU)."""
    dropout: float = 0.1
    """Dropout on embeddings, attention weights and residual branches while training (the paper: 0.1)."""
    shared_vocab: bool = False
    """One vocabulary for both languages: one embedding matrix for the encoder and the decoder (and lm_head,
    with tie_embeddings: Vaswani 3.4 shares all three). False: separate source and target embeddings."""
    tie_embeddings: bool = True
    """lm_head reuses the target embedding matrix."""

    def __post_init__(self):
        for name in ("n_enc_layer", "n_dec_layer"):
            if getattr(self, name) < 1:
                raise PicochatError(f"{name} must be at least 1, got {getattr(self, name)}")
        self.block_config(self.n_dec_layer)  # ModelConfig checks widths, heads, dropout

    def shape(self) -> dict:
        """The architecture fields alone, e.g. to build a Seq2SeqConfig from a training config."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(Seq2SeqShape)}

    def block_config(self, n_layer: int) -> ModelConfig:
        """The shared parts (Block, Attention, FeedForward, norms) read their shapes from a ModelConfig."""
        return ModelConfig(vocab_size=1, block_size=self.block_size, n_layer=n_layer,
                           n_head=self.n_head, n_embd=self.n_embd, ffn_hidden=self.ffn_hidden, pos=self.pos,
                           norm="layernorm", norm_position=self.norm_position, activation=self.activation,
                           bias=True, tie_embeddings=self.tie_embeddings, dropout=self.dropout)


@dataclass
class Seq2SeqConfig(Seq2SeqShape):
    src_vocab_size: int = 64
    """Source token ids (the encoder's embedding)."""
    tgt_vocab_size: int = 64
    """Target token ids (the decoder's embedding and lm_head)."""
    pad_id: int = 0
    """Padding id in both vocabularies (never attended to, never a target)."""
    bos_id: int = 1
    """The decoder's first input token."""
    eos_id: int = 2
    """End of sentence: decoding stops when it is produced."""

    def __post_init__(self):
        super().__post_init__()
        if self.shared_vocab and self.src_vocab_size != self.tgt_vocab_size:
            raise PicochatError(f"shared_vocab needs one vocabulary, got src_vocab_size={self.src_vocab_size} and "
                                f"tgt_vocab_size={self.tgt_vocab_size}")
        if len({self.pad_id, self.bos_id, self.eos_id}) < 3:
            raise PicochatError("pad_id, bos_id and eos_id must be three different ids")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Seq2SeqConfig":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise PicochatError(f"seq2seq config has unknown fields {sorted(unknown)}: written by another picochat")
        return cls(**d)

    def flops_per_token(self) -> float:
        """Training FLOPs per target token, about 6N (forward 2N, backward 4N) over the N weights of the matmuls:
        every encoder and decoder layer (the encoder's counted once per target token, close here as both
        sentences have similar lengths), the decoder's cross-attention (4 d^2 per layer) and lm_head."""
        d, per_layer = self.n_embd, self.block_config(1).num_params(embeddings=False)
        return 6.0 * ((self.n_enc_layer + self.n_dec_layer) * per_layer + self.n_dec_layer * 4 * d * d
                      + self.tgt_vocab_size * d)


def encoder_mask(src_keep: torch.Tensor) -> torch.Tensor:
    """(B, S) True on real tokens -> (B, 1, S, S): every query may look at every real key, never at padding."""
    B, S = src_keep.shape
    return src_keep[:, None, None, :].expand(B, 1, S, S)


def decoder_mask(tgt_keep: torch.Tensor) -> torch.Tensor:
    """(B, T) True on real tokens -> (B, 1, T, T): query i may look at key j <= i when j is not padding."""
    T = tgt_keep.size(1)
    return causal_mask(T, T, tgt_keep.device)[None, None] & tgt_keep[:, None, None, :]


def cross_mask(src_keep: torch.Tensor) -> torch.Tensor:
    """(B, S) -> (B, 1, 1, S): every decoder query may look at every real source token."""
    return src_keep[:, None, None, :]


class CrossAttention(nn.Module):
    """Encoder-decoder attention (Vaswani 3.2.3): queries from the decoder, keys and values from the encoder.

    Self-attention projects Q, K and V from one input in one fused matmul; here K and V come from another
    sequence, so they get their own projection (fused: K rows, then V rows), applied once per source sentence.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        d, inner = config.n_embd, config.n_head * config.head_dim
        self.q_proj = Linear(d, inner, bias=config.bias)
        self.kv_proj = Linear(d, 2 * inner, bias=config.bias)
        self.o_proj = Linear(inner, d, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.last_weights: Optional[torch.Tensor] = None  # (B, nh, T, S) when maps are requested

    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder output (B, S, d) -> K, V, each (B, nh, S, hs)."""
        B, S, _ = memory.shape
        kv = self.kv_proj(memory).view(B, S, 2 * self.n_head, self.head_dim).transpose(1, 2)  # (B, 2 nh, S, hs)
        return kv[:, :self.n_head], kv[:, self.n_head:]

    def forward(self, x: torch.Tensor, memory_kv: tuple[torch.Tensor, torch.Tensor], src_keep: torch.Tensor,
                return_weights: bool = False) -> torch.Tensor:
        """x (B, T, d), src_keep (B, S) True on real source tokens -> (B, T, d)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k, v = memory_kv
        mask = cross_mask(src_keep)  # (B, 1, 1, S)
        if return_weights:  # the textbook path, which also hands back softmax(QK^T / sqrt(d_k) + M)
            y, w = attention(q, k, v, mask=mask, return_weights=True)
            self.last_weights = w.detach()
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                               dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * self.head_dim)  # (B, T, nh*hs)
        return self.resid_dropout(self.o_proj(y))


class DecoderBlock(nn.Module):
    """Masked self-attention, cross-attention, feed-forward: three residual sublayers (Vaswani Figure 1)."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.pre_norm = config.norm_position == "pre"
        self.self_attn_norm, self.self_attn = make_norm(config), Attention(config, layer_idx)
        self.cross_attn_norm, self.cross_attn = make_norm(config), CrossAttention(config)
        self.ffn_norm, self.ffn = make_norm(config), FeedForward(config)

    def forward(self, x, memory_kv, src_keep, self_mask=None, rope=None, cache=None, start_pos=0,
                return_weights=False):
        sublayers = ((self.self_attn_norm, lambda h: self.self_attn(h, rope=rope, kv_cache=cache, start_pos=start_pos,
                                                                    attn_mask=self_mask, return_weights=return_weights)),
                     (self.cross_attn_norm, lambda h: self.cross_attn(h, memory_kv, src_keep, return_weights)),
                     (self.ffn_norm, self.ffn))
        for norm, f in sublayers:
            x = x + f(norm(x)) if self.pre_norm else norm(x + f(x))
        return x


class DecoderCache:
    """A decode step's memory of the past, per decoder layer: the self-attention K/V of every target token so
    far (one more column per step, (B, nh, t, hs)) and the cross-attention K/V of the encoder output
    (B, nh, S, hs), computed once. ``update`` is the interface the GPT's Attention writes its K/V through."""

    def __init__(self, n_layer: int, cross_kv: list[tuple[torch.Tensor, torch.Tensor]]):
        self.n_layer, self.cross_kv = n_layer, cross_kv
        self.k: list[Optional[torch.Tensor]] = [None] * n_layer
        self.v: list[Optional[torch.Tensor]] = [None] * n_layer
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Append this step's k, v (B, nh, T, hs) and return all of them so far, (B, nh, pos + T, hs)."""
        self.k[layer] = k if self.k[layer] is None else torch.cat([self.k[layer], k], dim=2)
        self.v[layer] = v if self.v[layer] is None else torch.cat([self.v[layer], v], dim=2)
        if layer == self.n_layer - 1:
            self.pos += k.size(2)
        return self.k[layer], self.v[layer]

    def reorder(self, rows: torch.Tensor) -> None:
        """Beam search: row i continues the hypothesis that was in row rows[i]. The cross K/V need no
        reordering: a hypothesis only ever moves between the beams of its own source sentence."""
        self.k = [k.index_select(0, rows) for k in self.k]
        self.v = [v.index_select(0, rows) for v in self.v]


class Seq2Seq(nn.Module):
    def __init__(self, config: Seq2SeqConfig):
        super().__init__()
        self.config = config
        enc_cfg, dec_cfg = config.block_config(config.n_enc_layer), config.block_config(config.n_dec_layer)
        d = config.n_embd
        self.src_emb = nn.Embedding(config.src_vocab_size, d)
        self.tgt_emb = self.src_emb if config.shared_vocab else nn.Embedding(config.tgt_vocab_size, d)
        if config.pos == "learned":
            self.src_pos = nn.Embedding(config.block_size, d)
            self.tgt_pos = nn.Embedding(config.block_size, d)
        if config.pos == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(config.block_size, d), persistent=False)
        if config.pos == "rope":
            cos, sin = rope_cos_sin(config.block_size, enc_cfg.head_dim, enc_cfg.rope_base)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.drop = nn.Dropout(config.dropout)
        self.encoder = nn.ModuleList(Block(enc_cfg, i) for i in range(config.n_enc_layer))
        self.decoder = nn.ModuleList(DecoderBlock(dec_cfg, i) for i in range(config.n_dec_layer))
        # post-norm blocks already end with a norm; pre-norm stacks need a final one
        pre = config.norm_position == "pre"
        self.enc_norm = make_norm(enc_cfg) if pre else nn.Identity()
        self.dec_norm = make_norm(dec_cfg) if pre else nn.Identity()
        self.lm_head = Linear(d, config.tgt_vocab_size, bias=False)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):  # times sqrt(d) in _embed: unit-size token vectors (fairseq)
                nn.init.normal_(module.weight, std=d ** -0.5)
        if config.tie_embeddings:
            self.lm_head.weight = self.tgt_emb.weight

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _embed(self, emb: nn.Embedding, pos_emb: Optional[nn.Embedding], idx: torch.Tensor, start_pos: int = 0):
        T = idx.size(1)
        if start_pos + T > self.config.block_size:
            raise PicochatError(f"a sequence of {start_pos + T} tokens is longer than the translator's "
                                f"block_size={self.config.block_size}; shorten the sentence")
        x = emb(idx) * math.sqrt(self.config.n_embd)  # (B, T, d); Vaswani 3.4: scale the embeddings by sqrt(d)
        if self.config.pos == "sinusoidal":
            x = x + self.pos_table[start_pos:start_pos + T]
        elif self.config.pos == "learned":
            x = x + pos_emb(torch.arange(start_pos, start_pos + T, device=idx.device))
        return self.drop(x)

    def _rope(self):
        return (self.rope_cos, self.rope_sin) if self.config.pos == "rope" else None

    def encode(self, src: torch.Tensor, return_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """src (B, S) -> encoder output h (B, S, d) and src_keep (B, S), True on real tokens."""
        src_keep = src != self.config.pad_id
        x = self._embed(self.src_emb, getattr(self, "src_pos", None), src)  # (B, S, d)
        mask = encoder_mask(src_keep)  # (B, 1, S, S)
        for block in self.encoder:
            x = block(x, attn_mask=mask, rope=self._rope(), return_weights=return_weights)
        return self.enc_norm(x), src_keep

    def new_cache(self, memory: torch.Tensor) -> DecoderCache:
        """A decode cache whose cross-attention K/V are computed here, once, from the encoder output."""
        return DecoderCache(len(self.decoder), [blk.cross_attn.memory_kv(memory) for blk in self.decoder])

    def decode(self, tgt: torch.Tensor, memory: Optional[torch.Tensor], src_keep: torch.Tensor,
               cache: Optional[DecoderCache] = None, start_pos: int = 0, return_weights: bool = False) -> torch.Tensor:
        """tgt (B, T) target ids at positions start_pos.. -> logits (B, T, tgt_vocab).

        Without a cache: the whole target at once, masked (causal, and padding keys hidden). With one: the new
        tokens after the cached ones (memory may be None: the cache holds its K/V)."""
        x = self._embed(self.tgt_emb, getattr(self, "tgt_pos", None), tgt, start_pos)
        if cache is None:
            cross = [blk.cross_attn.memory_kv(memory) for blk in self.decoder]
            self_mask = decoder_mask(tgt != self.config.pad_id)  # (B, 1, T, T)
        else:
            if cache.pos != start_pos:
                raise ValueError(f"the cache holds {cache.pos} positions but start_pos is {start_pos}")
            cross, self_mask = cache.cross_kv, None  # every cached key is in the new tokens' past
        for blk, kv in zip(self.decoder, cross):
            x = blk(x, kv, src_keep, self_mask=self_mask, rope=self._rope(), cache=cache, start_pos=start_pos,
                    return_weights=return_weights)
        return self.lm_head(self.dec_norm(x))

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, return_weights: bool = False):
        """Teacher forcing. src (B, S); tgt (B, T) = [BOS] y_1 .. y_n [EOS] [PAD]... -> logits for tgt[:, 1:]
        (B, T-1, V) from tgt[:, :-1], and the cross-entropy of predicting tgt[:, 1:], padding ignored."""
        memory, src_keep = self.encode(src, return_weights)
        logits = self.decode(tgt[:, :-1], memory, src_keep, return_weights=return_weights)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), tgt[:, 1:].reshape(-1),
                               ignore_index=self.config.pad_id)
        return logits, loss

    def cross_attention_maps(self) -> list[torch.Tensor]:
        """Per decoder layer, (B, nh, T, S) cross-attention weights from the last pass with return_weights=True."""
        return [blk.cross_attn.last_weights for blk in self.decoder]

    def attention_maps(self) -> dict[str, list[torch.Tensor]]:
        """The last pass with return_weights=True: encoder self-attention (B, nh, S, S), decoder masked
        self-attention (B, nh, T, T) and cross-attention (B, nh, T, S), each per layer."""
        return {"encoder": [b.attn.last_weights for b in self.encoder],
                "decoder": [b.self_attn.last_weights for b in self.decoder], "cross": self.cross_attention_maps()}

    def _step_logprobs(self, tokens, src_keep, cache, t):
        """log p(next | tokens, source) (B, V) of the cached decoder; it may never produce PAD or BOS."""
        logits = self.decode(tokens[:, -1:], None, src_keep, cache=cache, start_pos=t)[:, -1].float()
        banned = torch.tensor([self.config.pad_id, self.config.bos_id], device=logits.device)
        return torch.log_softmax(logits.index_fill(-1, banned, float("-inf")), dim=-1)

    def _max_len(self, max_len: Optional[int]) -> int:
        limit = self.config.block_size
        if max_len is not None and not 1 <= max_len <= limit:
            raise PicochatError(f"max_len must be in 1..{limit} (the translator's block_size), got {max_len}")
        return max_len or limit

    @torch.no_grad()
    def greedy(self, src: torch.Tensor, max_len: Optional[int] = None) -> list[list[int]]:
        """The most likely next token at every step, until EOS (or max_len tokens); ids without BOS/EOS."""
        memory, src_keep = self.encode(src)
        cache = self.new_cache(memory)
        B, eos = src.size(0), self.config.eos_id
        tokens = torch.full((B, 1), self.config.bos_id, dtype=torch.long, device=src.device)
        done = torch.zeros(B, dtype=torch.bool, device=src.device)
        for t in range(self._max_len(max_len)):
            nxt = self._step_logprobs(tokens, src_keep, cache, t).argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, self.config.pad_id), nxt)  # finished rows idle on PAD
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            done |= nxt == eos
            if done.all():
                break
        return [self._strip(row) for row in tokens[:, 1:].tolist()]

    @torch.no_grad()
    def beam_search(self, src: torch.Tensor, beam: int = 4, length_penalty: float = 1.0,
                    max_len: Optional[int] = None) -> list[list[int]]:
        """Keep the `beam` best hypotheses per sentence; ids of the best one without BOS/EOS.

        Hypotheses are ranked by score / length^length_penalty, where score = sum of log-probs and length counts
        the tokens produced (EOS included). length_penalty 0 ranks by the plain sum, which favours short outputs
        (every token adds a negative log-prob); 1 ranks by the mean log-prob per token. A finished hypothesis
        stays in the beam with its score frozen (its only continuation is PAD, at no cost), so it competes with
        the live ones until every hypothesis of every sentence has ended. beam=1 is greedy decoding.
        """
        V, K = self.config.tgt_vocab_size, beam
        if not 1 <= K <= V - 2:  # step 0 extends one hypothesis by every token but PAD and BOS
            raise PicochatError(f"beam must be in 1..{V - 2} (the target vocabulary's real tokens), got {beam}")
        if length_penalty < 0:
            raise PicochatError(f"length_penalty must be >= 0, got {length_penalty}")
        memory, src_keep = self.encode(src)
        B, dev = src.size(0), src.device
        memory, src_keep = memory.repeat_interleave(K, 0), src_keep.repeat_interleave(K, 0)  # (B*K, S, ...)
        cache = self.new_cache(memory)
        tokens = torch.full((B * K, 1), self.config.bos_id, dtype=torch.long, device=dev)
        scores = torch.zeros(B, K, device=dev)
        scores[:, 1:] = float("-inf")  # the K beams start identical: expand only the first one
        lengths = torch.zeros(B, K, device=dev)
        done = torch.zeros(B, K, dtype=torch.bool, device=dev)
        pad_only = torch.full((V,), float("-inf"), device=dev)
        pad_only[self.config.pad_id] = 0.0
        for t in range(self._max_len(max_len)):
            logp = self._step_logprobs(tokens, src_keep, cache, t).view(B, K, V)
            logp = torch.where(done[..., None], pad_only, logp)
            cand = scores[..., None] + logp  # (B, K, V) summed log-probs of every one-token extension
            cand_len = lengths + (~done).float()  # (B, K)
            rank = cand / cand_len.clamp(min=1)[..., None] ** length_penalty
            _, idx = rank.view(B, K * V).topk(K, dim=-1)  # (B, K), best first
            parent, tok = idx // V, idx % V
            scores = cand.view(B, K * V).gather(1, idx)
            lengths, done = cand_len.gather(1, parent), done.gather(1, parent) | (tok == self.config.eos_id)
            rows = (parent + K * torch.arange(B, device=dev)[:, None]).view(-1)  # (B*K,) flat row of each parent
            tokens = torch.cat([tokens.index_select(0, rows), tok.view(-1, 1)], dim=1)
            cache.reorder(rows)
            if done.all():
                break
        best = tokens.view(B, K, -1)[:, 0, 1:]  # topk sorted the beams: beam 0 ranks first
        return [self._strip(row) for row in best.tolist()]

    def _strip(self, ids: list[int]) -> list[int]:
        eos = self.config.eos_id
        return ids[:ids.index(eos)] if eos in ids else ids
