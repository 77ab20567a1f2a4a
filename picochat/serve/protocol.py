"""Request bodies of the OpenAI-compatible API, with the limits a public endpoint needs.

Pydantic rejects wrong types and out-of-range values with the field's name, which the app turns into
an OpenAI-shaped 400. Unknown fields are accepted and ignored (clients send `user`, `logprobs`: false,
and so on), as OpenAI and vLLM do.

Text is held to the conversation store's own rule (`store_rules.check_text`: valid Unicode, at most
1,000,000 bytes of UTF-8 per message) here, before any generation: a request the store would refuse
afterwards must not cost a generation, nor leave half a conversation behind.

A user message's content may hold pictures, OpenAI's `image_url` parts; their structure is checked here
(only user messages, `detail` one of auto/low/high), their data: URLs by serve/images.py in a worker
thread (decoding a picture is CPU work the event loop must not do).
"""
from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .store_rules import MAX_CONTENT_BYTES, StoreError, check_text

MAX_MESSAGES = 1024
MAX_TEXT = MAX_CONTENT_BYTES  # bytes of UTF-8 per message / prompt; the body limit caps the total too
MAX_N = 8
MAX_STOP = 4


def storable(value: str, what: str, limit: int = MAX_TEXT) -> str:
    """check_text's rule as a pydantic validation error (a 400 naming the field)."""
    try:
        return check_text(value, what, limit)
    except StoreError as e:
        raise ValueError(e.message) from None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str

    @field_validator("text")
    @classmethod
    def _limit(cls, v):
        return storable(v, "text")


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="ignore")
    url: str
    # every picture is read at the model's one fixed size (24 x 24): the three mean the same (docs/api.md)
    detail: Optional[Literal["auto", "low", "high"]] = None


class ImagePart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["image_url"]
    image_url: ImageURL

    @field_validator("image_url", mode="before")
    @classmethod
    def _bare_url(cls, v):  # some clients send the URL itself rather than {"url": ...}
        return {"url": v} if isinstance(v, str) else v


Part = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[Part], None] = Field(default="")

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content if p.type == "text")

    def has_images(self) -> bool:
        return isinstance(self.content, list) and any(p.type == "image_url" for p in self.content)

    @model_validator(mode="after")
    def _limit(self):
        storable(self.text(), "content")  # parts joined: the message as it is stored
        if self.role != "user" and self.has_images():
            raise ValueError(f"only user messages may hold pictures (image_url parts); this one is a {self.role} "
                             "message")
        return self


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


MAX_LOGIT_BIAS = 1024


class Sampling(BaseModel):
    """The sampling fields both endpoints share (OpenAI's, plus vLLM's extras)."""
    model_config = ConfigDict(extra="ignore")
    model: Optional[str] = Field(default=None, max_length=256)
    max_tokens: Optional[int] = Field(default=None, ge=1, le=1_000_000)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(default=None, ge=-1, le=1_000_000)    # -1 / 0 / None = off (vLLM: -1)
    min_p: Optional[float] = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: Optional[float] = Field(default=None, gt=0.0, le=10.0)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = Field(default=None, ge=-(2**63), le=2**63 - 1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    frequency_penalty: Optional[float] = Field(default=None, ge=-2.0, le=2.0)
    presence_penalty: Optional[float] = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: Optional[dict[str, float]] = None   # {"token id": bias in [-100, 100]}

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        if v is None:
            return v
        if len(v) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} tokens may be biased, got {len(v)}")
        for k, b in v.items():
            if not k.isdigit():
                raise ValueError(f"keys are token ids (as strings, e.g. \"50256\"), got {k!r}")
            if not -100.0 <= b <= 100.0:
                raise ValueError(f"biases are in [-100, 100], got {b} for token {k}")
        return v

    def bias_pairs(self) -> tuple[tuple[int, float], ...]:
        return tuple(sorted((int(k), float(b)) for k, b in (self.logit_bias or {}).items()))

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(not s or len(s) > 256 for s in stops):
            raise ValueError("each stop sequence must have 1 to 256 characters")
        for s in stops:
            storable(s, "stop")
        return stops

    def stop_list(self) -> list[str]:
        return list(self.stop or [])


class ChatCompletionRequest(Sampling):
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1, le=1_000_000)
    metadata: Optional[dict[str, str]] = None
    # picochat extension (the web page sets it): when the conversation no longer fits the context, drop
    # its oldest turns (never the system prompt or the last message) instead of answering 400
    truncate_history: bool = False

    @field_validator("metadata")
    @classmethod
    def _meta(cls, v):
        if v is not None and (len(v) > 16 or any(len(k) > 64 or len(x) > 512 for k, x in v.items())):
            raise ValueError("metadata: at most 16 keys of up to 64 characters, values up to 512")
        for k, x in (v or {}).items():
            storable(k, "metadata")
            storable(x, "metadata")
        return v


class CompletionRequest(Sampling):
    prompt: Union[str, list[str], list[int]] = Field(default="")
    max_tokens: Optional[int] = Field(default=16, ge=1, le=1_000_000)  # OpenAI's default for completions
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], str):
            if len(v) != 1:
                raise ValueError("a list of several prompts is not supported; send one request per prompt")
            v = v[0]
        if isinstance(v, str):
            storable(v, "prompt")
        if isinstance(v, list) and len(v) > 1_000_000:
            raise ValueError("the prompt has too many tokens")
        return v


class ConversationMeta(BaseModel):
    """metadata fields the web page sends to have an answer stored in one of its conversations."""
    conversation_id: str = Field(max_length=64)
    parent_id: int
