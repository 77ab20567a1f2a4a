"""Attention over pictures: GET /api/messages/{id}/attention for an answer to a conversation with pictures
(a tiny model that sees, in process), and `picochat attention RUN "question" --image FILE`.

The maps must be what the model really computed with the picture in place: every row (an image token's
too) sums to 1, and each layer's map equals softmax(Q K^T / sqrt(d_k)) recomputed by hand from that
layer's input in a plain forward pass that places the picture's embeddings at its markers (as `picochat
chat --image` generates). The CLI test lives here, beside the route's, to share the tiny VLM fixture.
"""
from __future__ import annotations

import math

import pytest
import torch
from fastapi.testclient import TestClient

from picochat.errors import PicochatError
from picochat.model.attention import apply_rope
from picochat.serve.app import create_app
from picochat.serve.hosts import load_host
from picochat.serve.store import Store
from tests.serve.conftest import DirectEngine, png_bytes
from tests.serve.test_attention_api import ask, error

RED = png_bytes((220, 40, 40), size=(48, 36))


def scene(colour=(30, 90, 220), box=(4, 4, 20, 16), size=(40, 30)) -> bytes:
    """A shape on white paper: a picture whose parts differ (a one-colour one draws a flat overlay)."""
    import io
    from PIL import Image
    img = Image.new("RGB", size, (255, 255, 255))
    img.paste(colour, box)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def parts(*items) -> list[dict]:
    """A user message's OpenAI content parts: bytes are pictures, strings texts."""
    from tests.serve.conftest import data_url
    return [{"type": "image_url", "image_url": {"url": data_url(x)}} if isinstance(x, bytes) else
            {"type": "text", "text": x} for x in items]


@pytest.fixture(scope="module")
def setup(one_thread, tiny_vlm_run, tiny_chat_ckpt, tmp_path_factory):
    vlm = load_host(str(tiny_vlm_run), dtype="fp32", max_batch=4, max_queue=16, max_context=256)
    chat = load_host(str(tiny_chat_ckpt), dtype="fp32", max_batch=4, max_queue=16, max_context=512)
    store = Store(tmp_path_factory.mktemp("attn-pictures") / "t.db")
    with TestClient(create_app([vlm, chat], store=store)) as c:
        yield c, vlm, store
    store.close()


