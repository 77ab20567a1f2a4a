"""Self-replay for SFT: conversations answered by the base model itself, mixed into the training data.

Fine-tuning on a narrow set (say, the identity conversations) pulls every answer toward that set: asked
anything, the model starts to say "I am picochat". Training at the same time on questions the base model
answers itself, with its own greedy answers as targets, costs nearly nothing on those (they are already
its most likely tokens) and anchors everything the new data does not mention: a cheap form of
self-distillation, as replay of old data is in continual learning. An answer the base did not finish
within ``max_tokens`` is kept without its end-of-turn token (``finished`` False): SFT trains on its words
but never teaches the model to stop where the cut fell. Dropping such answers instead would keep only the
short ones, and teach brevity. Questions
come from training splits only, and never from the SFT run's own validation conversations, so neither a
held-out test question nor a validation one is answered into the training data.
"""
from __future__ import annotations

import random
import sys
import time
from typing import Iterable

import torch

from ..errors import PicochatError


def replay_questions(prompts_spec: str, n: int, seed: int = 0, exclude: Iterable[str] = ()) -> list[str]:
    """Up to n distinct first user questions of ``prompts_spec``'s training split, in a seeded order."""
    from ..data.chat_data import load_mixture
    convs, _ = load_mixture(prompts_spec, split="train", seed=seed)
    skip = set(exclude)
    questions = list(dict.fromkeys(m["content"] for c in convs for m in c[:2]
                                   if m["role"] == "user" and m["content"] not in skip))
    if not questions:
        raise PicochatError(f"--replay-prompts {prompts_spec!r} holds no user question to replay")
    random.Random(seed).shuffle(questions)
    if len(questions) < n:
        print(f"replay: {prompts_spec} holds {len(questions)} questions, fewer than the {n} asked for; "
              f"using them all", file=sys.stderr)
    return questions[:n]


def self_replay(model, tokenizer, template: str, questions: list[str], max_tokens: int = 64,
                batch_size: int = 16) -> list[dict]:
    """[{"messages": [user, assistant], "finished": bool}]: the model's own greedy answers, "finished" when
    the model ended the answer itself rather than being cut at max_tokens. Empty answers are left out."""
    from ..eval.chat_eval import greedy_results
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        results = greedy_results(model, tokenizer, template, [[{"role": "user", "content": q}] for q in questions],
                                 max_tokens=max_tokens, batch_size=batch_size)
    model.train(was_training)
    out = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": r.text}],
            "finished": r.finish_reason == "stop"} for q, r in zip(questions, results) if r.text.strip()]
    print(f"replay: the base answered {len(questions)} questions in {time.perf_counter() - t0:.0f}s; "
          f"{sum(o['finished'] for o in out)} finished within {max_tokens} tokens, "
          f"{sum(not o['finished'] for o in out)} cut there (kept without their end)", file=sys.stderr)
    return out


def render_replay(items: list[dict], tokenizer, template: str) -> list[tuple[list[int], list[int]]]:
    """(ids, loss_mask) per replayed answer: a finished one as render_conversation gives it; a cut one
    as the prompt plus its words, trained, and no end-of-turn token."""
    from ..chat_template import render_conversation
    out = []
    for item in items:
        if item["finished"]:
            out.append(render_conversation(item["messages"], tokenizer, template))
            continue
        ids, mask = render_conversation(item["messages"][:-1], tokenizer, template, add_generation_prompt=True)
        answer = tokenizer.encode(item["messages"][-1]["content"])
        out.append((ids + answer, mask + [1] * len(answer)))
    return out
