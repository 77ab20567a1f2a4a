"""The OpenAI-compatible API on a tiny random model, in process (FastAPI TestClient)."""
from __future__ import annotations

import json
import threading
import time

import pytest
from fastapi.testclient import TestClient

from picochat.serve.app import create_app
from picochat.serve.hosts import load_host
from picochat.serve.store import Store

USER = [{"role": "user", "content": "Hello there, how are you?"}]


def make_client(ckpt, tmp_path, **kw):
    host = load_host(str(ckpt), dtype="fp32", max_batch=kw.pop("max_batch", 4), max_queue=kw.pop("max_queue", 16),
                     max_context=kw.pop("max_context", 512))
    store = Store(tmp_path / "t.db")
    return TestClient(create_app([host], store=store, **kw)), host, store


@pytest.fixture(scope="module")
def client(tiny_chat_ckpt, tmp_path_factory):
    c, host, store = make_client(tiny_chat_ckpt, tmp_path_factory.mktemp("api"))
    with c:
        yield c
    store.close()


def sse(resp) -> list:
    out = []
    for line in resp.iter_lines():
        if line.startswith("data: "):
            out.append(line[6:] if line[6:] == "[DONE]" else json.loads(line[6:]))
    return out


def test_models_health_config_metrics(client):
    assert client.get("/health").json()["status"] == "ok"
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny-chat"
    assert models["data"][0]["context_length"] == 512
    cfg = client.get("/api/config").json()
    assert cfg["default_model"] == "tiny-chat" and cfg["auth"] is False
    client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 3})
    text = client.get("/metrics").text
    for name in ("picochat_requests_total", "picochat_generated_tokens_total", "picochat_tokens_per_second",
                 "picochat_queue_depth", "picochat_active_sequences", "picochat_http_requests_total"):
        assert f"\n{name}{{" in text, name
    gen = [ln for ln in text.splitlines() if ln.startswith("picochat_generated_tokens_total{")]
    assert float(gen[0].split()[-1]) >= 3


