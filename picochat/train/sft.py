"""Chat fine-tuning (SFT): teach a pretrained GPT to answer, on conversations rendered by the chat template.

    loss = -1/|A| sum_{t in A} log p(x_{t+1} | x_{<=t})      A = the assistant's tokens (and its end token)

`render_conversation` gives each conversation its ids and the loss mask (1 on what the assistant says),
so the model learns to answer and to stop, never to imitate the user. Conversations are packed into
rows of seq_len + 1 tokens, best fit decreasing, and never split unless one alone is longer than a row.
A packed row does not let a conversation see the one before it: every segment restarts its positions
at 0 and the attention mask is block-diagonal (causal within a segment), so a packed row computes
exactly what the conversations would alone.

Numerically safe: the loss is sum / max(count, 1) over the trained tokens, so a micro-batch without any
(all prompt, or a long conversation's middle chunk) gives 0 and a zero gradient, never NaN.

    picochat sft runs/base --data arithmetic:20000,greetings:500,identity:500
    picochat sft smollm2 --data identity --replay 200 --lora-rank 8 --max-steps 60
"""
from __future__ import annotations

import bisect
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from ..cli_args import add_dataclass_args, dataclass_from_args
from ..errors import PicochatError
from .loop import TrainConfig, Trainer


@dataclass
class SFTConfig(TrainConfig):
    base: str = ""
    """Model to fine-tune: a picochat run or checkpoint (from `picochat pretrain`), smollm2, or a .gguf file."""
    data: str = "arithmetic:20000,greetings:500,identity:500,chatterbot"
    """Chat data: comma-separated NAME[:N] sets (`picochat data chat --list`) and .jsonl files of {"messages": [...]}."""
    out_dir: str = "runs/sft"
    """Run directory: checkpoints, metrics.jsonl, loss.png."""
    seq_len: int = 512
    """Tokens per packed row (at most the base model's context)."""
    strict: bool = False
    """Refuse the data at its first bad conversation instead of skipping (and counting) bad ones."""
    val_conversations: int = 200
    """Conversations held out of the mixture for the validation loss (never trained on)."""
    max_steps: int = 300
    """Optimizer steps."""
    batch_size: int = 8
    """Packed rows per micro-batch per process."""
    lr: float = 3e-4
    """Peak learning rate (LoRA usually wants about 1e-3)."""
    warmup_steps: int = 20
    """Linear warmup steps."""
    weight_decay: float = 0.0
    """AdamW weight decay (matrices only)."""
    eval_every: int = 50
    """Evaluate every this many steps (and at the end)."""
    ckpt_every: int = 100
    """Write a checkpoint every this many steps (and at the end)."""
    replay: int = 0
    """Ask the base model this many questions (greedy, before training) and mix its finished answers into
    the data, so it keeps what it knew while it learns the new data (picochat/train/replay.py). 0: off."""
    replay_prompts: Optional[str] = None
    """Chat mixture whose training-split questions --replay asks (default: chatterbot,python_faq)."""
    replay_max_tokens: Optional[int] = None
    """Longest replayed answer (default 64); a longer one is cut there and trained without its end token."""
    lora_rank: int = 0
    """LoRA rank r (0: fine-tune every weight). With r > 0 only the adapters train and are saved."""
    lora_alpha: float = 16.0
    """LoRA scale alpha: the update is (alpha / r) B A."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA adapters' input."""
    lora_targets: str = "q,k,v,o"
    """Layers that get adapters: q,k,v,o,gate,up,down,lm_head."""

    def __post_init__(self):
        super().__post_init__()
        if not self.base:
            raise PicochatError("name the model to fine-tune: picochat sft BASE (a run directory, smollm2, ...)")
        if self.seq_len < 8:
            raise PicochatError(f"--seq-len must be at least 8, got {self.seq_len}")
        if self.lora_rank < 0 or self.val_conversations < 0 or self.replay < 0:
            raise PicochatError("--lora-rank, --val-conversations and --replay must be >= 0")
        if not self.replay and (self.replay_prompts is not None or self.replay_max_tokens is not None):
            raise PicochatError("--replay-prompts and --replay-max-tokens shape the replay; give --replay N too")
        if self.replay_max_tokens is not None and self.replay_max_tokens < 1:
            raise PicochatError(f"--replay-max-tokens must be at least 1, got {self.replay_max_tokens}")


