"""What an RL run shows a person: a table of sampled answers with their scores, and plots per iteration."""
from __future__ import annotations

import io
import json
from pathlib import Path

from ..fsutil import atomic_write
from .metrics import read_metrics


def sample_table(out: Path, iteration: int, samples: list, stats: dict, n: int = 6) -> None:
    """Print the first n (question, answer, score) of a rollout, and append them to samples.jsonl."""
    from tqdm.auto import tqdm
    lines = [f"iteration {iteration}: mean score {stats['objective/scores']:+.3f}, KL {stats['objective/kl']:.3f}"
             + (f", accuracy {stats['objective/accuracy']:.1%}" if "objective/accuracy" in stats else "")]
    for q, a, s in samples[:n]:
        lines.append(f"  {s:+7.3f}  {_cut(q, 40):<40}  {_cut(a, 60)}")
    tqdm.write("\n".join(lines))
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "samples.jsonl", "a") as f:  # a resumed run may repeat an iteration; readers keep the last
        f.write(json.dumps({"iteration": iteration, "samples": [
            {"prompt": q, "answer": a, "score": s} for q, a, s in samples[:n]]}) + "\n")


def _cut(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "…"


def plot_rl(out: Path) -> None:
    """rlhf.png: score and RLHF reward, KL, and held-out accuracy (the SFT model's at iteration 0)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = read_metrics(out / "metrics.jsonl")
    try:
        cycle = json.loads((out / "run.json").read_text())["optimizer_steps_per_iteration"]
    except (OSError, KeyError, json.JSONDecodeError):
        return
    train = [r for r in rows if "objective/scores" in r]
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    base = json.loads((out / "baseline.json").read_text()) if (out / "baseline.json").is_file() else {}
    if not train:
        return
    fig, ax = plt.subplots(1, 3, figsize=(14, 3.8))
    it = [r["step"] / cycle for r in train]
    ax[0].plot(it, [r["objective/scores"] for r in train], label="score")
    ax[0].plot(it, [r["objective/rlhf_reward"] for r in train], label="score - beta KL")
    ax[0].set_title("reward per answer")
    ax[0].legend()
    ax[1].plot(it, [r["objective/kl"] for r in train], color="C3")
    ax[1].set_title("KL(policy || SFT) per answer (nats)")
    keys = sorted({k for r in evals for k in r if k.startswith("eval/")} | set(base))
    for k in keys:
        pts = ([(0, base[k])] if k in base else []) + [(r["step"] / cycle, r[k]) for r in evals if k in r]
        ax[2].plot([p[0] for p in pts], [100 * p[1] for p in pts], "o-", ms=3, label=k.split("accuracy_")[-1])
    if "objective/accuracy" in train[0]:
        ax[2].plot(it, [100 * r["objective/accuracy"] for r in train], lw=1, alpha=0.5, label="rollouts (train)")
    ax[2].set_title("exact-match accuracy (%)" if ax[2].lines else "exact-match accuracy (no --eval-tasks)")
    if ax[2].lines:
        ax[2].legend()
    for a in ax:
        a.set_xlabel("iteration"); a.grid(alpha=0.3)
    fig.suptitle(out.name)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write(out / "rlhf.png", buf.getvalue())
