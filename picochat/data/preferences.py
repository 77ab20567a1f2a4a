"""Preference data for the reward model and DPO: which of two answers to the same prompt people prefer.

One JSONL row per judgement, in trl's conversational preference format, which is exactly what
``picochat feedback export`` writes (its extra keys, such as source and model, are kept aside):

    {"prompt": [{"role": "user", "content": "..."}], "chosen": [{"role": "assistant", "content": "..."}],
     "rejected": [{"role": "assistant", "content": "..."}]}

``chosen`` and ``rejected`` may also be plain strings (one assistant message). A ranking of K answers,

    {"prompt": [...], "completions": ["best", "second", ...]}   or with "ranking": [indices, best first]

becomes its K(K-1)/2 pairs: each answer preferred to every answer ranked below it.

Every row is checked: broken JSON, missing fields, unknown roles, empty or non-string content, a prompt
the chat template refuses, chosen equal to rejected, and (given a tokenizer and max_tokens) a prompt and
answer longer than the context. A bad row is reported as ``path:line: reason`` and skipped, with a count,
or with strict=True refused at once; nothing is trained on silently.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

from ..errors import PicochatError
from .chat_sources import clean, validate


def expand_ranking(prompt: list[dict], best_first: list) -> list[dict]:
    """K answers ordered best first -> the K(K-1)/2 pairs {prompt, chosen, rejected}."""
    return [{"prompt": prompt, "chosen": best_first[i], "rejected": best_first[j]}
            for i in range(len(best_first)) for j in range(i + 1, len(best_first))]


def _answer(x) -> Union[list[dict], str]:
    """An answer as a list of assistant messages, or the reason it is not one."""
    if isinstance(x, str):
        x = [{"role": "assistant", "content": x}]
    if not isinstance(x, list) or not x:
        return "must be a string or a non-empty list of assistant messages"
    if any(not isinstance(m, dict) or m.get("role") != "assistant" for m in x):
        return "must hold assistant messages only"
    return x


def check_pair(row: dict, render=None, max_tokens: Optional[int] = None) -> tuple[Optional[dict], Optional[str]]:
    """(the cleaned pair, None) or (None, why it cannot be trained on)."""
    for key in ("prompt", "chosen", "rejected"):
        if key not in row:
            return None, f'missing field "{key}"'
    prompt = row["prompt"]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt:
        return None, '"prompt" must be a string or a non-empty list of messages'
    out = {"prompt": None}
    for key in ("chosen", "rejected"):
        answer = _answer(row[key])
        if isinstance(answer, str):
            return None, f'"{key}" {answer}'
        why = validate(prompt + answer)  # roles, contents, the chat template's turn order
        if why is not None:
            return None, f"prompt + {key}: {why}"
        out[key] = clean(answer)
    if out["chosen"] == out["rejected"]:
        return None, "chosen and rejected are the same answer: nothing to learn from"
    out["prompt"] = clean(prompt)
    kind = row.get("kind", row.get("source"))  # honest pairs' kind, or the export's ranking / thumbs
    if isinstance(kind, str):  # reports split held-out accuracy by it
        out["kind"] = kind
    if render is not None and max_tokens is not None:
        for key in ("chosen", "rejected"):
            n = len(render(out["prompt"] + out[key]))
            if n > max_tokens:
                return None, f"prompt + {key} is {n} tokens, longer than the context of {max_tokens}"
    return out, None


def read_preferences(path: Union[str, Path], tokenizer=None, max_tokens: Optional[int] = None,
                     strict: bool = False) -> tuple[list[dict], dict]:
    """-> (pairs, report {"rows", "pairs", "skipped", "problems": ["path:line: reason", ...]})."""
    path = Path(path)
    if not path.is_file():
        raise PicochatError(f"no preference file at {path}; make one with `picochat feedback export {path}`")
    render = None
    if tokenizer is not None and max_tokens is not None:
        from ..chat_template import pick_template, render_conversation
        template = pick_template(tokenizer)
        render = lambda msgs: render_conversation(msgs, tokenizer, template)[0]  # noqa: E731
    pairs: list[dict] = []
    report: dict = {"rows": 0, "pairs": 0, "skipped": 0, "problems": []}

    def problem(where: str, why: str) -> None:
        if strict:
            raise PicochatError(f"{where}: {why} (strict: fix or remove the row, or leave out --strict to skip it)")
        report["problems"].append(f"{where}: {why}")
        report["skipped"] += 1

    for i, line in enumerate(path.read_text("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        report["rows"] += 1
        where = f"{path}:{i}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            problem(where, f"broken JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(row, dict):
            problem(where, "a row must be a JSON object")
            continue
        if "completions" in row:
            rows = _ranking_rows(row)
            if isinstance(rows, str):
                problem(where, rows)
                continue
        else:
            rows = [row]
        for r in rows:
            pair, why = check_pair(r, render, max_tokens)
            if why is not None:
                problem(where, why)
            else:
                pairs.append(pair)
    report["pairs"] = len(pairs)
    return pairs, report


def _ranking_rows(row: dict) -> Union[list[dict], str]:
    completions, ranking = row.get("completions"), row.get("ranking")
    if "prompt" not in row:
        return 'missing field "prompt"'
    if not isinstance(completions, list) or len(completions) < 2:
        return '"completions" must list at least two answers'
    if ranking is None:
        ranking = list(range(len(completions)))
    if (not isinstance(ranking, list) or not all(type(k) is int for k in ranking)
            or sorted(ranking) != list(range(len(completions)))):
        return f'"ranking" must order every completion once: a permutation of 0..{len(completions) - 1}'
    return expand_ranking(row["prompt"], [completions[k] for k in ranking])
