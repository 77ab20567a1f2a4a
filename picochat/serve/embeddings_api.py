"""POST /v1/embeddings in OpenAI's shape, answered by an encoder loaded beside the chat models.

    picochat serve smollm2 minilm
    client.embeddings.create(model="minilm", input=["first text", "second"])

input: a string, a list of strings, a list of token ids or a list of token-id lists (the encoder's own
WordPiece ids, without [CLS]/[SEP], which are added as for text). encoding_format: float, or base64 of
little-endian float32 (what the openai client asks for by default). dimensions: the encoder's own size
is accepted, any other refused (MiniLM was not trained to be cut short, as Matryoshka models are).
usage.prompt_tokens counts the tokens the encoder read, [CLS] and [SEP] included.
An input longer than the encoder reads is a 400, never silently truncated (as OpenAI does; `picochat
embed` refuses it the same way).
"""
from __future__ import annotations

import asyncio
import base64
from typing import Literal, Optional, Union

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..errors import PicochatError
from .errors import bad_request, not_found
from .protocol import storable

MAX_INPUTS = 2048  # OpenAI's limit per request


class EmbeddingRequest(BaseModel):
    # every field OpenAI defines is named here, so a misspelt one (`dimension`) is a 400, not dropped
    model_config = ConfigDict(extra="forbid")
    model: Optional[str] = Field(default=None, max_length=256)
    user: Optional[str] = Field(default=None, max_length=256)  # OpenAI's end-user id for abuse reports: unused
    input: Union[str, list]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = Field(default=None, ge=1)

    @field_validator("input", mode="before")
    @classmethod
    def _input(cls, v):
        shapes = "a string, a list of strings, a list of token ids or a list of token-id lists"
        items = [v] if isinstance(v, str) else v
        if not isinstance(items, list):
            raise ValueError(f"input must be {shapes}")
        if not items:
            raise ValueError(f"input is empty: give {shapes}")

        def is_id(x):
            return isinstance(x, int) and not isinstance(x, bool)
        for i, x in enumerate(items):
            wrong = [t for t in x if not is_id(t)] if isinstance(x, list) else \
                ([] if isinstance(x, str) or is_id(x) else [x])
            if wrong:
                raise ValueError(f"input[{i}] holds {type(wrong[0]).__name__} {wrong[0]!r}: {shapes}")
        kinds = {"text" if isinstance(x, str) else "id" if is_id(x) else "ids" for x in items}
        if len(kinds) > 1:
            raise ValueError(f"input mixes strings, token ids and token-id lists; give {shapes}")
        if len(items) > MAX_INPUTS and not is_id(items[0]):
            raise ValueError(f"at most {MAX_INPUTS} inputs per request, got {len(items)}")
        for i, x in enumerate(items):
            if isinstance(x, str):
                if not x:
                    raise ValueError(f"input {i} is an empty string")
                storable(x, "input")
            elif isinstance(x, list) and not x:
                raise ValueError(f"input {i} is an empty list of token ids")
        return v


def encoders_hint(app) -> str:
    names = list(app.state.encoders)
    return (f"embedding models here: {', '.join(names)}" if names else
            "no embedding model is loaded: start the server with one, e.g. `picochat serve smollm2 minilm`")


def _encoder(app, name: Optional[str]):
    encoders = app.state.encoders
    if name in app.state.hosts:
        raise bad_request(f"model {name!r} is a chat model and gives no embeddings; {encoders_hint(app)}", "model")
    if not encoders:
        raise bad_request(encoders_hint(app), "model")
    if not name:
        return next(iter(encoders.values()))
    if name not in encoders:
        raise not_found(f"model {name!r} is not loaded here; {encoders_hint(app)}", "model")
    return encoders[name]


def _sequences(enc, inp) -> list[list[int]]:
    """Token ids per input, [CLS] and [SEP] included."""
    if isinstance(inp, str):
        return enc.encode([inp])
    if isinstance(inp[0], str):
        return enc.encode(inp)
    lists = [inp] if isinstance(inp[0], int) else inp
    V = enc.vocab_size
    for i, ids in enumerate(lists):
        if any(not 0 <= t < V for t in ids):
            raise bad_request(f"input {i}: token ids must be in [0, {V}) for {enc.name}", "input")
    return [enc.wrap(ids) for ids in lists]


router = APIRouter()


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request):
    enc = _encoder(request.app, body.model)
    if body.dimensions is not None and body.dimensions != enc.dim:
        raise bad_request(f"{enc.name} gives {enc.dim}-dimensional embeddings and cannot shorten them (it was not "
                          f"trained to); leave dimensions out or set it to {enc.dim}", "dimensions")
    seqs = await asyncio.to_thread(_sequences, enc, body.input)
    try:  # embed_ids refuses an over-long input before any forward pass
        vectors = await asyncio.to_thread(enc.embed_ids, seqs)
    except PicochatError as e:
        raise bad_request(str(e), "input") from None
    if body.encoding_format == "base64":
        data = [base64.b64encode(v.numpy().astype("<f4").tobytes()).decode("ascii") for v in vectors]
    else:
        data = vectors.tolist()
    n = sum(len(s) for s in seqs)
    return {"object": "list", "model": enc.name,
            "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
            "usage": {"prompt_tokens": n, "total_tokens": n}}
