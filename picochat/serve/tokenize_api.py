"""POST /tokenize and /detokenize (the names vLLM's and llama.cpp's servers use): the ids a model reads.

    /tokenize    {"model"?, "prompt": "text"}                  -> {"tokens": [...], "count", "max_model_len"}
                 {"model"?, "messages": [...], "add_generation_prompt"?: true}   (the chat template's ids)
    /detokenize  {"model"?, "tokens": [ids]}                   -> {"prompt": "text"}

A prompt is tokenized exactly as /v1/completions reads it, and messages exactly as /v1/chat/completions
renders them (system prompt, template, the assistant's opening tokens), so `count` is the `usage.prompt_tokens`
those would report. `content` is accepted for `prompt`, as llama.cpp's server names it. Any other field is a
400 naming it: nothing is silently ignored.
"""
from __future__ import annotations

import asyncio
from typing import Literal, Optional, Union

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import PicochatError
from .errors import bad_request
from .protocol import MAX_MESSAGES, Message, NamedToolChoice, Tool
from .tools import fold

router = APIRouter()


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: Optional[str] = Field(default=None, max_length=256)
    prompt: Optional[str] = None
    content: Optional[str] = None   # llama.cpp's name for prompt
    messages: Optional[list[Message]] = Field(default=None, min_length=1, max_length=MAX_MESSAGES)
    add_generation_prompt: bool = True
    # the tools a chat request would list: they are part of what the model reads (serve/tools.py)
    tools: Optional[list[Tool]] = Field(default=None, max_length=128)
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None

    @model_validator(mode="after")
    def _one_input(self):
        given = [k for k in ("prompt", "content", "messages") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of prompt (or content) and messages"
                             + (f", not {' and '.join(given)}" if given else ""))
        for k in ("add_generation_prompt", "tools", "tool_choice"):
            if self.messages is None and k in self.model_fields_set:
                raise ValueError(f"{k} applies to messages only")
        return self


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: Optional[str] = Field(default=None, max_length=256)
    tokens: list[int] = Field(max_length=1_000_000)


def _ids(host, body: TokenizeRequest) -> list[int]:
    from ..chat_template import render_conversation
    if body.messages is None:
        return host.tokenizer.encode(body.prompt if body.prompt is not None else body.content)
    if host.template is None:
        raise bad_request(f"model {host.id!r} has no chat template; tokenize a prompt instead", "messages")
    if any(m.has_images() for m in body.messages):
        raise bad_request("/tokenize reads text only: a picture is the model's image tokens, not text; "
                          "leave out the image_url parts", "messages")
    messages = fold([{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                     for m in body.messages], body, host.default_system)
    try:
        return render_conversation(messages, host.tokenizer, host.template,
                                   add_generation_prompt=body.add_generation_prompt,
                                   default_system=host.default_system)[0]
    except PicochatError as e:
        raise bad_request(str(e), "messages") from None


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request):
    from .chat_prepare import _host
    host = _host(request.app, body.model)
    ids = await asyncio.to_thread(_ids, host, body)   # up to megabytes of text: not on the event loop
    return {"tokens": ids, "count": len(ids), "max_model_len": host.context}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request):
    from .chat_prepare import _host
    host = _host(request.app, body.model)
    V = host.tokenizer.vocab_size
    bad = next((t for t in body.tokens if not 0 <= t < V), None)
    if bad is not None:
        raise bad_request(f"token {bad} is not an id of {host.id!r} (ids 0 to {V - 1})", "tokens")
    return {"prompt": await asyncio.to_thread(host.tokenizer.decode, body.tokens)}
