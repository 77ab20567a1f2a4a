"""Issue 8, the store's part: the chat template's turn order in every stored tree, one transaction per
chat exchange, text rules that can run before generation, exports without refused prompts, and
private files (0700 folders, 0600 database, WAL and exports)."""
import json
import os
import sqlite3
import stat
import time

import pytest
from fastapi.testclient import TestClient

from picochat.cli import main
from picochat.serve.store import Invalid, NotFound, Store
from tests.serve.test_store_api import make_app


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "rules.db")
    yield s
    s.close()


@pytest.fixture
def umask_022():
    old = os.umask(0o022)  # the usual umask: files 0644 and folders 0755 unless the code says otherwise
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def counts(store) -> tuple[int, int]:
    return (store._read("SELECT COUNT(*) FROM conversations")[0][0], store._read("SELECT COUNT(*) FROM messages")[0][0])


# -- (a) the tree keeps the chat template's turn order -----------------------------------------------
def test_system_only_at_the_root(store):
    c = store.create_conversation()
    s = store.add_message(c["id"], role="system", content="Be brief.")  # depth 0: fine
    u = store.add_message(c["id"], role="user", content="hi", parent_id=s["id"])
    with pytest.raises(Invalid, match="system message may only come first"):
        store.add_message(c["id"], role="system", content="late", parent_id=u["id"])
    with pytest.raises(Invalid, match="system message may only come first"):  # inside one chain too
        store.add_messages(c["id"], [dict(role="user", content="q"), dict(role="system", content="s")])
    # the conversation's own system prompt is a column, not a message: still allowed at any time
    assert store.update_conversation(c["id"], system_prompt="Be kind.")["system_prompt"] == "Be kind."
    assert len(store.get_conversation(c["id"])["messages"]) == 2


def test_an_assistant_message_answers_a_user_message(store):
    c = store.create_conversation()
    with pytest.raises(Invalid, match="assistant message must answer a user message"):
        store.add_message(c["id"], role="assistant", content="root answer")
    s = store.add_message(c["id"], role="system", content="sys")
    with pytest.raises(Invalid, match="assistant message must answer a user message"):
        store.add_message(c["id"], role="assistant", content="under system", parent_id=s["id"])
    u = store.add_message(c["id"], role="user", content="q", parent_id=s["id"])
    a = store.add_message(c["id"], role="assistant", content="a", parent_id=u["id"])
    with pytest.raises(Invalid, match="assistant message must answer a user message") as e:
        store.add_message(c["id"], role="assistant", content="under assistant", parent_id=a["id"])
    assert e.value.status == 400 and e.value.param == "parent_id" and "parent_id" in e.value.message
    with pytest.raises(Invalid):  # the chain [assistant, assistant] under a user fails at its second message
        store.add_messages(c["id"], [dict(role="assistant", content="x"), dict(role="assistant", content="y")],
                           parent_id=u["id"])
    # allowed: a user message under a user message (edit and resend), under an answer, under the system one
    u2 = store.add_message(c["id"], role="user", content="again", parent_id=u["id"])
    store.add_message(c["id"], role="user", content="next", parent_id=a["id"])
    store.add_message(c["id"], role="user", content="other", parent_id=s["id"])
    store.add_message(c["id"], role="assistant", content="b", parent_id=u2["id"])
    assert len(store.get_conversation(c["id"])["messages"]) == 7  # nothing refused was written


def test_store_api_refuses_a_broken_tree_with_400(store):
    with TestClient(make_app(store)) as client:
        cid = client.post("/api/conversations", json={}).json()["id"]
        url = f"/api/conversations/{cid}/messages"
        r = client.post(url, json={"role": "assistant", "content": "no question"})
        assert r.status_code == 400 and "must answer a user message" in r.json()["error"]["message"]
        u = client.post(url, json={"content": "q"}).json()
        r = client.post(url, json={"role": "system", "content": "late", "parent_id": u["id"]})
        assert r.status_code == 400 and "system message may only come first" in r.json()["error"]["message"]
        # the byte rule runs in the request model, before the store: 600,000 "é" are 1.2 MB
        r = client.post(url, json={"content": "é" * 600_000})
        assert r.status_code == 400 and "bytes" in r.json()["error"]["message"]
        assert [m["id"] for m in client.get(f"/api/conversations/{cid}").json()["messages"]] == [u["id"]]


