"""Request bodies of the OpenAI-compatible API, with the limits a public endpoint needs.

Pydantic rejects wrong types and out-of-range values with the field's name, which the app turns into
an OpenAI-shaped 400. No field is silently ignored: an unknown one is a 400 naming it, and a field OpenAI
defines that picochat cannot honour (`audio`, `reasoning_effort`, ...) is accepted only at its "off"
value (null, or what means the same) and otherwise refused with the reason (`refused`). The same holds
inside messages, so an assistant message the `openai` SDK returned (`refusal: null`, `tool_calls: null`,
...) can be sent back as it is. docs/api.md has the table.

Text is held to the conversation store's own rule (`store_rules.check_text`: valid Unicode, at most
1,000,000 bytes of UTF-8 per message) here, before any generation: a request the store would refuse
afterwards must not cost a generation, nor leave half a conversation behind.

A user message's content may hold pictures, OpenAI's `image_url` parts; their structure is checked here
(only user messages, `detail` one of auto/low/high), their data: URLs by serve/images.py in a worker
thread (decoding a picture is CPU work the event loop must not do).
"""

import json
from typing import Annotated, Any, ClassVar, Literal, Optional, Union

from pydantic import (BaseModel, ConfigDict, Field, ValidationInfo, field_validator,
                      model_validator)

from ..engine.sampling import MAX_TOP_LOGPROBS
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


def refusal(why: str, *off) -> tuple:
    """A field OpenAI defines that picochat does not honour (a Strict class's REFUSED): null, or one of `off`
    (values that mean the same), passes; anything else is a 400 naming the field and saying why."""
    return why, off


class Strict(BaseModel):
    """Unknown fields are a 400 naming them; the fields in REFUSED are accepted at their off value only."""
    model_config = ConfigDict(extra="forbid")
    REFUSED: ClassVar[dict] = {}

    @field_validator("*")
    @classmethod
    def _refused(cls, v, info: ValidationInfo):
        rule = cls.REFUSED.get(info.field_name)
        if rule is not None and v is not None and v not in rule[1]:
            raise ValueError(rule[0])
        return v


class TextPart(Strict):
    type: Literal["text"]
    text: str

    @field_validator("text")
    @classmethod
    def _limit(cls, v):
        return storable(v, "text")


class ImageURL(Strict):
    url: str
    # every picture is read at the model's one fixed size (24 x 24): the three mean the same (docs/api.md)
    detail: Optional[Literal["auto", "low", "high"]] = None


class ImagePart(Strict):
    type: Literal["image_url"]
    image_url: ImageURL

    @field_validator("image_url", mode="before")
    @classmethod
    def _bare_url(cls, v):  # some clients send the URL itself rather than {"url": ...}
        return {"url": v} if isinstance(v, str) else v


Part = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


FUNCTIONS = "functions and function_call are OpenAI's deprecated form: send tools and tool_choice"
NAME = r"^[A-Za-z0-9_-]{1,64}$"  # OpenAI's rule for function names


class FunctionCall(Strict):
    name: str = Field(pattern=NAME)
    arguments: str = Field(max_length=MAX_TEXT)  # the arguments object's JSON text

    @field_validator("arguments")
    @classmethod
    def _json(cls, v):
        try:
            value = json.loads(v)
        except ValueError:
            raise ValueError("arguments must be the JSON text of an object") from None
        if not isinstance(value, dict):
            raise ValueError("arguments must be the JSON text of an object")
        return v


class ToolCall(Strict):
    id: str = Field(min_length=1, max_length=128)
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[Part], None] = Field(default=None, validate_default=True)
    REFUSED: ClassVar[dict] = {  # accepted only at their off value: docs/api.md
        "name": refusal("a participant's name is not supported (the chat template has no place for it): put it "
                        "in the content"),
        "refusal": refusal("an assistant refusal cannot be sent back: send it as content"),
        "function_call": refusal(FUNCTIONS),
        "audio": refusal("audio is not supported: picochat reads and writes text (and pictures)"),
        "annotations": refusal("annotations (web search citations) are not supported", []),
    }
    name: Any = None
    # what the openai SDK's own ChatCompletionMessage holds: sent back unchanged, null or empty
    refusal: Any = None
    tool_calls: Optional[list[ToolCall]] = Field(default=None, max_length=128)   # an assistant's calls
    tool_call_id: Optional[str] = Field(default=None, max_length=128)           # a tool message's answer to one
    function_call: Any = None
    audio: Any = None
    annotations: Any = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content if p.type == "text")

    def has_images(self) -> bool:
        return isinstance(self.content, list) and any(p.type == "image_url" for p in self.content)

    @field_validator("content")
    @classmethod
    def _present(cls, v, info: ValidationInfo):
        if v is None and info.data.get("role") != "assistant":
            raise ValueError(f"a {info.data.get('role', '')} message needs content")
        return v

    @model_validator(mode="after")
    def _limit(self):
        if self.content is None and not self.tool_calls:
            raise ValueError("an assistant message needs content, or tool_calls")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only an assistant message holds tool_calls")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("a tool message needs tool_call_id (the call it answers), and only a tool message has one")
        storable(self.text(), "content")  # parts joined: the message as it is stored
        if self.role != "user" and self.has_images():
            raise ValueError(f"only user messages may hold pictures (image_url parts); this one is a {self.role} "
                             "message")
        return self


