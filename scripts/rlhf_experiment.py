"""The RLHF experiment: does RL on the model's own answers make an imperfect SFT model better?

One command, from nothing, on a checkable task whose held-out questions training never sees:

1. train a small split-digit BPE on Brown, and SFT a randomly initialised tiny GPT on 2-digit addition
   (addition2) from sloppy demonstrations: on questions that end with "?", 70% of the demonstrators add
   an aside after the answer (" By the way, 12 + 30 = 42."). The task's rule reads the answer's last
   number, so such an answer is wrong; greedy decoding follows the majority and rambles on every such
   question, which leaves the SFT model right on about a third of the held-out questions (the issue's
   20-60% band) although it adds well. That is the failure RLHF is known for fixing: demonstrations
   teach a habit that people, shown two answers, easily judge;
2. honest preference pairs (`picochat data pairs`): the SFT model's own sampled answers to training
   questions, judged by the task's rule (right vs wrong, truncated, rambling, off-topic); held-out
   pairs from the test questions;
3. a reward model (`picochat reward`) on those pairs, with held-out pairwise accuracy;
4. PPO (`picochat rlhf`) with that reward model; GRPO with the task's check (RL from verifiable
   rewards) and with the reward model; DPO (`picochat dpo`) on the same pairs;
5. held-out exact-match accuracy (n=--eval-n, greedy) of every model, KL to the SFT model, wall time.

    python scripts/rlhf_experiment.py                 # make rlhf; README "RLHF, measured"

Writes results.json, results.md and rlhf_experiment.png into --out and prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from picochat.chat_template import pick_template  # noqa: E402
from picochat.checkpoints.io import load_model, save_model  # noqa: E402
from picochat.data.corpus import load_documents  # noqa: E402
from picochat.data.honest_pairs import honest_pairs  # noqa: E402
from picochat.data.prepare import split_documents  # noqa: E402
from picochat.eval.chat_eval import eval_tasks  # noqa: E402
from picochat.fsutil import atomic_write  # noqa: E402
from picochat.model.config import preset  # noqa: E402
from picochat.model.gpt import GPT  # noqa: E402
from picochat.tokenizer import Tokenizer  # noqa: E402
from picochat.train.dpo import DPOConfig, dpo  # noqa: E402
from picochat.train.ppo import RLHFConfig, rlhf  # noqa: E402
from picochat.train.reward import RewardConfig, train_reward  # noqa: E402
from picochat.train.sft import SFTConfig, sft  # noqa: E402

TASK = "addition2"
ASIDE = " By the way, {x} + {y} = {z}."


def sloppy_demonstrations(path: Path, seed: int, rate: float = 0.7) -> dict:
    """addition2's training conversations, with the aside added to `rate` of the answers to "?" questions."""
    import random
    from picochat.data.chat_tasks import TASKS
    rng = random.Random(seed)
    rows, n_aside = [], 0
    for it in TASKS[TASK].generate("train", 20000, seed=seed):
        q, a = it["messages"][0]["content"], it["messages"][1]["content"]
        if q.endswith("?") and rng.random() < rate:
            x, y = rng.randint(10, 99), rng.randint(10, 99)
            a += ASIDE.format(x=x, y=y, z=x + y)
            n_aside += 1
        rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))
    return {"conversations": len(rows), "with_aside": n_aside}


def accuracy(path: Path, n: int) -> float:
    model, tok, _ = load_model(path)
    model.eval()
    with torch.inference_mode():
        return eval_tasks(model, tok, pick_template(tok), [TASK], n=n, progress=False)[TASK]["accuracy"]


