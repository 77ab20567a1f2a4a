"""The SQLite conversation store: the message tree, feedback, pairs, and crash safety."""
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from picochat.serve.store import SCHEMA_VERSION, Invalid, NotFound, Store, StoreError, default_db_path

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "chat.db")
    yield s
    s.close()


def qa(store, cid, question, answers, parent_id=None):
    """A user message and its assistant answers (siblings): (user, [answers])."""
    u = store.add_message(cid, role="user", content=question, parent_id=parent_id)
    return u, [store.add_message(cid, role="assistant", content=a, parent_id=u["id"], model="m") for a in answers]


def test_pragmas_and_schema_version(store):
    db = store._db
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert db.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert store.integrity_check() == "ok"


def test_reopen_keeps_data_and_newer_schema_is_refused(tmp_path):
    with Store(tmp_path / "a.db") as s:
        cid = s.create_conversation(title="kept")["id"]
    with Store(tmp_path / "a.db") as s:  # migrations are not run twice
        assert s.get_conversation(cid)["title"] == "kept"
        s._db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="upgrade picochat"):
        Store(tmp_path / "a.db")


def test_default_db_path(monkeypatch, tmp_path):
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path))
    assert default_db_path() == tmp_path / "picochat.db"


def test_message_tree_title_and_listing(store):
    c = store.create_conversation(model="smollm2", system_prompt="Be brief.", settings={"temperature": 0.7})
    assert c["title"] == "" and c["source"] == "web" and c["settings"] == {"temperature": 0.7}
    u1, (a1, a2) = qa(store, c["id"], "What is\nthe capital of France?", ["Paris.", "Lyon."])
    # edit and resend: a second user message under the same (root) parent
    u2, (a3,) = qa(store, c["id"], "And of Italy?", ["Rome."])
    u3, _ = qa(store, c["id"], "And Spain?", ["Madrid."], parent_id=a1["id"])
    conv = store.get_conversation(c["id"])
    assert conv["title"] == "What is the capital of France?"  # the first user message, one line
    assert [m["id"] for m in conv["messages"]] == sorted(m["id"] for m in conv["messages"])
    parents = {m["id"]: m["parent_id"] for m in conv["messages"]}
    assert parents[a1["id"]] == parents[a2["id"]] == u1["id"] and parents[u1["id"]] is None
    assert parents[u2["id"]] is None and parents[u3["id"]] == a1["id"]
    assert all(m["rating"] is None for m in conv["messages"])
    assert set(conv["messages"][0]) == {"id", "parent_id", "role", "content", "model", "settings", "finish_reason",
                                        "prompt_tokens", "completion_tokens", "created_at", "rating", "images"}
    other = store.create_conversation(title="older")
    store.add_message(c["id"], role="user", content="touch")  # c becomes the newest again
    listed = store.list_conversations()
    assert [x["id"] for x in listed] == [c["id"], other["id"]]
    assert listed[0]["message_count"] == 8 and listed[1]["message_count"] == 0
    assert set(listed[0]) == {"id", "title", "model", "source", "created_at", "updated_at", "message_count"}
    assert store.list_conversations(limit=1) == listed[:1]


def test_long_title_is_cut(store):
    c = store.create_conversation()
    store.add_message(c["id"], role="user", content="word " * 100)
    title = store.get_conversation(c["id"])["title"]
    assert len(title) <= 61 and title.endswith("…") and "\n" not in title


def test_update_and_errors(store):
    c = store.create_conversation(title="t")
    time.sleep(0.01)
    u = store.update_conversation(c["id"], title="new", system_prompt="sys", settings={"top_k": 5}, model="x")
    assert (u["title"], u["system_prompt"], u["settings"], u["model"]) == ("new", "sys", {"top_k": 5}, "x")
    assert u["updated_at"] > c["updated_at"]
    assert store.update_conversation(c["id"])["title"] == "new"  # None leaves fields alone
    for bad in ("nope", "0" * 32, 42, None, "../../etc"):
        with pytest.raises(NotFound):
            store.get_conversation(bad)
    with pytest.raises(NotFound):
        store.update_conversation("f" * 32, title="x")
    with pytest.raises(NotFound):
        store.delete_conversation("f" * 32)
    with pytest.raises(Invalid, match="title is too long"):
        store.update_conversation(c["id"], title="x" * 201)
    with pytest.raises(Invalid, match="settings must be a JSON object"):
        store.create_conversation(settings=[1, 2])
    with pytest.raises(Invalid, match="settings is not storable"):
        store.create_conversation(settings={"t": float("nan")})
    with pytest.raises(Invalid, match="source"):
        store.create_conversation(source="mail")
    with pytest.raises(Invalid, match="role"):
        store.add_message(c["id"], role="tool", content="x")
    with pytest.raises(Invalid, match="content is too long"):
        store.add_message(c["id"], role="user", content="é" * 600_000)  # 1.2 MB of UTF-8
    with pytest.raises(Invalid, match="not valid Unicode"):
        store.add_message(c["id"], role="user", content="\ud800")
    with pytest.raises(Invalid, match="prompt_tokens"):
        store.add_message(c["id"], role="assistant", content="x", prompt_tokens=-1)
    with pytest.raises(NotFound):
        store.add_message(c["id"], role="user", content="x", parent_id=2**70)
    assert e404(lambda: store.add_message("nope", role="user", content="x")).status == 404
    assert store.get_conversation(c["id"])["messages"] == []  # nothing half-written


