"""Pictures through /v1/chat/completions and the store's routes, in process (FastAPI TestClient), on a tiny
model that sees beside a text-only one. The server's answer must be the engine's own for the same picture
and prompt; every bad picture is one 400 that names its problem, and leaves nothing stored."""
from __future__ import annotations

import base64
import json

import pytest
import torch
from fastapi.testclient import TestClient

from picochat.chat_template import render_conversation
from picochat.serve.app import create_app
from picochat.serve.hosts import load_host
from picochat.serve.store import Store
from tests.serve.conftest import DirectEngine, data_url, picture_message, png_bytes

COLOURS = [(220, 40, 40), (40, 80, 230), (40, 170, 60), (235, 195, 20), (0, 0, 0), (128, 128, 128)]


@pytest.fixture(scope="module")
def vlm(tiny_vlm_run, tiny_chat_ckpt, tmp_path_factory):
    torch.set_num_threads(1)
    hosts = [load_host(str(tiny_vlm_run), dtype="fp32", max_batch=4, max_queue=16, max_context=256),
             load_host(str(tiny_chat_ckpt), dtype="fp32", max_batch=2, max_queue=8, max_context=256)]
    store = Store(tmp_path_factory.mktemp("images") / "t.db")
    client = TestClient(create_app(hosts, store=store, max_body=64 * 2**20))
    with client:
        yield client, hosts[0], store
    store.close()


@pytest.fixture(scope="module")
def oracle(tiny_vlm_run):
    return DirectEngine(tiny_vlm_run)


@pytest.fixture(scope="module")
def talkative(oracle):
    """Pictures the untrained model answers something (not only a stop token) about: a non-empty answer
    makes the comparison with the engine mean something."""
    found = [png_bytes(c) for c in COLOURS if oracle.answer([("user", [png_bytes(c)], "Describe the picture.")])]
    assert found, "the tiny model answers nothing about any test picture"
    return found


def noise_png() -> bytes:
    """A picture that does not compress: cut in half, its header still reads but its pixels do not."""
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.frombytes("RGB", (64, 64), bytes((i * 7919) % 251 for i in range(64 * 64 * 3))).save(buf, "PNG")
    return buf.getvalue()


def ask(client, messages, **kw):
    return client.post("/v1/chat/completions", json={"model": "tiny-vlm", "messages": messages, "temperature": 0,
                                                     "max_tokens": 12, **kw})


def error(r, status=400) -> dict:
    assert r.status_code == status, r.text
    return r.json()["error"]


def count(store, table: str) -> int:
    return store._read(f"SELECT COUNT(*) FROM {table}")[0][0]


def test_models_say_which_can_see(vlm):
    client, host, _ = vlm
    cards = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert cards["tiny-vlm"]["vision"] is True and cards["tiny-vlm"]["image_tokens"] == host.image_tokens == 9
    assert cards["tiny-vlm"]["image_size"] == 24 and cards["tiny-chat"]["vision"] is False
    assert {m["id"]: m["vision"] for m in client.get("/api/config").json()["models"]} == {"tiny-vlm": True,
                                                                                         "tiny-chat": False}


def test_answer_equals_the_engine_streamed_or_not(vlm, oracle, talkative):
    client, _, store = vlm
    pic = talkative[0]
    want = oracle.answer([("user", [pic], "Describe the picture.")])
    r = ask(client, [picture_message(pic)])
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == want
    assert r.json()["usage"]["prompt_tokens"] == len(oracle.embeds([("user", [pic], "Describe the picture.")])[0])
    with client.stream("POST", "/v1/chat/completions", json={"model": "tiny-vlm", "messages": [picture_message(pic)],
                                                             "temperature": 0, "max_tokens": 12, "stream": True}) as s:
        chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == want
    # stored with its picture: the bytes as sent, where the part sat
    conv = client.get(f"/api/conversations/{client.get('/api/conversations').json()[0]['id']}").json()
    user = conv["messages"][0]
    assert user["content"] == "Describe the picture." and len(user["images"]) == 1
    img = user["images"][0]
    assert img["offset"] == 0 and img["media_type"] == "image/png" and (img["width"], img["height"]) == (40, 30)
    got = client.get(img["url"])
    assert got.status_code == 200 and got.content == pic and got.headers["content-type"] == "image/png"
    assert count(store, "image_blobs") == 1  # two conversations, one copy of the bytes


