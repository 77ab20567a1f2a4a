"""GET /api/messages/{id}/tokens: each stored answer token's probability and the alternatives, equal to a direct
forward pass of the model over the conversation and the answer (the page's token hover reads it)."""
from __future__ import annotations

import math

import pytest

from tests.serve.test_api import USER


def test_token_probabilities_of_a_stored_answer(tiny_api):
    c, host = tiny_api
    tok = host.tokenizer
    for seed in range(50):  # the stored answer is re-encoded from its text: one whose text re-encodes to the
        r = c.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 8, "temperature": 1.0,  # tokens
                                                 "seed": seed, "logprobs": True, "top_logprobs": 3}).json()
        text, live = r["choices"][0]["message"]["content"], r["choices"][0]["logprobs"]["content"]
        if text and [bytes(e["bytes"]) for e in live] == [tok.token_bytes(t) for t in tok.encode(text)]:
            break
    else:
        pytest.fail("no seed gave an answer of whole tokens")
    conv = c.get("/api/conversations").json()[0]
    answer = [m for m in c.get(f"/api/conversations/{conv['id']}").json()["messages"] if m["role"] == "assistant"][0]
    got = c.get(f"/api/messages/{answer['id']}/tokens?top=3").json()
    assert got["exact"] is True and got["model"] == host.id
    toks = got["tokens"]
    assert b"".join(bytes(t["bytes"]) for t in toks).decode() == answer["content"]
    for t, live in zip(toks, live):
        # at temperature 1 the engine's logprobs are the model's own, as here
        assert t["token"] == live["token"] and abs(t["logprob"] - live["logprob"]) < 1e-3
        assert len(t["top"]) == 3 and all(math.isfinite(a["logprob"]) for a in t["top"])
    # and the stats the page shows: the answer's timing was stored with it
    timing = answer["settings"]["timing"]
    assert timing["ttft_s"] >= 0 and timing["tokens_per_s"] > 0
    assert c.get("/api/messages/999999/tokens").status_code == 404
    user = [m for m in c.get(f"/api/conversations/{conv['id']}").json()["messages"] if m["role"] == "user"][0]
    assert c.get(f"/api/messages/{user['id']}/tokens").status_code == 400
    assert c.get(f"/api/messages/{answer['id']}/tokens?top=21").status_code == 400


def test_search_conversations_by_title_and_content(tiny_api):
    c, _ = tiny_api
    a = c.post("/api/conversations", json={"title": "Trip to Lisbon"}).json()
    b = c.post("/api/conversations", json={"title": "Other"}).json()
    c.post(f"/api/conversations/{b['id']}/messages", json={"role": "user", "content": "What about 100% of Porto?"})
    ids = lambda q: [x["id"] for x in c.get("/api/conversations", params={"q": q}).json()]  # noqa: E731
    assert ids("lisbon") == [a["id"]] and ids("porto") == [b["id"]] and ids("100%") == [b["id"]]
    assert ids("zzz-nothing") == [] and c.get("/api/conversations", params={"q": "x" * 201}).status_code == 400
