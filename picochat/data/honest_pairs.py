"""Honest preference pairs from tasks with a checkable answer: the model's own answers, judged by the rule.

For each question of a checkable task (chat_tasks.py), the SFT model answers ``samples`` times at a
temperature; each answer is checked by the task's exact-answer rule (``Task.check``, as `picochat eval`
scores). A correct, finished answer is *chosen*; *rejected* is, in this order of preference:

- ``wrong``: one of the model's own finished answers that the check fails (the pairs that teach most);
- ``truncated``: the correct answer cut before its end, so the answer it carries is lost;
- ``rambling``: the correct answer followed by unrelated sentences from other answers;
- ``off_topic``: the answer to another question.

When no sample is right but one *starts* right (its first sentences carry the right answer and the rest
spoils it, as a rambling one does), that start is the chosen answer (``chosen_source`` "edited"): the
model's own words, cut where a person editing it would cut. Every rejected answer is checked to fail
(a cut or borrowed answer that still happens to carry the right number is dropped), so a pair never
claims a right answer is worse. Questions the model never got right are skipped (counted) unless
``reference=True``, which takes the task's reference answer as chosen: its wording is the data's, not
the model's, and a reward model learns that difference (measured: trained on such pairs it preferred
"The answer is N." whatever N was, and PPO found it). Rows are written in the same trl format as
``picochat feedback export``, plus ``kind`` (held-out accuracy is reported per kind) and ``source``, so
the reward model and DPO read both without conversion:

    picochat data pairs runs/sft --tasks addition2 --questions 2000 --out pairs.jsonl
    picochat data pairs runs/sft --tasks addition2 --questions 300 --split test --out pairs-test.jsonl
"""
from __future__ import annotations

import random
from collections import Counter
from typing import Optional

from ..errors import PicochatError

KINDS = ("wrong", "truncated", "rambling", "off_topic")


def honest_pairs(model, tokenizer, template: str, tasks: list[str], questions: int, samples: int = 4,
                 split: str = "train", seed: int = 0, temperature: float = 1.0, max_tokens: int = 64,
                 pairs_per_question: int = 2, batch_size: int = 64, reference: bool = False) -> tuple[list[dict], dict]:
    """-> (rows, report). ``questions`` per task; up to ``pairs_per_question`` pairs each: the model's
    wrong answers first, then the synthetic kinds in rotation."""
    from ..eval.chat_eval import _prompt, greedy_results
    from .chat_tasks import TASKS
    if samples < 1 or questions < 1 or pairs_per_question < 1:
        raise PicochatError("--samples, --questions and --pairs-per-question must be at least 1")
    rng = random.Random(seed)
    rows: list[dict] = []
    report: dict = {"questions": 0, "samples": 0, "sampled_correct": 0, "kinds": Counter(),
                    "chosen_model": 0, "chosen_edited": 0, "chosen_reference": 0,
                    "skipped_no_right_answer": 0}
    for name in tasks:
        task = TASKS.get(name)
        if task is None or not task.checkable:
            ok = ", ".join(n for n, t in TASKS.items() if t.checkable)
            raise PicochatError(f"honest pairs need a task with a checkable answer; {name!r} is not one ({ok})")
        items = task.generate(split, questions, seed=seed)
        prompts = [_prompt(it["messages"]) for it in items]
        results = greedy_results(model, tokenizer, template, [p for p in prompts for _ in range(samples)],
                                 max_tokens=max_tokens, batch_size=batch_size, temperature=temperature,
                                 seed=seed)
        others = [it["messages"][-1]["content"] for it in items]
        for q, (item, prompt) in enumerate(zip(items, prompts)):
            mine = results[q * samples:(q + 1) * samples]
            check = lambda text: task.check(text, item["answer"])  # noqa: E731
            right = [r.text for r in mine if r.finish_reason == "stop" and r.text.strip() and check(r.text)]
            wrong = list(dict.fromkeys(r.text for r in mine if r.finish_reason == "stop" and r.text.strip()
                                       and not check(r.text)))
            report["questions"] += 1
            report["samples"] += len(mine)
            report["sampled_correct"] += sum(check(r.text) for r in mine)
            edited = [e for e in (_right_start(r.text, check) for r in mine) if e]  # cut answers too
            source = "model" if right else "edited" if edited else "reference"
            right = right or edited
            if not right and not reference:
                report["skipped_no_right_answer"] += 1
                continue
            chosen = right[0] if right else item["messages"][-1]["content"]
            report[f"chosen_{source}"] += 1
            rejected = [(w, "wrong") for w in wrong]
            for k in range(2 * len(KINDS)):  # synthetic ones, from a kind that varies with the question
                kind = KINDS[1 + (q + k) % 3]
                bad = _synthetic(kind, chosen, others, q, rng, tokenizer)
                if bad and bad.strip() and bad != chosen and not check(bad) and bad not in [b for b, _ in rejected]:
                    rejected.append((bad, kind))
            for bad, kind in rejected[:pairs_per_question]:
                rows.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
                             "rejected": [{"role": "assistant", "content": bad}],
                             "kind": kind, "source": f"honest:{name}:{split}",
                             "chosen_source": source})
                report["kinds"][kind] += 1
    report["pairs"] = len(rows)
    report["kinds"] = dict(report["kinds"])
    return rows, report


def _right_start(text: str, check) -> Optional[str]:
    """The shortest run of whole sentences at the start of a wrong answer that the check accepts, if any."""
    if check(text):
        return None
    for i, ch in enumerate(text):
        if ch in ".!?" and (i + 1 == len(text) or text[i + 1] == " ") and check(text[:i + 1]):
            return text[:i + 1]
    return None


def _synthetic(kind: str, chosen: str, others: list[str], q: int, rng: random.Random, tokenizer) -> Optional[str]:
    if kind == "truncated":
        ids = tokenizer.encode(chosen)
        return tokenizer.decode(ids[:rng.randint(1, len(ids) - 1)]).rstrip() if len(ids) > 1 else None
    other = others[(q + rng.randint(1, len(others) - 1)) % len(others)] if len(others) > 1 else None
    if other is None:
        return None
    if kind == "rambling":
        extra = [others[rng.randrange(len(others))] for _ in range(rng.randint(2, 4))]
        return " ".join([chosen] + extra)
    return other  # off_topic
