"""Tool calls through the API with a random model (which never calls a tool by itself): forced calls always carry
arguments valid under the tool's schema, streamed deltas join to the non-streamed call, a tool result sent
back is answered, and every inconsistent request is a 400 naming the field, storing nothing."""
from __future__ import annotations

import json

import pytest

from tests.serve.test_api import USER, sse

pytest.importorskip("llguidance")
jsonschema_rs = pytest.importorskip("jsonschema_rs")
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 10}}, "required": ["zone"],
        "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}


@pytest.fixture(scope="module")
def tiny_api(tiny_dataset, tmp_path_factory):
    """The tiny chat model's tokenizer and shape with a 2,048-token context: the tools' signatures in the
    system prompt take ~800 of its small-vocabulary tokens."""
    from pathlib import Path

    import torch

    from picochat.checkpoints.io import save_model
    from picochat.model.config import ModelConfig
    from picochat.model.gpt import GPT
    from picochat.tokenizer import Tokenizer
    from tests.serve.test_api import make_client
    tok = Tokenizer.load(Path(tiny_dataset) / "tokenizer.json")
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=64, block_size=2048,
                            pos="rope", norm="rmsnorm", activation="swiglu", bias=False))
    ckpt = save_model(model, tmp_path_factory.mktemp("tools") / "tiny-tools", tokenizer=tok)
    c, host, store = make_client(ckpt, tmp_path_factory.mktemp("tools-db"), max_context=2048)
    with c:
        yield c, host
    store.close()


def ask(c, **kw):
    return c.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 120, "tools": TOOLS} | kw)


def test_forced_calls_are_valid_and_streamed_deltas_join_to_them(tiny_api):
    c, _ = tiny_api
    for choice in ({"type": "function", "function": {"name": "get_weather"}}, "required"):
        for seed in range(3):
            r = ask(c, tool_choice=choice, seed=seed, parallel_tool_calls=False).json()["choices"][0]
            assert r["finish_reason"] == "tool_calls" and r["message"]["content"] is None
            (call,) = r["message"]["tool_calls"]
            assert call["type"] == "function" and call["id"].startswith("call_")
            if isinstance(choice, dict):
                assert call["function"]["name"] == "get_weather"
            args = json.loads(call["function"]["arguments"])
            assert jsonschema_rs.is_valid(SCHEMAS[call["function"]["name"]], args)
    whole = ask(c, tool_choice="required", seed=4).json()["choices"][0]["message"]["tool_calls"]
    chunks = sse(ask(c, tool_choice="required", seed=4, stream=True))
    deltas = [d for ch in chunks[:-1] for x in ch["choices"] for d in x["delta"].get("tool_calls") or []]
    joined: dict[int, dict] = {}
    for d in deltas:
        j = joined.setdefault(d["index"], {"name": None, "arguments": ""})
        j["name"] = d["function"].get("name") or j["name"]
        j["arguments"] += d["function"].get("arguments", "")
    assert [(j["name"], j["arguments"]) for _, j in sorted(joined.items())] == \
        [(w["function"]["name"], w["function"]["arguments"]) for w in whole]
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"


def test_a_tool_result_is_answered_and_auto_may_answer_in_text(tiny_api):
    c, _ = tiny_api
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                             "arguments": '{"city": "Paris", "unit": "celsius"}'}}
    history = USER + [{"role": "assistant", "content": None, "tool_calls": [call]},
                      {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'}]
    r = c.post("/v1/chat/completions", json={"messages": history, "max_tokens": 8, "tools": TOOLS,
                                             "tool_choice": "none", "temperature": 0})
    assert r.status_code == 200 and isinstance(r.json()["choices"][0]["message"]["content"], str)
    # what the model read: the tools in the system prompt, the call and its result as text
    prompt = c.post("/tokenize", json={"messages": history}).json()["tokens"]
    from picochat.tokenizer import Tokenizer  # noqa: F401  (the server's own tokenizer decodes)
    text = c.post("/detokenize", json={"tokens": prompt}).json()["prompt"]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>' in text
    assert '<tool_response>\n{"temperature": 21}\n</tool_response>' in text
    auto = ask(c, seed=0, temperature=1.0).json()["choices"][0]
    assert auto["finish_reason"] in ("stop", "length", "tool_calls")
    if auto["finish_reason"] == "tool_calls":
        assert all(jsonschema_rs.is_valid(SCHEMAS[t["function"]["name"]], json.loads(t["function"]["arguments"]))
                   for t in auto["message"]["tool_calls"])
    else:
        assert not auto["message"]["content"].startswith("<")


CALL = {"id": "call_9", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}


@pytest.mark.parametrize("body,param", [
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
    ({"tools": TOOLS + TOOLS[:1]}, "tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}]},
     "tools.0.function.parameters"),
    ({"tools": TOOLS, "stop": ["x"]}, "stop"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "tools.0.function.parameters"),
    ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": USER + [{"role": "tool", "tool_call_id": "call_9", "content": "12:00"}]}, "messages.1.tool_call_id"),
    ({"messages": USER + [{"role": "assistant", "content": None, "tool_calls": [CALL]},
                          {"role": "tool", "tool_call_id": "call_8", "content": "12:00"}]}, "messages.2.tool_call_id"),
    ({"messages": USER + [{"role": "assistant", "content": None, "tool_calls": [CALL]},
                          {"role": "tool", "content": "12:00"}]}, "messages.2"),
    ({"messages": USER + [{"role": "assistant", "content": None}] + USER}, "messages.1"),
    ({"messages": USER + [{"role": "assistant", "content": None, "tool_calls": [
        CALL | {"function": {"name": "get_time", "arguments": "not json"}}]}]}, "messages.1.tool_calls.0.function.arguments"),
    ({"functions": [{"name": "f"}]}, "functions"),
])
def test_bad_tool_requests_are_a_400_and_store_nothing(tiny_api, body, param):
    c, _ = tiny_api
    before = len(c.get("/api/conversations").json())
    r = c.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 4} | body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert len(c.get("/api/conversations").json()) == before