def test_store_api_models_count_bytes_not_characters():
    from pydantic import ValidationError

    from picochat.serve.store_api import NewConversation, NewMessage
    with pytest.raises(ValidationError, match="bytes"):
        NewMessage(content="é" * 600_000)
    with pytest.raises(ValidationError, match="bytes"):
        NewConversation(system_prompt="é" * 600_000)
    assert NewMessage(content="a" * 1_000_000).content  # exactly the limit in bytes is fine


# -- (c) one transaction per chat exchange -------------------------------------------------------
def test_record_exchange_new_conversation_with_two_answers(store):
    ans = [dict(content=t, model="m", settings={"n": 2}, finish_reason="stop", prompt_tokens=5, completion_tokens=2)
           for t in ("Paris.", "Lyon.")]
    out = store.record_exchange(conversation_id=None, parent_id=None,
                                messages=[dict(role="user", content="Capital of France?")], answers=ans,
                                new_conversation=dict(model="m", system_prompt="Be brief.", settings={"n": 2}))
    assert set(out) == {"conversation_id", "message_ids", "answer_ids"}
    assert len(out["message_ids"]) == 1 and len(out["answer_ids"]) == 2
    conv = store.get_conversation(out["conversation_id"])
    assert (conv["source"], conv["title"], conv["system_prompt"], conv["model"]) == \
        ("api", "Capital of France?", "Be brief.", "m")
    (u,), answers = conv["messages"][:1], conv["messages"][1:]
    assert [a["parent_id"] for a in answers] == [u["id"]] * 2 and [a["id"] for a in answers] == out["answer_ids"]
    assert [(a["role"], a["content"], a["finish_reason"], a["completion_tokens"]) for a in answers] == \
        [("assistant", "Paris.", "stop", 2), ("assistant", "Lyon.", "stop", 2)]
    # the next turn: the client's new user message under an answer, and its answer
    nxt = store.record_exchange(conversation_id=out["conversation_id"], parent_id=out["answer_ids"][0],
                                messages=[dict(role="user", content="And Italy?")], answers=[dict(content="Rome.")])
    # the page's case: no new message, answers under a stored user message
    page = store.record_exchange(conversation_id=out["conversation_id"], parent_id=nxt["message_ids"][0],
                                 messages=[], answers=[dict(content="Roma.")])
    assert page["message_ids"] == []
    path = store.path_to(out["conversation_id"], page["answer_ids"][0])
    assert [(m["role"], m["content"]) for m in path] == [
        ("user", "Capital of France?"), ("assistant", "Paris."), ("user", "And Italy?"), ("assistant", "Roma.")]
    assert [m["id"] for m in path] == [u["id"], out["answer_ids"][0], nxt["message_ids"][0], page["answer_ids"][0]]


@pytest.mark.parametrize("bad", [dict(content="\ud800"), dict(content="é" * 600_000), dict(content="x", role="user"),
                                 dict(content="x", prompt_tokens=-1)])
def test_record_exchange_with_a_bad_answer_leaves_nothing(store, bad):
    with pytest.raises(Invalid):
        store.record_exchange(conversation_id=None, parent_id=None, messages=[dict(role="user", content="q")],
                              answers=[dict(content="fine"), bad], new_conversation=dict(model="m"))
    assert counts(store) == (0, 0)


