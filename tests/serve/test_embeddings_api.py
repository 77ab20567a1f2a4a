"""POST /v1/embeddings: MiniLM beside a chat model, in process and through the official clients."""
from __future__ import annotations

import base64

import numpy as np
import pytest
from fastapi.testclient import TestClient

from picochat.encoder.cli import EmbedConfig, embed
from picochat.encoder.embeddings import load_encoder
from picochat.serve.app import create_app
from picochat.serve.hosts import load_host

TEXTS = ["A man is eating food.", "A man is eating a piece of bread.", "The new movie is awesome.",
         "Ein Mann isst.", "x"]


@pytest.fixture(scope="module")
def minilm():
    return load_encoder("minilm")


@pytest.fixture(scope="module")
def client(tiny_chat_ckpt, minilm):
    host = load_host(str(tiny_chat_ckpt), dtype="fp32", max_batch=2, max_queue=8, max_context=256)
    with TestClient(create_app([host], encoders=[minilm])) as c:
        yield c


def vectors(resp) -> np.ndarray:
    assert resp.status_code == 200, resp.text
    data = resp.json()["data"]
    assert [d["index"] for d in data] == list(range(len(data))) and all(d["object"] == "embedding" for d in data)
    return np.array([d["embedding"] if isinstance(d["embedding"], list) else
                     np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in data])


def test_vectors_equal_picochat_embed_in_both_encodings(client, capsys):
    want = np.array([embed(EmbedConfig(texts=[t], json=True))["vectors"][0] for t in TEXTS])
    capsys.readouterr()
    floats = vectors(client.post("/v1/embeddings", json={"model": "minilm", "input": TEXTS}))
    b64 = vectors(client.post("/v1/embeddings", json={"input": TEXTS, "encoding_format": "base64"}))
    assert floats.shape == (5, 384)
    np.testing.assert_allclose(floats, want, atol=1e-5)  # batched with padding here, one at a time there
    np.testing.assert_allclose(b64, floats, atol=1e-7)
    one = client.post("/v1/embeddings", json={"input": TEXTS[0]}).json()
    np.testing.assert_allclose(one["data"][0]["embedding"], floats[0], atol=1e-6)
    assert one["model"] == "minilm" and one["object"] == "list"


def test_token_id_input_and_usage(client, minilm):
    ids = [e.ids for e in minilm.tokenizer.encode_batch(TEXTS[:2], add_special_tokens=False)]
    by_text = client.post("/v1/embeddings", json={"input": TEXTS[:2]}).json()
    by_ids = client.post("/v1/embeddings", json={"input": ids}).json()
    np.testing.assert_allclose(vectors_of(by_ids), vectors_of(by_text), atol=1e-6)
    single = client.post("/v1/embeddings", json={"input": ids[0]}).json()
    np.testing.assert_allclose(vectors_of(single)[0], vectors_of(by_text)[0], atol=1e-6)
    n = len(ids[0]) + len(ids[1]) + 4  # [CLS] and [SEP] around each
    assert by_text["usage"] == {"prompt_tokens": n, "total_tokens": n} == by_ids["usage"]


def vectors_of(body: dict) -> np.ndarray:
    return np.array([d["embedding"] for d in body["data"]])


def test_models_lists_the_encoder_as_such(client):
    cards = {c["id"]: c for c in client.get("/v1/models").json()["data"]}
    assert cards["minilm"]["type"] == "embedding" and cards["minilm"]["dimensions"] == 384
    assert cards["minilm"]["context_length"] == 256 and cards["minilm"]["chat"] is False
    assert cards["tiny-chat"]["type"] == "chat"


