"""POST /tokenize and /detokenize: the ids /v1/completions and /v1/chat/completions read, and back."""
from __future__ import annotations

import pytest

from tests.serve.test_api import USER


@pytest.fixture(scope="module")
def api(tiny_api):
    return tiny_api


def test_a_prompt_is_tokenized_as_completions_reads_it_and_comes_back(api):
    c, host = api
    text = "The cat sat on the mat. Ünïcödé, emoji 🐈 and  double  spaces."
    r = c.post("/tokenize", json={"prompt": text}).json()
    assert r["tokens"] == host.tokenizer.encode(text) and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == host.context
    used = c.post("/v1/completions", json={"prompt": text, "max_tokens": 1, "temperature": 0}).json()
    assert used["usage"]["prompt_tokens"] == r["count"]
    assert c.post("/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": text}
    assert c.post("/tokenize", json={"content": text}).json() == r   # llama.cpp's field name


def test_messages_are_tokenized_as_chat_completions_renders_them(api):
    c, host = api
    msgs = [{"role": "system", "content": "Be brief."}] + USER
    r = c.post("/tokenize", json={"messages": msgs}).json()
    used = c.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 1, "temperature": 0}).json()
    assert used["usage"]["prompt_tokens"] == r["count"]
    without = c.post("/tokenize", json={"messages": msgs, "add_generation_prompt": False}).json()
    assert r["tokens"][:without["count"]] == without["tokens"] and without["count"] < r["count"]


@pytest.mark.parametrize("path,body,param,words", [
    ("/tokenize", {}, None, "exactly one"),
    ("/tokenize", {"prompt": "a", "messages": USER}, None, "exactly one"),
    ("/tokenize", {"prompt": "a", "add_special_tokens": True}, "add_special_tokens", ""),
    ("/tokenize", {"prompt": "a", "add_generation_prompt": False}, None, "messages only"),
    ("/tokenize", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}, "messages", "text only"),
    ("/tokenize", {"model": "nope", "prompt": "a"}, "model", "not loaded"),
    ("/detokenize", {"tokens": [1, 10 ** 9]}, "tokens", "not an id"),
    ("/detokenize", {"tokens": [-1]}, "tokens", "not an id"),
    ("/detokenize", {"tokens": "abc"}, "tokens", ""),
])
def test_bad_requests_say_what_is_wrong(api, path, body, param, words):
    c, _ = api
    r = c.post(path, json=body)
    assert r.status_code in (400, 404), r.text
    err = r.json()["error"]
    assert words in err["message"], err
    if param:
        assert param in (err.get("param") or ""), err
