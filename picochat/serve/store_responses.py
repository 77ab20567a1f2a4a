"""Stored responses of the Responses API (schema version 3): what previous_response_id chains from, what
GET /v1/responses/{id} returns and DELETE removes. One row per response: its body as it was returned, and
the conversation up to and including its answer (`turns`), so a chain never depends on older rows."""
from __future__ import annotations

import json
import re
import time
from typing import Optional

from .store_rules import NotFound

_ID = re.compile(r"resp_[0-9a-f]{32}")


def _id(response_id: str, field: str) -> str:
    if not isinstance(response_id, str) or not _ID.fullmatch(response_id):
        raise NotFound(f"no stored response with id {str(response_id)[:80]!r}", field)
    return response_id


def save(store, body: dict, turns: list[dict], previous_id: Optional[str]) -> None:
    with store._tx() as db:
        db.execute("INSERT INTO responses (id, previous_id, model, turns, body, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                   (body["id"], previous_id, body["model"], json.dumps(turns), json.dumps(body), time.time()))


def get(store, response_id: str, field: str = "response_id") -> tuple[dict, list[dict]]:
    """(the response body, its turns); NotFound naming `field` if there is no such stored response."""
    rows = store._read("SELECT body, turns FROM responses WHERE id = ?", (_id(response_id, field),))
    if not rows:
        raise NotFound(f"no stored response with id {response_id!r} (never stored, store: false, or deleted)", field)
    return json.loads(rows[0]["body"]), json.loads(rows[0]["turns"])


def delete(store, response_id: str) -> None:
    with store._tx() as db:
        if db.execute("DELETE FROM responses WHERE id = ?", (_id(response_id, "response_id"),)).rowcount == 0:
            raise NotFound(f"no stored response with id {response_id!r}", "response_id")
