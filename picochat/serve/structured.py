"""Structured outputs: `response_format` json_object / json_schema become a grammar the engine enforces token by
token (engine/grammar.py), checked before any generation so that a schema the grammar engine cannot
compile is a 400 naming the field, never a failed generation."""
from __future__ import annotations

from typing import Optional

from ..engine.grammar import Grammar
from ..errors import PicochatError
from .errors import bad_request


def checked(host, grammar: Grammar, field: str) -> Grammar:
    """The grammar compiled for this model (check_grammar keeps the matcher each row copies), or a 400
    naming `field` with the grammar engine's reason. Runs in a worker thread: compiling is CPU work."""
    from ..engine.grammar import check_grammar
    try:
        check_grammar(grammar, host.tokenizer, host.model.config.vocab_size, host.stop_ids)
    except PicochatError as e:
        raise bad_request(str(e), field) from None
    return grammar


def response_grammar(host, fmt) -> Optional[Grammar]:
    """The grammar of a response_format (None for text or no format), compiled."""
    from ..engine.grammar import json_schema_grammar
    if fmt is None or fmt.type == "text":
        return None
    field = "response_format.json_schema.schema" if fmt.type == "json_schema" else "response_format"
    try:
        grammar = json_schema_grammar(fmt.answer_schema())
    except PicochatError as e:
        raise bad_request(str(e), field) from None
    return checked(host, grammar, field)