def test_each_picture_is_embedded_where_its_part_sits(vlm, oracle, monkeypatch):
    client, host, _ = vlm
    seen = []
    real = host.scheduler.submit_many
    monkeypatch.setattr(host.scheduler, "submit_many", lambda reqs: (seen.append(reqs[0].embeds), real(reqs))[1])
    red, blue = png_bytes(COLOURS[0]), png_bytes(COLOURS[1])
    for pics in ([red], [blue], [red]):
        assert ask(client, [picture_message(pics[0])], max_tokens=1).status_code == 200
    assert not torch.equal(seen[0].values, seen[1].values) and torch.equal(seen[0].values, seen[2].values)
    # two pictures, the second in the middle of a later message's text: in order, at their markers
    turns = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(red)}},
                                          {"type": "text", "text": "Describe the picture."}]},
             {"role": "assistant", "content": "a red square"},
             {"role": "user", "content": [{"type": "text", "text": "And "},
                                          {"type": "image_url", "image_url": {"url": data_url(blue), "detail": "low"}},
                                          {"type": "text", "text": "this one?"}]}]
    r = ask(client, turns)
    assert r.status_code == 200, r.text
    e = seen[-1]
    direct = torch.cat([oracle.embeds([("user", [p], "x")])[1].values for p in (red, blue)])
    assert torch.allclose(e.values, direct)
    image = {"type": "image"}
    first = {"role": "user", "content": [image, {"type": "text", "text": "Describe the picture."}]}
    last = {"role": "user", "content": [{"type": "text", "text": "And "}, image, {"type": "text", "text": "this one?"}]}
    ids, _ = render_conversation([first, turns[1], last], host.tokenizer, add_generation_prompt=True,
                                 image_tokens=host.image_tokens)
    assert e.positions == [i for i, t in enumerate(ids) if t == host.image_id]
    assert len(e.positions) == 2 * host.image_tokens and r.json()["usage"]["prompt_tokens"] == len(ids)


def test_bad_pictures_are_one_400_each_and_nothing_is_stored(vlm):
    client, _, store = vlm
    before = (count(store, "conversations"), count(store, "images"), count(store, "image_blobs"))
    png = png_bytes()
    noise = noise_png()
    huge = "data:image/png;base64," + "A" * (28 * 2**20)  # > 20 MB once decoded: refused before decoding
    cases = [
        ("https://example.com/cat.png", "fetches nothing", "data: URL"),
        ("http://169.254.169.254/latest", "fetches nothing", "base64 PNG or JPEG"),
        ("file:///etc/passwd", "fetches nothing", "data:image/png;base64"),
        ("data:image/gif;base64,R0lGODlhAQABAAAAACw=", "image/gif", "PNG or JPEG"),
        ("data:text/plain;base64,aGVsbG8=", "text/plain", "PNG or JPEG"),
        ("data:image/png," + "%89PNG", "base64-encoded", "data:image/png;base64"),
        ("data:image/png;base64,***not base64***", "not valid base64", "standard base64"),
        ("data:image/png;base64", "separated by a comma", "data:image/png;base64"),
        (data_url(b"hello, I am text"), "not an image", "PNG or JPEG"),
        (data_url(noise[: len(noise) // 2]), "corrupt or truncated", "save it again"),
        (data_url(png_bytes(size=(4100, 4100))), "4100x4100 pixels", "shrink it"),
        (huge, "MB; pictures up to 20 MB", "shrink it"),
    ]
    for url, *words in cases:
        msg = {"role": "user", "content": [{"type": "text", "text": "What is it?"},
                                           {"type": "image_url", "image_url": {"url": url}}]}
        err = error(ask(client, [msg]))
        assert err["param"] == "messages.0.content.1.image_url.url", (url[:40], err)
        assert all(w in err["message"] for w in words), (url[:40], err["message"])
    err = error(ask(client, [picture_message(png)], model="tiny-chat"))
    assert "'tiny-chat' is a text-only model" in err["message"] and "(tiny-vlm)" in err["message"], err
    err = error(ask(client, [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(png), "detail": "ultra"}}]}]))
    assert err["param"] == "messages.0.content.0.image_url.detail" and "'auto', 'low' or 'high'" in err["message"]
    err = error(ask(client, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [
        {"type": "image_url", "image_url": {"url": data_url(png)}}]}, {"role": "user", "content": "so?"}]))
    assert err["param"] == "messages.1" and "only user messages may hold pictures" in err["message"]
    err = error(ask(client, [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]))
    assert err["param"] == "messages.0.content.0" and "'text', 'image_url'" in err["message"]
    many = [{"type": "image_url", "image_url": {"url": data_url(png)}}] * 33
    err = error(ask(client, [{"role": "user", "content": many}]))
    assert "33 pictures" in err["message"] and "at most 32" in err["message"]
    err = error(ask(client, [picture_message(png)] * 30))  # 30 x 9 image tokens: past the 256-token context
    assert "context is 256 tokens" in err["message"]
    assert (count(store, "conversations"), count(store, "images"), count(store, "image_blobs")) == before


