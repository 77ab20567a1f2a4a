"""The conversation store: conversations, a tree of messages, ratings and rankings, in SQLite.

One file, stdlib sqlite3, WAL journal: readers never block the writer, so `picochat feedback export`
can read while the server writes. Every write is one transaction (BEGIN IMMEDIATE ... COMMIT), so a
crash leaves either all of it or none of it. Errors are ApiErrors (404 / 400 in OpenAI's shape).
"""
from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from .errors import ApiError
from .store_schema import MIGRATIONS, SCHEMA_VERSION

MAX_CONTENT_BYTES = 1_000_000   # one message (and the system prompt)
MAX_TITLE = 200
MAX_MODEL = 200
MAX_FINISH_REASON = 32
MAX_SETTINGS_BYTES = 64_000
MAX_INT = 2**63 - 1             # SQLite INTEGER; a bigger Python int makes sqlite3 raise OverflowError
ROLES = ("system", "user", "assistant")
SOURCES = ("web", "api")
_CID = re.compile(r"[0-9a-f]{32}")

_CONV_COLS = "id, title, model, system_prompt, settings, source, created_at, updated_at"
_MSG_COLS = ("m.id, m.conversation_id, m.parent_id, m.role, m.content, m.model, m.settings, m.finish_reason,"
             " m.prompt_tokens, m.completion_tokens, m.created_at, r.rating")


class StoreError(ApiError):
    """Base of the store's errors; an ApiError so the app answers with its status and OpenAI's shape."""


class NotFound(StoreError):
    def __init__(self, message: str, param: Optional[str] = None):
        super().__init__(404, message, param, type="not_found_error", code="not_found")


class Invalid(StoreError):
    def __init__(self, message: str, param: Optional[str] = None):
        super().__init__(400, message, param)


def default_db_path() -> Path:
    """$PICOCHAT_HOME/picochat.db ($PICOCHAT_HOME defaults to ~/.cache/picochat, as for datasets)."""
    from ..data.prepare import picochat_home
    return picochat_home() / "picochat.db"


def _text(value, name: str, limit: int, *, optional: bool = True, in_bytes: bool = False) -> Optional[str]:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise Invalid(f"{name} must be a string", name)
    try:  # a lone surrogate (legal in JSON "\ud800") cannot be stored as UTF-8
        size = len(value.encode("utf-8")) if in_bytes else len(value)
    except UnicodeEncodeError:
        raise Invalid(f"{name} is not valid Unicode", name) from None
    if size > limit:
        raise Invalid(f"{name} is too long ({size} > {limit} {'bytes' if in_bytes else 'characters'})", name)
    return value


def _settings(value) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise Invalid("settings must be a JSON object", "settings")
    try:  # allow_nan=False: NaN is not JSON, and the response encoder would fail on it later
        text = json.dumps(value, allow_nan=False, ensure_ascii=False)
        size = len(text.encode("utf-8"))
    except (TypeError, ValueError, UnicodeEncodeError) as e:
        raise Invalid(f"settings is not storable JSON: {e}", "settings") from None
    if size > MAX_SETTINGS_BYTES:
        raise Invalid(f"settings is too large ({size} > {MAX_SETTINGS_BYTES} bytes)", "settings")
    return text


def _count(value, name: str) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_INT:
        raise Invalid(f"{name} must be a non-negative integer", name)
    return value


def _message_id(value, name: str = "message_id") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise Invalid(f"{name} must be an integer", name)
    if not 1 <= value <= MAX_INT:
        raise NotFound(f"no message with id {value}", name)
    return value


def _title_from(content: str) -> str:
    """The first user message, on one line, cut to about 60 characters at a word boundary."""
    text = " ".join(content.split())
    if len(text) <= 60:
        return text
    cut = text[:60]
    space = cut.rfind(" ")
    return (cut[:space] if space > 40 else cut) + "…"


def _row(row) -> dict:
    d = dict(row)
    d["settings"] = json.loads(d["settings"]) if d["settings"] is not None else None
    return d