def explicit_maps(gpt, ids: list[int], embeds: torch.Tensor, marker: int) -> torch.Tensor:
    """(L, H, T, T): a plain forward pass (SDPA, no weights kept) with the picture's embeddings at the
    markers; each layer's input caught by a hook, and softmax(Q K^T / sqrt(d_k)) computed from it by hand."""
    assert gpt.config.pos != "alibi", "explicit_maps leaves out ALiBi's bias: use a model without it"
    T = len(ids)
    inputs, hooks = [], [b.attn.register_forward_hook(lambda mod, args, out: inputs.append(args[0]))
                         for b in gpt.blocks]
    idx = torch.tensor([ids])
    try:
        with torch.no_grad():
            gpt(idx, embeds=embeds, embeds_mask=idx == marker)
    finally:
        for h in hooks:
            h.remove()
    future = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
    out = []
    with torch.no_grad():
        for b, x in zip(gpt.blocks, inputs):
            a = b.attn
            qkv = a.qkv_proj(x).view(1, T, a.n_head + 2 * a.n_kv_head, a.head_dim).transpose(1, 2)
            q, k = qkv[:, :a.n_head], qkv[:, a.n_head:a.n_head + a.n_kv_head]
            if gpt.config.pos == "rope":
                cos, sin = gpt.rope_cos[:T], gpt.rope_sin[:T]
                q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            k = k.repeat_interleave(a.n_head // a.n_kv_head, dim=1)
            scores = (q @ k.transpose(-1, -2) / math.sqrt(a.head_dim)).masked_fill(future, float("-inf"))
            out.append(scores.softmax(-1)[0])
    return torch.stack(out)


def test_maps_of_an_answer_about_a_picture(setup, tiny_vlm_run):
    c, host, store = setup
    pic = scene()
    answer = ask(c, [{"role": "user", "content": parts(pic, "What colour is the shape?")}], model="tiny-vlm")
    user = store.get_message(answer["parent_id"])
    r = c.get(f"/api/messages/{answer['id']}/attention")
    assert r.status_code == 200, r.text
    d = r.json()
    # the prompt the model read, built without the server: the oracle `picochat chat --image` uses
    oracle = DirectEngine(tiny_vlm_run)
    prompt, embeds = oracle.embeds([("user", [pic], "What colour is the shape?")])
    ids = prompt + oracle.tok.encode(answer["content"])
    assert d["exact"] is True and d["tokens"] == len(ids)
    assert d["answer_start"] == len(prompt) == answer["prompt_tokens"]
    n = oracle.enc.n_tokens
    side = int(math.isqrt(n))
    first = embeds.positions[0]
    assert d["pictures"] == [{"index": 1, "first_token": first, "n_tokens": n, "grid": [side, side],
                              "image_id": user["images"][0]["id"], "url": f"/api/images/{user['images'][0]['id']}",
                              "message_id": user["id"], "media_type": "image/png", "width": 40, "height": 30}]
    g = d["groups"]["self"]
    assert g["queries"][first:first + n] == [f"<image1:r{i // side}c{i % side}>" for i in range(n)]
    assert "<image" not in "".join(g["queries"][:first] + g["queries"][first + n:])
    w = torch.tensor(g["weights"])
    L, H, T = w.shape[0], w.shape[1], len(ids)
    assert w.shape == (L, H, T, T)
    # every row a distribution, the image tokens' rows as the others (each of T numbers rounded to 4 decimals)
    assert torch.allclose(w.sum(-1), torch.ones(L, H, T), atol=T * 5e-5 + 1e-6)
    assert (w.masked_select(torch.triu(torch.ones(T, T, dtype=torch.bool), 1)) == 0).all()
    # the token that starts the answer, and the answer's, look at the picture: some weight on its tokens
    assert float(w[:, :, len(prompt) - 1:, first:first + n].sum(-1).min()) > 0
    # equal to softmax(Q K^T / sqrt(d_k)) on each layer's input, the picture's embeddings in place
    ref = explicit_maps(oracle.engine.model, ids, embeds.values, prompt[first])
    assert torch.allclose(w, ref, atol=1e-4), float((w - ref).abs().max())
    # and not the maps of the bare marker tokens: the picture changed what the model attended to
    from picochat.inspect.maps import gpt_maps
    bare = gpt_maps(oracle.engine.model, oracle.tok, ids).groups["self"].weights
    assert (bare[:, :, first:] - ref[:, :, first:]).abs().max() > 1e-3
    # one layer at a time: the same numbers, the same pictures
    one = c.get(f"/api/messages/{answer['id']}/attention", params={"layer": 0}).json()
    assert one["pictures"] == d["pictures"] and one["groups"]["self"]["weights"] == g["weights"][:1]


def test_two_pictures_and_text_between(setup, tiny_vlm_run):
    c, host, store = setup
    a, b = scene((220, 40, 40)), scene((40, 160, 60), box=(20, 10, 36, 26))
    answer = ask(c, [{"role": "user", "content": parts("Left:", a, "right:", b, "which is green?")}],
                 model="tiny-vlm", max_tokens=6)
    user = store.get_message(answer["parent_id"])
    d = c.get(f"/api/messages/{answer['id']}/attention").json()
    oracle = DirectEngine(tiny_vlm_run)
    n = oracle.enc.n_tokens
    p1, p2 = d["pictures"]
    assert d["exact"] is True and [p1["index"], p2["index"]] == [1, 2]
    assert [p1["image_id"], p2["image_id"]] == [im["id"] for im in user["images"]]
    assert p2["first_token"] > p1["first_token"] + n  # "right:" sits between them
    q = d["groups"]["self"]["queries"]
    assert q[p1["first_token"]] == "<image1:r0c0>" and q[p2["first_token"] + n - 1] == "<image2:r2c2>"
    assert "right:" in "".join(q[p1["first_token"] + n:p2["first_token"]])
    w = torch.tensor(d["groups"]["self"]["weights"])
    T = w.size(-1)
    assert torch.allclose(w.sum(-1), torch.ones(w.shape[:3]), atol=T * 5e-5 + 1e-6)


def test_a_text_only_model_under_a_picture_is_refused(setup):
    c, host, store = setup
    cid = c.post("/api/conversations", json={}).json()["id"]
    u = store.add_message(cid, role="user", content="Look.", images=[
        {"offset": 0, "media_type": "image/png", "data": RED, "width": 48, "height": 36}])
    a = store.add_message(cid, role="assistant", content="Red.", parent_id=u["id"], model="tiny-chat")
    msg = error(c.get(f"/api/messages/{a['id']}/attention"), 400, "message_id")
    assert "text-only" in msg and "tiny-chat" in msg


# ---- the CLI ---------------------------------------------------------------------------------------------
def test_cli_image_writes_the_grid_the_overlay_and_the_page(one_thread, tiny_vlm_run, tmp_path):
    from picochat.inspect.cli import AttentionConfig, attention
    from tests.inspect.test_html import embedded_json
    (tmp_path / "shape.png").write_bytes(scene())
    out = attention(AttentionConfig(model=str(tiny_vlm_run), text="What colour is the shape?",
                                    image=str(tmp_path / "shape.png"), out_dir=str(tmp_path / "maps"), answer_tokens=5))
    assert out["kind"] == "gpt" and [p.rsplit("/", 1)[1] for p in out["pngs"]] == ["self.png", "image.png"]
    assert (tmp_path / "maps" / "image.png").stat().st_size > 3000
    assert out["meta"]["question"] == "What colour is the shape?"
    data = embedded_json((tmp_path / "maps" / "attention.html").read_text("utf-8"))
    (pic,) = data["pictures"]
    assert pic["src"].startswith("data:image/png;base64,") and pic["name"] == "shape.png" and pic["grid"] == [3, 3]
    q = data["groups"]["self"]["queries"]
    assert q[pic["first_token"]] == "<image1:r0c0>" and q[pic["first_token"] + 8] == "<image1:r2c2>"
    # the model answered first (at most 5 tokens; a random tiny model may stop at once) after the prompt
    assert q[data["answer_start"] - 1] == "<|assistant_start|>" and len(q) - data["answer_start"] <= 5
    w = torch.tensor(data["groups"]["self"]["weights"])
    assert torch.allclose(w.sum(-1), torch.ones(w.shape[:3]), atol=len(q) * 5e-5 + 1e-6)


def test_cli_image_refused_for_models_that_cannot_see(one_thread, tiny_chat_ckpt, tmp_path, capsys):
    from picochat import cli
    from picochat.inspect.maps import maps_for
    (tmp_path / "red.png").write_bytes(RED)
    with pytest.raises(PicochatError, match=r"text-only model.*picochat vlm train.*leave out --image"):
        maps_for(str(tiny_chat_ckpt), "What is it?", image=str(tmp_path / "red.png"))
    assert cli.main(["attention", str(tiny_chat_ckpt), "What is it?", "--image", str(tmp_path / "red.png"),
                     "--out-dir", str(tmp_path / "maps")]) == 2
    assert "cannot see pictures" in capsys.readouterr().err and not (tmp_path / "maps").exists()
    # a vision transformer reads its image as the text, not beside one
    from picochat.model.vit import ViT, ViTConfig
    from picochat.vision.train import save_vision
    save_vision(ViT(ViTConfig(patch_size=2, n_layer=1, n_head=2, n_embd=16)), tmp_path / "vit" / "checkpoints" / "s")
    (tmp_path / "vit" / "latest").write_text("checkpoints/s")
    with pytest.raises(PicochatError, match="give the image as the text"):
        maps_for(str(tmp_path / "vit"), "x", image=str(tmp_path / "red.png"))


def test_a_missing_picture_is_refused_before_loading(one_thread, tiny_vlm_run, tmp_path):
    from picochat.inspect.maps import maps_for
    with pytest.raises(PicochatError, match="no image at"):
        maps_for(str(tiny_vlm_run), "What is it?", image=str(tmp_path / "nope.png"))
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(PicochatError):
        maps_for(str(tiny_vlm_run), "What is it?", image=str(tmp_path / "bad.png"))