def test_record_exchange_is_rolled_back_when_the_tree_is_refused(store):
    # the conversation row is written first, inside the transaction; the turn-order check fails after it
    for messages in ([], [dict(role="user", content="q"), dict(role="system", content="late")],
                     [dict(role="assistant", content="a")]):
        with pytest.raises(Invalid):
            store.record_exchange(conversation_id=None, parent_id=None, messages=messages,
                                  answers=[dict(content="answer")], new_conversation={})
    assert counts(store) == (0, 0)
    c = store.create_conversation()
    u = store.add_message(c["id"], role="user", content="q")
    a = store.add_message(c["id"], role="assistant", content="a", parent_id=u["id"])
    with pytest.raises(Invalid, match="last message must be a user message"):  # an answer under an answer
        store.record_exchange(conversation_id=c["id"], parent_id=a["id"], messages=[], answers=[dict(content="b")])
    other = store.create_conversation()
    with pytest.raises(NotFound):  # a parent from another conversation
        store.record_exchange(conversation_id=other["id"], parent_id=u["id"], messages=[],
                              answers=[dict(content="b")])
    with pytest.raises(Invalid, match="conversation_id"):
        store.record_exchange(conversation_id=None, parent_id=u["id"], messages=[], answers=[])
    assert counts(store) == (2, 2)


def test_path_to(store):
    c, other = store.create_conversation(), store.create_conversation()
    s = store.add_message(c["id"], role="system", content="S")
    u = store.add_message(c["id"], role="user", content="q", parent_id=s["id"])
    store.add_message(c["id"], role="user", content="sibling", parent_id=s["id"])
    a = store.add_message(c["id"], role="assistant", content="a", parent_id=u["id"])
    assert store.path_to(c["id"], a["id"]) == [{"id": s["id"], "role": "system", "content": "S", "images": []},
                                               {"id": u["id"], "role": "user", "content": "q", "images": []},
                                               {"id": a["id"], "role": "assistant", "content": "a", "images": []}]
    with pytest.raises(NotFound):
        store.path_to(other["id"], a["id"])
    with pytest.raises(NotFound):
        store.path_to(c["id"], 10**9)


# -- (d) the text rule, callable before generation ---------------------------------------------------
def test_check_text_counts_bytes_and_refuses_lone_surrogates():
    from picochat.serve.store import MAX_CONTENT_BYTES, check_text
    assert MAX_CONTENT_BYTES == 1_000_000
    assert check_text("a" * 1_000_000, "content") == "a" * 1_000_000
    with pytest.raises(Invalid, match=r"content is too long \(2000000 > 1000000 bytes"):
        check_text("é" * 1_000_000, "content")  # a million characters, two million bytes
    with pytest.raises(Invalid, match="not valid Unicode") as e:
        check_text("ok \ud800", "messages.0.content")
    assert e.value.status == 400 and e.value.param == "messages.0.content"
    with pytest.raises(Invalid, match="must be a string"):
        check_text(5, "content")
    with pytest.raises(Invalid, match="too long"):
        check_text("abcd", "stop", limit_bytes=3)


def test_short_fields_refuse_lone_surrogates_with_a_400(store):
    # sqlite3 cannot bind a lone surrogate: this used to be a UnicodeEncodeError, a 500
    with pytest.raises(Invalid, match="title is not valid Unicode"):
        store.create_conversation(title="\udc80")
    with pytest.raises(Invalid, match="model is not valid Unicode"):
        store.create_conversation(model="m\ud800")


# -- (b) the export never holds a prompt the template refuses --------------------------------------
def make_old_db(path) -> None:
    """One good pair, and one from an older picochat: a system message deep in the tree (raw SQL)."""
    with Store(path) as s:
        c = s.create_conversation(model="m")
        u = s.add_message(c["id"], role="user", content="good question")
        a, b = (s.add_message(c["id"], role="assistant", content=t, parent_id=u["id"]) for t in ("yes", "no"))
        s.add_ranking(a["id"], b["id"])
        now = time.time()

        def raw(parent, role, content):
            return s._db.execute("INSERT INTO messages (conversation_id, parent_id, role, content, created_at)"
                                 " VALUES (?, ?, ?, ?, ?)", (c["id"], parent, role, content, now)).lastrowid
        sys_id = raw(a["id"], "system", "a late system message")
        u2 = raw(sys_id, "user", "bad question")
        x, y = raw(u2, "assistant", "x"), raw(u2, "assistant", "y")
        s._db.execute("INSERT INTO rankings (chosen_id, rejected_id, created_at) VALUES (?, ?, ?)", (x, y, now))
        for m, r in ((x, 1), (y, -1)):  # a thumbs pair on the same bad prompt: also skipped
            s._db.execute("INSERT INTO ratings (message_id, rating, created_at) VALUES (?, ?, ?)", (m, r, now))


