"""A PNG grid of attention maps: one row per layer, one column per head, then the heads' average."""
from __future__ import annotations

import io
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

    from ..fsutil import atomic_write
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
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write(path, buf.getvalue())
    return Path(path)


def _show(token: str) -> str:
    """A token as a label: spaces and newlines made visible, long ones cut."""
    t = token.replace("\n", "\\n").replace(" ", "\u2423")
    return t if len(t) <= 14 else t[:13] + "\u2026"


def plot_image_attention(view, path) -> Path:
    """The image, then per layer where [CLS] looks (mean over heads; without [CLS], the mean over every
    patch's row): the weight on each patch drawn over the picture, brighter = more attention."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from ..fsutil import atomic_write
    img = torch.tensor(view.image["pixels"], dtype=torch.float32)  # (H, W) in 0..1
    rows, cols = view.image["grid"]
    first = view.image.get("first_key", 0)
    w = view.groups["self"].weights.mean(1)  # (L, T, T)
    L = w.size(0)
    fig, axes = plt.subplots(1, L + 1, figsize=(1.9 * (L + 1), 2.3), squeeze=False)
    axes[0][0].imshow(img.numpy(), cmap="gray_r", interpolation="nearest")
    axes[0][0].set_title("image", fontsize=8)
    for l in range(L):
        row = w[l, 0] if first else w[l].mean(0)  # [CLS]'s row, or the average row
        grid = row[first:first + rows * cols].reshape(rows, cols)
        ax = axes[0][l + 1]
        ax.imshow(img.numpy(), cmap="gray_r", interpolation="nearest", extent=(0, cols, rows, 0))
        ax.imshow(grid.numpy(), cmap="inferno", alpha=0.6, interpolation="nearest", extent=(0, cols, rows, 0))
        ax.set_title(f"layer {l}", fontsize=8)
    for ax in axes[0]:
        ax.set_xticks([])
        ax.set_yticks([])
    extra = f" -> {view.meta['prediction']} (p={view.meta['probability']})" if "prediction" in view.meta else ""
    fig.suptitle(f"{view.title}: where {'[CLS]' if first else 'the patches'} attend, mean over heads{extra}",
                 fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, buf.getvalue())
    return Path(path)
