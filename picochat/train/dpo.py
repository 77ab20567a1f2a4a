"""DPO: learn from preference pairs directly, with no reward model and no sampling (Rafailov et al. 2023).

    L = -log sigmoid(beta [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))])

log pi(y|x) is the sum of the answer's token log-probs (its end-of-turn token included). The reference
is the starting model, frozen; its log-probs never change, so they are computed once, before the first
step (under the same autocast as training, so step 0's implicit rewards are 0 up to rounding). The
implicit reward beta (log pi - log ref) of each answer gives the metrics trl reports:
``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``; the same on
held-out pairs under ``val/``, and, with --eval-tasks, held-out exact-match accuracy.

    picochat dpo runs/sft --data pairs.jsonl --beta 0.1 --max-steps 200
    picochat dpo smollm2 --data feedback.jsonl --lora-rank 8 --lr 5e-5
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..cli_args import add_dataclass_args, dataclass_from_args
from ..errors import PicochatError
from .loop import TrainConfig, Trainer
from .rl_data import LoraOptions, PreferenceOptions
from .rl_losses import dpo_loss


@dataclass
class DPOConfig(LoraOptions, PreferenceOptions, TrainConfig):
    base: str = ""
    """The model to improve (usually the SFT model); it is also the frozen reference."""
    beta: float = 0.1
    """DPO's beta: how far from the reference the policy may move (higher = closer)."""
    eval_tasks: str = ""
    """Checkable tasks whose held-out exact-match accuracy is measured at each evaluation (e.g. addition2)."""
    eval_n: int = 200
    """Held-out questions per task for --eval-tasks."""
    out_dir: str = "runs/dpo"
    """Run directory: checkpoints, metrics.jsonl, loss.png."""
    max_steps: int = 200
    """Optimizer steps."""
    lr: float = 5e-5
    """Peak learning rate."""

    def __post_init__(self):
        super().__post_init__()
        if not self.base:
            raise PicochatError("name the model to improve: picochat dpo BASE --data pairs.jsonl")
        self.check_preferences()
        if not self.beta > 0:
            raise PicochatError(f"--beta must be > 0, got {self.beta}")
        from .rl_data import check_tasks
        check_tasks(self.eval_tasks, self.eval_n)
        self.lora_config()


def answer_sums(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) log pi(answer | prompt): the sum of the answer's token log-probs."""
    from .rl_data import answer_logprobs
    return (answer_logprobs(model, ids) * mask).sum(-1)


@torch.no_grad()
def reference_sums(model, rows, batch_size: int, autocast) -> torch.Tensor:
    """(N, 2): log ref(chosen), log ref(rejected) for every pair, batched in order (training batches are
    shuffled and padded otherwise: equal up to rounding, as attention is causal and padding on the right)."""
    out = torch.zeros(len(rows), 2)
    device = next(model.parameters()).device
    model.eval()
    for s in range(0, len(rows), batch_size):
        idx = list(range(s, min(s + batch_size, len(rows))))
        ids, _, mask = (t.to(device) for t in rows.tensors(idx))
        with autocast():
            sums = answer_sums(model, ids, mask).float().cpu()
        out[idx, 0], out[idx, 1] = sums[:len(idx)], sums[len(idx):]
    model.train()
    return out


def task_accuracy(model, tokenizer, template: str, tasks: str, n: int) -> dict:
    """{"eval/accuracy_TASK": held-out exact match} for the comma-separated checkable tasks."""
    from ..eval.chat_eval import eval_tasks
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        return {}
    res = eval_tasks(model, tokenizer, template, names, n=n, progress=False)
    return {f"eval/accuracy_{k}": v["accuracy"] for k, v in res.items()}


