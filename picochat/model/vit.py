"""The vision transformer (ViT, Dosovitskiy et al. 2020): an image read as a sequence of patches.

    x_n   = vec(patch_n) W_E + b                    patch_n: the n-th p x p tile in raster order, n = 0..N-1
    h_0   = [x_cls; x_0; ...; x_{N-1}] + P          (x_cls only with pool="cls"); P learned, 2-D sinusoidal or 0
    h_l   = h + Attn(Norm(h)),  then  h + FFN(Norm(h))      picochat's own Block, pre-norm, bidirectional
    y     = W_c pool(Norm(h_L)) + b_c               pool: h[cls], or the mean over the N patch tokens

An 8 x 8 digit with p = 2 is N = 16 tokens of 4 pixels each. The blocks are the GPT's ``Block``
(model/gpt.py) with a mask that lets every token see every other: attention is the only place a patch
learns about the rest of the image, and nothing in it depends on the order of the tokens, which is why the
positions P are added. ``forward_features`` returns the patch states (B, N, d) that a projector can feed
into a language model's embedding space.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import PicochatError
from .attention import sinusoidal_table
from .config import ModelConfig
from .gpt import Block
from .layers import Linear, make_norm


@dataclass
class ViTShape:
    """The architecture, without the data's facts (image size, channels, classes)."""
    patch_size: int = 2
    """Side p of the square patches, in pixels: an image of side S is (S/p)^2 tokens of p*p*channels values."""
    n_layer: int = 4
    """Transformer blocks."""
    n_head: int = 4
    """Attention heads."""
    n_embd: int = 64
    """Model width d."""
    ffn_hidden: Optional[int] = None
    """Feed-forward hidden width. None = 4 * n_embd."""
    pool: Literal["cls", "mean"] = "cls"
    """What the classifier reads: a learned [CLS] token prepended to the patches (ViT), or the mean of the
    patch states (global average pooling)."""
    pos: Literal["learned", "sinusoidal", "none"] = "learned"
    """Positions added to the tokens: a learned table (ViT), the fixed 2-D sinusoidal table (row sinusoids in
    the first half of the width, column sinusoids in the second; MAE), or none (a bag of patches)."""
    dropout: float = 0.0
    """Dropout on attention weights and residual branches while training."""

    def __post_init__(self):
        if self.patch_size < 1:
            raise PicochatError(f"patch_size must be at least 1 pixel, got {self.patch_size}")
        if self.pos == "sinusoidal" and self.n_embd % 4:
            raise PicochatError(f"2-D sinusoidal positions split n_embd into 4 (sin, cos for rows and columns): "
                                f"n_embd={self.n_embd} must be a multiple of 4")

    def shape(self) -> dict:
        """The architecture fields alone, e.g. to build a ViTConfig from a training config."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(ViTShape)}


@dataclass
class ViTConfig(ViTShape):
    image_size: int = 8
    """Side of the square input images, in pixels (a multiple of patch_size)."""
    channels: int = 1
    """Colour channels of the input (1 = grayscale)."""
    num_classes: int = 10
    """Classes the head scores."""
    init_std: Optional[float] = None
    """Std of the normal init of weight matrices, positions and [CLS] (residual projections scaled by
    1/sqrt(2*n_layer)). None = 1/sqrt(n_embd): GPT-2's 0.02 suits d = 768; at d = 64 it starts attention so
    flat that 2x2 patches learnt 4x slower (91% vs 98% validation accuracy after 600 steps)."""

    def __post_init__(self):
        super().__post_init__()
        if self.init_std is None:
            self.init_std = self.n_embd ** -0.5
        if self.image_size < 1 or self.channels < 1 or self.num_classes < 2:
            raise PicochatError("image_size and channels must be positive and num_classes at least 2")
        if self.image_size % self.patch_size:
            raise PicochatError(f"patch_size={self.patch_size} does not tile an image of {self.image_size} pixels: "
                                "pick a divisor of the image size (1, 2, 4 or 8 for the 8x8 digits)")
        self.block_config()  # ModelConfig checks widths, heads, dropout

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def n_tokens(self) -> int:
        return self.grid ** 2 + (self.pool == "cls")

    def block_config(self) -> ModelConfig:
        """The shared parts (Block, Attention, FeedForward, norms) read their shapes from a ModelConfig:
        ViT's choices are LayerNorm, GELU, biases, pre-norm; positions are added before the blocks."""
        return ModelConfig(vocab_size=1, block_size=self.n_tokens, n_layer=self.n_layer, n_head=self.n_head,
                           n_embd=self.n_embd, ffn_hidden=self.ffn_hidden, pos="none", norm="layernorm",
                           norm_eps=1e-6, norm_position="pre", activation="gelu", bias=True,
                           tie_embeddings=False, dropout=self.dropout, init_std=self.init_std)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ViTConfig":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise PicochatError(f"ViT config has unknown fields {sorted(unknown)}: written by another picochat")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def num_params(self) -> int:
        return sum(p.numel() for p in ViT(self).parameters())

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6 per weight of the blocks' matmuls, plus 12 L T d for attention."""
        blocks = self.block_config().num_params(embeddings=False)
        return 6 * blocks + 12 * self.n_layer * self.n_tokens * self.n_embd


def patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p*p*C): tile n = (row r, column c) of the (H/p) x (W/p) grid, n = r * W/p + c,
    its pixels in (y, x, channel) order. A reshape, so every pixel lands in exactly one token."""
    B, C, H, W = images.shape
    x = images.view(B, C, H // p, p, W // p, p)     # (B, C, r, y, c, x)
    x = x.permute(0, 2, 4, 3, 5, 1)                 # (B, r, c, y, x, C)
    return x.reshape(B, (H // p) * (W // p), p * p * C)


def sinusoidal_2d(h: int, w: int, d: int) -> torch.Tensor:
    """The 2-D sinusoidal table (h*w, d) of a grid in raster order (MAE's): half the width encodes the row,
    half the column, each with the 1-D table of the 2017 Transformer at width d/2:

        PE[(r, c), :d/2] = PE_1d(r),   PE[(r, c), d/2:] = PE_1d(c)
        PE_1d(p)[2i] = sin(p / 10000^(4i/d)),  PE_1d(p)[2i+1] = cos(p / 10000^(4i/d)),  i < d/4

    so PE(a) . PE(b) = sum_i cos((r_a - r_b) w_i) + cos((c_a - c_b) w_i) depends only on the offset b - a.
    """
    if d % 4:
        raise PicochatError(f"2-D sinusoidal positions need a width divisible by 4, got {d}")
    rows, cols = sinusoidal_table(h, d // 2), sinusoidal_table(w, d // 2)   # (h, d/2), (w, d/2)
    return torch.cat([rows[:, None, :].expand(h, w, d // 2),
                      cols[None, :, :].expand(h, w, d // 2)], dim=-1).reshape(h * w, d)


class ViT(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = c = config
        self.patch_embed = Linear(c.patch_size ** 2 * c.channels, c.n_embd)  # = Conv2d(kernel = stride = p)
        self.cls_token = nn.Parameter(torch.randn(1, 1, c.n_embd) * c.init_std) if c.pool == "cls" else None
        n_cls = int(c.pool == "cls")
        if c.pos == "learned":
            self.pos_emb = nn.Parameter(torch.randn(c.n_tokens, c.n_embd) * c.init_std)
        elif c.pos == "sinusoidal":  # the [CLS] token has no place in the grid: its row of the table is 0
            table = torch.cat([torch.zeros(n_cls, c.n_embd), sinusoidal_2d(c.grid, c.grid, c.n_embd)])
            self.register_buffer("pos_emb", table, persistent=False)
        else:
            self.pos_emb = None
        self.drop = nn.Dropout(c.dropout)
        bc = c.block_config()
        self.blocks = nn.ModuleList(Block(bc, i) for i in range(c.n_layer))
        self.final_norm = make_norm(bc)
        self.head = Linear(c.n_embd, c.num_classes)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's 1/sqrt(2L) on the residual projections
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=c.init_std / math.sqrt(2 * c.n_layer))
        # the patch embedding as ViT's convolution: LeCun normal, std 1/sqrt(fan_in) (= 0.5 for 2x2 gray
        # patches); at 0.02 the pixels would start 25 times fainter than they are and learning crawls
        nn.init.normal_(self.patch_embed.weight, std=self.patch_embed.in_features ** -0.5)
        nn.init.zeros_(self.head.weight)  # ViT's zero head: every class starts at p = 1/K

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward_features(self, images: torch.Tensor, return_attention: bool = False) -> torch.Tensor:
        """images (B, C, H, W) -> the final states (B, T, d), normed: [CLS] first (pool="cls"), then the patches."""
        c = self.config
        if images.dim() != 4 or tuple(images.shape[1:]) != (c.channels, c.image_size, c.image_size):
            raise PicochatError(f"images must be (batch, {c.channels}, {c.image_size}, {c.image_size}), "
                                f"got {tuple(images.shape)}")
        x = self.patch_embed(patchify(images, c.patch_size))  # (B, N, d)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.size(0), 1, -1).to(x.dtype), x], dim=1)  # (B, T, d)
        if self.pos_emb is not None:
            x = x + self.pos_emb
        x = self.drop(x)
        # every token may attend to every token: an all-True mask (without one, Attention is causal)
        everywhere = torch.ones(1, 1, x.size(1), x.size(1), dtype=torch.bool, device=x.device)
        for block in self.blocks:
            x = block(x, attn_mask=everywhere, return_weights=return_attention)
        return self.final_norm(x)  # (B, T, d)

    def forward(self, images: torch.Tensor, targets: Optional[torch.Tensor] = None,
                return_attention: bool = False):
        """images (B, C, H, W) -> logits (B, K) and, with targets (B,), the mean cross-entropy (else None)."""
        h = self.forward_features(images, return_attention)  # (B, T, d)
        pooled = h[:, 0] if self.config.pool == "cls" else h.mean(dim=1)  # (B, d)
        logits = self.head(pooled)  # (B, K)
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.float(), targets)

    def attention_maps(self) -> list[torch.Tensor]:
        """Per-layer (B, nh, T, T) weights from the last forward(..., return_attention=True)."""
        return [b.attn.last_weights for b in self.blocks]
