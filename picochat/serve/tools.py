"""Tool calls: OpenAI's `tools` / `tool_choice` / `parallel_tool_calls`, assistant `tool_calls` and `tool` messages,
in the prompt convention ChatML models are tuned on (Hermes, Qwen2.5, and what most tool-calling servers
use for them):

    system:     ...the system prompt... + "# Tools" + <tools>{one JSON signature per line}</tools> + how to call
    assistant:  <tool_call>\\n{"name": "get_weather", "arguments": {"city": "Paris"}}\\n</tool_call>   (one per call)
    tool:       a user turn of <tool_response>\\n...\\n</tool_response> blocks, one per result, in order

The call is written under a grammar (engine/grammar.py): the fixed text around it is forced, the name is one
of the tools', and the arguments follow that tool's `parameters` JSON schema, so they always parse and
validate. tool_choice "auto" lets the model answer in text instead (text that does not begin with "<");
"required" and a named function allow calls only; "none" leaves the tools out of the prompt altogether. Under "auto" a text answer may not begin with "<" or
whitespace (so the first character tells a call from text), and numbers are not capped (that would reach
the prose too).
"""
from __future__ import annotations

import json
import uuid
from typing import Optional

from ..engine.grammar import JSON_STYLE, Grammar
from ..errors import PicochatError
from .errors import ApiError, bad_request

OPEN, CLOSE = "<tool_call>\n", "\n</tool_call>"
HEAD = '{"name": '
ARGS = ', "arguments": '

PREAMBLE = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


def call_text(name: str, arguments: str) -> str:
    """One call as the model writes it; `arguments` is the JSON text of the arguments object."""
    return f"{OPEN}{HEAD}{json.dumps(name)}{ARGS}{arguments}}}{CLOSE}"


def choice_of(body) -> str:
    """"none", "auto", "required", or the name of the one function to call."""
    c = body.tool_choice
    if c is None:
        return "auto" if body.tools else "none"
    return c if isinstance(c, str) else c.function.name


def fold(messages: list[dict], body, default_system: Optional[str] = None) -> list[dict]:
    """The chat template's messages: tools into the system prompt (after the model's default one when the
    request has none), calls and results into text (module docstring). `messages` are request_messages'
    (same order as body.messages)."""
    out: list[dict] = []
    previous = None  # the role of the message before, as sent
    for m, sent in zip(messages, body.messages):
        if sent.role == "tool":
            block = f"<tool_response>\n{m['content']}\n</tool_response>"
            if previous == "tool":  # a run of results: one user turn
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block})
        elif sent.role == "assistant" and sent.tool_calls:
            calls = "\n".join(call_text(c.function.name, c.function.arguments) for c in sent.tool_calls)
            out.append({"role": "assistant", "content": (m["content"] + "\n" if m["content"] else "") + calls})
        else:
            out.append(dict(m))
        previous = sent.role
    if body.tools and choice_of(body) != "none":
        sigs = "\n".join(json.dumps(t.model_dump(exclude_none=True, by_alias=True)) for t in body.tools)
        block = PREAMBLE.format(tools=sigs)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{block}"}
        else:
            out.insert(0, {"role": "system", "content": f"{default_system}\n\n{block}" if default_system else block})
    return out


def check_conversation(body) -> None:
    """The request's tool fields make sense together, or a 400 naming the field: tool_choice names a tool
    that exists, tool names are distinct, and each tool message answers a call of the assistant message
    just before it (or of the same run of tool messages) that no other tool message answered."""
    names = [t.function.name for t in body.tools or []]
    if len(set(names)) != len(names):
        raise bad_request("two tools have the same name", "tools")
    choice = choice_of(body)
    if choice != "none" and not names:
        raise bad_request(f"tool_choice {choice!r} needs tools", "tool_choice")
    if choice not in ("none", "auto", "required") and choice not in names:
        raise bad_request(f"tool_choice names {choice!r}, which is not among the tools ({', '.join(names)})",
                          "tool_choice")
    if choice != "none" and body.stop_list():
        raise bad_request("stop cannot be combined with tool calls (a stop string could cut a call in half)", "stop")
    if choice != "none" and body.response_format is not None and body.response_format.type != "text":
        raise bad_request("response_format cannot be combined with tool calls: the answer is a call or text",
                          "response_format")
    open_ids: set[str] = set()
    for i, m in enumerate(body.messages):
        if m.role == "tool":
            if m.tool_call_id not in open_ids:
                raise bad_request(f"tool message {i} answers call {m.tool_call_id!r}, but the assistant message "
                                  "before it made no such call (or it was answered already)",
                                  f"messages.{i}.tool_call_id")
            open_ids.discard(m.tool_call_id)
        else:
            open_ids = {c.id for c in m.tool_calls or []}


def _schema(parameters: Optional[dict]) -> dict:
    return {**(parameters or {"type": "object", "properties": {}}), "x-guidance": JSON_STYLE}


def compiled_grammar(body, host) -> Grammar:
    """tool_grammar, compiled (structured.checked); when it does not compile, each tool's parameters alone
    are tried, so that the 400 names the tool at fault (only then: compiling twice is wasted work)."""
    from ..engine.grammar import json_schema_grammar
    from .structured import checked
    for i, t in enumerate(body.tools or []):
        if t.function.parameters is not None and t.function.parameters.get("type") != "object":
            raise bad_request(f"tool {t.function.name!r}: parameters must be a JSON schema of type object (the "
                              "arguments are an object)", f"tools.{i}.function.parameters")
    try:
        return checked(host, tool_grammar(body), "tools")
    except ApiError as whole:
        for i, t in enumerate(body.tools or []):
            try:
                checked(host, json_schema_grammar(t.function.parameters or {"type": "object"}), "")
            except (ApiError, PicochatError) as e:
                raise bad_request(f"tool {t.function.name!r}: {getattr(e, 'message', e)}",
                                  f"tools.{i}.function.parameters") from None
        raise whole


