"""Pictures in the conversation store: a round trip of the bytes, the migration of a database from before
pictures, one copy per picture however many messages hold it, and nothing stored half-way."""
from __future__ import annotations

import sqlite3

import pytest

from picochat.serve.store import SCHEMA_VERSION, Invalid, NotFound, Store
from picochat.serve.store_images import MAX_IMAGE_BYTES
from picochat.serve.store_schema import MIGRATIONS
from tests.serve.conftest import png_bytes


def picture(data: bytes, offset: int = 0, media: str = "image/png", size=(40, 30)) -> dict:
    return {"offset": offset, "media_type": media, "data": data, "width": size[0], "height": size[1]}


def count(store, table: str) -> int:
    return store._read(f"SELECT COUNT(*) FROM {table}")[0][0]


def test_a_database_from_before_pictures_is_migrated_and_keeps_everything(tmp_path):
    path = tmp_path / "v1.db"
    db = sqlite3.connect(path)  # version 1 exactly as an older picochat left it
    db.executescript(MIGRATIONS[0] + "; PRAGMA user_version = 1;")
    db.execute("INSERT INTO conversations (id, title, source, created_at, updated_at)"
               " VALUES ('0123456789abcdef0123456789abcdef', 'old', 'web', 1, 1)")
    db.execute("INSERT INTO messages (conversation_id, role, content, created_at)"
               " VALUES ('0123456789abcdef0123456789abcdef', 'user', 'an old question', 1)")
    db.commit()
    db.close()
    with Store(path) as store:
        assert store._read("PRAGMA user_version")[0][0] == SCHEMA_VERSION == 3  # (3: stored responses)
        old = store.get_conversation("0123456789abcdef0123456789abcdef")
        assert [(m["content"], m["images"]) for m in old["messages"]] == [("an old question", [])]
        pic = png_bytes()
        m = store.add_message(old["id"], role="user", content="and this?", parent_id=old["messages"][0]["id"],
                              images=[picture(pic, offset=4)])
        assert store.integrity_check() == "ok"
    with Store(path) as store:  # reopened: no second migration, the picture is there
        assert store._read("PRAGMA user_version")[0][0] == 3 and store._read("SELECT COUNT(*) FROM responses")[0][0] == 0
        img = store.get_conversation(old["id"])["messages"][1]["images"][0]
        assert img["offset"] == 4 and img["bytes"] == len(pic) and img["id"] == m["images"][0]["id"]
        assert store.image(img["id"])["data"] == pic


def test_round_trip_order_offsets_and_one_copy_per_picture(tmp_path):
    red, blue = png_bytes((255, 0, 0)), png_bytes((0, 0, 255), fmt="JPEG")
    with Store(tmp_path / "s.db") as store:
        a = store.create_conversation()
        text = "é🙂 one, two"  # offsets count characters, not UTF-8 or UTF-16 units
        m = store.add_message(a["id"], role="user", content=text,
                              images=[picture(red, 0), picture(blue, 2, "image/jpeg"), picture(red, len(text))])
        assert [(i["offset"], i["media_type"]) for i in m["images"]] == [(0, "image/png"), (2, "image/jpeg"),
                                                                         (len(text), "image/png")]
        assert [store.image(i["id"])["data"] for i in m["images"]] == [red, blue, red]
        path = store.path_to(a["id"], m["id"])
        assert [(i["offset"], i["sha256"]) for i in path[0]["images"]] == \
            [(i["offset"], i["sha256"]) for i in m["images"]]
        # an API conversation holding the same picture again: a second row, not a second copy
        b = store.record_exchange(conversation_id=None, parent_id=None,
                                  messages=[{"role": "user", "content": "again", "images": [picture(red)]}],
                                  answers=[{"content": "red", "model": "m"}])
        assert (count(store, "images"), count(store, "image_blobs")) == (4, 2)
        store.delete_conversation(a["id"])  # blue goes; red stays for b
        assert (count(store, "images"), count(store, "image_blobs")) == (1, 1)
        with pytest.raises(NotFound, match="no picture with id"):
            store.image(m["images"][1]["id"])
        store.delete_conversation(b["conversation_id"])
        assert (count(store, "images"), count(store, "image_blobs")) == (0, 0)


@pytest.mark.parametrize("images,words", [
    ([picture(b"x", offset=99)], "offset must be an integer in [0, 5]"),
    ([picture(b"x", offset=3), picture(b"x", offset=1)], "offset must be an integer in [3, 5]"),
    ([picture(b"x", media="image/gif")], "media_type must be one of image/png, image/jpeg"),
    ([picture(b"")], "1 to 20971520 bytes"),
    ([{"offset": 0, "data": b"x"}], "a picture takes exactly"),
    ([picture(b"x")] * 33, "at most 32 pictures"),
    ("not a list", "images must be a list"),
])
def test_bad_pictures_store_nothing(tmp_path, images, words):
    with Store(tmp_path / "s.db") as store:
        before = [count(store, t) for t in ("conversations", "messages", "images", "image_blobs")]
        with pytest.raises(Invalid, match=words.replace("[", r"\[").replace("]", r"\]")):
            store.record_exchange(conversation_id=None, parent_id=None, answers=[{"content": "a"}],
                                  messages=[{"role": "user", "content": "first", "images": [picture(png_bytes())]},
                                            {"role": "assistant", "content": "ok"},
                                            {"role": "user", "content": "hello", "images": images}])
        assert [count(store, t) for t in ("conversations", "messages", "images", "image_blobs")] == before


def test_only_user_messages_hold_pictures_and_the_limit_is_the_readers(tmp_path):
    from picochat.data.scenes import MAX_FILE_BYTES
    assert MAX_IMAGE_BYTES == MAX_FILE_BYTES
    with Store(tmp_path / "s.db") as store:
        c = store.create_conversation()
        u = store.add_message(c["id"], role="user", content="q")
        with pytest.raises(Invalid, match="only user messages may hold pictures"):
            store.add_message(c["id"], role="assistant", content="a", parent_id=u["id"], images=[picture(b"x")])
        with pytest.raises(Invalid, match="only user messages may hold pictures"):
            store.record_exchange(conversation_id=c["id"], parent_id=u["id"], messages=[],
                                  answers=[{"content": "a", "images": [picture(b"x")]}])
        assert count(store, "messages") == 1 and count(store, "image_blobs") == 0


def test_a_pair_about_a_picture_is_not_exported_as_text(tmp_path):
    with Store(tmp_path / "s.db") as store:
        c = store.create_conversation()
        u = store.add_message(c["id"], role="user", content="what colour?", images=[picture(png_bytes())])
        a = store.add_message(c["id"], role="assistant", content="red", parent_id=u["id"])
        b = store.add_message(c["id"], role="assistant", content="blue", parent_id=u["id"])
        store.add_ranking(a["id"], b["id"])
        skipped = []
        assert list(store.preference_pairs(skipped.append)) == []
        assert "holds 1 picture(s)" in skipped[0]["reason"]
