"""A vision transformer's attention over an image's patches, as an inspect.maps.AttentionView.

The tokens are [CLS] (with pool="cls") and the N = (S/p)^2 patches in raster order; the view carries the
8x8 picture the model read and its patch grid, so a viewer can draw a token's row of A over the image.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..inspect.maps import AttentionView, MapGroup, _stack


@torch.no_grad()
def vit_maps(model, pixels: torch.Tensor, title: str = "", labels=None) -> AttentionView:
    """pixels: (8, 8) digits-style counts 0..16 (vision.data.read_digit) -> the maps of every layer."""
    from .data import to_model_input
    x = to_model_input(pixels[None])  # (1, 1, 8, 8)
    model.eval()
    try:
        logits, _ = model(x, return_attention=True)
        w = _stack(model.attention_maps())  # (L, H, T, T)
    finally:
        for b in model.blocks:
            b.attn.last_weights = None
    c = model.config
    rows = cols = c.grid
    first = 1 if c.pool == "cls" else 0
    names = (["[CLS]"] if first else []) + [f"patch r{r}c{q}" for r in range(rows) for q in range(cols)]
    p = torch.softmax(logits[0].float(), -1)
    top = int(p.argmax())
    label = labels[top] if labels else str(top)
    return AttentionView("vit", title, {"self": MapGroup(names, names, w)},
                         image={"pixels": (x[0, 0]).tolist(), "grid": [rows, cols], "first_key": first},
                         meta={"prediction": label, "probability": round(float(p[top]), 4)})


def vit_maps_for(spec: str, image_path: str, title: str = "") -> AttentionView:
    """Load a `picochat vision train` run and read one image file (PNG or JPEG) as `predict` does."""
    from .data import read_digit
    from .train import load_vision
    model, task, _ = load_vision(spec)
    pixels = read_digit(image_path)
    return vit_maps(model, pixels, title or Path(spec).name, task.get("labels"))