def tool_grammar(body) -> Optional[Grammar]:
    """The grammar of the answer under tool_choice (None for "none"): Lark with each tool's schema inline."""
    choice = choice_of(body)
    if choice == "none":
        return None
    tools = [t for t in body.tools if choice in ("auto", "required") or t.function.name == choice]
    rules = [f'call_{k}: {json.dumps(OPEN + HEAD + json.dumps(t.function.name) + ARGS)} '
             f'%json {json.dumps(_schema(t.function.parameters))} {json.dumps("}" + CLOSE)}'
             for k, t in enumerate(tools)]
    many = body.parallel_tool_calls is not False and choice in ("auto", "required")
    calls = 'calls: call ("\\n" call)*' if many else "calls: call"
    start = "start: TEXT | calls\nTEXT: /[^<\\s](.|\\n)*/" if choice == "auto" else "start: calls"
    lark = "\n".join(["%llguidance {}", start, calls, "call: " + " | ".join(f"call_{k}" for k in range(len(tools)))]
                     + rules)
    return Grammar(lark, json=choice != "auto")  # (the digit cap would also cut numbers in auto's free text)


def parse_calls(text: str, cut: bool = False) -> Optional[list[dict]]:
    """OpenAI tool_calls from an answer written under tool_grammar, or None if it is a text answer.
    cut: the answer ran into max_tokens; its complete calls are returned (None if there is none)."""
    if not text.startswith(OPEN):
        return None
    calls, pos, dec = [], 0, json.JSONDecoder()
    while pos < len(text):
        try:
            if not text.startswith(OPEN + HEAD, pos):
                raise ValueError
            name, pos = dec.raw_decode(text, pos + len(OPEN + HEAD))
            if not text.startswith(ARGS, pos):
                raise ValueError
            start = pos + len(ARGS)
            _, end = dec.raw_decode(text, start)
            if not text.startswith("}" + CLOSE, end):
                raise ValueError
        except ValueError:
            return (calls or None) if cut else None
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": name, "arguments": text[start:end]}})
        pos = end + len("}" + CLOSE)
        if text.startswith("\n", pos):
            pos += 1
    return calls


class CallStream:
    """Streamed tool-call deltas in OpenAI's chunk shape from the answer's text as it grows: the first delta
    of a call carries its index, id, type and name (arguments ""), the next ones pieces of the arguments,
    never the closing text; joined, they are the non-streamed call (a call cut by max_tokens: the pieces
    sent, where the non-streamed answer leaves that call out)."""

    def __init__(self):
        self.text, self.sent, self.index, self.in_args = "", 0, -1, False

    def push(self, delta: str) -> list[dict]:
        self.text += delta
        out = []
        while True:
            if not self.in_args:
                head = self.text.find(ARGS, self.sent)
                if not self.text.startswith(OPEN + HEAD, self.sent) or head < 0:
                    return out
                name = json.loads(self.text[self.sent + len(OPEN + HEAD):head])
                self.index += 1
                out.append({"index": self.index, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                            "function": {"name": name, "arguments": ""}})
                self.sent, self.in_args = head + len(ARGS), True
            end = self.text.find("}" + CLOSE, self.sent)
            # until the call's end is seen, hold back what could be its beginning
            upto = end if end >= 0 else max(self.sent, len(self.text) - len("}" + CLOSE))
            if upto > self.sent:
                out.append({"index": self.index, "function": {"arguments": self.text[self.sent:upto]}})
                self.sent = upto
            if end < 0:
                return out
            self.sent, self.in_args = end + len("}" + CLOSE), False
            if self.text.startswith("\n", self.sent):
                self.sent += 1


def chat_message(text: str, finish_reason: str, tool_mode: bool) -> tuple[dict, str]:
    """A choice's message and finish reason: tool calls (content null, finish_reason "tool_calls") when the
    answer is calls, else the text. Calls cut by max_tokens: the complete ones, finish_reason "length" (a
    model not tuned for tools, such as SmolLM2, may repeat a call until then when parallel calls are on)."""
    calls = parse_calls(text, cut=finish_reason == "length") if tool_mode else None
    if not calls:
        return {"role": "assistant", "content": text, "refusal": None}, finish_reason
    return ({"role": "assistant", "content": None, "refusal": None, "tool_calls": calls},
            "tool_calls" if finish_reason == "stop" else finish_reason)


class ChatDeltas:
    """One choice's streamed deltas: {"content": ...} for a text answer, {"tool_calls": [...]} for calls
    (decided by the answer's first character under tool_choice auto: calls begin with "<")."""

    def __init__(self, tool_mode: bool):
        self.mode = None if tool_mode else "text"
        self.calls = CallStream()
        self.made_calls = False

    def push(self, text: str) -> list[dict]:
        if not text:
            return []
        if self.mode is None:
            self.mode = "calls" if text.startswith("<") else "text"
        if self.mode == "text":
            return [{"content": text}]
        deltas = self.calls.push(text)
        self.made_calls = self.made_calls or bool(deltas)
        return [{"tool_calls": [d]} for d in deltas]

    def finish(self, reason: str) -> str:
        return "tool_calls" if self.made_calls and reason == "stop" else reason
