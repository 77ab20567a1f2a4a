"""Structured outputs: `response_format` json_object / json_schema become a grammar the engine enforces token by
token (engine/grammar.py), checked before any generation so that a schema the grammar engine cannot
compile is a 400 naming the field, never a failed generation."""
from __future__ import annotations

from typing import Optional

from ..engine.grammar import Grammar

from ..errors import PicochatError
from .errors import bad_request


def response_grammar(host, fmt) -> Optional[Grammar]:
    """The llguidance grammar of a response_format (None for text or no format). Runs in a worker thread:
    compiling a large schema is CPU work."""
    from ..engine.grammar import check_grammar, json_schema_grammar
    if fmt is None or fmt.type == "text":
        return None
    field = "response_format.json_schema.schema" if fmt.type == "json_schema" else "response_format"
    try:
        grammar = json_schema_grammar(fmt.answer_schema())
        check_grammar(grammar, host.tokenizer, host.model.config.vocab_size, host.stop_ids)
    except PicochatError as e:
        raise bad_request(str(e), field) from None
    return grammar
