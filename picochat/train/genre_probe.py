"""`picochat probe`: a pretrained encoder's genre knowledge, read by a linear classifier on one layer.

    picochat probe minilm --out-dir runs/genre-minilm
    picochat classify runs/genre-minilm "The committee voted 7-2 on Tuesday to approve the budget."

The encoder is frozen. Each Brown passage becomes, per layer l, the mean of its hidden states h_t^(l) over
its tokens; a multinomial logistic regression, p(y | x) = softmax(W x + b) with an L2 penalty
(lambda / 2) ||W||^2, is fitted on the training documents' passages for every layer, and the layer and
lambda that score best on the validation documents are kept; the test documents are scored once, beside
TF-IDF + logistic regression on the very same passages.

Why a middle layer: all-MiniLM-L6-v2's last layer was trained to say what a sentence *means* (its
sentence-pair objective), and genre is more how it is said. Measured (`make bert`, 8,082 training passages),
validation accuracy by layer 1..6, best L2 each: 70.3, 71.1, 73.7, 72.9, 71.5, 64.4% (TF-IDF on the same
validation passages: 68.9%): the sentence embedding itself (layer 6) is the worst of them. Logistic
regression is written here (L-BFGS, float64), not taken from scikit-learn, so that the classifier
`picochat classify` runs is the one that was scored.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import PicochatError

L2_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)


@dataclass
class ProbeConfig:
    encoder: str = "minilm"
    """The frozen encoder: `minilm` (all-MiniLM-L6-v2) or a BERT folder (`picochat bert` run, transformers)."""
    out_dir: str = "runs/genre-probe"
    """Where the classifier goes (config.json, probe.safetensors, results.json)."""
    passage_words: int = 100
    """Words per passage (the genre task's passages, as `picochat bert genre` cuts them)."""
    batch_size: int = 32
    """Passages per forward pass."""
    progress: bool = True
    """Show a progress bar."""


def fit_logistic(X: torch.Tensor, y: torch.Tensor, n_labels: int, l2: float, steps: int = 200):
    """Multinomial logistic regression: argmin_W,b mean_i CE(W x_i + b, y_i) + (l2 / 2) ||W||^2, by L-BFGS
    in float64 (a convex problem: the optimum, not a point on a learning curve). -> (W (L, d), b (L,))."""
    X = X.double()
    W = torch.zeros(n_labels, X.size(1), dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_labels, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=steps, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(X @ W.T + b, y) + 0.5 * l2 * (W * W).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return W.detach(), b.detach()


@torch.no_grad()
def layer_features(enc, seqs: list[list[int]], batch_size: int = 32, upto=None, bar=None) -> torch.Tensor:
    """Mean-pooled hidden states of every layer (or of the first `upto`) of a frozen encoder: (N, n_layer, d)."""
    model = enc.model
    out = torch.zeros(len(seqs), upto or model.config.n_layer, model.config.n_embd)
    for chunk, ids, mask in enc.batches(seqs, batch_size):
        m = mask.unsqueeze(-1).float()  # (B, T, 1)
        hs = model.hidden_states(ids, mask, upto=upto)  # n_layer x (B, T, d)
        out[chunk] = torch.stack([(h.float() * m).sum(1) / m.sum(1) for h in hs], 1)
        if bar is not None:
            bar.update(len(chunk))
    return out


def _passages(enc, docs, words: int, groups: tuple[str, ...]):
    from ..data.brown_tags import labelled_passages
    rows = labelled_passages(docs, words)
    seqs = enc.encode([t for t, _ in rows])
    # a passage longer than the encoder reads (a table of figures) leaves the split, the baseline's too
    keep = [i for i, s in enumerate(seqs) if len(s) <= enc.max_tokens]
    return [seqs[i] for i in keep], torch.tensor([groups.index(rows[i][1]) for i in keep]), \
        [rows[i] for i in keep], len(rows) - len(keep)


def train_probe(cfg: ProbeConfig) -> dict:
    """Fit, choose the layer and L2 on validation, score test; writes the run folder; -> results."""
    from safetensors.torch import save_file
    from tqdm import tqdm
    from ..data.brown_tags import GENRE_GROUPS, load_tagged, split_documents, tfidf_genre_baseline
    from ..encoder.embeddings import load_encoder
    from ..fsutil import atomic_dir
    t0 = time.time()
    enc = load_encoder(cfg.encoder)
    groups = tuple(sorted(set(GENRE_GROUPS.values())))
    splits = split_documents(load_tagged())
    data = [_passages(enc, docs, cfg.passage_words, groups) for docs in splits]
    with tqdm(total=sum(len(d[0]) for d in data), desc="passages", unit="psg", disable=not cfg.progress) as bar:
        X = [layer_features(enc, d[0], cfg.batch_size, bar=bar) for d in data]  # (N, n_layer, d) per split
    (Xtr, Xva, Xte), (ytr, yva, yte) = X, [d[1] for d in data]
    mean, std = Xtr.mean(0), Xtr.std(0).clamp(min=1e-6)  # (n_layer, d): standardised per feature
    scores, best = {}, None
    for layer in range(Xtr.size(1)):
        for l2 in L2_GRID:
            W, b = fit_logistic((Xtr[:, layer] - mean[layer]) / std[layer], ytr, len(groups), l2)
            val = float(((((Xva[:, layer] - mean[layer]) / std[layer]).double() @ W.T + b).argmax(-1) == yva).float().mean())
            scores[f"layer{layer + 1}_l2_{l2:g}"] = round(val, 4)
            if best is None or val > best[0]:
                best = (val, layer, l2, W, b)
    val, layer, l2, W, b = best
    test = float(((((Xte[:, layer] - mean[layer]) / std[layer]).double() @ W.T + b).argmax(-1) == yte).float().mean())
    baseline = tfidf_genre_baseline(data[0][2], data[2][2])
    results = {"task": "genre", "encoder": cfg.encoder, "layer": layer + 1, "l2": l2, "val_accuracy": round(val, 4),
               "test_accuracy": round(test, 4), "test_n": len(yte),
               "baseline": {"name": "TF-IDF + logistic regression", "accuracy": round(baseline, 4)},
               "documents": {k: len(d) for k, d in zip(("train", "val", "test"), splits)},
               "train_rows": len(ytr), "passages_too_long_dropped": {k: d[3] for k, d in zip(("train", "val", "test"), data)},
               "val_by_layer_and_l2": scores, "train_seconds": round(time.time() - t0, 1)}
    config = {"format": "picochat_probe", "encoder": cfg.encoder, "layer": layer + 1, "labels": list(groups),
              "passage_words": cfg.passage_words, "probe": asdict(cfg)}

    def fill(tmp: Path) -> None:
        save_file({"W": W.float().contiguous(), "b": b.float(), "mean": mean[layer].contiguous(),
                   "std": std[layer].contiguous()}, str(tmp / "probe.safetensors"))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "results.json").write_text(json.dumps(results, indent=2))
    atomic_dir(cfg.out_dir, fill)
    print(json.dumps({k: v for k, v in results.items() if k != "val_by_layer_and_l2"}), flush=True)
    return results


class Probe:
    """A trained probe at work: text -> {label: probability} (`picochat classify`)."""

    def __init__(self, folder: str | Path):
        from safetensors.torch import load_file
        from ..encoder.embeddings import load_encoder
        folder = Path(folder)
        if not is_probe(folder):
            raise PicochatError(f"{folder} is not a `picochat probe` run (no config.json with format picochat_probe)")
        self.config = json.loads((folder / "config.json").read_text())
        t = load_file(str(folder / "probe.safetensors"))
        self.W, self.b, self.mean, self.std = t["W"], t["b"], t["mean"], t["std"]
        self.enc = load_encoder(self.config["encoder"])
        self.layer, self.labels = int(self.config["layer"]), tuple(self.config["labels"])

    def __call__(self, text: str, what: str = "text") -> dict[str, float]:
        seqs = self.enc.encode([text])
        self.enc.check_lengths(seqs, what)
        x = (layer_features(self.enc, seqs, upto=self.layer)[0, self.layer - 1] - self.mean) / self.std
        p = torch.softmax(x @ self.W.T + self.b, -1)
        return {self.labels[j]: round(float(p[j]), 4) for j in p.argsort(descending=True).tolist()}


def is_probe(path: str | Path) -> bool:
    cfg = Path(path) / "config.json"
    try:
        return cfg.is_file() and json.loads(cfg.read_text()).get("format") == "picochat_probe"
    except (OSError, ValueError):
        return False


def add_parser(sub) -> None:
    import argparse
    from ..cli_args import add_dataclass_args, dataclass_from_args
    p = sub.add_parser("probe", help="genre from a frozen pretrained encoder's best layer (linear probe)",
                       description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(p, ProbeConfig, positional=("encoder",))
    p.set_defaults(func=lambda args: train_probe(dataclass_from_args(ProbeConfig, args)) and 0)
