"""GET /api/messages/{id}/attention on a tiny random chat model, in process (FastAPI TestClient)."""
from __future__ import annotations

import threading
import time

import pytest
import torch
from fastapi.testclient import TestClient

from picochat.chat_template import render_conversation
from picochat.engine.engine import SamplingParams
from picochat.engine.scheduler import Request
from picochat.inspect.maps import MAX_TOKENS, gpt_maps, token_strings
from picochat.serve.app import create_app
from picochat.serve.hosts import load_host
from picochat.serve.store import Store


@pytest.fixture(scope="module")
def setup(tiny_chat_ckpt, tmp_path_factory):
    host = load_host(str(tiny_chat_ckpt), dtype="fp32", max_batch=4, max_queue=16, max_context=512)
    store = Store(tmp_path_factory.mktemp("attn") / "t.db")
    with TestClient(create_app([host], store=store)) as c:
        yield c, host, store
    store.close()


def ask(c, messages, **extra) -> dict:
    """A chat completion; returns the stored answer (the newest assistant message of its conversation)."""
    r = c.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 12, "temperature": 0, **extra})
    assert r.status_code == 200, r.text
    cid = (extra.get("metadata") or {}).get("conversation_id") or c.get("/api/conversations").json()[0]["id"]
    msgs = c.get(f"/api/conversations/{cid}").json()["messages"]
    answer = max((m for m in msgs if m["role"] == "assistant"), key=lambda m: m["id"])
    assert answer["content"] == r.json()["choices"][0]["message"]["content"]
    return answer


def error(r, status: int, param: str) -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    return err["message"]


def test_maps_of_a_stored_answer(setup, tiny_chat_ckpt):
    c, host, store = setup
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The cat sees the garden."}]
    answer = ask(c, messages)
    r = c.get(f"/api/messages/{answer['id']}/attention")
    assert r.status_code == 200, r.text
    d = r.json()
    prompt = render_conversation(messages, host.tokenizer, host.template, add_generation_prompt=True)[0]
    ids = prompt + host.tokenizer.encode(answer["content"])
    assert d["answer_start"] == len(prompt) == answer["prompt_tokens"] == d["prompt_tokens"]
    assert d["exact"] is True and d["tokens"] == len(ids) and d["model"] == "tiny-chat"
    assert d["kind"] == "gpt" and d["layer"] is None and d["n_layers"] == 2 and d["n_heads"] == 2
    g = d["groups"]["self"]
    assert g["causal"] is True and g["layers"] == 2 and g["heads"] == 2
    assert g["queries"] == g["keys"] == token_strings(host.tokenizer, ids)
    w = torch.tensor(g["weights"])
    T = len(ids)
    assert w.shape == (2, 2, T, T)
    # rows are distributions (each of the T numbers rounded to 4 decimals), exactly 0 above the diagonal
    assert torch.allclose(w.sum(-1), torch.ones(2, 2, T), atol=T * 5e-5 + 1e-6)
    assert (w.masked_select(torch.triu(torch.ones(T, T, dtype=torch.bool), 1)) == 0).all()
    # the very maps a fresh copy of the model gives for those tokens
    from picochat.checkpoints.io import load_model
    model, tok, _ = load_model(str(tiny_chat_ckpt))
    ref = gpt_maps(model, tok, ids).groups["self"].weights
    assert torch.allclose(w, ref, atol=1e-4)


def test_layer_param(setup):
    c, host, store = setup
    answer = ask(c, [{"role": "user", "content": "A dog likes a red ball."}])
    full = c.get(f"/api/messages/{answer['id']}/attention").json()
    one = c.get(f"/api/messages/{answer['id']}/attention", params={"layer": 1}).json()
    assert one["layer"] == 1 and one["n_layers"] == 2 and one["groups"]["self"]["layers"] == 1
    assert one["groups"]["self"]["weights"] == full["groups"]["self"]["weights"][1:]
    assert one["answer_start"] == full["answer_start"]
    assert "0..1" in error(c.get(f"/api/messages/{answer['id']}/attention?layer=2"), 400, "layer")
    error(c.get(f"/api/messages/{answer['id']}/attention?layer=-1"), 400, "layer")
    error(c.get(f"/api/messages/{answer['id']}/attention?layer=top"), 400, "layer")