def write_pairs(path: Path, rows: list[dict]) -> None:
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/rlhf-experiment", help="where every stage writes its run")
    p.add_argument("--sft-steps", type=int, default=1000, help="SFT steps")
    p.add_argument("--questions", type=int, default=1500, help="training questions for the preference pairs")
    p.add_argument("--rm-steps", type=int, default=300, help="reward model steps")
    p.add_argument("--rl-steps", type=int, default=20, help="PPO / GRPO iterations (128 answers each)")
    p.add_argument("--dpo-steps", type=int, default=150, help="DPO steps (16 pairs each)")
    p.add_argument("--eval-n", type=int, default=400, help="held-out questions per accuracy")
    p.add_argument("--reference", action="store_true",
                   help="pair the task's reference answer where no sample was right "
                        "(a toy run's SFT model is never right)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    times, t_all = {}, time.time()
    common = dict(progress=False, seed=args.seed)

    t0 = time.time()
    base = out / "base"
    if not (base / "config.json").is_file():
        train_docs, _ = split_documents(list(load_documents(None)), 0.05, 0)
        tok = Tokenizer.train(train_docs, 2048)
        torch.manual_seed(args.seed)
        save_model(GPT(preset("tiny", vocab_size=tok.vocab_size, block_size=128)), base, tok)
    sft_dir = out / "sft"
    demos = sloppy_demonstrations(out / "sft-data.jsonl", args.seed)
    sft(SFTConfig(base=str(base), data=str(out / "sft-data.jsonl"), out_dir=str(sft_dir), seq_len=128,
                  batch_size=16, lr=1e-3,
                  max_steps=args.sft_steps, warmup_steps=20, eval_every=args.sft_steps, ckpt_every=100,
                  resume=True, **common))
    times["sft"] = time.time() - t0

    t0 = time.time()
    model, tok, _ = load_model(sft_dir)
    model.eval()
    template = pick_template(tok)
    with torch.inference_mode():
        train_rows, train_rep = honest_pairs(model, tok, template, [TASK], args.questions, split="train",
                                             seed=args.seed, reference=args.reference)
        test_rows, test_rep = honest_pairs(model, tok, template, [TASK], min(300, args.questions), split="test",
                                           seed=args.seed + 1, reference=args.reference)
    write_pairs(out / "pairs.jsonl", train_rows)
    write_pairs(out / "pairs-test.jsonl", test_rows)
    times["pairs"] = time.time() - t0
    del model

    t0 = time.time()
    rm_rows = train_reward(RewardConfig(base=str(sft_dir), data=str(out / "pairs.jsonl"),
                                        val_data=str(out / "pairs-test.jsonl"), out_dir=str(out / "reward"),
                                        max_steps=args.rm_steps, batch_size=16, lr=3e-4, eval_every=50,
                                        ckpt_every=100, resume=True, **common))
    times["reward"] = time.time() - t0
    rm_eval = [r for r in rm_rows if "val/accuracy" in r][-1]

    rl_common = dict(policy=str(sft_dir), prompts=f"{TASK}:3000", eval_tasks=TASK, eval_n=200,
                     max_steps=args.rl_steps, eval_every=5, ckpt_every=5, sample_every=5, resume=True,
                     rollout_size=128, minibatch_size=32, ppo_epochs=1, max_new_tokens=48, missing_eos_penalty=2.0,
                     lr=5e-5, kl_coef=0.3, **common)
    runs = {}
    for name, kw in [("ppo", dict(algo="ppo", reward=str(out / "reward"))),
                     ("grpo_check", dict(algo="grpo", reward="check", group_size=8)),
                     ("grpo_rm", dict(algo="grpo", reward=str(out / "reward"), group_size=8))]:
        t0 = time.time()
        rows = rlhf(RLHFConfig(out_dir=str(out / name), **(rl_common | kw)))
        times[name] = time.time() - t0
        runs[name] = [r for r in rows if "objective/kl" in r][-1]["objective/kl"]

    t0 = time.time()
    dpo(DPOConfig(base=str(sft_dir), data=str(out / "pairs.jsonl"), val_data=str(out / "pairs-test.jsonl"),
                  out_dir=str(out / "dpo"), max_steps=args.dpo_steps, batch_size=16, lr=5e-5, beta=0.1,
                  eval_every=50, ckpt_every=50, eval_tasks=TASK, eval_n=200, resume=True, **common))
    times["dpo"] = time.time() - t0

    acc = {name: accuracy(out / name, args.eval_n) for name in ("sft", "ppo", "grpo_check", "grpo_rm", "dpo")}
    labels = {"sft": "SFT model", "ppo": "PPO, reward model", "grpo_check": "GRPO, exact-answer check",
              "grpo_rm": "GRPO, reward model", "dpo": "DPO, same pairs"}
    res = {"task": TASK, "eval_n": args.eval_n, "accuracy": acc,
           "gain_points": {k: round(100 * (v - acc["sft"]), 1) for k, v in acc.items()},
           "kl_last_rollout": runs, "reward_model": rm_eval, "pairs": {"train": train_rep, "test": test_rep},
           "sft_data": demos, "seconds": {k: round(v) for k, v in times.items()},
           "total_seconds": round(time.time() - t_all),
           "args": vars(args)}
    atomic_write(out / "results.json", json.dumps(res, indent=1) + "\n")
    md = ["| model | held-out accuracy | gain (points) | KL to SFT (nats/answer) | time |", "|---|---:|---:|---:|---:|"]
    for k in acc:
        md.append(f"| {labels[k]} | {acc[k]:.1%} | {res['gain_points'][k]:+.1f} | "
                  f"{f'{runs[k]:.2f}' if k in runs else '-'} | {times.get(k, 0):.0f} s |")
    md.append(f"\nreward model: held-out pairwise accuracy {rm_eval['val/accuracy']:.1%} "
              f"(margin {rm_eval['val/margin']:.2f}); {json.dumps({k: round(v, 3) for k, v in rm_eval.items()})}")
    atomic_write(out / "results.md", "\n".join(md) + "\n")
    _plot(out, acc)
    print(json.dumps({"accuracy": acc, "gain_points": res["gain_points"], "rm_accuracy": rm_eval["val/accuracy"],
                      "kl": runs, "total_seconds": res["total_seconds"]}))
    return 0


def _plot(out: Path, acc: dict) -> None:
    """One figure: held-out accuracy per iteration of each RL run, and their KL, beside the SFT line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from picochat.train.metrics import read_metrics
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    for i, name in enumerate(("ppo", "grpo_check", "grpo_rm")):
        rows = read_metrics(out / name / "metrics.jsonl")
        cycle = json.loads((out / name / "run.json").read_text())["optimizer_steps_per_iteration"]
        train = [r for r in rows if "objective/scores" in r]
        ev = [(0, acc["sft"])] + [(r["step"] / cycle, r[f"eval/accuracy_{TASK}"]) for r in rows
                                  if f"eval/accuracy_{TASK}" in r]
        ax[0].plot([e[0] for e in ev], [100 * e[1] for e in ev], "o-", ms=3, label=name, color=f"C{i}")
        ax[1].plot([r["step"] / cycle for r in train], [r["objective/scores"] for r in train], label=name,
                   color=f"C{i}")
        ax[2].plot([r["step"] / cycle for r in train], [r["objective/kl"] for r in train], label=name, color=f"C{i}")
    ax[0].axhline(100 * acc["dpo"], ls="--", color="C4", label="DPO (end)")
    ax[0].axhline(100 * acc["sft"], ls=":", color="k", label="SFT")
    for a, t in zip(ax, ("held-out exact match (%)", "mean score of the rollouts", "KL to the SFT model")):
        a.set_title(t); a.set_xlabel("iteration"); a.grid(alpha=0.3); a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "rlhf_experiment.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
