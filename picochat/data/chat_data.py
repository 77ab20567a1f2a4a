"""Chat data for fine-tuning: named sets, users' JSONL files, and mixtures of them, all in OpenAI's
``messages`` form (a conversation is a list of ``{"role", "content"}``).

A mixture spec is comma-separated ``NAME[:N]``; a NAME is
- a generated task (``addition``, ``identity``, ... see chat_tasks.TASKS): N conversations of its split
  (without N: min(1000, the split's size));
- a group: ``arithmetic`` (addition, subtraction, multiplication) or ``tasks`` (every generated task),
  N spread evenly over the members (without N: 1000 per member, at most the split);
- ``chatterbot`` (chatterbot-corpus 1.3.3, English) or ``python_faq`` (Debian's python3.11-doc);
- a path to a ``.jsonl`` file, one ``{"messages": [...]}`` per line.
For a file-like set, N takes a seeded subset when N <= its size, and cycles through it (each copy
shuffled) when N is larger; without N, all of it.

Splits: generated tasks have their fixed held-out split (see chat_tasks). chatterbot and python_faq
hold out about 15% of their conversations by a stable hash of the first user message (so a question
asked twice with two answers lands on one side), giving held-out chat text; split="test" reads those.
A user's .jsonl file is used whole for either split: which file you pass is your choice of split.

Every conversation, from any source, is validated (chat_sources.validate; with a tokenizer and
max_tokens, its rendered length too). A bad one is reported as ``path:line: reason`` and skipped, with
a count in the report, or with strict=True the first one raises PicochatError. Nothing bad is trained
on silently.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable, Optional

from ..errors import PicochatError
from . import chat_sources
from .chat_tasks import TASKS, is_test_key

DEFAULT_TASK_N = 1000
GROUPS = {
    "arithmetic": ("addition", "subtraction", "multiplication"),
    "tasks": tuple(TASKS),
}
# file-like named sets: name -> (reader, description, why it may be unavailable)
SOURCES: dict[str, tuple[Callable, str]] = {
    "chatterbot": (chat_sources.chatterbot, "English conversations of chatterbot-corpus 1.3.3 (PyPI)"),
    "python_faq": (chat_sources.python_faq, "Python FAQ questions and answers (Debian python3.11-doc)"),
}


def known_names() -> list[str]:
    return [*TASKS, *GROUPS, *SOURCES]


def _source_split(name: str, split: str) -> list[chat_sources.Record]:
    """A named source's records of one split (held out by a hash of the first user message)."""
    reader = SOURCES[name][0]
    out = []
    for where, conv in reader():
        first = next((m.get("content") for m in conv if isinstance(m, dict) and m.get("role") == "user"),
                     where) if isinstance(conv, list) else where
        if is_test_key((name, str(first))) == (split == "test"):
            out.append((where, conv))
    return out


def _available(name: str) -> Optional[str]:
    """None if the source can be read, else how to make it available."""
    if name == "chatterbot" and chat_sources.chatterbot_dir() is None:
        return "`pip install chatterbot-corpus==1.3.3`"
    if name == "python_faq" and not chat_sources.FAQ_DIR.is_dir():
        return "`apt-get install python3.11-doc`"
    return None


def list_sets() -> list[dict]:
    """Every named set: {"name", "size" (train conversations; None if unavailable), "test_size",
    "description", "available"}. Counting the big arithmetic splits takes a few seconds."""
    rows = []
    for name, task in TASKS.items():
        rows.append({"name": name, "size": task.size("train"), "test_size": task.size("test"),
                     "description": task.description, "available": True})
    for name, members in GROUPS.items():
        rows.append({"name": name, "size": sum(TASKS[m].size("train") for m in members),
                     "test_size": sum(TASKS[m].size("test") for m in members),
                     "description": "mix of " + ", ".join(members), "available": True})
    for name, (_, description) in SOURCES.items():
        missing = _available(name)
        if missing:
            rows.append({"name": name, "size": None, "test_size": None, "available": False,
                         "description": f"{description}; unavailable: {missing}"})
        else:
            rows.append({"name": name, "size": len(_source_split(name, "train")),
                         "test_size": len(_source_split(name, "test")), "description": description,
                         "available": True})
    return rows


def parse_spec(spec: str) -> list[tuple[str, Optional[int]]]:
    """"arithmetic:20000,chatterbot,my.jsonl" -> [("arithmetic", 20000), ("chatterbot", None), ...]."""
    out = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, n = part, None
        head, sep, tail = part.rpartition(":")
        if sep and not Path(part).exists():  # a file may have ':' in its name; a count never does
            if not tail.strip().isdigit():
                raise PicochatError(f"{part!r}: the count after ':' must be a whole number >= 0, "
                                    "as in arithmetic:20000")
            name, n = head.strip(), int(tail)
        out.append((name, n))
    if not out:
        raise PicochatError("empty data spec; name sets like arithmetic:20000,chatterbot,my.jsonl "
                            "(`picochat data chat --list` shows them)")
    return out