def dpo(cfg: DPOConfig) -> list[dict]:
    """Direct preference optimisation of cfg.base on cfg.data; returns the metric rows (`picochat dpo`)."""
    from ..chat_template import pick_template
    from ..checkpoints.io import load_model
    from .reward import PairRows, describe, load_pairs
    from .rl_data import no_dropout
    from .sft import _adapter_checkpoints
    model, tokenizer, _ = load_model(cfg.base)
    if tokenizer is None:
        raise PicochatError(f"{cfg.base} has no tokenizer.json; DPO needs the tokenizer the model was trained with")
    template = pick_template(tokenizer)
    train_pairs, val_pairs = load_pairs(cfg, tokenizer, model.config.block_size, cfg.seed)
    no_dropout(model)
    lora, hooks = cfg.lora_config(), {}
    if lora is not None:
        from ..model.lora import add_lora
        torch.manual_seed(cfg.seed)
        add_lora(model, lora)  # B = 0: the model still equals the reference
        hooks = _adapter_checkpoints(model, lora, cfg.base, tokenizer)
    train = PairRows(train_pairs, tokenizer, template, cfg.seed)
    val = PairRows(val_pairs, tokenizer, template, cfg.seed) if val_pairs else None
    B, box, ref = cfg.batch_size, [], {}

    def batch_fn(step: int, micro: int):
        per_step = B * cfg.grad_accum * box[0].dist.world
        idx = [train.order(step * per_step + micro * B + b) for b in range(B)]
        ids, _, mask = train.tensors(idx)
        r = ref["train"][idx]
        return ids, mask, torch.cat([r[:, 0], r[:, 1]])

    def loss_fn(m, batch):
        ids, mask, ref_sums = batch
        sums = answer_sums(m, ids, mask)
        n = ids.size(0) // 2
        return dpo_loss(sums[:n], sums[n:], ref_sums[:n], ref_sums[n:], cfg.beta)

    def eval_fn(m):
        out = {}
        if val is not None:
            device = next(m.parameters()).device
            stats = []
            for s in range(0, len(val), B):
                idx = list(range(s, min(s + B, len(val))))
                ids, _, mask = (t.to(device) for t in val.tensors(idx))
                sums = answer_sums(m, ids, mask).float()
                r = ref["val"][idx].to(device)
                loss, st = dpo_loss(sums[:len(idx)], sums[len(idx):], r[:, 0], r[:, 1], cfg.beta)
                stats.append((len(idx), float(loss), st))
            n = sum(k for k, _, _ in stats)
            out["val/loss"] = sum(k * x for k, x, _ in stats) / n
            for key in stats[0][2]:
                out[f"val/{key}"] = sum(k * st[key] for k, _, st in stats) / n
        return out | task_accuracy(m, tokenizer, template, cfg.eval_tasks, cfg.eval_n)
    trainer = Trainer(cfg, model, batch_fn, loss_fn, eval_fn=eval_fn, tokenizer=tokenizer,
                      run_info={"stage": "dpo", "base": cfg.base, "data": cfg.data, "beta": cfg.beta,
                                "train_pairs": len(train), "val_pairs": len(val_pairs),
                                "lora": asdict(lora) if lora else None}, **hooks)
    box.append(trainer)
    ref["train"] = reference_sums(trainer.raw_model, train, B, trainer.autocast)
    ref["val"] = reference_sums(trainer.raw_model, val, B, trainer.autocast) if val else None
    if trainer.dist.is_main:
        print(f"dpo: {cfg.base} ({model.num_params() / 1e6:.1f}M parameters"
              f"{f', LoRA r={cfg.lora_rank}' if lora else ''}),"
              f" beta {cfg.beta}; {describe(train_pairs)}, {len(val_pairs):,} held out; reference "
              f"log-probs computed once")
    rows = trainer.fit()
    if trainer.dist.is_main:
        evals = [r for r in rows if "val/rewards/accuracies" in r]
        if evals:
            print(f"done: held-out reward accuracy {evals[-1]['val/rewards/accuracies']:.1%}, margin "
                  f"{evals[-1]['val/rewards/margins']:.3f}; chat with it: picochat chat {cfg.out_dir}")
    return rows


def add_parser(sub) -> None:
    p = sub.add_parser("dpo", help="direct preference optimisation on preference pairs (no reward model)",
                       description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n")[-1],
                       formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    add_dataclass_args(p, DPOConfig, positional=("base",))
    p.set_defaults(func=lambda args: dpo(dataclass_from_args(DPOConfig, args)) and 0)
