"""logprobs / top_logprobs on chat completions and the integer logprobs of /v1/completions: OpenAI's shapes,
streamed chunks joining to the non-streamed list, values equal to a direct forward pass of the model."""
from __future__ import annotations

import math

import pytest
import torch

from tests.serve.test_api import USER, sse


@pytest.fixture(scope="module")
def served(tiny_api):
    return tiny_api


def forward_logprobs(host, prompt: list[int], tokens: list[int]) -> list[float]:
    """The chosen tokens' log softmax at temperature 1, from one full forward pass."""
    with torch.no_grad():
        logits = host.scheduler.model(torch.tensor([prompt + tokens]))[0][0].float()
    lp = torch.log_softmax(logits, -1)
    return [float(lp[len(prompt) - 1 + k, t]) for k, t in enumerate(tokens)]


def token_ids(host, pieces: list[bytes]) -> list[int]:
    """Ids from token bytes (a byte-level BPE token's bytes are its own)."""
    index = {host.tokenizer.token_bytes(i): i for i in range(host.tokenizer.vocab_size)}
    return [index[b] for b in pieces]


def test_chat_logprobs(served):
    c, host = served
    body = {"messages": USER, "max_tokens": 12, "temperature": 1.0, "seed": 7, "logprobs": True, "top_logprobs": 3}
    r = c.post("/v1/chat/completions", json=body).json()
    choice = r["choices"][0]
    content = choice["logprobs"]["content"]
    assert choice["logprobs"]["refusal"] is None and len(content) == r["usage"]["completion_tokens"]
    special = set(host.tokenizer.special_tokens)
    text = b"".join(bytes(e["bytes"]) for e in content if e["token"] not in special).decode("utf-8", "replace")
    assert text == choice["message"]["content"]
    for e in content:
        tops = [t["logprob"] for t in e["top_logprobs"]]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and all(math.isfinite(v) for v in tops)
        assert math.isfinite(e["logprob"]) and e["logprob"] <= 0 and set(e) == {"token", "logprob", "bytes",
                                                                                "top_logprobs"}
    # the chosen tokens' logprobs are the model's own at temperature 1
    from picochat.chat_template import render_conversation
    prompt = render_conversation(USER, host.tokenizer, host.template, add_generation_prompt=True,
                                 default_system=host.default_system)[0]
    ids = token_ids(host, [bytes(e["bytes"]) for e in content])
    assert max(abs(e["logprob"] - w) for e, w in zip(content, forward_logprobs(host, prompt, ids))) < 1e-4
    # streamed: the chunks' logprobs join to the same list
    chunks = sse(c.post("/v1/chat/completions", json=body | {"stream": True}))
    joined = [e for ch in chunks[:-1] for x in ch["choices"] if x["logprobs"] for e in x["logprobs"]["content"]]
    assert [e["token"] for e in joined] == [e["token"] for e in content]
    assert max(abs(a["logprob"] - b["logprob"]) for a, b in zip(joined, content)) < 1e-4
    # off by default, and logprobs alone gives no alternatives
    assert c.post("/v1/chat/completions", json=body | {"logprobs": False, "top_logprobs": None}).json()[
        "choices"][0]["logprobs"] is None
    alone = c.post("/v1/chat/completions", json=body | {"top_logprobs": None}).json()
    assert all(e["top_logprobs"] == [] for e in alone["choices"][0]["logprobs"]["content"])


def test_completion_logprobs(served):
    c, host = served
    prompt = [5, 6, 7, 8]
    body = {"prompt": prompt, "max_tokens": 10, "temperature": 1.0, "seed": 3, "logprobs": 2}
    choice = c.post("/v1/completions", json=body).json()["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"])
    special = set(host.tokenizer.special_tokens)
    text = "".join(t for t in lp["tokens"] if t not in special)
    assert text == choice["text"] or "\ufffd" in text  # (a character split over two tokens shows as U+FFFD)
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][-1] <= len(choice["text"])
    for tok, v, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        # the two likeliest and the chosen one; keyed by text, two byte-fragment tokens (each shown as U+FFFD)
        # are one key
        assert top[tok] == v and (2 <= len(top) <= 3 or (len(top) == 1 and "\ufffd" in next(iter(top))))
    # the same request to the engine (same seed, so the same draws) gives the ids behind the strings
    from picochat.engine.engine import Engine
    ref = Engine(host.scheduler.model, host.tokenizer).generate(
        [prompt], max_tokens=10, temperature=1.0, seed=3, logprobs=2, stop_token_ids=(host.tokenizer.eot_id,))[0]
    assert [host.tokenizer.token_bytes(t).decode("utf-8", "replace") for t in ref.token_ids] == lp["tokens"]
    want = forward_logprobs(host, prompt, ref.token_ids)
    assert max(abs(a - b) for a, b in zip(lp["token_logprobs"], want)) < 1e-4
    chunks = sse(c.post("/v1/completions", json=body | {"stream": True}))
    got = [x["logprobs"] for ch in chunks[:-1] for x in ch["choices"]]
    assert sum((g["tokens"] for g in got), []) == lp["tokens"]
    assert sum((g["text_offset"] for g in got), []) == lp["text_offset"]


@pytest.mark.parametrize("path,body,param", [
    ("/v1/chat/completions", {"messages": USER, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": USER, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 1, "echo": True}, "echo"),
])
def test_bad_logprobs_requests_name_the_field(served, path, body, param):
    r = served[0].post(path, json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