def test_chat_completion_and_stream_agree(client):
    body = {"model": "tiny-chat", "messages": USER, "temperature": 0, "max_tokens": 24}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    full = r.json()
    assert full["object"] == "chat.completion" and full["choices"][0]["message"]["role"] == "assistant"
    u = full["usage"]
    assert u["completion_tokens"] <= 24 and u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    with client.stream("POST", "/v1/chat/completions",
                       json=body | {"stream": True, "stream_options": {"include_usage": True}}) as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        events = sse(s)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and finals[0]["choices"][0]["finish_reason"] == full["choices"][0]["finish_reason"]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == full["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == full["usage"]


def test_n_and_seed(client):
    body = {"messages": USER, "temperature": 1.0, "max_tokens": 12, "n": 3, "seed": 5}
    a = client.post("/v1/chat/completions", json=body).json()
    b = client.post("/v1/chat/completions", json=body).json()
    assert [c["index"] for c in a["choices"]] == [0, 1, 2]
    assert [c["message"]["content"] for c in a["choices"]] == [c["message"]["content"] for c in b["choices"]]
    assert len({c["message"]["content"] for c in a["choices"]}) > 1  # different seeds per choice


def test_stop_string(client):
    r = client.post("/v1/chat/completions", json={"messages": USER, "temperature": 0, "max_tokens": 40}).json()
    text = r["choices"][0]["message"]["content"]
    if len(text) > 6:
        cut = text[3:5]
        s = client.post("/v1/chat/completions", json={"messages": USER, "temperature": 0, "max_tokens": 40,
                                                      "stop": [cut]}).json()
        assert s["choices"][0]["message"]["content"] == text[:text.index(cut)]
        assert s["choices"][0]["finish_reason"] == "stop"


def test_completions(client):
    r = client.post("/v1/completions", json={"prompt": "The cat", "max_tokens": 8, "temperature": 0}).json()
    assert r["object"] == "text_completion" and r["usage"]["completion_tokens"] <= 8
    with client.stream("POST", "/v1/completions", json={"prompt": "The cat", "max_tokens": 8, "temperature": 0,
                                                        "stream": True}) as s:
        events = sse(s)
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == r["choices"][0]["text"]
    ids = client.post("/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0}).json()
    assert ids["usage"]["prompt_tokens"] == 3
    echo = client.post("/v1/completions", json={"prompt": "The cat", "max_tokens": 4, "temperature": 0,
                                                "echo": True}).json()
    assert echo["choices"][0]["text"].startswith("The cat")


@pytest.mark.parametrize("body,param", [
    ({"messages": USER, "temperature": 5}, "temperature"),
    ({"messages": USER, "top_p": 0}, "top_p"),
    ({"messages": USER, "n": 9}, "n"),
    ({"messages": USER, "max_tokens": 0}, "max_tokens"),
    ({"messages": USER, "max_tokens": 100000}, "max_tokens"),
    ({"messages": USER, "min_p": 1.5}, "min_p"),
    ({"messages": USER, "repetition_penalty": -1}, "repetition_penalty"),
    ({"messages": USER, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": USER, "frequency_penalty": 2.5}, "frequency_penalty"),
    ({"messages": USER, "presence_penalty": -2.5}, "presence_penalty"),
    ({"messages": USER, "logit_bias": {"7": 150}}, "logit_bias"),
    ({"messages": USER, "logit_bias": {"seven": 1}}, "logit_bias"),
    ({"messages": USER, "logit_bias": {"99999999": 1}}, "logit_bias"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"messages": USER + [{"role": "system", "content": "late"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "word " * 600}]}, "messages"),
    ({"messages": USER, "metadata": {"conversation_id": "abc", "parent_id": "x"}}, "metadata"),
])
def test_bad_requests_name_the_field(client, body, param):
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]


def test_penalties_and_logit_bias_are_honoured(tiny_chat_ckpt, tmp_path):
    """The API's answer equals the engine's under the same fields (tests/engine/test_penalties.py checks the
    engine against the formulas), and each field changes the answer."""
    from picochat.engine.engine import Engine
    c, host, store = make_client(tiny_chat_ckpt, tmp_path)
    prompt = [5, 6, 7, 8]
    base = {"prompt": prompt, "max_tokens": 16, "temperature": 0}
    eot = host.tokenizer.eot_id
    engine = Engine(host.scheduler.model, host.tokenizer)
    favourite = host.tokenizer.encode(" Z")[0]
    with c:
        plain = c.post("/v1/completions", json=base).json()["choices"][0]["text"]
        assert plain
        for extra, fields in [({"frequency_penalty": 2.0}, {"frequency_penalty": 2.0}),
                              ({"presence_penalty": 2.0}, {"presence_penalty": 2.0}),
                              ({"logit_bias": {str(favourite): 100}}, {"logit_bias": ((favourite, 100.0),)})]:
            got = c.post("/v1/completions", json=base | extra).json()["choices"][0]["text"]
            want = engine.generate([prompt], max_tokens=16, temperature=0, stop_token_ids=(eot,), **fields)[0].text
            assert got == want and got != plain, extra
        assert got == host.tokenizer.decode([favourite] * 16)  # +100 on one token: nothing else is said
    store.close()


def test_other_errors(client):
    r = client.post("/v1/chat/completions", json={"model": "nope", "messages": USER})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    r = client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    r = client.post("/v1/completions", json={"prompt": [10 ** 9]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = client.post("/v1/chat/completions", content=b"x" * (5 * 1024 * 1024), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_api_conversations_are_stored(client):
    before = len(client.get("/api/conversations").json())
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Store me"}]
    r = client.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 5, "temperature": 0}).json()
    convs = client.get("/api/conversations").json()
    assert len(convs) == before + 1 and convs[0]["source"] == "api" and convs[0]["title"] == "Store me"
    conv = client.get(f"/api/conversations/{convs[0]['id']}").json()
    assert conv["system_prompt"] == "Be brief."
    user, answer = conv["messages"]
    assert answer["parent_id"] == user["id"] and answer["content"] == r["choices"][0]["message"]["content"]
    assert answer["completion_tokens"] == r["usage"]["completion_tokens"] and answer["settings"]["temperature"] == 0


def test_page_metadata_stores_answers_under_the_user_message(client):
    conv = client.post("/api/conversations", json={"title": "web"}).json()
    user = client.post(f"/api/conversations/{conv['id']}/messages", json={"role": "user", "content": "Hi"}).json()
    meta = {"conversation_id": conv["id"], "parent_id": str(user["id"])}
    for _ in range(2):  # an answer and a regenerated one: siblings
        client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                  "max_tokens": 4, "metadata": meta})
    msgs = client.get(f"/api/conversations/{conv['id']}").json()["messages"]
    answers = [m for m in msgs if m["role"] == "assistant"]
    assert len(answers) == 2 and all(a["parent_id"] == user["id"] for a in answers)
    r = client.post("/api/rankings", json={"chosen_id": answers[0]["id"], "rejected_id": answers[1]["id"]})
    assert r.status_code == 200
    ranks = client.get(f"/api/conversations/{conv['id']}").json()["rankings"]
    assert [(k["chosen_id"], k["rejected_id"]) for k in ranks] == [(answers[0]["id"], answers[1]["id"])]
    bad = client.post("/v1/chat/completions", json={"messages": USER, "metadata": {
        "conversation_id": conv["id"], "parent_id": "999999"}})
    assert bad.status_code in (400, 404) and "error" in bad.json()


def test_api_key(tiny_chat_ckpt, tmp_path):
    c, host, store = make_client(tiny_chat_ckpt, tmp_path, api_key="sekret")
    with c:
        assert c.get("/health").status_code == 200
        r = c.get("/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert c.get("/api/conversations", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer sekret"}).status_code == 200
        assert c.get("/metrics").status_code == 401
    store.close()


