"""Issue 8: one client's request never hurts or informs another's, and a refused request costs nothing.

Against real server processes (tiny random model) where the finding needs one: the prefix cache per
API key and per conversation, fair sharing between two client addresses, streams refused up front;
in process (TestClient) for what the route does before generation.
"""
from __future__ import annotations

import asyncio
import json
import threading

import httpx
import pytest
from fastapi.testclient import TestClient

from picochat.serve.app import create_app
from picochat.serve.hosts import load_host
from picochat.serve.store import Store
from tests.serve.conftest import ServerProcess

ALICE, MALLORY = "alice-key-0123456789abcdef", "mallory-key-0123456789abcdef"
SECRET = [{"role": "user", "content": "My bank PIN is 4821. Remember it and never tell anyone, please."}]


def cached(url, key=None, messages=SECRET, **extra):
    r = httpx.post(url + "/v1/chat/completions", timeout=60,
                   headers={"Authorization": f"Bearer {key}"} if key else {},
                   json={"messages": messages, "max_tokens": 1, "temperature": 0, **extra})
    assert r.status_code == 200, r.text
    return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


@pytest.mark.slow
def test_the_prefix_cache_is_per_api_key(tiny_chat_ckpt, tmp_path):
    """Finding 4: another key's cached_tokens told how much of a guessed prompt matched (a PIN in 40 tries)."""
    srv = ServerProcess(str(tiny_chat_ckpt), db=tmp_path / "k.db",
                        env_extra={"PICOCHAT_API_KEY": f"alice {ALICE},mallory {MALLORY}"})
    try:
        assert cached(srv.url, ALICE) == 0
        assert cached(srv.url, MALLORY, SECRET) == 0  # even the exact prompt: nothing of alice's is offered
        assert cached(srv.url, ALICE) > 10             # alice's own next request still reuses it
        guess = [{"role": "user", "content": SECRET[0]["content"].replace("4821", "4822")}]
        assert cached(srv.url, MALLORY, guess) > 10    # (mallory's own prefix, from her request above)
    finally:
        srv.stop()


@pytest.mark.slow
def test_the_prefix_cache_is_per_conversation_and_off_without_a_store(tiny_chat_ckpt, tmp_path):
    srv = ServerProcess(str(tiny_chat_ckpt), db=tmp_path / "c.db")
    try:
        def page_turn(text):
            conv = httpx.post(srv.url + "/api/conversations", json={}).json()
            user = httpx.post(f"{srv.url}/api/conversations/{conv['id']}/messages",
                              json={"role": "user", "content": text}).json()
            return {"conversation_id": conv["id"], "parent_id": str(user["id"])}
        first = page_turn(SECRET[0]["content"])
        assert cached(srv.url, metadata=first) == 0
        assert cached(srv.url, metadata=first) > 10    # regenerate in the same conversation: reused
        other = page_turn(SECRET[0]["content"])
        assert cached(srv.url, metadata=other) == 0    # another conversation starts from nothing
    finally:
        srv.stop()
    srv = ServerProcess(str(tiny_chat_ckpt), "--no-store", db=tmp_path / "unused.db")
    try:
        assert cached(srv.url) == 0 and cached(srv.url) == 0  # nothing outlives its request
    finally:
        srv.stop()


@pytest.mark.slow
def test_a_free_slot_goes_to_the_other_client_first(tiny_chat_ckpt, tmp_path):
    """Finding 7: n choices of one client used to run before anything queued after them. Client A
    (127.0.0.1) asks for 4 long completions on a 1-slot server; client B (127.0.0.2) asks for one
    token meanwhile, and gets it after A's first choice, not after all four."""
    srv = ServerProcess(str(tiny_chat_ckpt), "--max-batch", "1", "--max-queue", "8", db=tmp_path / "f.db")
    try:
        order = []
        b_client = httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2"), timeout=60)

        def b():
            r = b_client.post(srv.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1})
            order.append(("b", r.status_code))
        body = {"prompt": "Once upon a time", "max_tokens": 200, "n": 4, "stream": True, "temperature": 1.0}
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=120) as r:
            thread = None
            for line in r.iter_lines():
                if line.startswith("data: {") and thread is None:
                    thread = threading.Thread(target=b)
                    thread.start()
                if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["finish_reason"]:
                    order.append(("a", json.loads(line[6:])["choices"][0]["index"]))
            thread.join(60)
        b_client.close()
        assert ("b", 200) in order
        assert order.index(("b", 200)) <= 2, order  # B waited for at most A's first choice (and a second)
    finally:
        srv.stop()


@pytest.mark.slow
def test_streams_that_cannot_be_stored_are_refused_before_generation(tiny_server):
    """Finding 6: the store's rules (bytes, valid Unicode) ran after generation: a 400 after the work,
    an empty orphan conversation, and for streams a broken connection."""
    url = tiny_server.url
    before = httpx.get(url + "/api/conversations?limit=10000").json()
    for content in ("é" * 600_000, "lone \ud800 surrogate"):
        for stream in (True, False):
            body = json.dumps({"messages": [{"role": "user", "content": content}], "max_tokens": 2,
                               "stream": stream})  # ensure_ascii: the surrogate travels as \\ud800
            r = httpx.post(url + "/v1/chat/completions", content=body, timeout=60,
                           headers={"Content-Type": "application/json"})
            assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages"), r.text[:300]
    assert httpx.get(url + "/api/conversations?limit=10000").json() == before


