"""The decoder-only language model: GPT-2 and Llama are both points in ModelConfig's space.

    h_0 = E[x] (+ P)                 token embedding, plus added positions if learned/sinusoidal
    h_l = h_{l-1} + Attn(Norm(h)),  then  h + FFN(Norm(h))      (pre-norm; post-norm applies Norm after)
    logits = Norm(h_L) W_E^T         the unembedding (tied to E unless configured otherwise)
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import PicochatError
from .attention import Attention, alibi_bias, alibi_slopes, rope_cos_sin, sinusoidal_table
from .config import ModelConfig
from .layers import FeedForward, Linear, make_norm
from .moe import MoEFeedForward


class Block(nn.Module):
    """One transformer layer: attention then feed-forward, each wrapped in a residual connection."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.pre_norm = config.norm_position == "pre"
        self.attn_norm = make_norm(config)
        self.attn = Attention(config, layer_idx)
        self.ffn_norm = make_norm(config)
        # mixture of experts replaces the one feed-forward; attention and the residual stream are unchanged
        self.ffn = MoEFeedForward(config) if config.moe_experts else FeedForward(config)

    def forward(self, x, **attn_kwargs):
        if self.pre_norm:
            x = x + self.attn(self.attn_norm(x), **attn_kwargs)
            return x + self.ffn(self.ffn_norm(x))
        x = self.attn_norm(x + self.attn(x, **attn_kwargs))
        return self.ffn_norm(x + self.ffn(x))


_INITS = ("normal_", "zeros_", "ones_", "uniform_", "kaiming_uniform_", "trunc_normal_", "xavier_uniform_")


