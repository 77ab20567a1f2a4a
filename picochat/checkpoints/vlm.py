"""Multimodal checkpoints: a picochat GPT checkpoint plus the image encoder that lets it see.

    config.json          {"format": "picochat", "version": 1, "model": ModelConfig, "vision": VisionConfig}
    model.safetensors    the GPT's weights, exactly as a text model's: every GPT loader reads the text half
    vision.safetensors   the ImageEncoder's (ViT + projector)
    tokenizer.json       with the <|image|> special token (and the chat template's)

``load_model`` (io.py) returns the GPT of such a checkpoint as of any other (chat, serve, quantize, LoRA all
work on it unchanged); ``load_image_encoder`` returns its ImageEncoder, or None for a text-only model. The
two run separately: the encoder turns pictures into (N, d) embeddings once (``embed_images``), and the engine
places them at the prompt's marker positions (engine.PromptEmbeds), which is all a server needs too:

    gpt, tok, ckpt = load_model(path); enc = load_image_encoder(path)
    z = embed_images(enc, [png_bytes])                            # (N, d), N = enc.n_tokens per picture
    ids, _ = render_conversation(messages_with_image_parts, tok, image_tokens=enc.n_tokens, add_generation_prompt=True)
    Request(ids, params, on_event, embeds=PromptEmbeds.at_markers(ids, tok.special_tokens["<|image|>"], z))
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from ..errors import PicochatError
from ..model.multimodal import VLM, ImageEncoder, VisionConfig
from .io import load_state, load_weights_into, resolve_checkpoint, save_model

VISION_FILE = "vision.safetensors"


def save_vlm(model: VLM, out_dir: str | Path, tokenizer=None, extra_files: Optional[dict] = None) -> Path:
    """One atomic directory: the GPT as save_model writes it, plus vision.safetensors and config's "vision"."""
    from safetensors.torch import save_file
    state = {k: v.detach().contiguous().cpu() for k, v in model.vision.state_dict().items()}
    files = dict(extra_files or {}) | {VISION_FILE: lambda p: save_file(state, str(p), metadata={"format": "pt"})}
    return save_model(model.gpt, out_dir, tokenizer, files, meta={"vision": model.vision.config.to_dict()})


def read_vision_config(ckpt: Path) -> Optional[VisionConfig]:
    """The checkpoint's VisionConfig, or None when it has none (a text-only model)."""
    try:
        meta = json.loads((ckpt / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PicochatError(f"{ckpt}/config.json is unreadable or corrupt ({e}); use another checkpoint") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("vision"), dict):
        return None
    return VisionConfig.from_dict(meta["vision"])


def _load_encoder_weights(encoder: ImageEncoder, ckpt: Path) -> None:
    state = load_state(ckpt / VISION_FILE)
    expected = encoder.state_dict()
    if set(state) != set(expected):
        odd = sorted(set(state) ^ set(expected))
        raise PicochatError(f"{ckpt}/{VISION_FILE} does not match its config's image encoder ({odd[:3]} ...); "
                            "the checkpoint is damaged or from another picochat")
    for k, v in expected.items():
        if state[k].shape != v.shape:
            raise PicochatError(f"{ckpt}/{VISION_FILE}: tensor {k} has shape {tuple(state[k].shape)}, the config "
                                f"says {tuple(v.shape)}")
    encoder.load_state_dict(state)


def load_vlm_weights(model: VLM, ckpt: Path) -> None:
    """Both halves into an existing VLM (resuming a training run), strictly."""
    load_weights_into(model.gpt, load_state(ckpt / "model.safetensors"), str(ckpt))
    _load_encoder_weights(model.vision, ckpt)


def load_image_encoder(path: str | Path, device: str | torch.device = "cpu",
                       dtype: Optional[torch.dtype] = None) -> Optional[ImageEncoder]:
    """The model's ImageEncoder in eval mode, or None when the model cannot see (no "vision" in its
    config.json; a GGUF file; a model name such as smollm2; a LoRA adapter)."""
    from ..model.lora import is_adapter
    from .gguf import gguf_source
    if gguf_source(path) is not None or is_adapter(path):
        return None
    ckpt = resolve_checkpoint(path)
    config = read_vision_config(ckpt)
    if config is None:
        return None
    encoder = ImageEncoder(config)
    _load_encoder_weights(encoder, ckpt)
    encoder.to(device=device, dtype=dtype) if dtype is not None else encoder.to(device)
    return encoder.eval()


def image_token_id(tokenizer, encoder: ImageEncoder) -> int:
    token = encoder.config.image_token
    if tokenizer is None or token not in tokenizer.special_tokens:
        raise PicochatError(f"the model's tokenizer has no {token} token; its checkpoint is incomplete")
    return tokenizer.special_tokens[token]


def load_vlm(path: str | Path, device: str | torch.device = "cpu"):
    """-> (VLM in eval mode, Tokenizer, checkpoint dir); a text-only model is refused."""
    from .io import load_model
    gpt, tokenizer, ckpt = load_model(path, device=device)
    encoder = load_image_encoder(path, device=device)
    if encoder is None:
        raise PicochatError(f"{path} is a text-only model: it has no image encoder (train one with `picochat vlm train`)")
    return VLM(gpt, encoder, image_token_id(tokenizer, encoder)).eval(), tokenizer, ckpt


@torch.no_grad()
def embed_images(encoder: ImageEncoder, sources: list) -> torch.Tensor:
    """PNG/JPEG files or their bytes -> (len(sources) * N, d) embeddings, one picture after another. Every
    picture is read and checked before any is encoded (a bad one costs nothing and changes nothing)."""
    from ..data.scenes import read_image
    size = encoder.config.vit_config().image_size
    pixels = torch.stack([read_image(s, size=size) for s in sources])   # (M, 3, S, S) uint8
    return encode_pixels(encoder, pixels)


@torch.no_grad()
def encode_pixels(encoder: ImageEncoder, pixels: torch.Tensor) -> torch.Tensor:
    """(M, 3, H, W) uint8 -> (M * N, d) embeddings in the encoder's dtype and device."""
    from ..data.scenes import to_model_input
    p = next(encoder.parameters())
    z = encoder(to_model_input(pixels).to(device=p.device, dtype=p.dtype))  # (M, N, d)
    return z.reshape(-1, z.size(-1))
