"""Chat evaluation: how well a model answers, measured the same way for every model.

Two numbers per model, each comparable across models and tokenizers:

- **Task accuracy** (exact match). For every checkable task in ``picochat.data.chat_tasks.TASKS``
  the held-out split (``task.generate("test", n, seed)``, which training never sees) is asked:
  the conversation up to its last user turn is rendered with the model's chat template and a
  generation prompt, the model answers greedily (temperature 0, so the score is deterministic) through
  the batched KV-cache engine, stopping at the template's end-of-turn tokens or ``max_tokens``, and the
  reply is scored by ``task.check(reply, answer)``: the task's one strict, documented answer rule
  (see chat_tasks.py). A reply cut off by ``max_tokens`` is scored as it stands.
- **Chat bits per byte** on held-out conversations: the sum of -log2 p over the assistant's tokens
  (the loss mask of ``render_conversation``: the reply and the token that ends its turn) divided by the
  UTF-8 bytes of those tokens' text (special tokens count 0 bytes, as in ``pretrain.evaluate_lm``). Per
  byte, not per token, so models with different vocabularies compare. The system prompt a model was
  tuned with (SmolLM2's) is part of the context, never of the score.

Speed: prompts are sorted by length and generated in left-padded batches (``Engine.generate``), so a few
hundred questions take seconds to a minute; bits per byte runs the LM head only at the scored positions.
``dtype="auto"`` runs in bf16 where the CPU has native bf16 (``pick_dtype``), ``--dtype fp32`` gives the
reference numbers. Measured on the project's 2-core machine (SmolLM2, n=100 per task, idle machine):
bf16 12-17 s per task, 164 s for all ten tasks and bpb; fp32 about 1.6x slower. bf16 vs fp32 moved
accuracies by a few questions in 100 (greedy decoding flips on near-ties: compare 29 vs 31%,
count_letter 26 vs 30%, word_problems 15 vs 14%) and chat bpb by 0.002 (1.172 vs 1.174).
On a machine whose cores are shared with other busy processes, OpenMP's 2-thread barriers stall:
``OMP_NUM_THREADS=1`` was 3-6x faster there.
"""
from __future__ import annotations

import math
import sys
import time
from typing import Optional

import torch

from ..errors import PicochatError

DEFAULT_BPB_DATA = "chatterbot,identity,greetings"
N_EXAMPLES = 4  # examples kept per task in the results (the first ones, plus the first wrong ones)


def _prompt(messages: list[dict]) -> list[dict]:
    """The conversation up to (not including) its final assistant turn: what the model is asked."""
    msgs = list(messages)
    while msgs and msgs[-1]["role"] == "assistant":
        msgs.pop()
    if not msgs or msgs[-1]["role"] != "user":
        raise PicochatError("a task item must end with a user turn (optionally followed by the reference answer)")
    return msgs


def generate_replies(model, tokenizer, template: str, conversations: list[list[dict]], max_tokens: int = 32,
                     batch_size: int = 32, default_system: Optional[str] = None) -> list[str]:
    """Greedy replies to each conversation's last user turn, in the order given."""
    return [r.text for r in greedy_results(model, tokenizer, template, conversations, max_tokens, batch_size,
                                           default_system)]


def greedy_results(model, tokenizer, template: str, conversations: list[list[dict]], max_tokens: int = 32,
                   batch_size: int = 32, default_system: Optional[str] = None, temperature: float = 0.0,
                   seed: int = 0) -> list:
    """generate_replies with the engine's whole GenerationResult (text, token ids, finish reason).
    Prompts are sorted by length so that each left-padded batch holds similar lengths (less padding).
    temperature > 0 samples instead (RL rollouts, preference pairs): the batch starting at sorted
    position s draws from seed * 1_000_003 + s, so the same call gives the same answers."""
    from ..chat_template import render_conversation, stop_token_ids
    from ..engine.engine import Engine, SamplingParams
    if batch_size < 1:
        raise PicochatError(f"batch_size must be at least 1, got {batch_size}")
    prompts = [render_conversation(c, tokenizer, template, add_generation_prompt=True,
                                   default_system=default_system)[0] for c in conversations]
    engine = Engine(model, tokenizer)
    stops = stop_token_ids(tokenizer, template)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list = [None] * len(prompts)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, stop_token_ids=stops,
                                seed=seed * 1_000_003 + s if temperature > 0 else None)
        for i, res in zip(idx, engine.generate([prompts[i] for i in idx], params)):
            results[i] = res
        engine.reset()  # a batch of one keeps its cache; nothing should carry over between questions
    return results