@contextlib.contextmanager
def _skip_init():
    """torch.nn.init's fills as no-ops (as transformers' no_init_weights): weights about to be replaced.
    Process-wide while it lasts (a few ms): models are loaded before serving starts, never beside it."""
    saved = {n: getattr(nn.init, n) for n in _INITS}
    try:
        for n in _INITS:
            setattr(nn.init, n, lambda t, *a, **k: t)
        yield
    finally:
        for n, f in saved.items():
            setattr(nn.init, n, f)


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd) if config.pos == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        # post-norm models already end every block with a norm; pre-norm ones need a final one
        self.final_norm = make_norm(config) if config.norm_position == "pre" else nn.Identity()
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.init_tables()
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by 1/sqrt(2L)
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=config.init_std / math.sqrt(2 * config.n_layer))

    def init_tables(self) -> None:
        """The fixed tables, as buffers (not saved: persistent=False) so .to(device) moves them."""
        config = self.config
        if config.pos == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(config.block_size, config.n_embd), persistent=False)
        if config.pos == "rope":
            cos, sin = rope_cos_sin(config.block_size, config.head_dim, config.rope_base)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        if config.pos == "alibi":
            self.register_buffer("alibi_slopes", alibi_slopes(config.n_head), persistent=False)

    @classmethod
    def from_state(cls, config: ModelConfig, state: dict[str, torch.Tensor], frame=None) -> "GPT":
        """A GPT holding exactly `state`'s tensors (their dtype and memory: no second copy). Its own weights
        are never initialised: allocated untouched (so never resident), then replaced by the state's.
        (The meta device would do the same, but its first use imports ~2 s of torch's decompositions.)
        frame(model), if given, reshapes the fresh model first (a quantized one's modules: model/quant.py)."""
        with _skip_init():
            model = cls(config)
        if frame is not None:
            frame(model)
        result = model.load_state_dict(state, strict=False, assign=True)
        missing = set(result.missing_keys) - ({"lm_head.weight"} if config.tie_embeddings else set())
        if missing or result.unexpected_keys:  # (a weight left out would stay uninitialised memory)
            raise PicochatError(f"the weights do not fit the model: missing {sorted(missing)[:3]}, "
                                f"unexpected {sorted(result.unexpected_keys)[:3]}")
        if config.tie_embeddings and isinstance(model.lm_head, nn.Linear):  # (a quantized head is a copy)
            model.lm_head.weight = model.tok_emb.weight
        return model

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        n = sum(p.numel() for p in self.parameters())
        # a quantized model (model/quant.py) keeps its linear weights as buffers (int4: two per byte; VNNI's
        # int4 blocks: 512 weights in 320 bytes); a tied LM head's is a copy
        per_byte = {"weight_int8": 1, "weight_q8": 1, "weight_int4": 2, "weight_q4": 512 / 320}
        tied = self.config.tie_embeddings
        return n + sum(int(b.numel() * per_byte[name.rpartition(".")[2]]) for name, b in self.named_buffers()
                       if name.rpartition(".")[2] in per_byte and not (tied and name.startswith("lm_head.")))

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None, *, start_pos: int = 0,
                kv_cache=None, return_attention: bool = False, loss_reduction: str = "mean",
                positions: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None,
                last_logits_only: bool = False, return_hidden: bool = False,
                embeds: Optional[torch.Tensor] = None, embeds_mask: Optional[torch.Tensor] = None):
        """idx: (B, T) token ids -> logits (B, T, vocab) and, with targets (B, T), the cross-entropy.

        targets equal to -1 are ignored (padding, or prompt tokens masked out in chat fine-tuning).
        start_pos: position of idx[:, 0] (non-zero when continuing from a KV cache).
        positions, attn_mask: for left-padded batches in the engine, where each row has its own positions
        (B, T) and a (B, 1, T, T_k) bool mask (True = may attend) that is causal and hides the padding;
        start_pos then only locates the rows in the cache. Both None = the ordinary path.
        last_logits_only: logits (B, 1, vocab) of the last position only, for a prefill that only needs
        the next token: the LM head is the largest matmul (SmolLM2: 49152 x 576 per position).
        return_hidden: return the final hidden states (B, T, d) instead of logits, for heads other than
        the LM head (the reward and value models' scalar head, model/scalar.py).
        embeds (M, d), embeds_mask (B, T) bool with M True entries: h_0 at the True positions (row-major
        order) is embeds' rows instead of E[x] (plus positions as usual). An image's patches, projected to
        the model's width, sit at its marker tokens this way (model/multimodal.py). None = text only.
        """
        B, T = idx.shape
        if positions is not None:
            # (a compiled decode step skips this host sync: its callers stop first, KVCache.reserve refusing
            # positions past the context, the scheduler ending a row at its context)
            if not torch.compiler.is_compiling() and int(positions.max()) >= self.config.block_size:
                raise PicochatError(f"position {int(positions.max())} is beyond the model's context "
                                    f"block_size={self.config.block_size}; shorten the input")
        elif start_pos + T > self.config.block_size:
            raise PicochatError(f"sequence of {start_pos + T} tokens is longer than the model's context "
                                f"block_size={self.config.block_size}; shorten the input or use a model with a longer context")
        x = self.tok_emb(idx)  # (B, T, d)
        if embeds is not None:
            x = self._place_embeds(x, embeds, embeds_mask)
        if positions is not None and self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        elif positions is not None and self.config.pos == "sinusoidal":
            x = x + self.pos_table[positions]
        elif self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(start_pos, start_pos + T, device=idx.device))
        elif self.config.pos == "sinusoidal":
            x = x + self.pos_table[start_pos:start_pos + T]
        x = self.drop(x)
        rope = (self.rope_cos, self.rope_sin) if self.config.pos == "rope" else None
        alibi = None
        if self.config.pos == "alibi":  # relative (i - j), so cache indices work for left-padded rows too
            alibi = alibi_bias(self.alibi_slopes, T, start_pos + T, idx.device)
        for block in self.blocks:
            x = block(x, rope=rope, alibi=alibi, kv_cache=kv_cache, start_pos=start_pos,
                      return_weights=return_attention, positions=positions,
                      attn_mask=attn_mask)
        x = self.final_norm(x)
        if return_hidden:
            return x
        if targets is None:
            return self.lm_head(x[:, -1:] if last_logits_only else x), None
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-1, reduction=loss_reduction)
        return logits, loss

    @staticmethod
    def _place_embeds(x: torch.Tensor, embeds: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """x (B, T, d) with the rows of embeds (M, d) at mask's True positions, in row-major order."""
        if (mask is None or mask.dtype != torch.bool or mask.shape != x.shape[:2] or embeds.dim() != 2
                or embeds.size(1) != x.size(2)):
            raise PicochatError(f"embeds must be (M, {x.size(2)}) with embeds_mask a (B, T) bool mask of the input "
                                f"ids; got {tuple(embeds.shape)} and {None if mask is None else tuple(mask.shape)}")
        if int(mask.sum()) != embeds.size(0):
            raise PicochatError(f"{int(mask.sum())} marker positions but {embeds.size(0)} embeddings to place there")
        return x.masked_scatter(mask.unsqueeze(-1), embeds.to(x.dtype))  # differentiable in embeds

    def attention_maps(self) -> list[torch.Tensor]:
        """Per-layer (B, nh, T, T) weights from the last forward(..., return_attention=True)."""
        return [b.attn.last_weights for b in self.blocks]
