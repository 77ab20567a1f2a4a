"""ModelConfig: every architectural choice of the decoder in one typed dataclass, plus named presets.

One config describes both families the project loads real weights for: GPT-2 (learned positions,
LayerNorm, GELU, biases, fused QKV) and Llama (RoPE, RMSNorm, SwiGLU, grouped-query attention).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Literal, Optional

from ..errors import PicochatError


@dataclass
class ModelConfig:
    vocab_size: int = 8192
    """Number of token ids the embedding and the LM head cover."""
    block_size: int = 256
    """Maximum context length (positions) the model is built for."""
    n_layer: int = 4
    """Number of transformer blocks."""
    n_head: int = 4
    """Number of query heads."""
    n_kv_head: Optional[int] = None
    """Key/value heads: n_head = multi-head, 1 = multi-query, in between = grouped-query. None = n_head."""
    n_embd: int = 256
    """Model width d_model."""
    head_dim: Optional[int] = None
    """Per-head width d_k. None = n_embd // n_head."""
    ffn_hidden: Optional[int] = None
    """Feed-forward hidden width. None = 4*n_embd (GELU/ReLU) or 8/3*n_embd rounded to 64 (SwiGLU)."""
    pos: Literal["learned", "sinusoidal", "rope", "alibi", "none"] = "rope"
    """How positions enter: added embeddings (learned, sinusoidal) or inside attention (rope, alibi)."""
    rope_base: float = 10000.0
    """RoPE base theta: frequencies theta^(-2i/d_k)."""
    norm: Literal["layernorm", "rmsnorm"] = "rmsnorm"
    """Normalisation layer."""
    norm_eps: float = 1e-5
    """Epsilon inside the norm."""
    norm_position: Literal["pre", "post"] = "pre"
    """pre: x + f(norm(x)) (GPT-2, Llama); post: norm(x + f(x)) (the 2017 Transformer, BERT)."""
    activation: Literal["gelu", "gelu_tanh", "relu", "swiglu"] = "swiglu"
    """Feed-forward non-linearity; swiglu is the gated SiLU of Llama."""
    bias: bool = False
    """Biases in the linear layers (and LayerNorm)."""
    tie_embeddings: bool = True
    """Share the token embedding matrix with the LM head."""
    dropout: float = 0.0
    """Dropout on attention weights and residual branches during training."""
    init_std: float = 0.02
    """Std of the normal init of weight matrices (residual projections scaled by 1/sqrt(2*n_layer))."""
    moe_experts: int = 0
    """Mixture of experts: feed-forward experts per block (0 = one dense feed-forward). Each expert is a full feed-forward of width ffn_hidden."""
    moe_top_k: int = 2
    """Experts each token is sent to; their outputs are mixed by the router softmax renormalised over the top_k (top-1: Switch's full softmax probability)."""
    moe_aux_loss_coef: float = 0.01
    """Weight of the Switch-Transformer load-balancing loss in the training loss (0 = off)."""
    moe_z_loss_coef: float = 0.001
    """Weight of the ST-MoE router z-loss, which keeps router logits small (0 = off)."""

    def __post_init__(self):
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise PicochatError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                                    "pick a width that is a multiple of the head count or set head_dim")
            self.head_dim = self.n_embd // self.n_head
        if self.ffn_hidden is None:
            if self.activation == "swiglu":  # same parameter count as a 4x GELU MLP
                self.ffn_hidden = 64 * ((8 * self.n_embd // 3 + 63) // 64)
            else:
                self.ffn_hidden = 4 * self.n_embd
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd", "head_dim",
                     "ffn_hidden"):
            if getattr(self, name) < 1:
                raise PicochatError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.n_head % self.n_kv_head:
            raise PicochatError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head} "
                                "(each key/value head serves a whole group of query heads)")
        if self.pos == "rope" and self.head_dim % 2:
            raise PicochatError(f"RoPE rotates pairs of dimensions: head_dim={self.head_dim} must be even")
        if self.pos == "sinusoidal" and self.n_embd % 2:
            raise PicochatError(f"sinusoidal positions need an even n_embd, got {self.n_embd}")
        if not 0.0 <= self.dropout < 1.0:
            raise PicochatError(f"dropout must be in [0, 1), got {self.dropout}")
        self._check_moe()

    def _check_moe(self) -> None:
        if self.moe_experts < 0:
            raise PicochatError(f"moe_experts must be >= 0 (0 = dense feed-forward), got {self.moe_experts}")
        if self.moe_experts == 1:  # one expert always chosen with gate 1: a dense FFN plus a useless router
            raise PicochatError("moe_experts=1 is a dense feed-forward with a router that has nothing to choose; "
                                "use 0 for a dense model or at least 2 experts")
        if self.moe_experts and not 1 <= self.moe_top_k <= self.moe_experts:
            raise PicochatError(f"moe_top_k={self.moe_top_k} must be between 1 and moe_experts={self.moe_experts} "
                                "(each token is sent to top_k distinct experts)")
        for name in ("moe_aux_loss_coef", "moe_z_loss_coef"):
            v = getattr(self, name)
            if not (v >= 0 and math.isfinite(v)):
                raise PicochatError(f"{name} must be a finite number >= 0, got {v}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise PicochatError(f"model config has unknown fields {sorted(unknown)}: "
                                "the checkpoint was written by a different picochat or is not a picochat checkpoint")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def num_params(self, embeddings: bool = True, active: bool = False) -> int:
        """Parameter count computed from the shapes (matches the built model).

        active: count only what one token uses, i.e. top_k of the moe_experts feed-forwards (+ the router);
        the same as the total for a dense model."""
        d, L, hd = self.n_embd, self.n_layer, self.head_dim
        b = 1 if self.bias else 0
        attn = d * hd * self.n_head + 2 * d * hd * self.n_kv_head + hd * self.n_head * d
        attn += b * (hd * self.n_head + 2 * hd * self.n_kv_head + d)
        n_in = 2 if self.activation == "swiglu" else 1
        ffn = n_in * d * self.ffn_hidden + self.ffn_hidden * d + b * (n_in * self.ffn_hidden + d)
        if self.moe_experts:  # N experts (k of them per token) plus the router's d x N matrix
            ffn = (self.moe_top_k if active else self.moe_experts) * ffn + d * self.moe_experts
        norm = d * (2 if (self.norm == "layernorm" and self.bias) else 1)
        total = L * (attn + ffn + 2 * norm) + (norm if self.norm_position == "pre" else 0)
        if embeddings:
            total += self.vocab_size * d
            if not self.tie_embeddings:
                total += self.vocab_size * d
            if self.pos == "learned":
                total += self.block_size * d
        return total

    def flops_per_token(self, seq_len: Optional[int] = None) -> float:
        """Training FLOPs per token: 6N for the matmuls plus 12*L*T*d for attention (PaLM appendix B).

        N counts active parameters: a mixture-of-experts token runs top_k experts, not all of them."""
        T = seq_len or self.block_size
        N = self.num_params(embeddings=False, active=True) + self.vocab_size * self.n_embd  # LM head is a matmul
        return 6 * N + 12 * self.n_layer * T * self.head_dim * self.n_head


PRESETS: dict[str, dict] = {
    # ~10 minutes of training on a 2-core CPU; see README for the curve it reaches
    "tiny": dict(vocab_size=8192, block_size=256, n_layer=4, n_head=4, n_embd=256),
    "small": dict(vocab_size=8192, block_size=512, n_layer=6, n_head=6, n_embd=384),
    "gpt2": dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768, pos="learned",
                 norm="layernorm", activation="gelu_tanh", bias=True, tie_embeddings=True),
    "gpt2-medium": dict(vocab_size=50257, block_size=1024, n_layer=24, n_head=16, n_embd=1024, pos="learned",
                        norm="layernorm", activation="gelu_tanh", bias=True, tie_embeddings=True),
    "smollm2-135m": dict(vocab_size=49152, block_size=8192, n_layer=30, n_head=9, n_kv_head=3, n_embd=576,
                         ffn_hidden=1536, pos="rope", rope_base=100000.0, norm="rmsnorm", norm_eps=1e-5,
                         activation="swiglu", bias=False, tie_embeddings=True),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise PicochatError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
