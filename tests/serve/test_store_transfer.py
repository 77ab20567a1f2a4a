"""Export and import of conversations: a whole tree with branches, ratings, a ranking and a picture goes out and
comes back equal (under new ids); a bad document is a 400 that stores nothing."""
from __future__ import annotations

import copy

import pytest

from tests.serve.conftest import png_bytes
from tests.serve.test_store_images import picture


def build(store) -> str:
    """system prompt, a user message with a picture, two rated and ranked answers, a follow-up on one."""
    conv = store.create_conversation(title="Export me", model="tiny-chat", system_prompt="Be brief.",
                                     settings={"temperature": 0.5})
    pic = png_bytes()
    u = store.add_message(conv["id"], role="user", content="Look at this: what colour?", images=[picture(pic, offset=13)])
    a1 = store.add_message(conv["id"], role="assistant", content="Red.", parent_id=u["id"], model="tiny-chat",
                           settings={"timing": {"ttft_s": 0.1}}, finish_reason="stop", completion_tokens=2)
    a2 = store.add_message(conv["id"], role="assistant", content="Crimson, I think.", parent_id=u["id"])
    store.set_rating(a1["id"], 1)
    store.set_rating(a2["id"], -1)
    store.add_ranking(a1["id"], a2["id"])
    u2 = store.add_message(conv["id"], role="user", content="Sure?", parent_id=a1["id"])
    store.add_message(conv["id"], role="assistant", content="Yes.", parent_id=u2["id"])
    return conv["id"]


def shape(doc: dict) -> dict:
    """A document without its ids and times: what must survive a round trip."""
    index = {m["id"]: k for k, m in enumerate(doc["messages"])}
    strip = ("id", "created_at", "parent_id")
    return {"title": doc["title"], "system_prompt": doc["system_prompt"], "settings": doc["settings"],
            "messages": [{k: v for k, v in m.items() if k not in strip} | {"parent": index.get(m["parent_id"])}
                         for m in doc["messages"]],
            "rankings": [(index[r["chosen_id"]], index[r["rejected_id"]]) for r in doc["rankings"]]}


def test_a_conversation_goes_out_and_comes_back(tiny_api):
    c, _ = tiny_api
    store = c.app.state.store
    cid = build(store)
    r = c.get(f"/api/conversations/{cid}/export")
    assert r.status_code == 200 and "attachment" in r.headers["content-disposition"]
    doc = r.json()
    assert doc["format"] == "picochat-conversation" and len(doc["messages"]) == 5 and doc["rankings"]
    new = c.post("/api/import", json=doc).json()["imported"]
    assert len(new) == 1 and new[0]["id"] != cid and new[0]["title"] == "Export me"
    again = c.get(f"/api/conversations/{new[0]['id']}/export").json()
    assert shape(again) == shape(doc)  # the tree, texts, ratings, ranking and the picture's bytes
    # all at once: every conversation comes back as a new one
    before = len(c.get("/api/conversations").json())
    everything = c.get("/api/export").json()
    assert everything["format"] == "picochat-conversations" and len(everything["conversations"]) == before
    assert len(c.post("/api/import", json=everything).json()["imported"]) == before
    assert len(c.get("/api/conversations").json()) == 2 * before


def broken(doc: dict, how: str) -> dict:
    d = copy.deepcopy(doc)
    if how == "format":
        d["format"] = "something-else"
    elif how == "parent order":
        d["messages"].reverse()
    elif how == "rating on a question":
        d["messages"][0]["rating"] = 1
    elif how == "turn order":
        d["messages"][1]["role"] = "user"
    elif how == "ranking":
        d["rankings"] = [{"chosen_id": d["messages"][1]["id"], "rejected_id": d["messages"][4]["id"]}]
    elif how == "base64":
        d["messages"][0]["images"][0]["data"] = "not base64!"
    elif how == "unknown key":
        d["messages"][0]["colour"] = "red"
    elif how == "list as an id":
        d["messages"][1]["parent_id"] = [1]
        d["rankings"] = [{"chosen_id": [1], "rejected_id": {}}]
    return d


@pytest.mark.parametrize("how", ["format", "parent order", "rating on a question", "turn order", "ranking",
                                 "base64", "unknown key", "list as an id"])
def test_a_bad_document_stores_nothing(tiny_api, how):
    c, _ = tiny_api
    store = c.app.state.store
    doc = c.get(f"/api/conversations/{build(store)}/export").json()
    before = c.get("/api/conversations").json()
    for body in (broken(doc, how), {"format": "picochat-conversations", "version": 1,
                                    "conversations": [doc, broken(doc, how)]}):  # the good one is not kept either
        r = c.post("/api/import", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == "conversations", r.text
    assert c.get("/api/conversations").json() == before