def test_export_skips_pairs_the_template_refuses(tmp_path, capsys):
    db, out = tmp_path / "old.db", tmp_path / "pairs.jsonl"
    make_old_db(db)
    with Store(db) as s:
        skipped = []
        pairs = list(s.preference_pairs(skipped.append))
        assert [p["prompt"] for p in pairs] == [[{"role": "user", "content": "good question"}]]
        assert len(skipped) == 1 and "system message may only come first" in skipped[0]["reason"]
        st = s.stats()
        assert st["pairs"] == {"ranking": 1, "thumbs": 0} and st["skipped_pairs"] == 1
    assert main(["feedback", "export", str(out), "--db", str(db)]) == 0
    printed = capsys.readouterr().out
    assert "wrote 1 preference pairs (1 from rankings, 0 from thumbs)" in printed
    assert "skipped 1 pairs" in printed and "system message may only come first" in printed
    assert [json.loads(x)["chosen"][0]["content"] for x in out.read_text().splitlines()] == ["yes"]
    assert main(["feedback", "stats", "--db", str(db)]) == 0
    assert "1 skipped" in capsys.readouterr().out


# -- (e) private files -----------------------------------------------------------------------------
def test_new_database_and_folders_are_private(tmp_path, umask_022):
    path = tmp_path / "made" / "by" / "us" / "chat.db"
    with Store(path) as s:
        c = s.create_conversation()
        s.add_message(c["id"], role="user", content="secret")  # the WAL and shm exist now
        for p in (path, f"{path}-wal", f"{path}-shm"):
            assert mode(p) == 0o600, p
    for d in (tmp_path / "made", tmp_path / "made" / "by", tmp_path / "made" / "by" / "us"):
        assert mode(d) == 0o700, d


def test_default_home_is_private(tmp_path, monkeypatch, umask_022):
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path / "home"))
    tmp_path.chmod(0o755)
    with Store() as s:
        s.create_conversation()
    assert mode(tmp_path / "home") == 0o700 and mode(tmp_path / "home" / "picochat.db") == 0o600
    assert mode(tmp_path) == 0o755  # a folder that was there is not ours to change


def test_an_old_world_readable_database_is_tightened(tmp_path, umask_022):
    path = tmp_path / "old.db"
    old = sqlite3.connect(path)  # as an older picochat made it: 0644, and its WAL open
    old.execute("PRAGMA journal_mode=WAL")
    old.execute("CREATE TABLE t (x)")
    old.execute("INSERT INTO t VALUES (1)")
    old.commit()
    assert mode(path) == mode(f"{path}-wal") == mode(f"{path}-shm") == 0o644
    with Store(path):
        for p in (path, f"{path}-wal", f"{path}-shm"):
            assert mode(p) == 0o600, p
    old.close()


def test_export_is_private_and_other_atomic_writes_are_unchanged(tmp_path, umask_022):
    from picochat.fsutil import atomic_write
    make_old_db(tmp_path / "f.db")
    out = tmp_path / "pairs.jsonl"
    out.write_text("old\n")
    out.chmod(0o644)
    assert main(["feedback", "export", str(out), "--db", str(tmp_path / "f.db")]) == 0
    assert mode(out) == 0o600 and out.read_text() != "old\n"
    atomic_write(tmp_path / "checkpoint.json", "{}")  # checkpoints, shards, metrics: the umask decides
    assert mode(tmp_path / "checkpoint.json") == 0o644
    atomic_write(tmp_path / "private.json", "{}", mode=0o600)
    assert mode(tmp_path / "private.json") == 0o600