def test_errors(setup):
    c, host, store = setup
    answer = ask(c, [{"role": "user", "content": "Our teacher paints the bridge."}])
    msg = error(c.get(f"/api/messages/{answer['parent_id']}/attention"), 400, "message_id")
    assert "user message" in msg
    for bad in ("999999", "abc", "-1", "99999999999999999999999"):
        assert c.get(f"/api/messages/{bad}/attention").status_code == 404, bad
    cid = c.post("/api/conversations", json={}).json()["id"]
    u = store.add_message(cid, role="user", content="Hello")
    other = store.add_message(cid, role="assistant", content="Hi", parent_id=u["id"], model="not-here-7b")
    msg = error(c.get(f"/api/messages/{other['id']}/attention"), 400, "message_id")
    assert "not-here-7b" in msg and "tiny-chat" in msg
    unnamed = c.post(f"/api/conversations/{cid}/messages",  # stored by hand: no model recorded
                     json={"role": "assistant", "content": "Hey", "parent_id": u["id"]}).json()
    assert "tiny-chat" in error(c.get(f"/api/messages/{unnamed['id']}/attention"), 400, "message_id")
    # longer than maps are drawn for: a clear 400, no work done
    u2 = store.add_message(cid, role="user", content="the sea " * 400)
    long = store.add_message(cid, role="assistant", content="ok", parent_id=u2["id"], model="tiny-chat")
    assert f"at most {MAX_TOKENS}" in error(c.get(f"/api/messages/{long['id']}/attention"), 400, "message_id")


def test_page_conversation_trimmed_system_prompt_and_dropped_turns(setup):
    """A web conversation: the page sends the system prompt trimmed, the stored path holds the turns
    truncate_history left out; the rebuilt prompt is still the one the model read."""
    c, host, store = setup
    conv = c.post("/api/conversations", json={"system_prompt": "  Be brief.  "}).json()
    u1 = c.post(f"/api/conversations/{conv['id']}/messages", json={"content": "the old man " * 60}).json()
    a1 = c.post(f"/api/conversations/{conv['id']}/messages",
                json={"role": "assistant", "content": "a small house " * 60, "parent_id": u1["id"]}).json()
    u2 = c.post(f"/api/conversations/{conv['id']}/messages",
                json={"content": "And the river?", "parent_id": a1["id"]}).json()
    sent = [{"role": "system", "content": "Be brief."}] + [{"role": m["role"], "content": m["content"]} for m in (u1, a1, u2)]
    r = c.post("/v1/chat/completions", json={
        "messages": sent, "max_tokens": 12, "temperature": 0, "truncate_history": True,
        "metadata": {"conversation_id": conv["id"], "parent_id": str(u2["id"])}})
    assert r.status_code == 200, r.text
    assert r.headers["X-Picochat-Dropped-Messages"] == "2"
    msgs = c.get(f"/api/conversations/{conv['id']}").json()["messages"]
    answer = next(m for m in msgs if m["role"] == "assistant" and m["parent_id"] == u2["id"])
    d = c.get(f"/api/messages/{answer['id']}/attention", params={"layer": 0}).json()
    kept = [sent[0], sent[3]]
    prompt = render_conversation(kept, host.tokenizer, host.template, add_generation_prompt=True)[0]
    assert d["exact"] is True and d["answer_start"] == len(prompt) == answer["prompt_tokens"]
    assert d["groups"]["self"]["queries"][:len(prompt)] == token_strings(host.tokenizer, prompt)


def test_maps_while_a_generation_is_in_flight(setup):
    """The route's torch work waits for a turn boundary on the model thread, not for the generation."""
    c, host, store = setup
    answer = ask(c, [{"role": "user", "content": "A child crosses the bridge."}])
    events, done = [], threading.Event()

    def on_event(ev):
        events.append(ev)
        time.sleep(0.01)  # a slow client: the generation lasts at least 4 s
        if ev.finish_reason:
            done.set()
    host.scheduler.submit(Request([1, 2, 3], SamplingParams(max_tokens=400, temperature=1.0, seed=0), on_event))
    deadline = time.monotonic() + 30
    while len(events) < 3:
        assert time.monotonic() < deadline, "the generation did not start"
        time.sleep(0.01)
    assert host.scheduler.stats()["active_sequences"] == 1
    r = c.get(f"/api/messages/{answer['id']}/attention")
    assert r.status_code == 200, r.text
    assert not done.is_set() and host.scheduler.stats()["active_sequences"] == 1  # still generating
    assert done.wait(120)
    assert events[-1].finish_reason == "length" and sum(len(e.token_ids) for e in events) == 400
