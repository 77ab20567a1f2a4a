"""The pipeline's report card: report.md (one row per stage, task accuracies, sample answers) and
report.png (pretraining and SFT loss curves, held-out accuracy per task), both written atomically."""
from __future__ import annotations

import io
import json
import platform
from pathlib import Path

from ..fsutil import atomic_write
from ..train.metrics import read_metrics


def _fmt(x, spec: str = ".3f") -> str:
    return "" if x is None else format(x, spec)


def _minutes(s: float) -> str:
    return f"{int(s // 60)}:{int(s % 60):02d}"


def stage_table(state: dict) -> list[str]:
    st = state["stages"]
    lines = ["| stage | wall time | tokens | final loss | val loss | bpb | result |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for name in ("tokenizer", "data", "pretrain", "sft", "eval"):
        s = st.get(name)
        if not s:
            continue
        tokens, loss, val, bpb, result = "", "", "", "", ""
        if name == "tokenizer":
            result = f"{s['vocab_size']:,} tokens; 23 + 45 = 68 -> {' '.join(repr(t) for t in s['example'])}"
        elif name == "data":
            tokens = f"{s['tokens']:,}"
            result = f"{s['bytes_per_token']} bytes/token; {s['val_tokens']:,} val tokens"
        elif name in ("pretrain", "sft"):
            tokens, loss, val = f"{s['tokens']:,}", _fmt(s.get("loss")), _fmt(s.get("val_loss"))
            bpb = _fmt(s.get("val_bpb"))
            result = f"{s['steps']} steps" + (" (resumed)" if s.get("resumed") else "")
        elif name == "eval":
            bpb = _fmt(s.get("chat_bpb"))
            acc = s["accuracy"]
            head = f"addition2 {100 * acc['addition2']:.1f}%; " if "addition2" in acc else ""
            result = f"{head}in kind {s['in_kind']}/{s['samples']} (tables below)"
        lines.append(f"| {name} | {_minutes(s['seconds'])} | {tokens} | {loss} | {val} | {bpb} | {result} |")
    total = sum(s["seconds"] for k, s in st.items() if k != "report")
    lines.append(f"| **total** | **{_minutes(total)}** | | | | | |")
    return lines


def write_report(out: Path, state: dict, cfg) -> tuple[Path, Path]:
    evals = json.loads((out / "eval.json").read_text("utf-8")) if (out / "eval.json").is_file() else {}
    md = ["# picochat pipeline report card", "",
          f"`picochat pipeline --out-dir {cfg.out_dir}` on {platform.machine()} ({_cpu_note()}); "
          f"options in `{out / 'state.json'}`. bpb: pretrain = held-out Brown text, "
          f"eval = the assistant's tokens of held-out chat conversations.", "",
          *stage_table(state), ""]
    if evals.get("tasks"):
        md += ["## Held-out task accuracy (exact match, greedy)", "", "| task | accuracy | n |", "|---|---:|---:|"]
        md += [f"| {k} | {100 * v['accuracy']:.1f}% | {v['n']} |" for k, v in evals["tasks"].items()]
        md += [f"| chat bpb | {_fmt(evals.get('chat_bpb'))} | {evals.get('bpb_conversations', '')} |", ""]
    if evals.get("samples"):
        md += ["## Sample answers", "", "| question | answer | in kind |", "|---|---|:-:|"]
        md += [f"| {s['question']} | {s['reply'].replace('|', '/').replace(chr(10), ' ')} | "
               f"{'yes' if s['in_kind'] else 'no'} |" for s in evals["samples"]]
        md.append("")
    md += ["![report card](report.png)", ""]
    md_path, png_path = out / "report.md", out / "report.png"
    atomic_write(md_path, "\n".join(md))
    atomic_write(png_path, _plot(out, evals))
    return md_path, png_path


def _cpu_note() -> str:
    import os
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return f"{os.cpu_count()} CPUs" + (f", load average {load:.1f} when the report was written" if load else "")


def _plot(out: Path, evals: dict) -> bytes:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    for a, stage in zip(ax[:2], ("pretrain", "sft")):
        rows = read_metrics(out / stage / "metrics.jsonl")
        train = [r for r in rows if "loss" in r]
        val = [r for r in rows if "val_loss" in r]
        a.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1, alpha=0.8, label="train loss")
        a.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", ms=3, label="val loss")
        a.set_title(f"{stage}: loss"), a.set_xlabel("step"), a.set_ylabel("nats/token")
        a.grid(alpha=0.3), a.legend()
    tasks = evals.get("tasks", {})
    names = list(tasks)
    ax[2].barh(names, [100 * tasks[k]["accuracy"] for k in names], color="C2")
    ax[2].set_xlim(0, 100), ax[2].invert_yaxis(), ax[2].grid(alpha=0.3, axis="x")
    ax[2].set_title("held-out accuracy (%)")
    for i, k in enumerate(names):
        ax[2].text(min(100 * tasks[k]["accuracy"] + 1, 88), i, f"{100 * tasks[k]['accuracy']:.0f}%", va="center")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()