# ---------------------------------------------------------------- packing

def pack(examples: list[tuple[list[int], list[int]]], row_len: int) -> list[list[tuple[list[int], list[int]]]]:
    """Best fit decreasing: each (ids, loss_mask) goes into the fullest row that still has room for it.

    Rows hold at most row_len tokens. An example longer than a row is cut into row-sized pieces first
    (the only time a conversation is split; each piece then trains without what came before it)."""
    pieces = []
    for ids, mask in examples:
        for i in range(0, len(ids), row_len):
            pieces.append((ids[i:i + row_len], mask[i:i + row_len]))
    pieces.sort(key=lambda p: -len(p[0]))
    rows: list[list] = []
    room: list[tuple[int, int]] = []  # (free tokens, row index), sorted: bisect finds the best fit
    for piece in pieces:
        n = len(piece[0])
        at = bisect.bisect_left(room, (n, -1))
        if at == len(room):
            rows.append([piece])
            bisect.insort(room, (row_len - n, len(rows) - 1))
            continue
        free, r = room.pop(at)
        rows[r].append(piece)
        bisect.insort(room, (free - n, r))
    return rows


class SampleOrder:
    """Global sample index -> row of n: each epoch a fresh permutation seeded by (seed, epoch), so a batch
    is a pure function of its first sample index (exact resume needs no data-loader state)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self._epoch, self._perm = n, seed, -1, None

    def __call__(self, sample: int) -> int:
        epoch, i = divmod(sample, self.n)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._epoch = torch.randperm(self.n, generator=g), epoch
        return int(self._perm[i])


class PackedRows:
    """Packed rows as tensors, and batches that are a pure function of the sample index (exact resume)."""

    def __init__(self, rows: list[list[tuple[list[int], list[int]]]], row_len: int, seed: int):
        n = len(rows)
        self.ids = torch.zeros(n, row_len, dtype=torch.long)
        self.mask = torch.zeros(n, row_len, dtype=torch.bool)
        self.seg = torch.full((n, row_len), -1, dtype=torch.long)  # -1: padding
        self.pos = torch.zeros(n, row_len, dtype=torch.long)
        for r, row in enumerate(rows):
            at = 0
            for s, (ids, mask) in enumerate(row):
                L = len(ids)
                self.ids[r, at:at + L] = torch.tensor(ids)
                self.mask[r, at:at + L] = torch.tensor(mask, dtype=torch.bool)
                self.seg[r, at:at + L] = s
                self.pos[r, at:at + L] = torch.arange(L)
                at += L
        self.order = SampleOrder(n, seed)

    def __len__(self) -> int:
        return self.ids.size(0)

    def trained_tokens(self) -> int:
        return int(self.mask.sum())

    def batch(self, first_sample: int, batch_size: int):
        idx = torch.tensor([self.order(first_sample + b) for b in range(batch_size)])
        return self.tensors(idx)

    def tensors(self, idx: torch.Tensor):
        """(x, y, positions, attn_mask) for rows idx: y is -1 where nothing is trained; the mask is causal
        within each segment only. Shapes (B, T), (B, T), (B, T), (B, 1, T, T)."""
        ids, mask, seg, pos = self.ids[idx], self.mask[idx], self.seg[idx], self.pos[idx]
        x, sx = ids[:, :-1], seg[:, :-1]
        same = seg[:, 1:] == sx  # a target in the same conversation (never the next one's first token)
        y = torch.where(mask[:, 1:] & same & (sx >= 0), ids[:, 1:], torch.full_like(x, -1))
        T = x.size(1)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        attn = (sx[:, :, None] == sx[:, None, :]) & causal  # padding attends to padding: never an empty row
        return x, y, pos[:, :-1], attn.unsqueeze(1)


def sft_loss(model, batch) -> torch.Tensor:
    """Mean cross-entropy over the trained tokens; 0 (and a zero gradient) when there are none."""
    x, y, positions, attn = batch
    _, total = model(x, y, positions=positions, attn_mask=attn, loss_reduction="sum")
    return total / (y >= 0).sum().clamp(min=1)


@torch.no_grad()
def evaluate_sft(model, rows: PackedRows, token_bytes: torch.Tensor, batch_size: int = 8) -> dict:
    """Validation loss per trained token and bits per byte of the assistant's text."""
    device = next(model.parameters()).device
    nats, n_tok, n_bytes = 0.0, 0, 0
    for i in range(0, len(rows), batch_size):
        x, y, positions, attn = (t.to(device) for t in rows.tensors(torch.arange(i, min(i + batch_size, len(rows)))))
        _, total = model(x, y, positions=positions, attn_mask=attn, loss_reduction="sum")
        nats += float(total)
        keep = y >= 0
        n_tok += int(keep.sum())
        n_bytes += int(token_bytes.to(device)[y[keep]].sum())
    return {"val_loss": nats / max(n_tok, 1), "val_bpb": nats / math.log(2) / max(n_bytes, 1)}


