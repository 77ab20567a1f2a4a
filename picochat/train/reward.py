"""Reward model: learn from people's (or a checker's) rankings which of two answers is better.

    r(x, y) = w^T h_last + b           h_last: the final hidden state at the answer's last token
    L = -log sigmoid(r(x, y_chosen) - r(x, y_rejected))        Bradley-Terry, as InstructGPT

The body starts as the SFT model (it already reads the prompts and answers it will judge) and the
scalar head is new (model/scalar.py). Pairs come from `picochat feedback export` (the web page's
rankings and thumbs) or `picochat data pairs` (honest pairs from checkable tasks), in the same trl
format. Some prompts' pairs are held out (by prompt, so no held-out prompt is ever trained on) and the
pairwise accuracy and margin on them are reported, per kind of pair when the rows say.

A reward's zero means nothing by itself, so the model is normalised as trl and InstructGPT do: at every
checkpoint the SFT model's own greedy answers to training prompts are scored and their mean is written
as ``offset`` (scalar.json); ``load_scalar_model`` subtracts it, so the SFT model's answers score 0 on
average, a better answer scores above 0 and PPO's rewards start centred.

    picochat reward runs/sft --data pairs.jsonl --max-steps 300
    picochat reward smollm2 --data feedback.jsonl --lora-rank 8 --lr 1e-4
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..cli_args import add_dataclass_args, dataclass_from_args
from ..errors import PicochatError
from .loop import TrainConfig, Trainer
from .rl_data import LoraOptions, PreferenceOptions
from .rl_losses import bradley_terry_loss


@dataclass
class RewardConfig(LoraOptions, PreferenceOptions, TrainConfig):
    base: str = ""
    """The SFT model the reward model starts from (its body); the policy PPO trains must share its tokenizer."""
    out_dir: str = "runs/reward"
    """Run directory: checkpoints, metrics.jsonl, loss.png."""
    norm_prompts: int = 64
    """Training prompts the SFT model answers (greedy) to centre the reward: its answers score 0 on average."""
    max_steps: int = 300
    """Optimizer steps."""
    batch_size: int = 16
    """Pairs per micro-batch per process."""
    lr: float = 1e-4
    """Peak learning rate."""

    def __post_init__(self):
        super().__post_init__()
        if not self.base:
            raise PicochatError("name the SFT model to start from: picochat reward BASE --data pairs.jsonl")
        self.check_preferences()
        if self.norm_prompts < 1:
            raise PicochatError(f"--norm-prompts must be at least 1, got {self.norm_prompts}")
        self.lora_config()


def read_pair_files(spec: str, tokenizer, max_tokens: int, strict: bool) -> list[dict]:
    """Every pair of the comma-separated files, with problems reported (and counted) as they are skipped."""
    from ..data.preferences import read_preferences
    pairs: list[dict] = []
    for path in [p.strip() for p in spec.split(",") if p.strip()]:
        got, report = read_preferences(path, tokenizer, max_tokens, strict=strict)
        for problem in report["problems"][:5]:
            print(f"skipped: {problem}")
        if report["skipped"]:
            print(f"{path}: skipped {report['skipped']} bad row(s) of {report['rows']} (--strict refuses them)")
        pairs += got
    if not pairs:
        raise PicochatError(f"{spec} holds no usable preference pair")
    return pairs


def load_pairs(cfg: PreferenceOptions, tokenizer, max_tokens: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(training pairs, held-out pairs) as cfg says: --val-data, or --val-fraction of --data's prompts."""
    pairs = read_pair_files(cfg.data, tokenizer, max_tokens, cfg.strict)
    if cfg.val_data:
        return pairs, read_pair_files(cfg.val_data, tokenizer, max_tokens, cfg.strict)
    train, val = split_by_prompt(pairs, cfg.val_fraction, seed)
    if not train:
        raise PicochatError(f"no training pairs are left after holding out {cfg.val_fraction:.0%} of the prompts")
    return train, val


def describe(pairs: list[dict]) -> str:
    """'1,200 training pairs (ranking 700, thumbs 500)': counts by kind (or export source)."""
    kinds: dict[str, int] = {}
    for p in pairs:
        kinds[p.get("kind") or "pair"] = kinds.get(p.get("kind") or "pair", 0) + 1
    return f"{len(pairs):,} training pairs ({', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))})"


