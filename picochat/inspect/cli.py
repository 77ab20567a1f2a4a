"""``picochat attention MODEL TEXT``: look at what every layer and head attends to.

Works for each model kind picochat has: a GPT (a picochat checkpoint, smollm2, a .gguf file), an encoder
(minilm, a `picochat bert` run), the translator (`picochat translate train` run; its encoder, decoder and
cross-attention), a vision transformer (`picochat vision train` run; TEXT is then an image file), and a
chat model that sees (`picochat vlm train` run with --image FILE: TEXT is a question about the picture,
which the model answers first; image.png draws where the answer looked in the picture).
Writes one PNG grid per kind of attention (rows: layers, columns: heads and their mean) and one
self-contained HTML page to explore them (pick a layer and head, hover a token), then prints the paths:

    picochat attention smollm2 "The capital of France is Paris."
    picochat attention runs/translate "four thousand two hundred and seven" --out-dir maps
    picochat attention runs/vlm "What colour is the circle?" --image scene.png
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..cli_args import add_dataclass_args, dataclass_from_args
from ..errors import PicochatError


@dataclass
class AttentionConfig:
    model: str = ""
    """A GPT checkpoint, smollm2 or a .gguf file; minilm or a `picochat bert` run; a translator run; a
    vision run."""
    text: str = ""
    """The text to read (a translator translates it first; a vision model takes an image file's path; with
    --image, a question about the picture)."""
    image: Optional[str] = None
    """A PNG or JPEG picture for a chat model that sees (`picochat vlm train`): it reads the picture and the
    text as one user message and answers; the maps cover both, the picture's tokens drawn over it."""
    answer_tokens: int = 24
    """With --image: the longest answer the model writes before its maps are drawn (0: the question alone)."""
    out_dir: str = "attention"
    """Where the PNGs and attention.html go (created if missing; files there of the same name are replaced)."""
    layers: Optional[str] = None
    """Only these layers, e.g. "0,5,29" (0-based; default every layer). A long text on a deep model needs it:
    the HTML page holds at most 16 million numbers (SmolLM2's 30 layers x 9 heads fill that at ~240 tokens)."""
    html: bool = True
    """Also write attention.html (--no-html: PNGs only)."""
    json: bool = False
    """Print the paths as one JSON line."""


def _layers(spec: Optional[str], n: int) -> Optional[list[int]]:
    if spec is None:
        return None
    try:
        out = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise PicochatError(f'--layers takes comma-separated layer numbers such as "0,3", got {spec!r}') from None
    bad = [x for x in out if not 0 <= x < n]
    if bad or not out:
        raise PicochatError(f"--layers {spec!r}: this model has layers 0..{n - 1}")
    return out


def attention(cfg: AttentionConfig) -> dict:
    """The plain-Python form of `picochat attention`: {"pngs": [...], "html": path or None}; also prints."""
    from .maps import maps_for
    from .plot import plot_group, plot_image_attention
    if not cfg.model or not cfg.text:
        raise PicochatError('give a model and a text: picochat attention smollm2 "The capital of France is"')
    view = maps_for(cfg.model, cfg.text, image=cfg.image, answer_tokens=cfg.answer_tokens)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # checked for every group before any file is written (the translator's encoder and decoder differ)
    chosen = {name: _layers(cfg.layers, g.weights.size(0)) for name, g in view.groups.items()}
    page = None
    if cfg.html:  # built (and its size checked) before any file is written
        from .html import page_html
        page = page_html(view, layers=next(iter(chosen.values())))
    pngs = []
    for name, group in view.groups.items():
        layers = chosen[name]
        what = {"self": "self-attention", "encoder": "encoder self-attention",
                "decoder": "decoder masked self-attention", "cross": "cross-attention"}[name]
        pngs.append(str(plot_group(group, out / f"{name}.png", f"{view.title}: {what}", layers)))
    if view.image is not None:  # a vision model: the attention drawn over the picture too
        pngs.append(str(plot_image_attention(view, out / "image.png")))
    for pic in view.pictures:  # a chat model that sees: where its answer looked in each picture
        name = "image.png" if len(view.pictures) == 1 else f"image-{pic['index']}.png"
        pngs.append(str(plot_image_attention(view, out / name, picture=pic)))
    html = None
    if page is not None:
        from ..fsutil import atomic_write
        atomic_write(out / "attention.html", page)
        html = str(out / "attention.html")
    result = {"kind": view.kind, "pngs": pngs, "html": html} | ({"meta": view.meta} if view.meta else {})
    print(json.dumps(result) if cfg.json else "\n".join(pngs + ([html] if html else [])))
    return result


def add_parser(sub) -> None:
    import argparse
    p = sub.add_parser("attention", help="draw a model's attention maps (PNG grid + an HTML page to explore)",
                       description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(p, AttentionConfig, positional=("model", "text"))
    p.set_defaults(func=lambda args: attention(dataclass_from_args(AttentionConfig, args)) and 0)
