"""POST /v1/responses, GET and DELETE /v1/responses/{id}: OpenAI's shapes (validated against the published spec),
streamed events, previous_response_id chains through the SQLite store (also across a restart), store: false,
tools and structured output, and bad input as 400s naming the field that store nothing."""
from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from picochat.serve.app import create_app
from picochat.serve.store import Store
from tests.serve.test_openai_schema import check
from tests.serve.test_tools_api import WEATHER, tiny_api  # noqa: F401  (the 2,048-token tiny model)

jsonschema_rs = pytest.importorskip("jsonschema_rs")


def events(resp) -> list[dict]:
    out, kind = [], None
    for line in resp.iter_lines():
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            data = json.loads(line[6:])
            assert data["type"] == kind
            out.append(data)
    return out


def test_create_get_delete_and_stream(tiny_api):  # noqa: F811
    c, _ = tiny_api
    r = c.post("/v1/responses", json={"input": "Hello there", "instructions": "Be brief.", "max_output_tokens": 6,
                                      "metadata": {"k": "v"}})
    assert r.status_code == 200, r.text
    body = r.json()
    check("Response", body)
    assert body["status"] in ("completed", "incomplete") and body["metadata"] == {"k": "v"}
    assert body["output"][0]["type"] == "message" and body["usage"]["output_tokens"] >= 1
    assert c.get(f"/v1/responses/{body['id']}").json() == body  # stored as returned
    assert c.delete(f"/v1/responses/{body['id']}").json()["deleted"] is True
    assert c.get(f"/v1/responses/{body['id']}").status_code == 404
    with c.stream("POST", "/v1/responses", json={"input": "Hi", "max_output_tokens": 8, "stream": True}) as s:
        evs = events(s)
    for e in evs:
        check("ResponseStreamEvent", e)
    kinds = [e["type"] for e in evs]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"] and kinds[-1] in ("response.completed", "response.incomplete")
    assert [e["sequence_number"] for e in evs] == list(range(len(evs)))
    text = "".join(e["delta"] for e in evs if e["type"] == "response.output_text.delta")
    assert text == evs[-1]["response"]["output"][0]["content"][0]["text"]


def test_previous_response_id_chains_and_survives_a_restart(tiny_chat_ckpt, tiny_api, tmp_path):  # noqa: F811
    c, host = tiny_api
    first = c.post("/v1/responses", json={"input": "My name is Ada.", "max_output_tokens": 4, "temperature": 0}).json()
    said = first["output"][0]["content"][0]["text"]
    second = c.post("/v1/responses", json={"input": "What is my name?", "max_output_tokens": 4,
                                           "previous_response_id": first["id"]}).json()
    # the model read both turns: the chained prompt is the whole conversation's
    conv = [{"role": "user", "content": "My name is Ada."}, {"role": "assistant", "content": said},
            {"role": "user", "content": "What is my name?"}]
    assert second["usage"]["input_tokens"] == c.post("/tokenize", json={"messages": conv}).json()["count"]
    # store: false keeps nothing, so nothing can chain from it
    off = c.post("/v1/responses", json={"input": "x", "max_output_tokens": 2, "store": False}).json()
    assert off["store"] is False and c.get(f"/v1/responses/{off['id']}").status_code == 404
    r = c.post("/v1/responses", json={"input": "y", "previous_response_id": off["id"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "previous_response_id"
    # a restart: a new app on the same database file continues the chain
    from picochat.serve.hosts import load_host
    db = tmp_path / "r.db"
    h = load_host(str(tiny_chat_ckpt), dtype="fp32", max_batch=2, max_queue=4, max_context=512)
    with TestClient(create_app([h], store=Store(db))) as a:
        rid = a.post("/v1/responses", json={"input": "Remember 42.", "max_output_tokens": 3}).json()["id"]
    h2 = load_host(str(tiny_chat_ckpt), dtype="fp32", max_batch=2, max_queue=4, max_context=512)
    with TestClient(create_app([h2], store=Store(db))) as b:
        again = b.post("/v1/responses", json={"input": "Which number?", "max_output_tokens": 3,
                                              "previous_response_id": rid})
        assert again.status_code == 200 and again.json()["previous_response_id"] == rid


def test_tools_and_structured_output(tiny_api):  # noqa: F811
    c, _ = tiny_api
    tool = {"type": "function", "name": "get_weather", "parameters": WEATHER}
    r = c.post("/v1/responses", json={"input": "Weather in Paris?", "tools": [tool],
                                      "tool_choice": {"type": "function", "name": "get_weather"}, "max_output_tokens": 300}).json()
    check("Response", r)
    (call,) = r["output"]
    assert call["type"] == "function_call" and call["name"] == "get_weather"
    assert jsonschema_rs.is_valid(WEATHER, json.loads(call["arguments"]))
    answered = c.post("/v1/responses", json={"previous_response_id": r["id"], "tools": [tool], "tool_choice": "none",
                                             "max_output_tokens": 5, "input": [
                                                 {"type": "function_call_output", "call_id": call["call_id"],
                                                  "output": '{"temperature": 21}'}]})
    assert answered.status_code == 200 and answered.json()["output"][0]["type"] == "message"
    fmt = {"format": {"type": "json_schema", "name": "weather", "schema": WEATHER, "strict": True}}
    j = c.post("/v1/responses", json={"input": "Weather?", "text": fmt, "max_output_tokens": 100}).json()
    assert jsonschema_rs.is_valid(WEATHER, json.loads(j["output"][0]["content"][0]["text"]))
    with c.stream("POST", "/v1/responses", json={"input": "Weather in Paris?", "tools": [tool], "stream": True,
                                                  "tool_choice": "required", "max_output_tokens": 300,
                                                  "parallel_tool_calls": False}) as s:
        evs = events(s)
    for e in evs:
        check("ResponseStreamEvent", e)
    args = "".join(e["delta"] for e in evs if e["type"] == "response.function_call_arguments.delta")
    assert args == evs[-1]["response"]["output"][0]["arguments"]
    # the agent loop: the streamed call's id (as the client saw it) answered against the stored response
    seen = next(e["item"]["call_id"] for e in evs if e["type"] == "response.output_item.added")
    rid = evs[-1]["response"]["id"]
    assert c.get(f"/v1/responses/{rid}").json()["output"][0]["call_id"] == seen
    r = c.post("/v1/responses", json={"previous_response_id": rid, "tools": [tool], "tool_choice": "none",
                                      "max_output_tokens": 4, "input": [
                                          {"type": "function_call_output", "call_id": seen, "output": "21"}]})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("body,param", [
    ({"input": "x", "previous_response_id": "resp_" + "0" * 32}, "previous_response_id"),
    ({"input": "x", "previous_response_id": "nope"}, "previous_response_id"),
    ({"input": "x", "frobnicate": 1}, "frobnicate"),
    ({"input": "x", "reasoning": {"effort": "high"}}, "reasoning"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "data:x"}]}]},
     "input.0.message.content.0.input_image.type"),
    ({"input": [{"type": "function_call_output", "call_id": "c1", "output": "1"}]}, "input"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "nonsense"}}}},
     "text.format.schema"),
    ({"input": ""}, "input"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools.0.type"),
])
def test_bad_requests_name_the_field_and_store_nothing(tiny_api, body, param):  # noqa: F811
    c, host = tiny_api
    store = c.app.state.store
    before = store._read("SELECT COUNT(*) FROM responses")[0][0]
    r = c.post("/v1/responses", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()
    assert store._read("SELECT COUNT(*) FROM responses")[0][0] == before