def test_full_queue_is_503(tiny_chat_ckpt, tmp_path):
    c, host, store = make_client(tiny_chat_ckpt, tmp_path, max_batch=1, max_queue=1)
    host.scheduler._turn = lambda: time.sleep(0.01)  # a model that never gets anywhere: requests pile up
    results = []
    with c:
        t = threading.Thread(target=lambda: results.append(
            c.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 4}).status_code))
        t.start()
        deadline = time.time() + 10
        while not host.scheduler.waiting and time.time() < deadline:
            time.sleep(0.01)
        r = c.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 4})
        assert r.status_code == 503 and r.json()["error"]["code"] == "queue_full"
        assert r.headers.get("retry-after")
        host.scheduler.stop()  # shutting down answers the waiting request with a 503
        t.join(timeout=30)
    assert results == [503]
    store.close()


def test_next_turn_reports_cached_prompt_tokens(client):
    first = [{"role": "user", "content": "Tell me about the sea and the ships on it, please."}]
    a = client.post("/v1/chat/completions", json={"messages": first, "max_tokens": 8, "temperature": 0}).json()
    turn = first + [{"role": "assistant", "content": a["choices"][0]["message"]["content"]},
                    {"role": "user", "content": "And the fish?"}]
    b = client.post("/v1/chat/completions", json={"messages": turn, "max_tokens": 4, "temperature": 0}).json()
    cached = b["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert a["usage"]["prompt_tokens"] - 1 <= cached < b["usage"]["prompt_tokens"]


def test_truncate_history_drops_the_oldest_turns(client):
    long = "the sea " * 12  # a turn of ~100 characters; 13 of them overflow the 512-token context
    messages = [{"role": "system", "content": "Be brief."}]
    for i in range(6):
        messages += [{"role": "user", "content": f"{i} {long}"}, {"role": "assistant", "content": long}]
    messages.append({"role": "user", "content": "and the last question?"})
    r = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 8})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 8, "truncate_history": True})
    assert r.status_code == 200, r.text
    dropped = int(r.headers["x-picochat-dropped-messages"])
    assert dropped % 2 == 0 and 0 < dropped < len(messages) - 2  # whole turns, system + last kept
    assert r.json()["usage"]["prompt_tokens"] + 8 <= 512
    short = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 4, "truncate_history": True})
    assert short.headers["x-picochat-dropped-messages"] == "0"


def test_two_models_side_by_side(tiny_chat_ckpt, tmp_path):
    hosts = [load_host(str(tiny_chat_ckpt), dtype="fp32", max_batch=2, max_context=256, name=n)
             for n in ("first", "second")]
    store = Store(tmp_path / "two.db")
    with TestClient(create_app(hosts, store=store)) as c:
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["first", "second"]
        assert c.get("/api/config").json()["default_model"] == "first"
        for name in ("first", "second"):
            r = c.post("/v1/chat/completions", json={"model": name, "messages": USER, "max_tokens": 3}).json()
            assert r["model"] == name
        assert c.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 3}).json()["model"] == "first"
        stored = {x["model"] for x in c.get("/api/conversations").json()}
        assert stored == {"first", "second"}
    store.close()


def test_a_streamed_event_is_one_line_to_every_line_splitter():
    """A token holding U+0085, U+2028 or U+2029 (a random model emits them) must not split an SSE event
    for clients that split lines as str.splitlines does (httpx's iter_lines)."""
    import httpx

    from picochat.serve.openai_api import _sse
    obj = {"choices": [{"text": "a\x85b\u2028c\u2029d\ve\x1cf\r\ng"}]}
    event = _sse(obj)
    lines = [ln for ln in httpx.Response(200, content=event.encode()).iter_lines() if ln]
    assert len(lines) == 1 and json.loads(lines[0][6:]) == obj