# ---------------------------------------------------------------- the stage

def _render(conversations, tokenizer, template) -> list[tuple[list[int], list[int]]]:
    from ..chat_template import render_conversation
    return [render_conversation(c, tokenizer, template) for c in conversations]


def _replay_set(cfg: SFTConfig, model, tokenizer, template, val_convs) -> list[dict]:
    """The base model's own answers (train/replay.py), made once per run: replay.jsonl holds them and
    replay.json (written last) the options that made them, which a resumed run must repeat."""
    import json
    import os
    from ..fsutil import atomic_write
    from .replay import replay_questions, self_replay
    out = Path(cfg.out_dir)
    opts = {"replay": cfg.replay, "replay_prompts": cfg.replay_prompts or "chatterbot,python_faq",
            "replay_max_tokens": cfg.replay_max_tokens or 64, "seed": cfg.seed}
    if cfg.resume and (out / "replay.json").is_file():
        made = json.loads((out / "replay.json").read_text("utf-8"))
        changed = [f"--{k.replace('_', '-')} {made.get(k)!r} (now {v!r})" for k, v in opts.items() if made.get(k) != v]
        if changed:
            raise PicochatError(f"cannot resume: {out} replayed with {', '.join(changed)}; repeat its options")
        return [json.loads(line) for line in (out / "replay.jsonl").read_text("utf-8").splitlines()]
    if not cfg.replay:
        return []
    exclude = [m["content"] for c in val_convs for m in c if m["role"] == "user"]
    questions = replay_questions(opts["replay_prompts"], cfg.replay, seed=cfg.seed, exclude=exclude)
    convs = self_replay(model, tokenizer, template, questions, max_tokens=opts["replay_max_tokens"])
    if int(os.environ.get("RANK", "0")) == 0:  # every process makes the same set; one writes it
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "replay.jsonl", "".join(json.dumps(c) + "\n" for c in convs))
        atomic_write(out / "replay.json", json.dumps(opts | {"asked": len(questions), "kept": len(convs),
                                                           "finished": sum(c["finished"] for c in convs),
                                                           "questions": questions}, indent=1) + "\n")
    return convs


def _adapter_checkpoints(model, lora, base: str, tokenizer) -> dict:
    """The Trainer's hooks for a LoRA run: checkpoints hold the adapters (and optimizer state) only."""
    from ..model.lora import load_trained, save_trained

    def save_weights(out_dir: Path, extra_files: dict) -> None:
        save_trained(model, lora, out_dir, base=base, tokenizer=tokenizer, extra_files=extra_files)

    def load_weights(ckpt: Path) -> None:
        load_trained(model, lora, ckpt)
    return {"save_weights": save_weights, "load_weights": load_weights}


