"""The conversation store: conversations, a tree of messages, ratings and rankings, in SQLite.

One file, stdlib sqlite3, WAL journal: readers never block the writer, so `picochat feedback export`
can read while the server writes. Every write is one transaction (BEGIN IMMEDIATE ... COMMIT), so a
crash leaves either all of it or none of it. Errors are ApiErrors (404 / 400 in OpenAI's shape).

Every message tree follows the chat template's turn order (store_rules.check_turn_order), so whatever
is stored can be rendered, continued and exported. A user message may hold pictures (store_images.py: the bytes
beside the text, written in the same transaction as their message). The file, its WAL and its folder are private (0600,
0700): they hold people's chats.
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
from typing import Any, Callable, Iterator, Optional

from ..fsutil import create_private_file, make_private, make_private_dirs
from . import store_images
from .store_rules import (MAX_CONTENT_BYTES, MAX_FINISH_REASON, MAX_INT, MAX_MODEL,  # noqa: F401 - re-exported
                          MAX_SETTINGS_BYTES, MAX_TITLE, ROLES, SOURCES, Invalid, NotFound, StoreError, check_text,
                          check_turn_order, message_id as _message_id, message_row, settings_json, text)
from .store_schema import MIGRATIONS, SCHEMA_VERSION

_CID = re.compile(r"[0-9a-f]{32}")
_NEW_CONVERSATION_KEYS = frozenset({"model", "system_prompt", "settings", "source", "title"})

_CONV_COLS = "id, title, model, system_prompt, settings, source, created_at, updated_at"
_MSG_COLS = ("m.id, m.conversation_id, m.parent_id, m.role, m.content, m.model, m.settings, m.finish_reason,"
             " m.prompt_tokens, m.completion_tokens, m.created_at, r.rating")
# the path from the root down to a message, root first. A parent is always older than its child (ids
# only grow), so `parent_id < id` costs nothing on a sound file and ends the walk on a corrupt one
_PATH = ("WITH RECURSIVE up(id, depth) AS ("
         " SELECT id, 0 FROM messages WHERE id = ? AND conversation_id = ?"
         " UNION ALL SELECT m.parent_id, up.depth + 1 FROM messages m JOIN up ON m.id = up.id"
         " WHERE m.parent_id IS NOT NULL AND m.parent_id < m.id)"
         " SELECT m.id, m.role{} FROM up JOIN messages m ON m.id = up.id ORDER BY up.depth DESC")


def default_db_path() -> Path:
    """$PICOCHAT_HOME/picochat.db ($PICOCHAT_HOME defaults to ~/.cache/picochat, as for datasets)."""
    from ..data.prepare import picochat_home
    return picochat_home() / "picochat.db"


def _private_files(path: Path) -> None:
    """A 0700 folder if we make it, a 0600 database whatever the umask. SQLite gives -wal and -shm the
    main file's mode, so creating that one 0600 before SQLite opens it covers them; files made before
    (with the umask's 0644) are tightened."""
    make_private_dirs(path.parent)
    if not create_private_file(path):
        for p in (path, *(path.with_name(path.name + s) for s in ("-wal", "-shm", "-journal"))):
            make_private(p)


def _title_from(content: str) -> str:
    """The first user message, on one line, cut to about 60 characters at a word boundary."""
    line = " ".join(content.split())
    if len(line) <= 60:
        return line
    cut = line[:60]
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
            _private_files(self.path)
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

    @staticmethod
    def _new_conversation(model=None, title=None, system_prompt=None, settings=None, source="web") -> tuple:
        """The checked (id, title, model, system_prompt, settings, source) of a conversation to insert."""
        if source not in SOURCES:
            raise Invalid(f"source must be one of {SOURCES}, got {str(source)[:40]!r}", "source")
        return (uuid.uuid4().hex, text(title, "title", MAX_TITLE) or "", text(model, "model", MAX_MODEL),
                None if system_prompt is None else check_text(system_prompt, "system_prompt"),
                settings_json(settings), source)

    def create_conversation(self, *, model: Optional[str] = None, title: Optional[str] = None,
                            system_prompt: Optional[str] = None, settings: Optional[dict] = None,
                            source: str = "web") -> dict:
        row = self._new_conversation(model, title, system_prompt, settings, source)
        now = time.time()
        with self._tx() as db:
            db.execute(f"INSERT INTO conversations ({_CONV_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (*row, now, now))
        return self._conversation(row[0])

    def conversation(self, cid: str) -> dict:
        """One conversation's fields, without its messages (NotFound if there is none)."""
        return self._conversation(cid)

    def _conversation(self, cid: str) -> dict:
        rows = self._read(f"SELECT {_CONV_COLS} FROM conversations WHERE id = ?", (self._cid(cid),))
        if not rows:
            raise NotFound(f"no conversation with id {cid!r}", "conversation_id")
        return _row(rows[0])

    def list_conversations(self, limit: int = 200, q: Optional[str] = None) -> list[dict]:
        """Newest first; q: only those whose title or any message holds q (case-insensitive for ASCII)."""
        limit = max(1, min(int(limit), 10_000))
        where, params = "", [limit]
        if q:
            like = "%" + q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            where = (" WHERE c.title LIKE ? ESCAPE '\\' OR EXISTS (SELECT 1 FROM messages m WHERE"
                     " m.conversation_id = c.id AND m.content LIKE ? ESCAPE '\\')")
            params = [like, like, limit]
        rows = self._read(
            "SELECT c.id, c.title, c.model, c.source, c.created_at, c.updated_at,"
            " (SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.id) AS message_count"
            f" FROM conversations c{where} ORDER BY c.updated_at DESC, c.rowid DESC LIMIT ?", params)
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
            store_images.attach(self._db, conv["messages"], cid)
        for m in conv["messages"]:
            del m["conversation_id"]
        return conv

    def update_conversation(self, cid: str, *, title: Optional[str] = None, system_prompt: Optional[str] = None,
                            settings: Optional[dict] = None, model: Optional[str] = None) -> dict:
        """None leaves a field as it is; "" clears a title or system prompt, {} the settings."""
        changes = {}
        if title is not None:
            changes["title"] = text(title, "title", MAX_TITLE)
        if system_prompt is not None:
            changes["system_prompt"] = check_text(system_prompt, "system_prompt")
        if settings is not None:
            changes["settings"] = settings_json(settings)
        if model is not None:
            changes["model"] = text(model, "model", MAX_MODEL)
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
            store_images.collect_garbage(db)  # its pictures' bytes, unless another message holds them

    # -- messages ------------------------------------------------------------------------------
    def add_message(self, cid: str, *, role: str, content: str, parent_id: Optional[int] = None,
                    model: Optional[str] = None, settings: Optional[dict] = None,
                    finish_reason: Optional[str] = None, prompt_tokens: Optional[int] = None,
                    completion_tokens: Optional[int] = None, images: Optional[list[dict]] = None) -> dict:
        """images: the message's pictures, [{"offset", "media_type", "data", "width", "height"}] (store_images)."""
        return self.add_messages(cid, [dict(role=role, content=content, model=model, settings=settings,
                                            finish_reason=finish_reason, prompt_tokens=prompt_tokens,
                                            completion_tokens=completion_tokens, images=images)],
                                 parent_id=parent_id)[0]

    def add_messages(self, cid: str, messages: list[dict], parent_id: Optional[int] = None) -> list[dict]:
        """A chain in one transaction: each message is the child of the one before, the first of parent_id.

        Keys of each dict are add_message's keyword arguments. The path from the root through the
        chain must keep the chat template's turn order (Invalid otherwise).
        """
        if not isinstance(messages, list):
            raise Invalid("messages must be a list of messages", "messages")
        rows = [message_row(m) for m in messages]
        pictures = [store_images.image_rows(m, row[1]) for m, row in zip(messages, rows)]
        if parent_id is not None:
            parent_id = _message_id(parent_id, "parent_id")
        self._cid(cid)
        with self._tx() as db:
            ids, _ = self._append(db, cid, parent_id, rows, [], "parent_id" if parent_id is not None else "role",
                                  pictures)
        return [self.get_message(i) for i in ids]

    def record_exchange(self, *, conversation_id: Optional[str], parent_id: Optional[int],
                        messages: list[dict], answers: list[dict],
                        new_conversation: Optional[dict] = None) -> dict:
        """Store one chat completion in ONE transaction.

        conversation_id None: create a conversation from new_conversation (keys: model, system_prompt,
        settings, source (default "api"), title; all optional), then add `messages` as a chain from the root.
        conversation_id given: add `messages` (may be []) as a chain under parent_id.
        Then every dict in `answers` (assistant messages: content, model, settings, finish_reason,
        prompt_tokens, completion_tokens) becomes a child of the chain's last message (siblings: n > 1).
        The whole path keeps the chat template's turn order. Everything is checked before the
        transaction, and a failure inside it rolls all of it back: never a conversation without its
        messages. Returns {"conversation_id", "message_ids", "answer_ids"}.
        """
        if not isinstance(messages, list) or not isinstance(answers, list):
            raise Invalid("messages and answers must be lists of messages", "messages")
        rows = [message_row(m) for m in messages]
        pictures = [store_images.image_rows(m, row[1]) for m, row in zip(messages, rows)]
        answer_rows = [message_row(a, "answers", role="assistant") for a in answers]
        for a, row in zip(answers, answer_rows):
            store_images.image_rows({**a, "role": "assistant"}, row[1])  # refuses pictures in an answer
        conv = None
        if conversation_id is None:
            if parent_id is not None:
                raise Invalid("parent_id needs a conversation_id: a new conversation starts at its root", "parent_id")
            new_conversation = {} if new_conversation is None else new_conversation
            if not isinstance(new_conversation, dict) or set(new_conversation) - _NEW_CONVERSATION_KEYS:
                raise Invalid(f"new_conversation takes only {sorted(_NEW_CONVERSATION_KEYS)}", "new_conversation")
            conv = self._new_conversation(**{"source": "api", **new_conversation})
            cid = conv[0]
        else:
            if new_conversation is not None:
                raise Invalid("new_conversation is only for a new conversation (conversation_id None)",
                              "new_conversation")
            cid = self._cid(conversation_id)
            if parent_id is not None:
                parent_id = _message_id(parent_id, "parent_id")
        with self._tx() as db:
            if conv is not None:
                now = time.time()
                db.execute(f"INSERT INTO conversations ({_CONV_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                           (*conv, now, now))
            ids, answer_ids = self._append(db, cid, parent_id, rows, answer_rows, "messages", pictures)
        return {"conversation_id": cid, "message_ids": ids, "answer_ids": answer_ids}

    def _append(self, db: sqlite3.Connection, cid: str, parent_id: Optional[int], rows: list[tuple],
                answers: list[tuple], param: str, pictures: list[list[tuple]]) -> tuple[list[int], list[int]]:
        """Inside a transaction: `rows` as a chain under parent_id (each with its store_images.image_rows),
        then `answers` as siblings under its end."""
        conv = db.execute("SELECT title FROM conversations WHERE id = ?", (cid,)).fetchone()
        if conv is None:
            raise NotFound(f"no conversation with id {cid!r}", "conversation_id")
        path = [r["role"] for r in self._path(db, cid, parent_id)] if parent_id is not None else []
        check_turn_order(path, [r[0] for r in rows], answered=bool(answers), param=param)
        title, now, ids = conv[0], time.time(), []

        def insert(parent, row):
            return db.execute("INSERT INTO messages (conversation_id, parent_id, role, content, model, settings,"
                              " finish_reason, prompt_tokens, completion_tokens, created_at)"
                              " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", (cid, parent, *row, now)).lastrowid
        for row, pics in zip(rows, pictures):
            ids.append(insert(ids[-1] if ids else parent_id, row))
            store_images.insert(db, ids[-1], pics, now)
            if not title and row[0] == "user" and row[1].strip():
                title = _title_from(row[1])
                db.execute("UPDATE conversations SET title = ? WHERE id = ?", (title, cid))
        answer_ids = [insert(ids[-1] if ids else parent_id, row) for row in answers]
        db.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (now, cid))
        return ids, answer_ids

    @staticmethod
    def _path(db: sqlite3.Connection, cid: str, mid: int, content: bool = False,
              param: str = "parent_id") -> list[sqlite3.Row]:
        rows = db.execute(_PATH.format(", m.content" if content else ""), (mid, cid)).fetchall()
        if not rows:
            raise NotFound(f"no message with id {mid} in conversation {cid}: pass the id of a message of that "
                           "conversation", param)
        return rows

    def path_to(self, conversation_id: str, message_id: int) -> list[dict]:
        """[{"id", "role", "content", "images"}] of each message from the root down to message_id (the last
        one): the conversation as a model answering under message_id sees it (without the system_prompt
        column; pictures without their bytes, which `image` reads)."""
        cid, mid = self._cid(conversation_id), _message_id(message_id)
        with self._lock:
            return store_images.attach(self._db, [
                {"id": r["id"], "role": r["role"], "content": r["content"]}
                for r in self._path(self._db, cid, mid, content=True, param="message_id")])

    def image(self, image_id: int) -> dict:
        """A stored picture: {"id", "offset", "media_type", "width", "height", "bytes", "sha256", "data"}."""
        found = None
        if isinstance(image_id, int) and 1 <= image_id <= MAX_INT:
            with self._lock:
                found = store_images.read(self._db, image_id)
        if found is None:
            raise NotFound(f"no picture with id {image_id}", "image_id")
        return found

    def get_message(self, message_id: int) -> dict:
        """A message with its conversation_id, rating and pictures (without their bytes)."""
        with self._lock:
            rows = self._read(f"SELECT {_MSG_COLS} FROM messages m LEFT JOIN ratings r ON r.message_id = m.id"
                              " WHERE m.id = ?", (_message_id(message_id),))
            if not rows:
                raise NotFound(f"no message with id {message_id}", "message_id")
            return store_images.attach(self._db, [_row(rows[0])])[0]

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

    def preference_pairs(self, on_skip: Optional[Callable[[dict], None]] = None) -> Iterator[dict[str, Any]]:
        """Preference pairs in trl's conversational format (docs/api.md, "Feedback export"); pairs the
        chat template would refuse (stored before the store checked turn order) go to on_skip instead."""
        from .feedback import preference_pairs
        return preference_pairs(self, on_skip)

    def stats(self) -> dict:
        """Counts for `picochat feedback stats`."""
        from .feedback import feedback_stats
        return feedback_stats(self)

    def integrity_check(self) -> str:
        return "\n".join(r[0] for r in self._read("PRAGMA integrity_check"))