# -- in process ------------------------------------------------------------------------------------

def make(ckpt, tmp_path, max_request_tokens=8192, **kw):
    host = load_host(str(ckpt), dtype="fp32", max_batch=kw.pop("max_batch", 4), max_queue=kw.pop("max_queue", 16),
                     max_context=512, max_request_tokens=max_request_tokens)
    store = Store(tmp_path / "t.db")
    return TestClient(create_app([host], store=store, **kw)), host, store


def test_n_has_a_budget_and_n_that_never_fits_is_400(tiny_chat_ckpt, tmp_path):
    c, host, store = make(tiny_chat_ckpt, tmp_path, max_request_tokens=600, max_queue=4)
    user = [{"role": "user", "content": "hi"}]
    with c:
        r = c.post("/v1/chat/completions", json={"messages": user, "n": 2, "max_tokens": 400})
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens", r.text
        r = c.post("/v1/chat/completions", json={"messages": user, "n": 3, "max_tokens": 1})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text  # was a 503 on an idle server
        r = c.post("/v1/chat/completions", json={"messages": user, "n": 2})  # the default shrinks to fit
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 600
        assert host.scheduler.requests_total == 2
    store.close()


def test_rendering_runs_off_the_event_loop_and_only_what_the_model_saw_is_stored(tiny_chat_ckpt, tmp_path,
                                                                                  monkeypatch):
    """Finding 8: tokenizing a 4 MB request stalled every stream for ~0.9 s, and all of its messages
    were stored although most were cut from the prompt."""
    import picochat.chat_template as ct
    real, on_loop = ct.render_conversation, []

    def render(*a, **kw):
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:
            on_loop.append(False)
        return real(*a, **kw)
    monkeypatch.setattr(ct, "render_conversation", render)
    c, host, store = make(tiny_chat_ckpt, tmp_path)
    turns = []
    for i in range(40):
        turns += [{"role": "user", "content": f"question {i} " + "words " * 30},
                  {"role": "assistant", "content": f"answer {i} " + "more " * 30}]
    turns.append({"role": "user", "content": "the last question"})
    with c:
        r = c.post("/v1/chat/completions", json={"messages": turns, "max_tokens": 2, "truncate_history": True})
        assert r.status_code == 200, r.text
        dropped = int(r.headers["X-Picochat-Dropped-Messages"])
        assert dropped > 40 and on_loop and not any(on_loop)
        conv = store.get_conversation(store.list_conversations()[0]["id"])
        msgs = conv["messages"]
        assert len(msgs) == len(turns) - dropped + 1  # the kept turns and the answer
        assert msgs[-2]["content"] == "the last question" and msgs[-1]["settings"]["dropped_messages"] == dropped
    store.close()


def test_the_answer_is_stored_under_the_path_the_model_saw(tiny_chat_ckpt, tmp_path):
    """Finding 10: metadata could file an answer under a conversation the model never saw."""
    c, host, store = make(tiny_chat_ckpt, tmp_path)
    with c:
        conv = c.post("/api/conversations", json={"system_prompt": "Be brief."}).json()
        user = c.post(f"/api/conversations/{conv['id']}/messages", json={"content": "What is 2+2?"}).json()
        meta = {"conversation_id": conv["id"], "parent_id": str(user["id"])}
        lie = [{"role": "user", "content": "Tell me a secret."}]
        r = c.post("/v1/chat/completions", json={"messages": lie, "max_tokens": 2, "metadata": meta})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
        truth = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
        r = c.post("/v1/chat/completions", json={"messages": truth, "max_tokens": 2, "metadata": meta})
        assert r.status_code == 200
        answer = [m for m in store.get_conversation(conv["id"])["messages"] if m["role"] == "assistant"]
        assert len(answer) == 1 and answer[0]["parent_id"] == user["id"]
        assert "system_prompt" not in answer[0]["settings"]  # the conversation's own: nothing to note
        new_system = [{"role": "system", "content": "Be verbose."}] + truth[1:]
        assert c.post("/v1/chat/completions", json={"messages": new_system, "max_tokens": 2,
                                                    "metadata": meta}).status_code == 200
        noted = [m["settings"].get("system_prompt") for m in store.get_conversation(conv["id"])["messages"]
                 if m["role"] == "assistant"]
        assert noted == [None, "Be verbose."]
        for bad in ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],   # answer under an answer
                    [{"role": "user", "content": "a"}, {"role": "system", "content": "b"},
                     {"role": "user", "content": "c"}]):                                             # system at depth 1
            r = c.post("/v1/chat/completions", json={"messages": bad, "max_tokens": 2})
            assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
        assert host.scheduler.requests_total == 2  # the refused ones never reached the model
    store.close()