def split_by_prompt(pairs: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held out): a prompt's pairs all go to one side."""
    prompts = sorted({repr(p["prompt"]) for p in pairs})
    random.Random(seed).shuffle(prompts)
    held = set(prompts[:max(1, round(fraction * len(prompts)))]) if len(prompts) > 1 else set()
    return [p for p in pairs if repr(p["prompt"]) not in held], [p for p in pairs if repr(p["prompt"]) in held]


class PairRows:
    """Encoded pairs, and batches that are a pure function of the sample index (exact resume)."""

    def __init__(self, pairs: list[dict], tokenizer, template: str, seed: int):
        from .rl_data import encode_answer
        from .sft import SampleOrder
        self.pairs, self.order = pairs, SampleOrder(len(pairs), seed)
        self.chosen = [encode_answer(p["prompt"], p["chosen"], tokenizer, template) for p in pairs]
        self.rejected = [encode_answer(p["prompt"], p["rejected"], tokenizer, template) for p in pairs]

    def __len__(self) -> int:
        return len(self.pairs)

    def batch(self, first_sample: int, batch_size: int):
        return self.tensors([self.order(first_sample + b) for b in range(batch_size)])

    def tensors(self, idx: list[int]):
        """(ids (2B, T), last (2B,), mask (2B, T-1)): the B chosen answers, then the B rejected ones."""
        from .rl_data import pad_batch
        seqs = [self.chosen[i] for i in idx] + [self.rejected[i] for i in idx]
        ids, mask, last = pad_batch([s for s, _ in seqs], [p for _, p in seqs])
        return ids, last, mask


def reward_loss(model, batch):
    ids, last, _ = batch
    scores = model(ids)[torch.arange(ids.size(0), device=ids.device), last]  # (2B,)
    B = ids.size(0) // 2
    loss, stats = bradley_terry_loss(scores[:B], scores[B:])
    return loss, {"train/accuracy": stats["accuracy"], "train/margin": stats["margin"]}


@torch.no_grad()
def pairwise_accuracy(model, rows: PairRows, batch_size: int = 32) -> dict:
    """Held-out accuracy (share of pairs whose chosen answer scores higher), mean margin, and the
    accuracy per kind of pair when the rows carry one."""
    right, margins, by_kind = [], [], {}
    for s in range(0, len(rows), batch_size):
        idx = list(range(s, min(s + batch_size, len(rows))))
        ids, last, _ = (t.to(next(model.parameters()).device) for t in rows.tensors(idx))
        scores = model(ids)[torch.arange(ids.size(0), device=ids.device), last]
        m = (scores[:len(idx)] - scores[len(idx):]).tolist()
        margins += m
        right += [x > 0 for x in m]
        for i, x in zip(idx, m):
            by_kind.setdefault(rows.pairs[i].get("kind") or "pair", []).append(x > 0)
    out = {"val/accuracy": sum(right) / len(right), "val/margin": sum(margins) / len(margins)}
    if len(by_kind) > 1:
        out |= {f"val/accuracy_{k}": sum(v) / len(v) for k, v in sorted(by_kind.items())}
    return out


@torch.no_grad()
def mean_score(model, answers: list[tuple[list[int], int]], batch_size: int = 32) -> float:
    """The mean reward of (ids, prompt_len) answers: what load_scalar_model subtracts."""
    from .rl_data import pad_batch
    was = model.training
    model.eval()
    total = 0.0
    for s in range(0, len(answers), batch_size):
        chunk = answers[s:s + batch_size]
        ids, _, last = pad_batch([a for a, _ in chunk], [p for _, p in chunk])
        ids, last = ids.to(next(model.parameters()).device), last.to(next(model.parameters()).device)
        total += float(model.score_at(ids, last).sum())
    model.train(was)
    return total / max(len(answers), 1)


def sft_answers(model, tokenizer, template: str, prompts: list[list[dict]]) -> list[tuple[list[int], int]]:
    """The model's own greedy answers to prompts, encoded as the reward model reads them."""
    from ..eval.chat_eval import greedy_results
    from .rl_data import encode_answer
    model.eval()
    with torch.inference_mode():
        results = greedy_results(model, tokenizer, template, prompts, max_tokens=64, batch_size=32)
    model.train()
    return [encode_answer(p, [{"role": "assistant", "content": r.text}], tokenizer, template)
            for p, r in zip(prompts, results)]  # an empty answer is an answer too: the end token alone


