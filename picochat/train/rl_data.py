"""Answers as tensors, shared by the reward model, DPO and PPO/GRPO.

An answer is the prompt rendered with the chat template and a generation prompt, followed by the
answer's tokens up to and including its end-of-turn token (what the model must learn to emit; an answer
cut short has none). Rows are right-padded: attention is causal, so padding after a row's end never
changes what its real tokens see, and no attention mask is needed.

Token-level tensors live in *target* space, shape (B, T-1): index j is the prediction of token j+1 from
the tokens up to j, i.e. ``logits[:, :-1]`` against ``ids[:, 1:]``. ``mask[b, j]`` is 1 when token j+1
belongs to row b's answer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import PicochatError
from .rl_losses import token_logprobs


@dataclass
class PreferenceOptions:
    """The preference data of `picochat reward` and `picochat dpo`, and the training defaults they share."""
    data: str = ""
    """Preference pairs: .jsonl files (comma-separated) from `picochat feedback export` or `picochat data pairs`."""
    val_data: Optional[str] = None
    """Held-out pairs (.jsonl); default: hold out --val-fraction of the prompts of --data."""
    val_fraction: float = 0.1
    """Share of prompts held out of --data when --val-data is not given."""
    strict: bool = False
    """Refuse the data at its first bad row instead of skipping (and counting) bad rows."""
    batch_size: int = 8
    """Pairs per micro-batch per process."""
    warmup_steps: int = 10
    """Linear warmup steps."""
    weight_decay: float = 0.0
    """AdamW weight decay (matrices only)."""
    eval_every: int = 50
    """Evaluate on the held-out pairs every this many steps (and at the end)."""
    ckpt_every: int = 100
    """Write a checkpoint every this many steps (and at the end)."""

    def check_preferences(self) -> None:
        if not self.data:
            raise PicochatError("--data is required: preference pairs from `picochat feedback export` or "
                                "`picochat data pairs`")
        if not 0 < self.val_fraction < 1:
            raise PicochatError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        if self.val_data and self.val_fraction != PreferenceOptions.val_fraction:
            raise PicochatError("--val-fraction holds pairs out of --data; with --val-data nothing is held out of it: "
                                "give one or the other")


@dataclass
class LoraOptions:
    """LoRA for the RL stages' trained bodies (policy, value, reward); a scalar head always trains whole."""
    lora_rank: int = 0
    """LoRA rank r (0: train every weight)."""
    lora_alpha: float = 16.0
    """LoRA scale alpha: the update is (alpha / r) B A."""
    lora_targets: str = "q,k,v,o"
    """Layers that get adapters: q,k,v,o,gate,up,down."""

    def lora_config(self):
        """The LoraConfig to apply, or None for full fine-tuning."""
        if self.lora_rank < 0:
            raise PicochatError(f"--lora-rank must be >= 0, got {self.lora_rank}")
        if not self.lora_rank:
            if (self.lora_alpha, self.lora_targets) != (LoraOptions.lora_alpha, LoraOptions.lora_targets):
                raise PicochatError("--lora-alpha and --lora-targets shape LoRA adapters; give --lora-rank R too")
            return None
        from ..model.lora import LoraConfig
        return LoraConfig(rank=self.lora_rank, alpha=self.lora_alpha,
                          targets=tuple(t.strip() for t in self.lora_targets.split(",") if t.strip()))


def encode_answer(prompt: list[dict], answer: list[dict], tokenizer, template: str,
                  default_system: Optional[str] = None) -> tuple[list[int], int]:
    """-> (ids, prompt_len): the rendered prompt + answer, cut after the answer's last trained token
    (the end-of-turn token), and where the answer starts."""
    from ..chat_template import render_conversation
    head, _ = render_conversation(prompt, tokenizer, template, add_generation_prompt=True,
                                  default_system=default_system)
    ids, mask = render_conversation(prompt + answer, tokenizer, template, default_system=default_system)
    last = max(i for i, m in enumerate(mask) if m)
    if ids[:len(head)] != head or last < len(head):
        raise PicochatError("the chat template does not render the prompt as a prefix of prompt + answer")
    return ids[:last + 1], len(head)


def pad_batch(seqs: list[list[int]], prompt_lens: list[int], pad_id: int = 0,
              length: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> ids (B, T), mask (B, T-1) float in target space, last (B,) index of each row's last token.
    length: pad every row to this many tokens (so that batches of one rollout share their shapes)."""
    T = max(max(map(len, seqs)), length or 0)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T - 1)
    for b, (s, p) in enumerate(zip(seqs, prompt_lens)):
        ids[b, :len(s)] = torch.tensor(s)
        mask[b, p - 1:len(s) - 1] = 1.0  # targets p .. len-1: the answer's tokens
    last = torch.tensor([len(s) - 1 for s in seqs])
    return ids, mask, last


def answer_logprobs(model, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(B, T-1) log p(token j+1 | tokens <= j) under a language model, its logits divided by temperature
    (RL scores the distribution its answers were sampled from)."""
    logits, _ = model(ids[:, :-1])
    return token_logprobs(logits.float() / temperature if temperature != 1.0 else logits, ids[:, 1:])


def same_tokenizer(a, b, what_a: str, what_b: str) -> None:
    """Refuse, in one line, two models whose token ids mean different things."""
    if a is None or b is None or a.fingerprint() != b.fingerprint():
        raise PicochatError(f"{what_a} and {what_b} use different tokenizers ({a.fingerprint() if a else None} vs "
                            f"{b.fingerprint() if b else None}): token ids would mean different things; "
                            f"train the reward model from the same SFT model as the policy")


def freeze(model) -> None:
    """A frozen model (reference, reward): no gradients, eval mode."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)


def no_dropout(model) -> None:
    """Dropout off everywhere (PPO compares log-probs of the same tokens across forward passes)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        elif isinstance(getattr(m, "dropout", None), float):  # attention's dropout_p
            m.dropout = 0.0
    if hasattr(model, "config") and hasattr(model.config, "dropout"):
        model.config.dropout = 0.0


def check_tasks(spec: str, eval_n: int = 200) -> list[str]:
    """The comma-separated names, each a checkable task, or a one-line refusal naming the ones that are.
    eval_n, the questions per task, must be left alone when there is no task to ask them."""
    from ..data.chat_tasks import TASKS
    if eval_n < 1:
        raise PicochatError(f"--eval-n must be at least 1, got {eval_n}")
    if not spec.strip() and eval_n != 200:
        raise PicochatError("--eval-n is the questions per --eval-tasks task; give --eval-tasks too")
    names = [t.strip() for t in spec.split(",") if t.strip()]
    for t in names:
        if t not in TASKS or not TASKS[t].checkable:
            raise PicochatError(f"--eval-tasks: {t!r} is not a checkable task "
                                f"({', '.join(n for n, x in TASKS.items() if x.checkable)})")
    return names
