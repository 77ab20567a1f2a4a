"""A PNG grid of attention maps: one row per layer, one column per head, then the heads' average."""
from __future__ import annotations

import io
import textwrap
from pathlib import Path
from typing import Optional, Sequence

from .maps import MapGroup

LABEL_UP_TO = 48  # more tokens than this and the axis labels would overlap into a grey bar


def plot_group(group: MapGroup, path, title: str = "", layers: Optional[Sequence[int]] = None) -> Path:
    """Heatmaps of group.weights (L, H, T_q, T_k): rows = layers, columns = heads + "mean"; darker = less.
    Token labels on the first column (queries) and the last row (keys) when there are few enough."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = group.weights
    L, H, Tq, Tk = w.shape
    layers = list(range(L)) if layers is None else list(layers)
    cols = H + 1
    cell = max(1.1, min(2.6, 0.09 * max(Tq, Tk)))  # inches per map: readable labels, bounded file size
    fig, axes = plt.subplots(len(layers), cols, figsize=(1.2 + cell * cols, 0.8 + cell * len(layers)),
                             squeeze=False)
    label_q, label_k = Tq <= LABEL_UP_TO, Tk <= LABEL_UP_TO
    font = max(4, min(8, int(220 / max(Tq, Tk, 1))))
    for r, l in enumerate(layers):
        for c in range(cols):
            ax = axes[r][c]
            m = w[l, c] if c < H else w[l].mean(0)
            ax.imshow(m.numpy(), cmap="viridis", vmin=0, vmax=float(m.max()) or 1.0, aspect="auto",
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title("mean" if c == H else f"head {c}", fontsize=8)
            if c == 0:
                ax.set_ylabel(f"layer {l}", fontsize=8)
                if label_q:
                    ax.set_yticks(range(Tq), [_show(t) for t in group.queries], fontsize=font)
            if r == len(layers) - 1 and label_k:
                ax.set_xticks(range(Tk), [_show(t) for t in group.keys], rotation=90, fontsize=font)
    fig.suptitle(title + "  (rows: queries, columns: keys; each map scaled to its own maximum)", fontsize=9)
    return _save(fig, path, dpi=100)


def _save(fig, path, dpi: int) -> Path:
    """Lay out, render to PNG in memory, close, and write atomically (a kill never leaves half a file)."""
    import matplotlib.pyplot as plt

    from ..fsutil import atomic_write
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write(path, buf.getvalue())
    return Path(path)


def _show(token: str) -> str:
    """A token as a label: spaces and newlines made visible, long ones cut."""
    t = token.replace("\n", "\\n").replace(" ", "\u2423")
    return t if len(t) <= 14 else t[:13] + "\u2026"


def plot_image_attention(view, path, picture: Optional[dict] = None) -> Path:
    """The image, then per layer where [CLS] looks (mean over heads; without [CLS], the mean over every
    patch's row): the weight on each patch drawn over the picture, brighter = more attention.

    picture (one of a VLM view's `pictures`, with its "src"): where the answer looks in that picture
    instead: per layer the mean over the answer's tokens (the last token's row without an answer) and the
    heads, divided by its sum over the picture's tokens (the cells compare with each other, whatever share
    the picture got), and that share in each layer's title."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    w = view.groups["self"].weights.mean(1)  # (L, T, T)
    L, T = w.size(0), w.size(-1)
    if picture is None:
        first = int(view.image.get("first_key", 0))
        from_cls = first > 0
        img = torch.tensor(view.image["pixels"], dtype=torch.float32).numpy()  # (H, W) in 0..1
        rows, cols = view.image["grid"]
        what = f"where {'[CLS]' if from_cls else 'the patches'} attend, mean over heads"
        looks = [w[l, 0] if from_cls else w[l].mean(0) for l in range(L)]  # [CLS]'s row, or the average row
    else:
        from .pictures import picture_pixels
        img = picture_pixels(picture["src"])  # (S, S, 3): the square the grid lies over
        (rows, cols), first = picture["grid"], picture["first_token"]
        answered = view.answer_start is not None and view.answer_start < T
        who = list(range(view.answer_start, T)) if answered else [T - 1]
        what = (f"where {'the answer' if answered else 'the last token'} looks in picture {picture['index']}, "
                "mean over its tokens and the heads")
        looks = [w[l, who].mean(0) for l in range(L)]
    width = 1.9 * (L + 1)
    fig, axes = plt.subplots(1, L + 1, figsize=(width, 2.5), squeeze=False)
    axes[0][0].imshow(img, cmap="gray_r", interpolation="nearest")
    axes[0][0].set_title("image", fontsize=8)
    for l in range(L):
        grid = looks[l][first:first + rows * cols]
        share = float(grid.sum())
        if picture is not None and share > 0:
            grid = grid / share
        ax = axes[0][l + 1]
        ax.imshow(img, cmap="gray_r", interpolation="nearest", extent=(0, cols, rows, 0))
        ax.imshow(grid.reshape(rows, cols).numpy(), cmap="inferno", alpha=0.6, interpolation="nearest",
                  extent=(0, cols, rows, 0))
        ax.set_title(f"layer {l}" + (f": {share:.0%} on it" if picture is not None else ""), fontsize=8)
    for ax in axes[0]:
        ax.set_xticks([])
        ax.set_yticks([])
    extra = f" -> {view.meta['prediction']} (p={view.meta['probability']})" if "prediction" in view.meta else ""
    # wrapped to the figure (about 14 characters an inch at 8 pt): a 1-layer model's figure is narrow
    fig.suptitle(textwrap.fill(f"{view.title}: {what}{extra}", max(30, int(width * 14))), fontsize=8)
    return _save(fig, path, dpi=110)