class Store:
    """Thread-safe: one connection shared by all threads, every use under one lock.

    The server's handlers run in a thread pool; SQLite serialises writers anyway, and the lock keeps
    a transaction from interleaving with another thread's statements on the same connection.
    """

    def __init__(self, path: str | Path | None = None, *, timeout: float = 10.0):
        self.path = Path(path) if path is not None else default_db_path()
        if str(self.path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: no implicit transactions; we open them ourselves with BEGIN IMMEDIATE
        self._db = sqlite3.connect(str(self.path), timeout=timeout, isolation_level=None,
                                   check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            # WAL + NORMAL: a commit is in the WAL file (the OS page cache) before COMMIT returns, so it
            # survives SIGKILL of this process; only a power cut can lose the last few commits (never
            # corrupt the file). FULL would fsync every commit to survive that too, at a latency cost.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
            self._migrate()

    def _migrate(self) -> None:
        with self._tx() as db:  # BEGIN IMMEDIATE: two processes opening a new file do not both migrate
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(500, f"{self.path} has schema version {version}; this picochat knows "
                                      f"up to {SCHEMA_VERSION}: upgrade picochat", type="server_error")
            for i in range(version, SCHEMA_VERSION):
                for stmt in MIGRATIONS[i].split(";"):
                    if stmt.strip():
                        db.execute(stmt)
                db.execute(f"PRAGMA user_version={i + 1}")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: all of it commits, or none of it (rollback on any exception)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _read(self, sql: str, params=()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- conversations -------------------------------------------------------------------------
    @staticmethod
    def _cid(cid) -> str:
        if not isinstance(cid, str) or not _CID.fullmatch(cid):
            raise NotFound(f"no conversation with id {str(cid)[:80]!r}", "conversation_id")
        return cid

    def create_conversation(self, *, model: Optional[str] = None, title: Optional[str] = None,
                            system_prompt: Optional[str] = None, settings: Optional[dict] = None,
                            source: str = "web") -> dict:
        if source not in SOURCES:
            raise Invalid(f"source must be one of {SOURCES}", "source")
        row = (uuid.uuid4().hex, _text(title, "title", MAX_TITLE) or "", _text(model, "model", MAX_MODEL),
               _text(system_prompt, "system_prompt", MAX_CONTENT_BYTES, in_bytes=True), _settings(settings),
               source)
        now = time.time()
        with self._tx() as db:
            db.execute(f"INSERT INTO conversations ({_CONV_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (*row, now, now))
        return self._conversation(row[0])

    def _conversation(self, cid: str) -> dict:
        rows = self._read(f"SELECT {_CONV_COLS} FROM conversations WHERE id = ?", (self._cid(cid),))
        if not rows:
            raise NotFound(f"no conversation with id {cid!r}", "conversation_id")
        return _row(rows[0])

    def list_conversations(self, limit: int = 200) -> list[dict]:
        limit = max(1, min(int(limit), 10_000))
        rows = self._read(
            "SELECT c.id, c.title, c.model, c.source, c.created_at, c.updated_at,"
            " (SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.id) AS message_count"
            " FROM conversations c ORDER BY c.updated_at DESC, c.rowid DESC LIMIT ?", (limit,))
        return [dict(r) for r in rows]

    def get_conversation(self, cid: str) -> dict:
        with self._lock:  # both reads under one lock hold: no write can slip in between them
            conv = self._conversation(cid)
            conv["messages"] = [_row(r) for r in self._read(
                f"SELECT {_MSG_COLS} FROM messages m LEFT JOIN ratings r ON r.message_id = m.id"
                " WHERE m.conversation_id = ? ORDER BY m.id", (cid,))]
            conv["rankings"] = [dict(r) for r in self._read(
                "SELECT k.id, k.chosen_id, k.rejected_id, k.created_at FROM rankings k"
                " JOIN messages m ON m.id = k.chosen_id WHERE m.conversation_id = ? ORDER BY k.id", (cid,))]
        for m in conv["messages"]:
            del m["conversation_id"]
        return conv

    def update_conversation(self, cid: str, *, title: Optional[str] = None, system_prompt: Optional[str] = None,
                            settings: Optional[dict] = None, model: Optional[str] = None) -> dict:
        """None leaves a field as it is; "" clears a title or system prompt, {} the settings."""
        changes = {}
        if title is not None:
            changes["title"] = _text(title, "title", MAX_TITLE)
        if system_prompt is not None:
            changes["system_prompt"] = _text(system_prompt, "system_prompt", MAX_CONTENT_BYTES, in_bytes=True)
        if settings is not None:
            changes["settings"] = _settings(settings)
        if model is not None:
            changes["model"] = _text(model, "model", MAX_MODEL)
        changes["updated_at"] = time.time()
        sets = ", ".join(f"{k} = ?" for k in changes)  # keys are ours, never the caller's
        with self._tx() as db:
            cur = db.execute(f"UPDATE conversations SET {sets} WHERE id = ?", (*changes.values(), self._cid(cid)))
            if cur.rowcount == 0:
                raise NotFound(f"no conversation with id {cid!r}", "conversation_id")
        return self._conversation(cid)

    def delete_conversation(self, cid: str) -> None:
        """Deletes its messages, ratings and rankings too (ON DELETE CASCADE)."""
        with self._tx() as db:
            if db.execute("DELETE FROM conversations WHERE id = ?", (self._cid(cid),)).rowcount == 0:
                raise NotFound(f"no conversation with id {cid!r}", "conversation_id")

    # -- messages ------------------------------------------------------------------------------
    def add_message(self, cid: str, *, role: str, content: str, parent_id: Optional[int] = None,
                    model: Optional[str] = None, settings: Optional[dict] = None,
                    finish_reason: Optional[str] = None, prompt_tokens: Optional[int] = None,
                    completion_tokens: Optional[int] = None) -> dict:
        return self.add_messages(cid, [dict(role=role, content=content, model=model, settings=settings,
                                            finish_reason=finish_reason, prompt_tokens=prompt_tokens,
                                            completion_tokens=completion_tokens)], parent_id=parent_id)[0]

    def add_messages(self, cid: str, messages: list[dict], parent_id: Optional[int] = None) -> list[dict]:
        """A chain in one transaction: each message is the child of the one before, the first of parent_id.

        For the OpenAI API, which stores a request's messages and its answer at once. Keys of each
        dict are add_message's keyword arguments.
        """
        allowed = {"role", "content", "model", "settings", "finish_reason", "prompt_tokens", "completion_tokens"}
        rows = []
        for m in messages:
            if not isinstance(m, dict) or set(m) - allowed:
                raise Invalid(f"a message takes only {sorted(allowed)}", "messages")
            if m.get("role") not in ROLES:
                raise Invalid(f"role must be one of {ROLES}, got {str(m.get('role'))[:40]!r}", "role")
            rows.append((m["role"], _text(m.get("content"), "content", MAX_CONTENT_BYTES, optional=False,
                                          in_bytes=True),
                         _text(m.get("model"), "model", MAX_MODEL), _settings(m.get("settings")),
                         _text(m.get("finish_reason"), "finish_reason", MAX_FINISH_REASON),
                         _count(m.get("prompt_tokens"), "prompt_tokens"),
                         _count(m.get("completion_tokens"), "completion_tokens")))
        if parent_id is not None:
            parent_id = _message_id(parent_id, "parent_id")
        self._cid(cid)
        ids = []
        with self._tx() as db:
            conv = db.execute("SELECT title FROM conversations WHERE id = ?", (cid,)).fetchone()
            if conv is None:
                raise NotFound(f"no conversation with id {cid!r}", "conversation_id")
            if parent_id is not None:
                p = db.execute("SELECT conversation_id FROM messages WHERE id = ?", (parent_id,)).fetchone()
                if p is None or p[0] != cid:
                    raise NotFound(f"no message with id {parent_id} in conversation {cid}", "parent_id")
            title, now = conv[0], time.time()
            for row in rows:
                ids.append(db.execute(
                    "INSERT INTO messages (conversation_id, parent_id, role, content, model, settings,"
                    " finish_reason, prompt_tokens, completion_tokens, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", (cid, parent_id, *row, now)).lastrowid)
                parent_id = ids[-1]
                if not title and row[0] == "user" and row[1].strip():
                    title = _title_from(row[1])
                    db.execute("UPDATE conversations SET title = ? WHERE id = ?", (title, cid))
            db.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (now, cid))
        return [self.get_message(i) for i in ids]

    def get_message(self, message_id: int) -> dict:
        """A message with its conversation_id and rating (the app checks metadata.parent_id with it)."""
        rows = self._read(f"SELECT {_MSG_COLS} FROM messages m LEFT JOIN ratings r ON r.message_id = m.id"
                          " WHERE m.id = ?", (_message_id(message_id),))
        if not rows:
            raise NotFound(f"no message with id {message_id}", "message_id")
        return _row(rows[0])

    # -- feedback ------------------------------------------------------------------------------
    def set_rating(self, message_id: int, rating: int) -> dict:
        """Thumbs up (1) or down (-1) on an assistant message; 0 clears it."""
        if isinstance(rating, bool) or rating not in (-1, 0, 1):
            raise Invalid(f"rating must be 1, -1 or 0, got {str(rating)[:40]}", "rating")
        message_id = _message_id(message_id)
        with self._tx() as db:
            m = db.execute("SELECT role FROM messages WHERE id = ?", (message_id,)).fetchone()
            if m is None:
                raise NotFound(f"no message with id {message_id}", "message_id")
            if m[0] != "assistant":
                raise Invalid(f"only assistant messages can be rated; message {message_id} is a {m[0]} message",
                              "message_id")
            if rating == 0:
                db.execute("DELETE FROM ratings WHERE message_id = ?", (message_id,))
            else:
                db.execute("INSERT INTO ratings (message_id, rating, created_at) VALUES (?, ?, ?)"
                           " ON CONFLICT (message_id) DO UPDATE SET rating = excluded.rating,"
                           " created_at = excluded.created_at", (message_id, rating, time.time()))
        return {"message_id": message_id, "rating": rating or None}

    def add_ranking(self, chosen_id: int, rejected_id: int) -> dict:
        """chosen_id is better than rejected_id: two assistant answers to the same user message.

        Ranking a pair again updates its time; ranking it the other way round replaces the old
        judgement (the latest one is what the user thinks).
        """
        chosen_id, rejected_id = _message_id(chosen_id, "chosen_id"), _message_id(rejected_id, "rejected_id")
        if chosen_id == rejected_id:
            raise Invalid("chosen_id and rejected_id are the same message", "rejected_id")
        with self._tx() as db:
            rows = {}
            for name, mid in (("chosen_id", chosen_id), ("rejected_id", rejected_id)):
                r = db.execute("SELECT m.role, m.parent_id, p.role FROM messages m"
                               " LEFT JOIN messages p ON p.id = m.parent_id WHERE m.id = ?", (mid,)).fetchone()
                if r is None:
                    raise NotFound(f"no message with id {mid}", name)
                if r[0] != "assistant":
                    raise Invalid(f"{name} {mid} is a {r[0]} message; only assistant answers can be ranked", name)
                rows[name] = r
            parent, parent_role = rows["chosen_id"][1], rows["chosen_id"][2]
            if parent is None or parent != rows["rejected_id"][1] or parent_role != "user":
                raise Invalid(f"messages {chosen_id} and {rejected_id} are not two answers to the same user "
                              "message", "rejected_id")
            now = time.time()
            db.execute("DELETE FROM rankings WHERE chosen_id = ? AND rejected_id = ?", (rejected_id, chosen_id))
            db.execute("INSERT INTO rankings (chosen_id, rejected_id, created_at) VALUES (?, ?, ?)"
                       " ON CONFLICT (chosen_id, rejected_id) DO UPDATE SET created_at = excluded.created_at",
                       (chosen_id, rejected_id, now))
            rid = db.execute("SELECT id FROM rankings WHERE chosen_id = ? AND rejected_id = ?",
                             (chosen_id, rejected_id)).fetchone()[0]
        return {"id": rid, "chosen_id": chosen_id, "rejected_id": rejected_id, "created_at": now}

    def preference_pairs(self) -> Iterator[dict[str, Any]]:
        """Preference pairs in trl's conversational format (docs/api.md, "Feedback export")."""
        from .feedback import preference_pairs
        return preference_pairs(self)

    def stats(self) -> dict:
        """Counts for `picochat feedback stats`."""
        from .feedback import feedback_stats
        return feedback_stats(self)

    def integrity_check(self) -> str:
        return "\n".join(r[0] for r in self._read("PRAGMA integrity_check"))
