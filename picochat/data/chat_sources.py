"""Where chat conversations come from besides the generated tasks: chatterbot-corpus (PyPI), the Python
FAQ of Debian's python3.11-doc, and users' own JSONL files; and the one validation every conversation
passes, whatever its source.

Every reader returns a list of records ``(where, conversation)``: ``where`` is ``"path:line"`` (the
place a person would open to fix it) and ``conversation`` is either a list of ``{"role", "content"}``
messages or a string saying why the line is not one (broken JSON, no "messages" list).
"""
from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Optional, Union

from ..chat_template import ROLES, turn_order_error
from ..errors import PicochatError

Record = tuple[str, Union[list, str]]

FAQ_DIR = Path("/usr/share/doc/python3.11/html/_sources/faq")
FAQ_HINT = "install Debian's python3.11-doc: `apt-get install python3.11-doc`"


def validate(messages) -> Optional[str]:
    """Why this is not a conversation to train on, or None: a list of {"role", "content"} with roles
    system/user/assistant, non-empty string contents, the chat template's turn order, and at least one
    assistant message (a conversation without one trains nothing)."""
    if not isinstance(messages, list) or not messages:
        return '"messages" must be a non-empty list of {"role", "content"} objects'
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"message {i} is not an object"
        if m.get("role") not in ROLES:
            return f"message {i}: unknown role {str(m.get('role'))[:40]!r}; use one of {', '.join(ROLES)}"
        c = m.get("content")
        if not isinstance(c, str):
            return f"message {i}: content must be a string, got {type(c).__name__}"
        if not c.strip():
            return f"message {i}: empty content"
    why = turn_order_error([m["role"] for m in messages])
    if why:
        return why
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant message: nothing to learn from"
    return None


def clean(messages: list) -> list[dict]:
    """Only role and content (a line may carry more keys, e.g. "name"; training never uses them)."""
    return [{"role": m["role"], "content": m["content"]} for m in messages]


# ---------------------------------------------------------------- user JSONL files
def read_jsonl(path: Union[str, Path]) -> list[Record]:
    """One conversation per line: {"messages": [...]}. Blank lines are ignored."""
    path = Path(path)
    if not path.is_file():
        raise PicochatError(f"{path}: no such file; a chat data file is JSONL with one "
                            '{"messages": [{"role": ..., "content": ...}, ...]} per line')
    out: list[Record] = []
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            where = f"{path}:{i}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                out.append((where, f"not UTF-8 (invalid byte at offset {e.start})"))
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                out.append((where, f"broken JSON ({e.msg} at column {e.colno})"))
                continue
            if not isinstance(obj, dict) or "messages" not in obj:
                out.append((where, 'each line must be an object with a "messages" list'))
                continue
            out.append((where, obj["messages"]))
    return out


# ---------------------------------------------------------------- chatterbot-corpus
def chatterbot_dir() -> Optional[Path]:
    """The installed package's English YAML folder (no network), or None if it is not installed."""
    from importlib import metadata
    try:
        dist = metadata.distribution("chatterbot-corpus")
    except metadata.PackageNotFoundError:
        return None
    d = Path(dist.locate_file("chatterbot_corpus/data/english"))
    return d if d.is_dir() else None


