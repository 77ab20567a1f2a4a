"""The Responses API's request (POST /v1/responses), and its translation into a chat-completions request.

Same rule as protocol.py: every field is honoured or refused by name. The input (a string, or message,
function_call and function_call_output items) joins the conversation a previous_response_id left behind,
with `instructions` as the system prompt (a response's instructions are not carried to the next, as
OpenAI defines it), and becomes the `messages` of a ChatCompletionRequest, so that both APIs share one
path to the model: the template, tools, structured output, sampling and the scheduler.
"""

from typing import Annotated, Any, ClassVar, Literal, Optional, Union

from pydantic import Discriminator, Field, Tag, ValidationError, field_validator

from ..engine.sampling import MAX_TOP_LOGPROBS
from .errors import bad_request
from .protocol import MAX_MESSAGES, NAME, ChatCompletionRequest, Strict, refusal, storable

NO_PICTURES = "pictures are read through /v1/chat/completions (image_url parts); the Responses API here takes text"
LOGPROBS = "message.output_text.logprobs"


class TextContent(Strict):
    type: Literal["input_text", "output_text"]
    text: str
    REFUSED: ClassVar[dict] = {  # accepted only at their off value: docs/api.md
        "annotations": refusal("annotations cannot be sent back", []),  # (an output_text echoed back)
        "logprobs": refusal("logprobs cannot be sent back", []),
    }
    annotations: Any = None
    logprobs: Any = None

    @field_validator("text")
    @classmethod
    def _limit(cls, v):
        return storable(v, "text")


class ImageContent(Strict):
    type: Literal["input_image", "input_file", "input_audio"]

    @field_validator("type")
    @classmethod
    def _no(cls, v):
        raise ValueError(NO_PICTURES)


Content = Annotated[Union[TextContent, ImageContent], Field(discriminator="type")]


class MessageItem(Strict):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: Union[str, list[Content]]
    id: Optional[str] = Field(default=None, max_length=128)            # (an output item sent back)
    status: Optional[Literal["in_progress", "completed", "incomplete"]] = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionCallItem(Strict):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1, max_length=128)
    name: str = Field(pattern=NAME)
    arguments: str
    id: Optional[str] = Field(default=None, max_length=128)
    status: Optional[Literal["in_progress", "completed", "incomplete"]] = None


class FunctionCallOutputItem(Strict):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1, max_length=128)
    output: str
    id: Optional[str] = Field(default=None, max_length=128)
    status: Optional[Literal["in_progress", "completed", "incomplete"]] = None


def _kind(item) -> str:
    return (item.get("type") if isinstance(item, dict) else getattr(item, "type", None)) or "message"


Item = Annotated[Union[Annotated[MessageItem, Tag("message")], Annotated[FunctionCallItem, Tag("function_call")],
                       Annotated[FunctionCallOutputItem, Tag("function_call_output")]], Discriminator(_kind)]


class FunctionTool(Strict):
    type: Literal["function"]
    name: str = Field(pattern=NAME)
    description: Optional[str] = Field(default=None, max_length=8192)
    parameters: Optional[dict] = None
    strict: Optional[bool] = None


class NamedFunction(Strict):
    type: Literal["function"]
    name: str = Field(pattern=NAME)


class TextFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    name: Optional[str] = Field(default=None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    schema_: Optional[dict] = Field(default=None, alias="schema")
    description: Optional[str] = Field(default=None, max_length=4096)
    strict: Optional[bool] = None


class TextConfig(Strict):
    format: Optional[TextFormat] = None
    REFUSED: ClassVar[dict] = {  # accepted only at their off value: docs/api.md
        "verbosity": refusal("verbosity is not supported: say how long in the input, or set max_output_tokens",
                             "medium"),
    }
    verbosity: Any = None


class StreamOptions(Strict):
    REFUSED: ClassVar[dict] = {  # accepted only at their off value: docs/api.md
        "include_obfuscation": refusal("stream obfuscation is not implemented: send include_obfuscation: false", False),
    }
    include_obfuscation: Any = None


class ResponsesRequest(Strict):
    model: Optional[str] = Field(default=None, max_length=256)
    input: Union[str, list[Item]] = Field(default="")
    instructions: Optional[str] = None
    previous_response_id: Optional[str] = Field(default=None, max_length=128)
    max_output_tokens: Optional[int] = Field(default=None, ge=1, le=1_000_000)
    temperature: Optional[float] = Field(default=None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    include: Optional[list[Literal["message.output_text.logprobs"]]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    store: bool = True
    metadata: Optional[dict[str, str]] = None
    text: Optional[TextConfig] = None
    tools: Optional[list[FunctionTool]] = Field(default=None, max_length=128)
    tool_choice: Union[Literal["none", "auto", "required"], NamedFunction, None] = None
    parallel_tool_calls: Optional[bool] = None
    truncation: Optional[Literal["auto", "disabled"]] = None   # auto: drop the oldest turns that do not fit
    user: Optional[str] = Field(default=None, max_length=256)
    safety_identifier: Optional[str] = Field(default=None, max_length=256)
    prompt_cache_key: Optional[str] = Field(default=None, max_length=256)
    REFUSED: ClassVar[dict] = {  # accepted only at their off value: docs/api.md
        "service_tier": refusal("this server has one tier: auto or default", "auto", "default"),
        "reasoning": refusal("these models do not reason before answering: reasoning is not supported"),
        "background": refusal("background responses are not supported: stream, or wait for the answer", False),
        "max_tool_calls": refusal("max_tool_calls is not supported: use parallel_tool_calls: false for one call"),
        "prompt": refusal("stored prompt templates are not supported: send instructions and input"),
        "conversation": refusal("conversations objects are not supported: chain with previous_response_id"),
    }
    service_tier: Any = None
    reasoning: Any = None
    background: Any = None
    max_tool_calls: Any = None
    prompt: Any = None
    conversation: Any = None

    @field_validator("input")
    @classmethod
    def _input(cls, v):
        if isinstance(v, str):
            storable(v, "input")
        elif len(v) > MAX_MESSAGES:
            raise ValueError(f"at most {MAX_MESSAGES} input items")
        return v

    @field_validator("metadata")
    @classmethod
    def _meta(cls, v):
        if v is not None and (len(v) > 16 or any(len(k) > 64 or len(x) > 512 for k, x in v.items())):
            raise ValueError("metadata: at most 16 keys of up to 64 characters, values up to 512")
        return v

    def logprobs_wanted(self) -> bool:
        return bool(self.include) or self.top_logprobs is not None


def input_messages(body: ResponsesRequest) -> list[dict]:
    """This request's input as chat messages (dicts of ChatCompletionRequest's message shape)."""
    if isinstance(body.input, str):
        return [{"role": "user", "content": body.input}] if body.input else []
    out: list[dict] = []
    for item in body.input:
        if item.type == "message":
            out.append({"role": item.role, "content": item.text()})
        elif item.type == "function_call":
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}
            if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls") is not None:
                out[-1]["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:
            out.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
    return out


def chat_request(body: ResponsesRequest, history: list[dict], new: list[dict]) -> ChatCompletionRequest:
    """The ChatCompletionRequest this response is: instructions, the chain's turns, this input."""
    fmt = body.text.format if body.text is not None else None
    response_format = None if fmt is None else {"type": fmt.type} | (
        {"json_schema": {"name": fmt.name or "response", "schema": fmt.schema_ or {"type": "object"},
                         "strict": fmt.strict, "description": fmt.description}} if fmt.type == "json_schema" else {})
    if fmt is not None and fmt.type != "json_schema" and (fmt.name or fmt.schema_ is not None):
        raise bad_request("name and schema belong to text.format of type json_schema", "text.format")
    tools = [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
             for t in body.tools or []]
    choice = body.tool_choice
    if not isinstance(choice, (str, type(None))):
        choice = {"type": "function", "function": {"name": choice.name}}
    messages = ([{"role": "system", "content": body.instructions}] if body.instructions else []) + history + new
    if not messages:
        raise bad_request("input is empty: give text or items", "input")
    fields = {"model": body.model, "messages": messages, "max_completion_tokens": body.max_output_tokens,
              "temperature": body.temperature, "top_p": body.top_p, "tools": tools or None,
              "tool_choice": choice, "parallel_tool_calls": body.parallel_tool_calls,
              "response_format": response_format, "user": body.user, "safety_identifier": body.safety_identifier,
              "prompt_cache_key": body.prompt_cache_key, "truncate_history": body.truncation == "auto",
              "logprobs": body.logprobs_wanted(), "top_logprobs": body.top_logprobs if body.logprobs_wanted() else None,
              "store": False}
    try:
        return ChatCompletionRequest.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        raise bad_request(f"{loc}: {err['msg']}", "input" if loc.startswith("messages") else loc) from None
