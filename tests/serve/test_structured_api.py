"""response_format json_object / json_schema through the API: a random model's answers always parse and validate,
streamed or not; a schema that cannot be compiled is a 400 naming the field, and nothing is stored."""
from __future__ import annotations

import json

import pytest

from tests.engine.test_grammar import SCHEMA
from tests.serve.test_api import USER, sse

pytest.importorskip("llguidance")
jsonschema_rs = pytest.importorskip("jsonschema_rs")
FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}


def test_json_schema_and_json_object(tiny_api):
    c, _ = tiny_api
    for seed in range(3):
        r = c.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 150, "seed": seed,
                                                 "response_format": FORMAT}).json()
        assert r["choices"][0]["finish_reason"] == "stop"
        assert jsonschema_rs.is_valid(SCHEMA, json.loads(r["choices"][0]["message"]["content"]))
    anything = c.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 200, "seed": 1, "temperature": 0.5,
                                                    "response_format": {"type": "json_object"}}).json()
    if anything["choices"][0]["finish_reason"] == "stop":  # (any object may run past max_tokens)
        assert isinstance(json.loads(anything["choices"][0]["message"]["content"]), dict)
    else:
        assert anything["choices"][0]["message"]["content"].startswith("{")
    chunks = sse(c.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 150, "seed": 5, "stream": True,
                                                      "response_format": FORMAT}))
    text = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks[:-1] if ch["choices"])
    assert jsonschema_rs.is_valid(SCHEMA, json.loads(text))


@pytest.mark.parametrize("fmt,param", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}},
     "response_format.json_schema.schema"),
    ({"type": "json_schema"}, "response_format"),
    ({"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}}, "response_format.json_schema.name"),
    ({"type": "json_object", "json_schema": {"name": "x", "schema": {}}}, "response_format"),
    ({"type": "yaml"}, "response_format.type"),
])
def test_bad_formats_are_a_400_and_store_nothing(tiny_api, fmt, param):
    c, _ = tiny_api
    before = len(c.get("/api/conversations").json())
    r = c.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 5, "response_format": fmt})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert len(c.get("/api/conversations").json()) == before