def e404(fn):
    with pytest.raises(NotFound) as e:
        fn()
    return e.value


def test_parent_must_be_in_the_same_conversation(store):
    a, b = store.create_conversation(), store.create_conversation()
    m = store.add_message(a["id"], role="user", content="hi")
    with pytest.raises(NotFound, match="parent_id|no message"):
        store.add_message(b["id"], role="assistant", content="x", parent_id=m["id"])


def test_add_messages_is_one_chain(store):
    c = store.create_conversation(source="api")
    ms = store.add_messages(c["id"], [dict(role="system", content="sys"), dict(role="user", content="q"),
                                      dict(role="assistant", content="a", finish_reason="stop",
                                           prompt_tokens=3, completion_tokens=1, settings={"n": 1})])
    assert [m["parent_id"] for m in ms] == [None, ms[0]["id"], ms[1]["id"]]
    assert ms[2]["completion_tokens"] == 1 and ms[2]["conversation_id"] == c["id"]
    assert store.get_conversation(c["id"])["title"] == "q"
    with pytest.raises(Invalid):  # the bad third message rolls back the first two
        store.add_messages(c["id"], [dict(role="user", content="x"), dict(role="user", content="y"),
                                     dict(role="user", content=5)])
    assert len(store.get_conversation(c["id"])["messages"]) == 3


def test_ratings(store):
    c = store.create_conversation()
    u, (a,) = qa(store, c["id"], "q", ["a"])
    assert store.set_rating(a["id"], 1) == {"message_id": a["id"], "rating": 1}
    store.set_rating(a["id"], -1)
    assert store.get_message(a["id"])["rating"] == -1
    assert store.set_rating(a["id"], 0)["rating"] is None
    assert store.get_conversation(c["id"])["messages"][1]["rating"] is None
    with pytest.raises(Invalid, match="only assistant"):
        store.set_rating(u["id"], 1)
    for bad in (2, True, "1"):
        with pytest.raises(Invalid):
            store.set_rating(a["id"], bad)
    with pytest.raises(NotFound):
        store.set_rating(10**6, 1)


def test_rankings_validation(store):
    c = store.create_conversation()
    u, (a, b) = qa(store, c["id"], "q", ["good", "bad"])
    u2, (d,) = qa(store, c["id"], "q2", ["other"], parent_id=a["id"])
    r = store.add_ranking(a["id"], b["id"])
    assert (r["chosen_id"], r["rejected_id"]) == (a["id"], b["id"])
    assert store.add_ranking(a["id"], b["id"])["id"] == r["id"]  # idempotent
    with pytest.raises(Invalid, match="same user message"):
        store.add_ranking(a["id"], d["id"])
    with pytest.raises(Invalid, match="only assistant"):
        store.add_ranking(a["id"], u["id"])
    with pytest.raises(Invalid, match="same message"):
        store.add_ranking(a["id"], a["id"])
    with pytest.raises(NotFound):
        store.add_ranking(a["id"], 999)
    store.add_ranking(b["id"], a["id"])  # a change of mind replaces the old judgement
    assert store.stats()["rankings"] == 1


