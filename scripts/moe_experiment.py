"""Mixture of experts against a dense GPT at equal active parameters, at equal tokens and at equal wall time.

Both models are the tiny preset (4 layers, d=256, SwiGLU, RoPE) on the embedded Brown corpus that
`picochat pretrain` uses, scored on the same held-out split (val loss and bits per byte):

    dense   one feed-forward of hidden width H (the preset's 704) per block
    moe     8 experts of hidden H/2 per block, top-2: each token runs 2 x H/2 = H hidden units, so the
            active feed-forward parameters match (plus a 256 x 8 router); 4x the total FFN parameters

Three runs, one after another (never two at once on a shared 2-core machine), each with its own cosine
schedule ending at its last step:
    1. dense for --steps steps and 2. moe for --steps steps           -> equal tokens
    3. the faster of the two again, for as many steps as fit in the slower one's measured training time
                                                                      -> equal wall time
Training time excludes evaluation and checkpoints (it is summed from the logged tokens/s). Runs are
ordinary `picochat pretrain` runs under --out-dir, so a killed experiment resumes where it stopped.

    python scripts/moe_experiment.py                   # make moe; README "Mixture of experts, measured"

Prints one JSON line; writes <out-dir>/moe_vs_dense.png (val loss vs tokens and vs seconds) and copies
the MoE run's per-expert load plot to <out-dir>/moe_load.png.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from picochat.model.config import preset  # noqa: E402
from picochat.train.metrics import read_metrics  # noqa: E402
from picochat.train.pretrain import TRAIN_PRESETS, PretrainConfig, pretrain  # noqa: E402


def model_overrides(kind: str, args) -> dict:
    if kind == "dense":
        return dict(ffn_hidden=args.hidden)
    # top_k experts of width H / top_k per token: the same active hidden units as the dense model's H
    return dict(ffn_hidden=args.hidden // args.top_k, moe_experts=args.experts, moe_top_k=args.top_k)


def run_arm(name: str, kind: str, steps: int, args) -> list[dict]:
    """One `picochat pretrain` run (resumed if its directory holds a checkpoint); returns its metric rows."""
    out = Path(args.out_dir) / name
    log_every = 5  # a multiple of it for eval_every, so every validation point has its training seconds
    eval_every = max(log_every, round(steps / args.evals / log_every) * log_every)
    recipe = TRAIN_PRESETS["tiny"]  # the same recipe (and warmup) for every run; only the length differs
    cfg = PretrainConfig(out_dir=str(out), preset="tiny", max_steps=steps, batch_size=recipe["batch_size"],
                         lr=recipe["lr"], warmup_steps=min(recipe["warmup_steps"], args.steps // 10),
                         weight_decay=recipe["weight_decay"], eval_every=eval_every, ckpt_every=eval_every,
                         log_every=log_every, eval_windows=args.eval_windows, seed=args.seed,
                         dtype=args.dtype, resume=True, progress=False)
    print(f"[{name}] {kind}, {steps} steps -> {out}", flush=True)
    pretrain(cfg, model_overrides(kind, args))
    return read_metrics(out / "metrics.jsonl")


def curve(rows: list[dict]) -> list[dict]:
    """Validation points with the tokens and the training seconds (eval and checkpoints excluded) behind them."""
    seconds, prev_tokens, at = 0.0, 0, {}
    for r in rows:
        if "tokens_per_s" in r and r["tokens_per_s"] > 0:
            seconds += (r["tokens"] - prev_tokens) / r["tokens_per_s"]
            prev_tokens = r["tokens"]
            at[r["step"]] = (r["tokens"], seconds)
    return [{"step": r["step"], "tokens": at[r["step"]][0], "seconds": round(at[r["step"]][1], 1),
             "val_loss": r["val_loss"], "val_bpb": r["val_bpb"]} for r in rows if "val_loss" in r and r["step"] in at]


def summary(rows: list[dict]) -> dict:
    c = curve(rows)
    train = [r for r in rows if "tokens_per_s" in r]
    out = {"steps": c[-1]["step"], "tokens": c[-1]["tokens"], "train_seconds": c[-1]["seconds"],
           "tokens_per_s": round(c[-1]["tokens"] / c[-1]["seconds"], 1), "val_loss": round(c[-1]["val_loss"], 4),
           "val_bpb": round(c[-1]["val_bpb"], 4), "train_loss_last": round(train[-1]["loss"], 4)}
    loads = [r["moe/load"] for r in rows if "moe/load" in r]
    if loads:  # the last logged interval: how far from 1/N the busiest and idlest experts are
        out["final_load_max"] = max(max(layer) for layer in loads[-1])
        out["final_load_min"] = min(min(layer) for layer in loads[-1])
        out["final_balance_loss"] = [r["moe/balance_loss"] for r in rows if "moe/balance_loss" in r][-1]
    return out


def plot(curves: dict[str, list[dict]], png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for name, c in curves.items():
        for a, x in zip(ax, ("tokens", "seconds")):
            a.plot([p[x] / (1e6 if x == "tokens" else 1) for p in c], [p["val_loss"] for p in c], marker="o", ms=3,
                   label=name, ls="--" if name.endswith("equal_time") else "-")
    ax[0].set_xlabel("training tokens (M)"); ax[1].set_xlabel("training seconds (eval excluded)")
    ax[0].set_ylabel("held-out val loss (nats/token)")
    ax[0].set_title("equal tokens"); ax[1].set_title("equal wall time")
    for a in ax:
        a.grid(alpha=0.3); a.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def interleaved_step_ratio(args, rounds: int = 4, steps: int = 3) -> dict:
    """Seconds per training step of both models, alternating in one process: on a shared machine the load
    changes between the runs above, so this ratio (taken under the same load) checks their time ratio."""
    import torch
    from picochat.device import pick_dtype
    from picochat.model.gpt import GPT
    from picochat.train.optim import make_optimizer
    dtype = pick_dtype(args.dtype, torch.device("cpu"))
    models = {}
    for kind in ("dense", "moe"):
        torch.manual_seed(args.seed)
        m = GPT(preset("tiny", **model_overrides(kind, args))).train()
        models[kind] = (m, make_optimizer(m, 1e-4, 0.1, (0.9, 0.95), "cpu"))
    x = torch.randint(0, 8192, (TRAIN_PRESETS["tiny"]["batch_size"], 256), generator=torch.Generator().manual_seed(0))
    times = {k: [] for k in models}
    for r in range(rounds + 1):  # round 0 warms up (allocator, oneDNN kernels)
        for kind, (m, opt) in models.items():
            t = time.perf_counter()
            for _ in range(steps):
                with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                    loss = m(x, x)[1]
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            if r:
                times[kind].append((time.perf_counter() - t) / steps)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return {"dense_s_per_step": round(med["dense"], 3), "moe_s_per_step": round(med["moe"], 3),
            "moe_vs_dense": round(med["moe"] / med["dense"], 3)}


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300, help="training steps of the equal-token runs")
    p.add_argument("--experts", type=int, default=8, help="experts per block")
    p.add_argument("--top-k", type=int, default=2, help="experts per token")
    p.add_argument("--hidden", type=int, default=preset("tiny").ffn_hidden,
                   help="the dense model's FFN hidden width H; each expert gets H / top_k")
    p.add_argument("--evals", type=int, default=6, help="validation points per run")
    p.add_argument("--eval-windows", type=int, default=128, help="held-out windows of 256 tokens per evaluation")
    p.add_argument("--dtype", default="auto", help="auto (bf16 where fast), fp32, bf16")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--out-dir", default="runs/moe_experiment")
    args = p.parse_args()
    if args.hidden % args.top_k:
        p.error(f"--hidden {args.hidden} must be a multiple of --top-k {args.top_k} (each expert is H / top_k wide)")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0, load0 = time.time(), loadavg()

    rows = {"dense": run_arm("dense", "dense", args.steps, args), "moe": run_arm("moe", "moe", args.steps, args)}
    s = {k: summary(v) for k, v in rows.items()}
    # equal wall time: the faster model trains again, with its own schedule, for the slower one's seconds.
    # The step count is decided once and kept in plan.json, so a resumed experiment finishes the same run.
    plan_file = out / "plan.json"
    if plan_file.is_file():
        plan = json.loads(plan_file.read_text())
    else:
        fast, slow = sorted(("dense", "moe"), key=lambda k: s[k]["train_seconds"])
        plan = {"kind": fast, "budget_seconds": s[slow]["train_seconds"], "slower": slow,
                "steps": round(args.steps * s[slow]["train_seconds"] / s[fast]["train_seconds"])}
        plan_file.write_text(json.dumps(plan))
    eq = f"{plan['kind']}_equal_time"
    rows[eq] = run_arm(eq, plan["kind"], plan["steps"], args)
    s[eq] = summary(rows[eq])

    plot({k: curve(v) for k, v in rows.items()}, out / "moe_vs_dense.png")
    if (out / "moe" / "moe_load.png").is_file():
        shutil.copy(out / "moe" / "moe_load.png", out / "moe_load.png")
    slow = plan["slower"]
    cfg_d, cfg_m = (preset("tiny", **model_overrides(k, args)) for k in ("dense", "moe"))
    result = {
        "experiment": "moe_vs_dense",
        "dense_params": cfg_d.num_params(), "moe_params": cfg_m.num_params(),
        "moe_active_params": cfg_m.num_params(active=True),
        "ffn": {"dense_hidden": args.hidden, "experts": args.experts, "top_k": args.top_k,
                "expert_hidden": args.hidden // args.top_k},
        "runs": s,
        "equal_tokens": {"val_bpb_dense": s["dense"]["val_bpb"], "val_bpb_moe": s["moe"]["val_bpb"],
                         "moe_minus_dense_bpb": round(s["moe"]["val_bpb"] - s["dense"]["val_bpb"], 4)},
        "equal_time": {"seconds": s[slow]["train_seconds"], f"val_bpb_{slow}": s[slow]["val_bpb"],
                       f"val_bpb_{eq}": s[eq]["val_bpb"], f"{eq}_seconds": s[eq]["train_seconds"],
                       "moe_minus_dense_bpb": round((s["moe"]["val_bpb"] if slow == "moe" else s[eq]["val_bpb"])
                                                    - (s[eq]["val_bpb"] if slow == "moe" else s["dense"]["val_bpb"]), 4)},
        "interleaved_step_time": interleaved_step_ratio(args),
        "moe_time_per_step_vs_dense": round((s["moe"]["train_seconds"] / s["moe"]["steps"])
                                            / (s["dense"]["train_seconds"] / s["dense"]["steps"]), 3),
        "wall_seconds_this_invocation": round(time.time() - t0, 1), "loadavg_start": load0, "loadavg_end": loadavg(),
        "plots": [str(out / "moe_vs_dense.png"), str(out / "moe_load.png")],
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