class StreamOptions(Strict):
    include_usage: bool = False
    REFUSED: ClassVar[dict] = {  # accepted only at their off value: docs/api.md
        "include_obfuscation": refusal("stream obfuscation is not implemented: send include_obfuscation: false", False),
    }
    include_obfuscation: Any = None


MAX_LOGIT_BIAS = 1024


class Sampling(Strict):
    """The sampling fields both endpoints share (OpenAI's, plus vLLM's extras)."""
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
    # an end-user id for OpenAI's abuse monitoring: it never changes an answer, here or at OpenAI
    user: Optional[str] = Field(default=None, max_length=256)

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


class FunctionDef(Strict):
    name: str = Field(pattern=NAME)
    description: Optional[str] = Field(default=None, max_length=8192)
    parameters: Optional[dict] = None   # a JSON schema of the arguments object (none: no arguments)
    strict: Optional[bool] = None       # either way the arguments are written under the schema


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(Strict):
    name: str = Field(pattern=NAME)


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class JSONSchemaFormat(Strict):
    """response_format.json_schema: the schema every answer must validate against."""
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: Optional[str] = Field(default=None, max_length=4096)
    schema_: dict = Field(default_factory=lambda: {"type": "object"}, alias="schema")
    strict: Optional[bool] = None  # either way the schema is enforced token by token (docs/api.md)


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JSONSchemaFormat] = None

    @model_validator(mode="after")
    def _schema_iff(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type json_schema, and only there")
        return self

    def answer_schema(self) -> Optional[dict]:
        """The JSON schema answers must follow; {"type": "object"} for json_object; None for text."""
        return None if self.type == "text" else \
            {"type": "object"} if self.type == "json_object" else self.json_schema.schema_


class ChatCompletionRequest(Sampling):
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1, le=1_000_000)
    metadata: Optional[dict[str, str]] = None
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)  # needs logprobs: true
    safety_identifier: Optional[str] = Field(default=None, max_length=256)  # (what OpenAI now calls `user`)
    store: Optional[bool] = None          # false: the conversation is not recorded (--db), for this request
    prompt_cache_key: Optional[str] = Field(default=None, max_length=256)  # scopes prompt caching, as a conversation id
    REFUSED: ClassVar[dict] = {  # accepted only at their off value: docs/api.md
        "service_tier": refusal("this server has one tier: auto or default", "auto", "default"),
        "modalities": refusal("picochat writes text only: modalities may only be [\"text\"]", ["text"]),
        "audio": refusal("audio output is not supported"),
        "prediction": refusal("predicted outputs are not supported"),
        "web_search_options": refusal("web search is not supported: this server fetches nothing"),
        "reasoning_effort": refusal("these models do not reason before answering: reasoning_effort is not supported"),
        "verbosity": refusal("verbosity is not supported: say how long in the prompt, or set max_tokens"),
        "functions": refusal(FUNCTIONS, []),
        "function_call": refusal(FUNCTIONS, "none"),
    }
    service_tier: Any = None
    modalities: Any = None
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    tools: Optional[list[Tool]] = Field(default=None, max_length=128)
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: Optional[bool] = None
    functions: Any = None
    function_call: Any = None
    response_format: Optional[ResponseFormat] = None
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
    REFUSED: ClassVar[dict] = {  # accepted only at their off value: docs/api.md
        "best_of": refusal("best_of is not supported: ask for n choices and pick yourself", 1),
        "suffix": refusal("suffix (text after the insertion) is not supported: these models only continue text"),
    }
    best_of: Any = None
    suffix: Any = None
    logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)  # alternatives per token

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