def scalar_checkpoints(model, tokenizer, meta_fn, lora=None, base: str = "") -> dict:
    """The Trainer's hooks for a ScalarModel: the body as a picochat checkpoint (or LoRA adapter) plus the
    head; meta_fn() -> scalar.json's content at save time (e.g. the current offset)."""
    from ..model.lora import load_trained, save_trained
    from ..model.scalar import head_files, load_head

    def save_weights(out_dir: Path, extra_files: dict) -> None:
        save_trained(model.body, lora, out_dir, base=base, tokenizer=tokenizer,
                     extra_files=extra_files | head_files(model, meta_fn()))

    def load_weights(ckpt: Path) -> None:
        load_trained(model.body, lora, ckpt)
        load_head(model, ckpt, normalise=False)
    return {"save_weights": save_weights, "load_weights": load_weights}


def train_reward(cfg: RewardConfig) -> list[dict]:
    """Train a reward model on preference pairs; returns the metric rows. The Python form of `picochat reward`."""
    from ..chat_template import pick_template
    from ..checkpoints.io import load_model
    from ..model.scalar import ScalarModel
    from .rl_data import no_dropout
    body, tokenizer, _ = load_model(cfg.base)
    if tokenizer is None:
        raise PicochatError(f"{cfg.base} has no tokenizer.json; the reward model needs the SFT model's tokenizer")
    template = pick_template(tokenizer)
    block = body.config.block_size
    train_pairs, val_pairs = load_pairs(cfg, tokenizer, block, cfg.seed)
    norm_prompts = list({repr(p["prompt"]): p["prompt"] for p in train_pairs}.values())
    random.Random(cfg.seed).shuffle(norm_prompts)
    answers = sft_answers(body, tokenizer, template, norm_prompts[:cfg.norm_prompts])  # before training moves it
    no_dropout(body)
    torch.manual_seed(cfg.seed)
    model = ScalarModel(body)
    lora = cfg.lora_config()
    if lora is not None:
        from ..model.lora import add_lora
        add_lora(model.body, lora)
        model.freeze_unused()
    train = PairRows(train_pairs, tokenizer, template, cfg.seed)
    val = PairRows(val_pairs, tokenizer, template, cfg.seed) if val_pairs else None
    meta = lambda: {"kind": "reward", "base": cfg.base, "offset": mean_score(model, answers),  # noqa: E731
                    "normalised_on": len(answers), "lora": asdict(lora) if lora else None}
    B, box = cfg.batch_size, []

    def batch_fn(step: int, micro: int):
        per_step = B * cfg.grad_accum * box[0].dist.world
        return train.batch(step * per_step + micro * B, B)
    trainer = Trainer(cfg, model, batch_fn, reward_loss,
                      eval_fn=(lambda m: pairwise_accuracy(m, val)) if val else None, tokenizer=tokenizer,
                      run_info={"stage": "reward", "base": cfg.base, "data": cfg.data, "train_pairs": len(train),
                                "val_pairs": len(val_pairs)},
                      **scalar_checkpoints(model, tokenizer, meta, lora, cfg.base))
    box.append(trainer)
    if trainer.dist.is_main:
        print(f"reward: {cfg.base} + a scalar head ({model.num_params() / 1e6:.1f}M parameters"
              f"{f', LoRA r={cfg.lora_rank}' if lora else ''}); {describe(train_pairs)}, {len(val_pairs):,} held out")
    rows = trainer.fit()
    if trainer.dist.is_main:
        evals = [r for r in rows if "val/accuracy" in r]
        if evals:
            print(f"done: held-out pairwise accuracy {evals[-1]['val/accuracy']:.1%}, mean margin "
                  f"{evals[-1]['val/margin']:.3f}; use it: picochat rlhf {cfg.base} --reward {cfg.out_dir}")
    return rows


def add_parser(sub) -> None:
    p = sub.add_parser("reward", help="train a reward model on preference pairs (Bradley-Terry)",
                       description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n")[-1],
                       formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    add_dataclass_args(p, RewardConfig, positional=("base",))
    p.set_defaults(func=lambda args: train_reward(dataclass_from_args(RewardConfig, args)) and 0)
