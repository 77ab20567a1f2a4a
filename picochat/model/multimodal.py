"""A chat model that sees: a ViT reads the picture, a projector translates, the GPT talks (nanoVLM, LLaVA).

    P   = ViT.forward_features(image)                (B, G*G, d_v)     patch states, G = image_size / patch_size
    P'  = pixel_shuffle(P, s)                         (B, (G/s)^2, s^2 d_v)   each s x s block of patches side by side
    Z   = W_2 GELU(W_1 P' + b_1) + b_2 + E_pos          (B, N, d)        N = (G/s)^2 image tokens at the GPT's width d
    h_0 = E[x_t] at text positions, the rows of Z at the N <|image|> markers of the rendered conversation
    loss = cross-entropy on the assistant's answer only (markers and prompt are never targets)

Pixel shuffle (nanoVLM's) trades tokens for width: the GPT reads N = G^2 / s^2 image tokens instead of G^2, each
carrying its s x s neighbourhood, so the language model's sequences stay short. The ViT here has no
classifier: pool="mean" (no [CLS]) and its head is dropped, so every state it returns is a patch.

The language model is a plain picochat GPT: its checkpoint half loads and runs anywhere a GPT does (chat,
serve, quantize, LoRA), and the image side is a separate module (``ImageEncoder``) whose output the GPT takes
through ``GPT.forward(..., embeds=Z, embeds_mask=idx == image_token_id)``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import PicochatError
from .config import ModelConfig
from .gpt import GPT
from .layers import Linear
from .vit import ViT, ViTConfig

IMAGE_TOKEN = "<|image|>"


@dataclass
class VisionConfig:
    """The image side: the ViT's config (image size, channels, shape), the projector, the marker token."""
    vit: dict = field(default_factory=dict)
    """ViTConfig fields (image_size, channels, patch_size, n_layer, n_head, n_embd, pos, ...)."""
    pixel_shuffle: int = 2
    """s: each s x s block of patch states becomes one image token (s = 1: one token per patch)."""
    lm_width: int = 128
    """The GPT's width d that the projector maps to."""
    image_token: str = IMAGE_TOKEN
    """The special token whose N copies mark where an image goes in the rendered conversation."""
    image_pos: bool = True
    """Add a learned position per image token to the projector's output (where in the picture, as content)."""

    def __post_init__(self):
        c = self.vit_config()
        if self.pixel_shuffle < 1 or c.grid % self.pixel_shuffle:
            raise PicochatError(f"pixel_shuffle={self.pixel_shuffle} must divide the ViT's {c.grid}x{c.grid} "
                                "patch grid (1 keeps one token per patch)")
        if self.lm_width < 1:
            raise PicochatError(f"lm_width must be positive, got {self.lm_width}")

    def vit_config(self) -> ViTConfig:
        # no classifier: mean pooling (no [CLS] token among the states), 2 classes to satisfy ViTConfig
        return ViTConfig.from_dict({"num_classes": 2, **self.vit, "pool": "mean"})

    @property
    def n_tokens(self) -> int:
        """N: image tokens per picture in the GPT's sequence."""
        return (self.vit_config().grid // self.pixel_shuffle) ** 2

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VisionConfig":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise PicochatError(f"vision config has unknown fields {sorted(unknown)}: written by another picochat")
        return cls(**d)


def pixel_shuffle(x: torch.Tensor, s: int) -> torch.Tensor:
    """(B, G*G, d) patch states in raster order -> (B, (G/s)^2, s*s*d): token (r, c) of the coarse grid is
    the concatenation of the s x s fine patches (r*s + i, c*s + j), in (i, j) raster order."""
    if s == 1:
        return x
    B, T, d = x.shape
    G = int(round(T ** 0.5))
    x = x.view(B, G // s, s, G // s, s, d)            # (B, R, i, C, j, d)
    x = x.permute(0, 1, 3, 2, 4, 5)                   # (B, R, C, i, j, d)
    return x.reshape(B, (G // s) ** 2, s * s * d)


class ImageEncoder(nn.Module):
    """images (B, C, H, W) in [0, 1] -> Z (B, N, d): ViT patch states, pixel-shuffled, through a 2-layer MLP."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        vc = config.vit_config()
        self.vit = ViT(vc)
        self.vit.head = nn.Identity()  # its classifier is not used: nothing of it in the checkpoint either
        s2d = config.pixel_shuffle ** 2 * vc.n_embd
        self.proj_in = Linear(s2d, config.lm_width)
        self.proj_out = Linear(config.lm_width, config.lm_width)
        # LeCun-normal in, small out: image tokens start at the scale of the GPT's token embeddings (std
        # 0.02), not far above it, so the first steps do not drown the text in the residual stream
        nn.init.normal_(self.proj_in.weight, std=s2d ** -0.5)
        nn.init.normal_(self.proj_out.weight, std=0.02)
        nn.init.zeros_(self.proj_in.bias)
        nn.init.zeros_(self.proj_out.bias)
        # Where each image token sits, written into its content. The GPT's RoPE tells a query how far back a
        # key is, but what attention brings back (V) carries no position: "is the circle left of the square?"
        # needs both shapes' columns as values to compare. Without it: 82% of validation questions after
        # 750 steps, "left" at chance; with it: 99% (docs in picochat/train/vlm.py).
        self.pos = nn.Parameter(torch.randn(config.n_tokens, config.lm_width) * 0.02) if config.image_pos else None

    @property
    def n_tokens(self) -> int:
        return self.config.n_tokens

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = self.vit.forward_features(images)                     # (B, G*G, d_v), normed
        h = pixel_shuffle(h, self.config.pixel_shuffle)           # (B, N, s^2 d_v)
        z = self.proj_out(F.gelu(self.proj_in(h)))                # (B, N, d)
        return z if self.pos is None else z + self.pos.to(z.dtype)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


@dataclass
class VLMConfig:
    """What the Trainer reads of a model's config (run.json, FLOPs): both halves."""
    lm: ModelConfig
    vision: VisionConfig

    def to_dict(self) -> dict:
        return {"lm": self.lm.to_dict(), "vision": self.vision.to_dict()}

    def flops_per_token(self, seq_len: Optional[int] = None) -> float:
        """Training FLOPs per GPT token: the GPT's own, plus the ViT's for the N image tokens' share
        (a picture's G^2 patch tokens are spread over the seq_len tokens of its conversation)."""
        T = seq_len or self.lm.block_size
        vc = self.vision.vit_config()
        return self.lm.flops_per_token(T) + vc.flops_per_token() * vc.grid ** 2 / T


class VLM(nn.Module):
    """The GPT and the ImageEncoder trained together; forward places each row's picture at its markers."""

    def __init__(self, lm: GPT, vision: ImageEncoder, image_token_id: int):
        super().__init__()
        if vision.config.lm_width != lm.config.n_embd:
            raise PicochatError(f"the projector maps to width {vision.config.lm_width} but the GPT's is "
                                f"{lm.config.n_embd}")
        if not 0 <= image_token_id < lm.config.vocab_size:
            raise PicochatError(f"image token id {image_token_id} is outside the GPT's vocabulary")
        self.gpt, self.vision, self.image_token_id = lm, vision, image_token_id
        self.config = VLMConfig(lm.config, vision.config)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None,
                images: Optional[torch.Tensor] = None, **kwargs):
        """idx (B, T), images (B_img, C, H, W): every row's markers, in row-major order, take the N tokens of
        the next picture (usually one picture per row: B_img = B). Other arguments go to GPT.forward."""
        if images is None:
            return self.gpt(idx, targets, **kwargs)
        z = self.vision(images)                                    # (B_img, N, d)
        return self.gpt(idx, targets, embeds=z.reshape(-1, z.size(-1)),
                        embeds_mask=idx == self.image_token_id, **kwargs)