def _resolve(tasks: list) -> list:
    """Task names -> Task objects (a Task object passes through: tests and callers may bring their own)."""
    names = [t for t in tasks if isinstance(t, str)]
    if not names:
        return list(tasks)
    from ..data.chat_tasks import TASKS
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise PicochatError(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")
    return [TASKS[t] if isinstance(t, str) else t for t in tasks]


def eval_tasks(model, tokenizer, template: str, tasks: list[str], n: int = 200, seed: int = 0,
               max_tokens: int = 32, batch_size: int = 32, default_system: Optional[str] = None,
               progress: bool = True) -> dict:
    """-> {task name: {"accuracy", "n", "correct", "seconds", "examples": [{question, reply, answer, ok}]}}
    for each checkable task named (tasks without an exact answer are skipped). `tasks`: names in
    chat_tasks.TASKS, or Task objects."""
    if n < 1:
        raise PicochatError(f"n must be at least 1, got {n}")
    results = {}
    for task in _resolve(tasks):
        name = task.name
        if not task.checkable:
            if progress:
                print(f"eval: {name} has no exact answer; skipped", file=sys.stderr)
            continue
        t0 = time.perf_counter()
        items = task.generate("test", n, seed=seed)
        convs = [_prompt(it["messages"]) for it in items]
        replies = generate_replies(model, tokenizer, template, convs, max_tokens, batch_size, default_system)
        oks = [bool(task.check(r, it["answer"])) for r, it in zip(replies, items)]
        examples = [{"question": c[-1]["content"], "reply": r, "answer": it["answer"], "ok": ok}
                    for c, r, it, ok in zip(convs, replies, items, oks)]
        wrong = [e for e in examples if not e["ok"]]
        keep = examples[:N_EXAMPLES] + [e for e in wrong[:N_EXAMPLES] if e not in examples[:N_EXAMPLES]]
        seconds = time.perf_counter() - t0
        results[name] = {"accuracy": sum(oks) / len(oks), "n": len(oks), "correct": sum(oks),
                         "seconds": round(seconds, 2), "examples": keep}
        if progress:
            print(f"eval: {name:<16} {100 * sum(oks) / len(oks):5.1f}%  ({len(oks)} questions, {seconds:.1f}s)",
                  file=sys.stderr)
    return results


@torch.no_grad()
def chat_bpb(model, tokenizer, template: str, conversations: list[list[dict]],
             default_system: Optional[str] = None, max_batch_tokens: int = 2048) -> float:
    """Bits per byte of the assistant's tokens of `conversations` (see the module docstring).
    A conversation longer than the model's context is scored on its first block_size + 1 tokens."""
    from ..chat_template import render_conversation
    if not conversations:
        raise PicochatError("chat_bpb needs at least one conversation")
    device = next(model.parameters()).device
    block = model.config.block_size
    special = set(tokenizer.special_tokens.values())
    rows = []
    for conv in conversations:
        ids, mask = render_conversation(conv, tokenizer, template, default_system=default_system)
        ids, mask = ids[:block + 1], mask[:block + 1]
        if sum(mask[1:]):
            rows.append((ids, mask))
    if not rows:
        raise PicochatError("no conversation has an assistant turn to score")
    rows.sort(key=lambda r: len(r[0]))
    bits, n_bytes = 0.0, 0
    i = 0
    while i < len(rows):
        # right-padded batches of similar length under a token budget (padding on the right is never
        # attended to by the real tokens before it, causal attention)
        j = i + 1
        while j < len(rows) and (j + 1 - i) * (len(rows[j][0]) - 1) <= max_batch_tokens:
            j += 1
        batch = rows[i:j]
        T = max(len(ids) for ids, _ in batch) - 1
        x = torch.zeros(len(batch), T, dtype=torch.long)
        y = torch.full((len(batch), T), -1, dtype=torch.long)
        for b, (ids, mask) in enumerate(batch):
            t = torch.tensor(ids)
            x[b, :len(ids) - 1] = t[:-1]
            y[b, :len(ids) - 1] = torch.where(torch.tensor(mask[1:]) == 1, t[1:], -1)
            n_bytes += sum(len(tokenizer.token_bytes(tok)) for tok, m in zip(ids[1:], mask[1:])
                           if m and tok not in special)
        y = y.to(device)
        logits = _scored_logits(model, x.to(device), y >= 0)  # (K, V) at the scored positions only
        logp = torch.log_softmax(logits.float(), dim=-1)
        bits += -logp.gather(-1, y[y >= 0].unsqueeze(-1)).sum().item() / math.log(2)
        i = j
    return bits / max(n_bytes, 1)


def _scored_logits(model, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The model's logits at the positions `keep` (B, T) marks, as (K, vocab).

    Assistant tokens are about a third of a chat's tokens, and the LM head (SmolLM2: 49,152 x 576) and
    the log-softmax over it cost as much as the rest of the model: a hook on the final norm hands the
    LM head only the kept positions' hidden states. Same numbers as slicing the full logits."""
    norm = getattr(model, "final_norm", None)
    if norm is None:
        return model(x)[0][keep]
    handle = norm.register_forward_hook(lambda mod, args, out: out[keep].unsqueeze(0))
    try:
        return model(x)[0][0]
    finally:
        handle.remove()


def default_tasks() -> list[str]:
    """Every checkable task, in TASKS order."""
    from ..data.chat_tasks import TASKS
    return [name for name, t in TASKS.items() if t.checkable]


def load_bpb_conversations(spec: str, seed: int = 0, limit: Optional[int] = None) -> list[list[dict]]:
    """The held-out split of a chat mixture spec (picochat.data.chat_data.load_mixture)."""
    from ..data.chat_data import load_mixture
    convs, _ = load_mixture(spec, split="test", seed=seed)
    return list(convs)[:limit] if limit else list(convs)


def evaluate(model_spec: str, tasks: Optional[list[str]] = None, n: int = 200, seed: int = 0,
             max_tokens: int = 32, batch_size: int = 32, bpb_data: Optional[str] = DEFAULT_BPB_DATA,
             bpb_limit: Optional[int] = None, dtype: str = "auto", device: str = "auto",
             progress: bool = True) -> dict:
    """Load a model (smollm2, a .gguf file, a checkpoint or run directory) and run both evaluations.
    bpb_data=None (or "") skips bits per byte; tasks=[] skips the tasks."""
    from ..chat_template import default_system_prompt, pick_template
    from ..checkpoints.gguf import gguf_source
    from ..checkpoints.io import load_model
    from ..device import pick_device, pick_dtype
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    t0 = time.perf_counter()
    model, tokenizer, where = load_model(model_spec, device=dev, dtype=dt)
    if tokenizer is None:
        raise PicochatError(f"{model_spec} has no tokenizer.json; it cannot be asked questions")
    model.eval()
    template = pick_template(tokenizer)
    default_system = default_system_prompt(tokenizer, from_gguf=gguf_source(model_spec) is not None)
    tasks = default_tasks() if tasks is None else list(tasks)
    out = {"model": str(model_spec), "path": str(where), "template": template,
           "dtype": str(dt).replace("torch.", ""), "device": str(dev), "default_system": default_system,
           "n": n, "seed": seed, "max_tokens": max_tokens, "tasks": {}, "chat_bpb": None,
           "bpb_data": bpb_data or None, "bpb_conversations": 0}
    with torch.inference_mode():
        out["tasks"] = eval_tasks(model, tokenizer, template, tasks, n=n, seed=seed, max_tokens=max_tokens,
                                  batch_size=batch_size, default_system=default_system, progress=progress)
        if bpb_data:
            t1 = time.perf_counter()
            convs = load_bpb_conversations(bpb_data, seed=seed, limit=bpb_limit)
            out["chat_bpb"] = chat_bpb(model, tokenizer, template, convs, default_system=default_system)
            out["bpb_conversations"] = len(convs)
            if progress:
                print(f"eval: chat bpb {out['chat_bpb']:.3f} on {len(convs)} held-out conversations "
                      f"({time.perf_counter() - t1:.1f}s)", file=sys.stderr)
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def format_table(results: dict) -> str:
    lines = [f"{'task':<16}{'accuracy':>9}{'n':>7}"]
    for name, r in results["tasks"].items():
        lines.append(f"{name:<16}{100 * r['accuracy']:>8.1f}%{r['n']:>7}")
    if results.get("chat_bpb") is not None:
        lines.append(f"{'chat bpb':<16}{results['chat_bpb']:>9.3f}")
    return "\n".join(lines)
