"""Typed config dataclasses become argparse options, and their docstrings become ``--help``.

litgpt-style: a command is a plain function taking a dataclass; the CLI is generated from it.
A field's help text is the string literal written right under it (an "attribute docstring"),
which Python drops at runtime, so we read it back from the source with ``ast``.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import typing
from functools import lru_cache


@lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """{field name: the docstring under it} for a dataclass and its bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object:
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(source).body[0].body
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _base_type(tp):
    """Optional[X] / X | None -> X."""
    args = typing.get_args(tp)
    if args and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0] if len(rest) == 1 else str
    return tp


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type,
                       positional: tuple[str, ...] = (), skip: tuple[str, ...] = ()) -> None:
    """Add one option per field of ``cls`` (``foo_bar`` -> ``--foo-bar``)."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        help_text = docs.get(f.name, "")
        # "(default: None)" says nothing: the docstring explains what leaving it out means
        shown = "" if default in (None, "", []) else f" (default: {default})"
        # argparse %-formats help strings: a docstring's "96%" must reach it as "96%%"
        kwargs: dict = {"help": (help_text + shown).strip().replace("%", "%%") or None}
        choices = typing.get_args(tp) if typing.get_origin(tp) is typing.Literal else None
        if choices:
            kwargs["choices"] = list(choices)
            tp = type(choices[0])
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) in (list, tuple):
            kwargs["nargs"] = "*"
            kwargs["type"] = typing.get_args(tp)[0]
        else:
            kwargs["type"] = tp
        if f.name in positional:
            kwargs.pop("action", None)
            if "nargs" not in kwargs:  # an empty-string default marks a required positional
                kwargs["nargs"] = None if default == "" else "?"
            parser.add_argument(f.name, default=default, metavar=f.name.upper(), **kwargs)
        else:
            parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=default, **kwargs)


def dataclass_from_args(cls: type, args: argparse.Namespace, **overrides):
    """Build ``cls`` from parsed args (fields the parser did not have keep their defaults)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    values.update(overrides)
    return cls(**values)