def test_the_page_stores_a_picture_then_the_answer_under_it(vlm, oracle, talkative):
    client, _, store = vlm
    pic, other = talkative[0], png_bytes(size=(41, 30))
    cid = client.post("/api/conversations", json={"title": "pictures"}).json()["id"]
    parts = [{"type": "image_url", "image_url": {"url": data_url(pic)}},
             {"type": "text", "text": "Describe the picture."}]
    m = client.post(f"/api/conversations/{cid}/messages", json={"role": "user", "content": parts})
    assert m.status_code == 200, m.text
    user = m.json()
    assert user["content"] == "Describe the picture."
    assert user["images"][0]["url"] == f"/api/images/{user['images'][0]['id']}"
    meta = {"conversation_id": cid, "parent_id": str(user["id"])}
    r = ask(client, [{"role": "user", "content": parts}], metadata=meta)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == oracle.answer([("user", [pic], "Describe the picture.")])
    conv = client.get(f"/api/conversations/{cid}").json()
    assert [x["role"] for x in conv["messages"]] == ["user", "assistant"]
    maps = client.get(f"/api/messages/{conv['messages'][1]['id']}/attention")  # the picture's tokens among them
    assert maps.status_code == 200, maps.text  # (tests/serve/test_attention_pictures.py checks the numbers)
    assert [p["image_id"] for p in maps.json()["pictures"]] == [user["images"][0]["id"]] and maps.json()["exact"]
    # the same text with another picture, or without it, is not the stored conversation
    for wrong in ([{"type": "image_url", "image_url": {"url": data_url(other)}}, parts[1]], "Describe the picture."):
        err = error(ask(client, [{"role": "user", "content": wrong}], metadata=meta))
        assert "its pictures included" in err["message"], err
    # the store's own route checks pictures as the API does
    bad = [{"type": "image_url", "image_url": {"url": "https://example.com/x.png"}}]
    err = error(client.post(f"/api/conversations/{cid}/messages", json={"content": bad}))
    assert err["param"] == "content.0.image_url.url" and "fetches nothing" in err["message"]
    err = error(client.post(f"/api/conversations/{cid}/messages",
                            json={"role": "assistant", "content": parts, "parent_id": user["id"]}))
    assert "only user messages may hold pictures" in err["message"]
    assert len(client.get(f"/api/conversations/{cid}").json()["messages"]) == 2
    assert error(client.get("/api/images/999999"), 404)["message"] == "no picture with id 999999"
    assert error(client.get("/api/images/abc"), 404)["param"] == "image_id"


def test_a_data_url_is_read_for_what_it_is(vlm):
    client, _, _ = vlm
    jpeg = png_bytes(COLOURS[2], fmt="JPEG")
    r = ask(client, [picture_message(jpeg, media="image/png")], max_tokens=1)  # a JPEG labelled PNG
    assert r.status_code == 200, r.text
    cid = client.get("/api/conversations").json()[0]["id"]
    img = client.get(f"/api/conversations/{cid}").json()["messages"][0]["images"][0]
    assert img["media_type"] == "image/jpeg" and client.get(img["url"]).content == jpeg
    # the URL itself instead of {"url": ...}, and base64 wrapped over lines: accepted
    b64 = base64.encodebytes(jpeg).decode()
    msg = {"role": "user", "content": [{"type": "image_url", "image_url": f"data:image/jpeg;base64,{b64}"}]}
    assert ask(client, [msg], max_tokens=1).status_code == 200
