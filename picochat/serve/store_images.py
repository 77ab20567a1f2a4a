"""Pictures in the conversation store (schema version 2): what a message's "images" may hold, and the SQL.

A stored message keeps its text in `content` as before (titles, the feedback export and every text-only
reader see no change); each picture is a row of `images` saying where it sits in that text (`offset`, in
characters) and which bytes it is (`sha256`, a row of `image_blobs`). The bytes are the file as it was
sent (PNG or JPEG, already checked by serve/images.py), kept once however many messages hold them: an API
client re-sends a conversation's pictures with every turn, and each turn is stored.

The store does not decode pictures (it never imports Pillow or torch); it checks what it can cheaply
(types, media type, size, offsets) and hashes the bytes itself rather than trust a caller's digest.
"""
from __future__ import annotations

import hashlib
import sqlite3
from typing import Optional

from .store_rules import Invalid

MAX_IMAGE_BYTES = 20 * 1024 * 1024   # = data.scenes.MAX_FILE_BYTES (the reader refuses more; a test checks)
MAX_IMAGES_PER_MESSAGE = 32
MEDIA_TYPES = ("image/png", "image/jpeg")
IMAGE_KEYS = frozenset({"offset", "media_type", "data", "width", "height"})

_COLS = ("i.id, i.message_id, i.char_offset, i.sha256, b.media_type, b.width, b.height,"
         " length(b.data) AS bytes")


def _count(value, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise Invalid(f"{name} must be an integer in [{low}, {high}], got {str(value)[:40]}", name)
    return value


def image_rows(m: dict, content: str) -> list[tuple]:
    """(char_offset, sha256, media_type, data, width, height) for each picture of message dict `m`
    ({"offset", "media_type", "data", "width", "height"} each; offsets in order, within `content`)."""
    images = m.get("images") or []
    if not isinstance(images, list):
        raise Invalid("images must be a list of pictures", "images")
    if images and m.get("role", "user") != "user":
        raise Invalid(f"only user messages may hold pictures; this one is a {str(m.get('role'))[:40]} message",
                      "images")
    if len(images) > MAX_IMAGES_PER_MESSAGE:
        raise Invalid(f"a message holds at most {MAX_IMAGES_PER_MESSAGE} pictures, got {len(images)}", "images")
    rows, last = [], 0
    for im in images:
        if not isinstance(im, dict) or set(im) != IMAGE_KEYS:
            raise Invalid(f"a picture takes exactly {sorted(IMAGE_KEYS)}", "images")
        offset = _count(im["offset"], "offset", last, len(content))
        last = offset
        if im["media_type"] not in MEDIA_TYPES:
            raise Invalid(f"media_type must be one of {', '.join(MEDIA_TYPES)}, got {str(im['media_type'])[:40]!r}",
                          "media_type")
        data = im["data"]
        if not isinstance(data, (bytes, bytearray)) or not 0 < len(data) <= MAX_IMAGE_BYTES:
            raise Invalid(f"a picture's data must be 1 to {MAX_IMAGE_BYTES} bytes", "data")
        w, h = _count(im["width"], "width", 1, 1 << 20), _count(im["height"], "height", 1, 1 << 20)
        rows.append((offset, hashlib.sha256(data).hexdigest(), im["media_type"], bytes(data), w, h))
    return rows


def insert(db: sqlite3.Connection, message_id: int, rows: list[tuple], now: float) -> None:
    """Inside the caller's transaction: the message's pictures, each blob stored once."""
    for offset, sha, media_type, data, w, h in rows:
        db.execute("INSERT INTO image_blobs (sha256, media_type, data, width, height, created_at)"
                   " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (sha256) DO NOTHING", (sha, media_type, data, w, h, now))
        db.execute("INSERT INTO images (message_id, char_offset, sha256) VALUES (?, ?, ?)", (message_id, offset, sha))


def collect_garbage(db: sqlite3.Connection) -> None:
    """Inside the caller's transaction: drop the bytes no message holds any more."""
    db.execute("DELETE FROM image_blobs WHERE NOT EXISTS (SELECT 1 FROM images i WHERE i.sha256 = image_blobs.sha256)")


def _out(r) -> dict:
    return {"id": r["id"], "offset": r["char_offset"], "media_type": r["media_type"], "width": r["width"],
            "height": r["height"], "bytes": r["bytes"], "sha256": r["sha256"]}


def attach(db: sqlite3.Connection, messages: list[dict], conversation_id: Optional[str] = None) -> list[dict]:
    """Give each message dict its "images" (a list, maybe empty), in order: all of one conversation's in
    one query, or those of the given messages."""
    if conversation_id is not None:
        rows = db.execute(f"SELECT {_COLS} FROM images i JOIN image_blobs b ON b.sha256 = i.sha256"
                          " JOIN messages m ON m.id = i.message_id WHERE m.conversation_id = ? ORDER BY i.id",
                          (conversation_id,)).fetchall()
    else:
        ids = [m["id"] for m in messages]
        rows = db.execute(f"SELECT {_COLS} FROM images i JOIN image_blobs b ON b.sha256 = i.sha256"
                          f" WHERE i.message_id IN ({', '.join('?' * len(ids))}) ORDER BY i.id", ids).fetchall()
    by_message: dict[int, list] = {}
    for r in rows:
        by_message.setdefault(r["message_id"], []).append(_out(r))
    for m in messages:
        m["images"] = by_message.get(m["id"], [])
    return messages


def read(db: sqlite3.Connection, image_id: int) -> Optional[dict]:
    """A stored picture with its bytes ("data"), or None."""
    r = db.execute(f"SELECT {_COLS}, b.data FROM images i JOIN image_blobs b ON b.sha256 = i.sha256 WHERE i.id = ?",
                   (image_id,)).fetchone()
    return None if r is None else _out(r) | {"data": bytes(r["data"])}