@lru_cache(maxsize=None)
def chatterbot() -> tuple[Record, ...]:
    """Each YAML conversation (a list of alternating lines) becomes user/assistant turns; a trailing
    line nobody answers is dropped. Lines are read as strings (YAML 1.1 would make "yes" a boolean)."""
    import yaml
    d = chatterbot_dir()
    if d is None:
        raise PicochatError("chatterbot-corpus is not installed: `pip install chatterbot-corpus==1.3.3`")
    loader = getattr(yaml, "CBaseLoader", yaml.BaseLoader)
    out: list[Record] = []
    for path in sorted(d.glob("*.yml")):
        text = path.read_text("utf-8")
        # compose gives each conversation's line number; load gives its values, in the same order
        root = yaml.compose(text, Loader=loader)
        data = yaml.load(text, Loader=loader) or {}
        nodes = next((v for k, v in root.value if k.value == "conversations"), None) if root else None
        for node, lines in zip(nodes.value if nodes else [], data.get("conversations") or []):
            where = f"chatterbot_corpus/data/english/{path.name}:{node.start_mark.line + 1}"
            if not isinstance(lines, list):
                out.append((where, "a conversation must be a list of lines"))
                continue
            lines = lines[: len(lines) // 2 * 2]
            out.append((where, [{"role": ("user", "assistant")[i % 2], "content": str(s).strip()}
                                for i, s in enumerate(lines)]))
    return tuple(out)


# ---------------------------------------------------------------- Python FAQ (reST)
_ROLE = re.compile(r":[\w:.-]+:`([^`]*)`")           # :func:`os.path.join` / :ref:`text <label>`
_LINK = re.compile(r"`([^`<]*?)\s*<[^`>]*>`__?")       # `text <url>`_
_REF = re.compile(r"`([^`]+)`__?")                     # `text`_
_LITERAL = re.compile(r"``(.+?)``")
_STRONG = re.compile(r"\*\*(.+?)\*\*")


def rst_inline(s: str) -> str:
    """reST inline markup -> plain text (roles, links, literals, bold)."""
    def role(m):
        t = m.group(1)
        t = re.sub(r"\s*<[^>]*>$", "", t)  # :ref:`text <label>` -> text
        return t.lstrip("~!")
    s = _ROLE.sub(role, s)
    s = _LINK.sub(r"\1", s)
    s = _LITERAL.sub(r"\1", s)
    s = _REF.sub(r"\1", s)
    return _STRONG.sub(r"\1", s)


def _is_underline(line: str, title: str) -> bool:
    s = line.rstrip()
    return bool(s) and len(set(s)) == 1 and s[0] in "=-~^*#" and len(s) >= len(title.rstrip()) > 0


def _rst_body(lines: list[str]) -> str:
    out: list[str] = []
    skip_indent = None  # inside a directive's options/body that is not prose (.. only::, .. _label:)
    for line in lines:
        if skip_indent is not None:
            if not line.strip() or line.startswith(" "):
                continue
            skip_indent = None
        if line.startswith(".. "):
            # code blocks keep their body (it is the answer); other directives are markup
            if "code-block::" not in line and "testcode::" not in line:
                skip_indent = True
            continue
        s = line.rstrip()
        if s.endswith("::"):  # "as follows::" -> "as follows:"; a bare "::" disappears
            s = s[:-2].rstrip() + (":" if s[:-2].strip() else "")
        prose = s and not s.startswith((" ", "* ", "- ", "#. ")) and not re.match(r"\d+\. ", s)
        if prose and out and out[-1] and not out[-1].startswith(" "):
            out[-1] += " " + s  # reST wraps paragraphs at 80 columns: one paragraph, one line
        else:
            out.append(s)
    # inline markup after joining: a link or a role may wrap across two source lines
    out = [rst_inline(re.sub(r"(?<=\S)  +", " ", s)) if not s.startswith(" ") else rst_inline(s) for s in out]
    text = "\n".join(out)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def parse_faq(path: Path) -> list[tuple[int, str, str]]:
    """(line, question, answer) for each question heading (underlined with '-') of one FAQ file."""
    lines = path.read_text("utf-8").splitlines()
    heads = [i for i in range(len(lines) - 1)
             if lines[i].strip() and not lines[i].startswith((" ", ".. ")) and _is_underline(lines[i + 1], lines[i])]
    out = []
    for j, i in enumerate(heads):
        end = heads[j + 1] if j + 1 < len(heads) else len(lines)
        if lines[i + 1].strip()[0] != "-":
            continue  # '=' underlines are chapters, not questions
        # the answer runs to the next heading (whose title line is at `end`)
        out.append((i + 1, rst_inline(lines[i].strip()), _rst_body(lines[i + 2:end])))
    return [(n, q, a) for n, q, a in out if q and a]


@lru_cache(maxsize=None)
def python_faq() -> tuple[Record, ...]:
    if not FAQ_DIR.is_dir():
        raise PicochatError(f"the python_faq set needs {FAQ_DIR}: {FAQ_HINT}")
    out: list[Record] = []
    for path in sorted(FAQ_DIR.glob("*.rst.txt")):
        for line, q, a in parse_faq(path):
            out.append((f"{path}:{line}", [{"role": "user", "content": q}, {"role": "assistant", "content": a}]))
    return tuple(out)
