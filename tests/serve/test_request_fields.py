"""No request field is silently ignored: every field of OpenAI's chat-completions and completions requests is
honoured or refused with a 400 naming it (docs/api.md's table), inside messages too."""
from __future__ import annotations

import pytest

from tests.serve.test_api import USER

ASSISTANT_FROM_SDK = {"role": "assistant", "content": "Fine.", "refusal": None, "tool_calls": None,
                      "function_call": None, "audio": None, "annotations": []}


@pytest.fixture(scope="module")
def client(tiny_api):
    return tiny_api[0]


@pytest.mark.parametrize("path,extra,param", [
    ("/v1/chat/completions", {"frobnicate": 1}, "frobnicate"),
    ("/v1/chat/completions", {"modalities": ["text", "audio"]}, "modalities"),
    ("/v1/chat/completions", {"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ("/v1/chat/completions", {"reasoning_effort": "high"}, "reasoning_effort"),
    ("/v1/chat/completions", {"verbosity": "low"}, "verbosity"),
    ("/v1/chat/completions", {"service_tier": "flex"}, "service_tier"),
    ("/v1/chat/completions", {"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ("/v1/chat/completions", {"web_search_options": {}}, "web_search_options"),
    ("/v1/chat/completions", {"functions": [{"name": "f"}]}, "functions"),
    ("/v1/chat/completions", {"stream_options": {"include_usage": True, "other": 1}}, "stream_options.other"),
    ("/v1/chat/completions", {"stream_options": {"include_obfuscation": True}}, "stream_options.include_obfuscation"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": None}]}, "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi", "name": "ann"}]}, "messages.0.name"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi", "colour": "red"}]}, "messages.0.colour"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi", "x": 1}]}]},
     "messages.0.content.0.text.x"),
    ("/v1/chat/completions", {"messages": USER + [ASSISTANT_FROM_SDK | {"refusal": "no"}] + USER},
     "messages.1.refusal"),
    ("/v1/chat/completions", {"store": False, "metadata": {"conversation_id": "1", "parent_id": "2"}}, "store"),
    ("/v1/completions", {"prompt": "hi", "best_of": 3}, "best_of"),
    ("/v1/completions", {"prompt": "hi", "suffix": "end"}, "suffix"),
    ("/v1/completions", {"prompt": "hi", "frobnicate": 1}, "frobnicate"),
])
def test_unknown_or_unhonoured_fields_are_a_400_naming_them(client, path, extra, param):
    body = ({"messages": USER} if path.endswith("chat/completions") else {}) | {"max_tokens": 2} | extra
    r = client.post(path, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error", err


def test_off_values_and_harmless_fields_pass(client):
    """What OpenAI's own SDK and LangChain send at their defaults is accepted, and means what it says."""
    before = len(client.get("/api/conversations").json())
    ok = {"messages": USER + [ASSISTANT_FROM_SDK] + USER, "max_tokens": 3, "user": "u-1", "safety_identifier": "s",
          "modalities": ["text"], "service_tier": "auto", "tool_choice": "none", "tools": [], "parallel_tool_calls": None,
          "response_format": {"type": "text"}, "stream_options": None, "logprobs": False, "prompt_cache_key": "k1"}
    r = client.post("/v1/chat/completions", json=ok)
    assert r.status_code == 200, r.text
    assert len(client.get("/api/conversations").json()) == before + 1
    # store: false is honoured: nothing recorded
    r = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 3, "store": False})
    assert r.status_code == 200 and len(client.get("/api/conversations").json()) == before + 1
    r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "best_of": 1, "suffix": None,
                                             "user": "u"})
    assert r.status_code == 200, r.text


def test_prompt_cache_key_scopes_prompt_caching(client):
    long = [{"role": "user", "content": "Tell me about caching keys and values in transformers, please. " * 4}]
    body = {"messages": long, "max_tokens": 2, "temperature": 0, "store": False}
    first = client.post("/v1/chat/completions", json=body | {"prompt_cache_key": "a"}).json()
    same = client.post("/v1/chat/completions", json=body | {"prompt_cache_key": "a"}).json()
    other = client.post("/v1/chat/completions", json=body | {"prompt_cache_key": "b"}).json()
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert same["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert other["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