@pytest.mark.parametrize("body,status,param,words", [
    ({"input": []}, 400, "input", "empty"),
    ({"input": ""}, 400, "input", "empty string"),
    ({"input": ["ok", ""]}, 400, "input", "input 1"),
    ({"input": [[1, 2], []]}, 400, "input", "empty list"),
    ({"input": [5, "a"]}, 400, "input", "mixes"),
    ({"input": [1.5]}, 400, "input", "input[0] holds float 1.5"),
    ({"input": [[1, None]]}, 400, "input", "input[0] holds NoneType"),
    ({"input": "hi", "dimension": 384}, 400, "dimension", "Extra inputs"),
    ({"input": [10**9]}, 400, "input", "token ids must be in"),
    ({"input": "word " * 300}, 400, "input", "at most 256"),
    ({"input": "hi", "encoding_format": "int8"}, 400, "encoding_format", None),
    ({"input": "hi", "dimensions": 128}, 400, "dimensions", "cannot shorten"),
    ({"input": "hi", "model": "tiny-chat"}, 400, "model", "embedding models here: minilm"),
    ({"input": "hi", "model": "nope"}, 404, "model", "minilm"),
    ({"input": ["a"] * 2049}, 400, "input", "at most 2048"),
])
def test_bad_requests_name_the_field(client, body, status, param, words):
    r = client.post("/v1/embeddings", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and (words is None or words in err["message"]), err


def test_dimensions_equal_to_the_model_size_and_user_are_accepted(client):
    body = {"input": "hi", "dimensions": 384, "user": "alice"}
    assert len(client.post("/v1/embeddings", json=body).json()["data"][0]["embedding"]) == 384


def test_an_encoder_cannot_chat_and_says_which_models_can(client):
    for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                       ("/v1/completions", {"prompt": "hi"})):
        r = client.post(path, json={"model": "minilm", **body})
        assert r.status_code == 400 and "models that can: tiny-chat" in r.json()["error"]["message"], r.text


def test_without_an_encoder_embeddings_say_how_to_load_one(tiny_chat_ckpt):
    host = load_host(str(tiny_chat_ckpt), dtype="fp32", max_batch=1, max_queue=2, max_context=128)
    with TestClient(create_app([host])) as c:
        r = c.post("/v1/embeddings", json={"input": "hi"})
    assert r.status_code == 400 and "picochat serve smollm2 minilm" in r.json()["error"]["message"]


@pytest.mark.slow
def test_openai_and_langchain_clients_against_picochat_serve(tiny_chat_ckpt, tmp_path, capsys):
    """`picochat serve CKPT minilm` in its own process; both clients' vectors equal `picochat embed`'s."""
    openai = pytest.importorskip("openai")
    from tests.serve.conftest import ServerProcess
    want = np.array(embed(EmbedConfig(texts=TEXTS[:3], json=True))["similarity"])
    vec = np.array([embed(EmbedConfig(texts=[t], json=True))["vectors"][0] for t in TEXTS[:3]])
    capsys.readouterr()
    server = ServerProcess(str(tiny_chat_ckpt), "minilm", db=tmp_path / "s.db")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        default = client.embeddings.create(model="minilm", input=TEXTS[:3])  # the client asks for base64
        floats = client.embeddings.create(model="minilm", input=TEXTS[:3], encoding_format="float")
        a = np.array([d.embedding for d in default.data])
        b = np.array([d.embedding for d in floats.data])
        np.testing.assert_allclose(a, b, atol=1e-7)
        np.testing.assert_allclose(a, vec, atol=1e-5)  # `picochat embed` prints 6 decimals
        np.testing.assert_allclose(a @ a.T, want, atol=1e-3)
        assert default.usage.prompt_tokens > 0 and default.model == "minilm"
        with pytest.raises(openai.BadRequestError, match="embedding models here: minilm"):
            client.embeddings.create(model="tiny-chat", input="hi")
        with pytest.raises(openai.BadRequestError, match="models that can: tiny-chat"):
            client.chat.completions.create(model="minilm", messages=[{"role": "user", "content": "hi"}])
        # langchain-openai tokenizes with tiktoken and sends OpenAI's token ids unless told not to; those ids
        # mean nothing to another tokenizer, so it must send text: check_embedding_ctx_length=False
        lc = pytest.importorskip("langchain_openai")
        emb = lc.OpenAIEmbeddings(model="minilm", base_url=server.url + "/v1", api_key="unused",
                                  check_embedding_ctx_length=False, max_retries=0)
        np.testing.assert_allclose(np.array(emb.embed_documents(TEXTS[:3])), vec, atol=1e-5)
        np.testing.assert_allclose(np.array(emb.embed_query(TEXTS[0])), vec[0], atol=1e-5)
    finally:
        server.stop()


def test_serve_refuses_encoders_alone(tmp_path):
    from picochat.errors import PicochatError
    from picochat.serve.cli import ServeConfig, build_app
    with pytest.raises(PicochatError, match="also needs a chat model"):
        build_app(ServeConfig(models=["minilm"], db=str(tmp_path / "x.db")))