def check_spec(spec: str) -> list[tuple[str, Optional[int]]]:
    """parse_spec, refusing a set that is unknown, unavailable or a missing file now, before any work
    (load_mixture calls it first; the pipeline before hours of pretraining)."""
    parts = parse_spec(spec)
    for name, _ in parts:
        if name in TASKS or name in GROUPS:
            continue
        if name in SOURCES:
            missing = _available(name)
            if missing:
                raise PicochatError(f"set {name} is unavailable: {missing}")
        elif _is_file(name):
            if not Path(name).is_file():
                chat_sources.read_jsonl(name)  # raises its own "no such file" error, with the expected format
        else:
            raise PicochatError(f"unknown chat set {name!r}; known sets: {', '.join(known_names())}, "
                                "or a path to a .jsonl file")
    return parts


def _is_file(name: str) -> bool:
    return name.endswith(".jsonl") or "/" in name or Path(name).is_file()


def _take(records: list, n: Optional[int], rng: random.Random) -> list:
    """All (n None), a seeded subset (n <= size), or whole shuffled copies plus a subset (n > size)."""
    if n is None:
        return list(records)
    out: list = []
    while len(out) < n and records:
        out += rng.sample(records, min(n - len(out), len(records)))
    return out


def load_mixture(spec: str, split: str = "train", seed: int = 0, strict: bool = False,
                 max_tokens: Optional[int] = None, tokenizer=None) -> tuple[list[list[dict]], dict]:
    """-> (conversations shuffled with seed, report {"sets": {name: count}, "skipped": count,
    "problems": ["path:line: reason", ...]}). See the module docstring for names, N and splits."""
    if split not in ("train", "test"):
        raise PicochatError(f"unknown split {split!r}; use train or test")
    if max_tokens is not None and tokenizer is None:
        raise PicochatError("max_tokens needs a tokenizer to measure conversations with")
    render = None
    if tokenizer is not None and max_tokens is not None:
        from ..chat_template import pick_template, render_conversation
        template = pick_template(tokenizer)
        render = lambda msgs: render_conversation(msgs, tokenizer, template)[0]  # noqa: E731

    conversations: list[list[dict]] = []
    report: dict = {"sets": {}, "skipped": 0, "problems": []}

    def problem(where: str, why: str) -> None:
        msg = f"{where}: {why}"
        if strict:
            raise PicochatError(f"{msg} (strict: fix or remove it, or leave out --strict to skip bad conversations)")
        report["problems"].append(msg)
        report["skipped"] += 1

    def good(records: list[chat_sources.Record]) -> list[list[dict]]:
        out = []
        for where, conv in records:
            why = conv if isinstance(conv, str) else chat_sources.validate(conv)
            if why is None and render is not None:
                n_tokens = len(render(conv))
                if n_tokens > max_tokens:
                    why = (f"conversation is {n_tokens} tokens, longer than the context of {max_tokens}; "
                           "shorten or split it")
            if why is not None:
                problem(where, why)
            else:
                out.append(chat_sources.clean(conv))
        return out

    for name, n in check_spec(spec):
        rng = random.Random(f"{name}/{split}/{seed}")
        if name in TASKS or name in GROUPS:
            members = GROUPS.get(name, (name,))
            per = [None] * len(members) if n is None else [n // len(members) + (i < n % len(members))
                                                          for i in range(len(members))]
            got = []
            for m, k in zip(members, per):
                task = TASKS[m]
                k = min(DEFAULT_TASK_N, task.size(split)) if k is None else k
                items = task.generate(split, k, seed)
                got += good([(f"{m}:{i + 1}", it["messages"]) for i, it in enumerate(items)])
        elif name in SOURCES:  # check_spec has refused unknown and unavailable sets
            got = _take(good(_source_split(name, split)), n, rng)
        else:
            got = _take(good(chat_sources.read_jsonl(name)), n, rng)
        report["sets"][name] = report["sets"].get(name, 0) + len(got)
        conversations += got
    random.Random(f"mixture/{split}/{seed}").shuffle(conversations)
    return conversations, report


def write_jsonl(conversations: list[list[dict]], path: str | Path) -> Path:
    """One {"messages": [...]} per line (the format load_mixture reads back)."""
    from ..fsutil import atomic_write
    path = Path(path)
    atomic_write(path, "".join(json.dumps({"messages": c}, ensure_ascii=False) + "\n" for c in conversations))
    return path
