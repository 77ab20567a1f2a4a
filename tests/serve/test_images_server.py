"""The official `openai` client sends a picture to a real `picochat serve` of a tiny model that sees (beside a
text-only one): the answer, streamed or not, is the one the engine gives for the same picture and prompt."""
from __future__ import annotations

import pytest

from tests.serve.conftest import DirectEngine, data_url, png_bytes

pytestmark = pytest.mark.slow  # a server process (like test_server.py's openai client tests)

COLOURS = [(220, 40, 40), (40, 80, 230), (40, 170, 60), (235, 195, 20), (0, 0, 0), (128, 128, 128)]
QUESTION = "Describe the picture."


def parts(pic: bytes, detail: str = "auto") -> list[dict]:
    return [{"type": "image_url", "image_url": {"url": data_url(pic), "detail": detail}},
            {"type": "text", "text": QUESTION}]


def test_openai_client_sends_a_picture(vlm_server, tiny_vlm_run):
    openai = pytest.importorskip("openai")
    oracle = DirectEngine(tiny_vlm_run)
    answers = {c: oracle.answer([("user", [png_bytes(c)], QUESTION)]) for c in COLOURS}
    pic = next((png_bytes(c) for c, a in answers.items() if a), None)
    assert pic is not None, "the tiny model answers nothing about any test picture"
    want = oracle.answer([("user", [pic], QUESTION)])
    client = openai.OpenAI(base_url=vlm_server.url + "/v1", api_key="unused", max_retries=0)
    models = {m.id: m for m in client.models.list().data}
    assert models["tiny-vlm"].model_extra["vision"] is True and models["tiny-chat"].model_extra["vision"] is False

    r = client.chat.completions.create(model="tiny-vlm", messages=[{"role": "user", "content": parts(pic)}],
                                       temperature=0, max_tokens=12)
    assert r.choices[0].message.content == want and want
    stream = client.chat.completions.create(model="tiny-vlm", temperature=0, max_tokens=12, stream=True,
                                            messages=[{"role": "user", "content": parts(pic, "high")}])
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want
    # another picture, another answer where the engine gives another one
    other = next((png_bytes(c) for c, a in answers.items() if a != want), None)
    if other is not None:
        r = client.chat.completions.create(model="tiny-vlm", messages=[{"role": "user", "content": parts(other)}],
                                           temperature=0, max_tokens=12)
        assert r.choices[0].message.content == oracle.answer([("user", [other], QUESTION)]) != want

    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny-vlm", max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}])
    assert "fetches nothing" in e.value.body["message"] and "data: URL" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny-chat", max_tokens=4,
                                       messages=[{"role": "user", "content": parts(pic)}])
    assert "text-only model" in e.value.body["message"] and "tiny-vlm" in e.value.body["message"]
