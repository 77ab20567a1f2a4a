"""Run metrics: one JSON line per logged step in metrics.jsonl, and a PNG of the curves."""
from __future__ import annotations

import io
import json
from pathlib import Path

from ..fsutil import atomic_write


class MetricsLog:
    def __init__(self, path: str | Path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            # drop lines written after the checkpoint we resume from: they will be written again
            keep = [l for l in self.read() if l.get("step", 0) <= resume_step]
            atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in keep))

    def log(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def read(self) -> list[dict]:
        return read_metrics(self.path)


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl ([] if there is none)."""
    path = Path(path)
    rows = []
    for line in (path.read_text().splitlines() if path.is_file() else []):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
    return rows


def plot_metrics(rows: list[dict], out_png: str | Path, title: str = "") -> None:
    """Train and validation loss against step (and tokens), plus bits-per-byte when present."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_loss" in r]
    if not train and not val:
        return
    fig, ax = plt.subplots(1, 2 if any("val_bpb" in r for r in val) else 1, figsize=(11, 4), squeeze=False)
    a = ax[0][0]
    if train:
        a.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1, alpha=0.8, label="train loss")
    if val:
        a.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", ms=3, label="val loss")
    a.set_xlabel("step"); a.set_ylabel("cross-entropy (nats/token)"); a.grid(alpha=0.3); a.legend()
    a.set_title(title or "loss")
    if ax.shape[1] > 1:
        b = ax[0][1]
        b.plot([r["step"] for r in val], [r["val_bpb"] for r in val], "o-", ms=3, color="C2")
        b.set_xlabel("step"); b.set_ylabel("val bits per byte"); b.grid(alpha=0.3)
        b.set_title(f"val bpb (last {val[-1]['val_bpb']:.3f})")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write(out_png, buf.getvalue())


def plot_moe_load(rows: list[dict], out_png: str | Path, title: str = "") -> None:
    """Mixture of experts: the fraction of token-slots each expert received, over training, one subplot per
    layer. A dashed line marks 1/N, perfect balance; a collapsed router shows as one line near 1."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    load = [r for r in rows if r.get("moe/load")]
    if not load:
        return
    steps = [r["step"] for r in load]
    n_layer, n_exp = len(load[0]["moe/load"]), len(load[0]["moe/load"][0])
    cols = min(n_layer, 4)
    nrows = (n_layer + cols - 1) // cols
    fig, ax = plt.subplots(nrows, cols, figsize=(3.6 * cols, 2.9 * nrows), squeeze=False, sharey=True)
    top = max(max(max(layer) for layer in r["moe/load"]) for r in load)
    for li in range(nrows * cols):
        a = ax[li // cols][li % cols]
        if li >= n_layer:
            a.axis("off")
            continue
        for e in range(n_exp):
            a.plot(steps, [r["moe/load"][li][e] for r in load], lw=1, label=f"expert {e}",
                   color=plt.cm.tab10(e % 10) if n_exp <= 10 else plt.cm.tab20(e % 20))
        a.axhline(1 / n_exp, color="k", ls="--", lw=0.8)
        a.set_title(f"layer {li}", fontsize=9)
        a.set_xlabel("step")
        a.set_ylim(0, min(1.0, top * 1.1 + 0.02))
        a.grid(alpha=0.3)
        if li % cols == 0:
            a.set_ylabel("fraction of token-slots")
    ax[0][0].legend(fontsize=6, ncol=2)
    fig.suptitle(f"{title + ': ' if title else ''}load per expert (dashed: 1/{n_exp}, balanced)", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write(out_png, buf.getvalue())