def sft(cfg: SFTConfig) -> list[dict]:
    """Fine-tune cfg.base on cfg.data; returns the metric rows. The plain-Python form of `picochat sft`."""
    from ..chat_template import pick_template
    from ..checkpoints.io import load_model
    from ..data.chat_data import load_mixture
    model, tokenizer, _ = load_model(cfg.base)  # fp32 weights: the Trainer autocasts
    if tokenizer is None:
        raise PicochatError(f"{cfg.base} has no tokenizer.json; SFT needs the tokenizer the model was trained with")
    template = pick_template(tokenizer)  # refuses a tokenizer without chat special tokens, with a hint
    row_len = min(cfg.seq_len, model.config.block_size) + 1  # inputs and their next-token targets
    conversations, report = load_mixture(cfg.data, split="train", seed=cfg.seed, strict=cfg.strict,
                                         max_tokens=row_len, tokenizer=tokenizer)
    for problem in report.get("problems", [])[:5]:
        print(f"skipped: {problem}")
    if report.get("skipped"):
        print(f"skipped {report['skipped']} bad conversation(s) in all (--strict refuses them instead)")
    n_val = min(cfg.val_conversations, len(conversations) // 10)
    train_convs, val_convs = conversations[n_val:], conversations[:n_val]
    if not train_convs:
        raise PicochatError(f"the data {cfg.data!r} holds no usable conversation; see `picochat data chat --list`")
    replayed = _replay_set(cfg, model, tokenizer, template, val_convs)
    from .replay import render_replay
    examples = _render(train_convs, tokenizer, template) + render_replay(replayed, tokenizer, template)
    train = PackedRows(pack(examples, row_len), row_len, cfg.seed)
    val = PackedRows(pack(_render(val_convs, tokenizer, template), row_len), row_len, cfg.seed) if val_convs else None
    specials = set(tokenizer.special_tokens.values())
    V = model.config.vocab_size
    token_bytes = torch.tensor([0 if i in specials or i >= tokenizer.vocab_size else len(tokenizer.token_bytes(i))
                                for i in range(V)])

    lora, hooks = None, {}
    if cfg.lora_rank > 0:
        from ..model.lora import LoraConfig, add_lora
        lora = LoraConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                          targets=tuple(t.strip() for t in cfg.lora_targets.split(",") if t.strip()))
        torch.manual_seed(cfg.seed)
        add_lora(model, lora)
        hooks = _adapter_checkpoints(model, lora, cfg.base, tokenizer)
    model.train()
    B = cfg.batch_size
    box: list[Trainer] = []

    def batch_fn(step: int, micro: int):
        per_step = B * cfg.grad_accum * box[0].dist.world
        return train.batch(step * per_step + micro * B, B)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    trainer = Trainer(cfg, model, batch_fn, sft_loss,
                      eval_fn=(lambda m: evaluate_sft(m, val, token_bytes, B)) if val is not None else None,
                      tokenizer=tokenizer, tokens_per_micro=B * (row_len - 1),
                      run_info={"stage": "sft", "base": cfg.base, "data": cfg.data, "data_report": report,
                                "replayed": len(replayed),
                                "lora": asdict(lora) if lora else None, "trainable_params": trainable},
                      **hooks)
    box.append(trainer)
    if trainer.dist.is_main:
        print(f"sft: {cfg.base} ({model.num_params() / 1e6:.1f}M parameters, {trainable / 1e6:.2f}M trained"
              f"{f', LoRA r={cfg.lora_rank}' if lora else ''}); {len(train_convs):,} conversations"
              f"{f' (+{len(replayed)} replayed)' if replayed else ''} in {len(train):,} "
              f"rows of {row_len - 1} tokens ({train.trained_tokens():,} trained tokens), {len(val_convs)} held out")
    rows = trainer.fit()
    if trainer.dist.is_main:
        evals = [r for r in rows if "val_loss" in r]
        tail = f", val loss {evals[-1]['val_loss']:.4f}" if evals else ""
        print(f"done: step {trainer.step}{tail}; chat with it: picochat chat {cfg.out_dir}")
    return rows


def add_parser(sub) -> None:
    p = sub.add_parser("sft", help="chat fine-tuning: teach a pretrained model to answer (full or LoRA)",
                       description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n")[-1],
                       formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    add_dataclass_args(p, SFTConfig, positional=("base",))
    p.set_defaults(func=run_sft)


def run_sft(args) -> int:
    sft(dataclass_from_args(SFTConfig, args))
    return 0