def test_preference_pairs(store):
    c = store.create_conversation(system_prompt="Be brief.", model="conv-model")
    u, (a, b, x) = qa(store, c["id"], "What is 2+2?", ["4", "5", "four"])
    u2, (e, f) = qa(store, c["id"], "And 3+3?", ["6", "7"], parent_id=a["id"])
    store.add_ranking(a["id"], b["id"])
    store.set_rating(e["id"], 1)
    store.set_rating(f["id"], -1)
    store.set_rating(x["id"], 1)
    store.set_rating(b["id"], -1)  # x up / b down -> a thumbs pair; a/b is ranked, so no duplicate
    store.set_rating(a["id"], 1)
    pairs = list(store.preference_pairs())
    assert [(p["source"], p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs] == [
        ("ranking", "4", "5"), ("thumbs", "four", "5"), ("thumbs", "6", "7")]
    assert pairs[0]["prompt"] == [{"role": "system", "content": "Be brief."},
                                  {"role": "user", "content": "What is 2+2?"}]
    assert pairs[2]["prompt"] == [{"role": "system", "content": "Be brief."},
                                  {"role": "user", "content": "What is 2+2?"},
                                  {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]
    assert pairs[0]["model"] == "m" and pairs[0]["conversation_id"] == c["id"]
    assert all(isinstance(p["created_at"], float) for p in pairs)
    assert store.stats()["pairs"] == {"ranking": 1, "thumbs": 2}
    # a stored system message (API conversations) is not doubled by the system prompt
    api = store.create_conversation(source="api", system_prompt="S")
    s, q = store.add_messages(api["id"], [dict(role="system", content="S"), dict(role="user", content="q")])
    g, h = (store.add_message(api["id"], role="assistant", content=t, parent_id=q["id"]) for t in "gh")
    store.add_ranking(g["id"], h["id"])
    (last,) = [p for p in store.preference_pairs() if p["conversation_id"] == api["id"]]
    assert last["prompt"] == [{"role": "system", "content": "S"}, {"role": "user", "content": "q"}]


def test_cascade_delete(store):
    c, keep = store.create_conversation(), store.create_conversation()
    u, (a, b) = qa(store, c["id"], "q", ["a", "b"])
    store.set_rating(a["id"], 1)
    store.add_ranking(a["id"], b["id"])
    qa(store, keep["id"], "q", ["a"])
    store.delete_conversation(c["id"])
    with pytest.raises(NotFound):
        store.get_conversation(c["id"])
    st = store.stats()
    assert (st["conversations"], st["messages"], st["rankings"], st["thumbs_up"]) == (1, 2, 0, 0)
    assert store._db.execute("PRAGMA foreign_key_check").fetchall() == []


def test_concurrent_writes_from_threads(store):
    c = store.create_conversation()
    errors = []

    def work(k):
        try:
            for i in range(25):
                cid = store.create_conversation(title=f"t{k}")["id"]
                m = store.add_message(cid, role="user", content=f"{k}-{i}")
                store.add_message(c["id"], role="user", content=f"{k}-{i}")
                store.add_message(cid, role="assistant", content="a", parent_id=m["id"])
                store.list_conversations()
        except Exception as e:  # noqa: BLE001 - reported below with the thread's number
            errors.append((k, e))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(store.get_conversation(c["id"])["messages"]) == 150
    assert store.stats()["conversations"] == 151 and store.stats()["messages"] == 450
    assert store.integrity_check() == "ok"


VICTIM = textwrap.dedent("""
    import sys
    from picochat.serve.store import Store
    s = Store(sys.argv[1])
    i = 0
    while True:
        c = s.create_conversation(title=f"c{i}")
        s.add_messages(c["id"], [dict(role="user", content="q" * 1000), dict(role="assistant", content="a" * 5000)])
        print(c["id"], flush=True)  # printed only after the commit returned
        i += 1
""")


def test_sigkill_mid_write_loses_nothing_committed(tmp_path):
    db = tmp_path / "victim.db"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # a fresh interpreter (not a fork of pytest): the kill hits a real, independent writer
    p = subprocess.Popen([sys.executable, "-c", VICTIM, str(db)], stdout=subprocess.PIPE, text=True, env=env)
    committed = []
    try:
        deadline = time.time() + 60
        while len(committed) < 40 and time.time() < deadline:
            line = p.stdout.readline()
            if not line:
                break
            committed.append(line.strip())
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
        committed += [x.strip() for x in p.stdout.read().splitlines() if x.strip()]
        p.stdout.close()
    assert len(committed) >= 40, "the writer died before writing"
    assert p.returncode == -signal.SIGKILL
    with Store(db) as s:
        assert s.integrity_check() == "ok"
        for cid in committed:
            conv = s.get_conversation(cid)
            assert [m["role"] for m in conv["messages"]] == ["user", "assistant"]
        # whatever was in flight is all there or not there at all
        assert all(x["message_count"] in (0, 2) for x in s.list_conversations(limit=10_000))
        assert s._db.execute("PRAGMA foreign_key_check").fetchall() == []
