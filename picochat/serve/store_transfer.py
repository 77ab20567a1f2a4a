"""Export and import of conversations: one JSON document per conversation, the whole tree (every branch, each
message's rating, the rankings between answers, pictures as base64), so a conversation moves between
servers, or out and back, with its feedback.

    {"format": "picochat-conversation", "version": 1, "title", "model", "system_prompt", "settings",
     "source", "created_at", "updated_at",
     "messages": [{"id", "parent_id", "role", "content", "model", "settings", "finish_reason", "prompt_tokens",
                   "completion_tokens", "created_at", "rating", "images": [{"offset", "media_type", "data",
                   "width", "height"}]}],
     "rankings": [{"chosen_id", "rejected_id", "created_at"}]}

An export of several is {"format": "picochat-conversations", "version": 1, "conversations": [...]}. Import
takes either, checks everything first (the store's own rules: text, sizes, turn order along every branch,
ratings on answers only, rankings between two answers to one user message), and writes all of it in ONE
transaction under new ids: a bad document stores nothing.
"""
from __future__ import annotations

import base64
import binascii
import time
import uuid

from . import store_images
from .store_rules import Invalid, message_row, settings_json, text

FORMAT, MANY, VERSION = "picochat-conversation", "picochat-conversations", 1
MAX_MESSAGES = 10_000  # per conversation
_OWN = ("id", "parent_id", "rating", "created_at", "images")  # the document's keys beyond a stored message's


def export_conversation(store, cid: str) -> dict:
    conv = store.get_conversation(cid)
    messages = []
    for m in conv["messages"]:
        pics = [{"offset": im["offset"], "media_type": im["media_type"], "width": im["width"], "height": im["height"],
                 "data": base64.b64encode(store.image(im["id"])["data"]).decode()} for im in m.get("images") or []]
        messages.append({k: m[k] for k in ("id", "parent_id", "role", "content", "model", "settings", "finish_reason",
                                           "prompt_tokens", "completion_tokens", "created_at", "rating")}
                        | {"images": pics})
    return {"format": FORMAT, "version": VERSION,
            **{k: conv[k] for k in ("title", "model", "system_prompt", "settings", "source", "created_at",
                                    "updated_at")},
            "messages": messages,
            "rankings": [{k: r[k] for k in ("chosen_id", "rejected_id", "created_at")} for r in conv["rankings"]]}


def export_all(store) -> dict:
    return {"format": MANY, "version": VERSION,
            "conversations": [export_conversation(store, c["id"]) for c in store.list_conversations(10_000)]}


def _is_id(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _fail(i: int, msg: str, where: str = "") -> Invalid:
    return Invalid(f"conversation {i}{where}: {msg}", "conversations")


def _plan(doc, i: int) -> dict:
    """One document, checked: what to insert (no ids of this store yet)."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise _fail(i, f'not a picochat conversation (format "{FORMAT}", version {VERSION})')
    msgs, ranks = doc.get("messages"), doc.get("rankings", [])
    if not isinstance(msgs, list) or not isinstance(ranks, list):
        raise _fail(i, "messages and rankings must be lists")
    if len(msgs) > MAX_MESSAGES or len(ranks) > MAX_MESSAGES:
        raise _fail(i, f"at most {MAX_MESSAGES} messages and rankings per conversation")
    rows, by_id = [], {}
    for k, m in enumerate(msgs):
        where = f", message {k}"
        if not isinstance(m, dict):
            raise _fail(i, "a message is an object", where)
        mid, parent = m.get("id"), m.get("parent_id")
        if not _is_id(mid) or mid in by_id:
            raise _fail(i, "each message needs an integer id of its own", where)
        if parent is not None and (not _is_id(parent) or parent not in by_id):
            raise _fail(i, f"parent_id {parent!r} is not a message before it (parents come first)", where)
        try:
            row = message_row({x: v for x, v in m.items() if x not in _OWN and v is not None})
            pics = [dict(p) for p in m.get("images") or []]
            for p in pics:
                p["data"] = base64.b64decode(p.get("data") or "", validate=True)
            pics = store_images.image_rows({"role": row[0], "images": pics}, row[1])
        except (Invalid, TypeError, AttributeError, binascii.Error, ValueError) as e:
            raise _fail(i, getattr(e, "message", str(e)), where) from None
        # the chat template's order, checked against the parent alone (linear in the messages): a system
        # message only at the root, an assistant message only under a user message
        up = by_id[parent]["role"] if parent is not None else None
        if (row[0] == "system" and up is not None) or (row[0] == "assistant" and up != "user"):
            raise _fail(i, f"a {row[0]} message under a {up or 'nothing (the root)'} breaks the turn order: a system "
                           "message only at the root, an assistant message answers a user message", where)
        rating = m.get("rating")
        if rating not in (None, 1, -1) or isinstance(rating, bool) or (rating is not None and row[0] != "assistant"):
            raise _fail(i, "rating is 1, -1 or null, and only on an assistant message", where)
        by_id[mid] = {"role": row[0], "parent": parent}
        rows.append((mid, parent, row, pics, rating))
    for r in ranks:
        a, b = (r.get("chosen_id"), r.get("rejected_id")) if isinstance(r, dict) else (None, None)
        if not (_is_id(a) and _is_id(b)) or a not in by_id or b not in by_id or a == b or by_id[a]["role"] != "assistant" or \
                by_id[b]["role"] != "assistant" or by_id[a]["parent"] != by_id[b]["parent"]:
            raise _fail(i, f"a ranking must name two answers to the same user message, got {str(r)[:80]}")
    try:
        conv = (text(doc.get("title"), "title", 200) or "", text(doc.get("model"), "model", 200),
                doc.get("system_prompt") if isinstance(doc.get("system_prompt"), str) else None,
                settings_json(doc.get("settings")), doc.get("source") if doc.get("source") in ("web", "api") else "api")
    except Invalid as e:
        raise _fail(i, e.message) from None
    return {"conversation": conv, "rows": rows, "rankings": [(r["chosen_id"], r["rejected_id"]) for r in ranks]}


def import_conversations(store, body) -> list[dict]:
    """Import one conversation document or an export of several; -> [{"id", "title"}] of the new ones."""
    docs = body.get("conversations") if isinstance(body, dict) and body.get("format") == MANY else [body]
    if not isinstance(docs, list) or not docs:
        raise Invalid("nothing to import: send a conversation document or an export of several", "conversations")
    plans = [_plan(d, i) for i, d in enumerate(docs)]
    out, now = [], time.time()
    with store._tx() as db:
        for plan in plans:
            cid = uuid.uuid4().hex
            title, model, system, settings, source = plan["conversation"]
            db.execute("INSERT INTO conversations (id, title, model, system_prompt, settings, source, created_at,"
                       " updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (cid, title, model, system, settings, source,
                                                                         now, now))
            new = {}
            for mid, parent, row, pics, rating in plan["rows"]:
                new[mid] = db.execute(
                    "INSERT INTO messages (conversation_id, parent_id, role, content, model, settings, finish_reason,"
                    " prompt_tokens, completion_tokens, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (cid, new.get(parent), *row, now)).lastrowid
                store_images.insert(db, new[mid], pics, now)
                if rating is not None:
                    db.execute("INSERT INTO ratings (message_id, rating, created_at) VALUES (?, ?, ?)",
                               (new[mid], rating, now))
            for a, b in plan["rankings"]:
                db.execute("INSERT OR IGNORE INTO rankings (chosen_id, rejected_id, created_at) VALUES (?, ?, ?)",
                           (new[a], new[b], now))
            out.append({"id": cid, "title": title})
    return out
