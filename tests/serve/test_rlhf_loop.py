"""The RLHF loop, closed through the running server: feedback given over HTTP trains models that serve.

One walk, with a tiny random chat model:

1. `picochat serve` runs; through its API, making the calls the web page makes (chat.js: create a
   conversation, post the user message, stream /v1/chat/completions with metadata naming the
   conversation and the message answered, "compare" for a second answer, POST /api/rankings for the
   better one, POST /api/messages/ID/rating for thumbs), several conversations collect rankings and
   thumbs; one answer is written by the API client itself (POST .../messages with role assistant).
2. `picochat feedback export` (while the server runs) writes exactly the pairs given, chosen first.
3. `picochat reward`, `picochat dpo` train on that file as it is (no row skipped), and
   `picochat rlhf` runs PPO against the reward model.
4. `picochat serve` serves the DPO and PPO models, and each answers a chat completion.
"""
from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import picochat_cmd, subprocess_env
from tests.serve.conftest import ServerProcess

pytestmark = pytest.mark.slow

ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
SYSTEM = "Be brief."
WRITTEN = "Hello! I am fine, thank you. How can I help you today?"


def run(*args: str, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    r = subprocess.run(picochat_cmd(*args), env=subprocess_env(PICOCHAT_HOME=str(cwd / "home"), **ENV), cwd=cwd,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"picochat {' '.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    return r


class Page:
    """What the web page does (picochat/serve/static/chat.js), as plain HTTP calls."""

    def __init__(self, url: str):
        self.http = httpx.Client(base_url=url, timeout=60)
        config = self.http.get("/api/config").json()
        self.model = config["default_model"]
        # the page sends its sampling settings (the server's defaults); fewer tokens keep the test fast
        self.settings = {k: v for k, v in config["defaults"].items() if v is not None} | {"max_tokens": 12}
        self.seed = 0

    def new_chat(self, title: str, system_prompt: str = "") -> dict:
        r = self.http.post("/api/conversations", json={"model": self.model, "title": title,
                                                        "system_prompt": system_prompt, "settings": self.settings})
        assert r.status_code == 200, r.text
        return r.json() | {"messages": []}

    def conversation(self, conv: dict) -> dict:
        r = self.http.get(f"/api/conversations/{conv['id']}")
        assert r.status_code == 200, r.text
        return r.json()

    def path_to(self, conv: dict, mid: int) -> list[dict]:
        by_id = {m["id"]: m for m in self.conversation(conv)["messages"]}
        path = []
        while mid is not None:
            path.append(by_id[mid])
            mid = by_id[mid]["parent_id"]
        return path[::-1]

    def send(self, conv: dict, text: str, parent_id: int | None = None) -> dict:
        """The person types a message (under parent_id, the answer shown); the page stores it, then answers."""
        r = self.http.post(f"/api/conversations/{conv['id']}/messages",
                           json={"role": "user", "content": text, "parent_id": parent_id})
        assert r.status_code == 200, r.text
        return r.json()

    def generate(self, conv: dict, user: dict) -> dict:
        """Stream an answer to `user` (as generateInner), then find the stored answer in the tree.
        A blank answer (a random model may end at once) is regenerated, as a person would."""
        for _ in range(5):
            self.seed += 1
            messages = ([{"role": "system", "content": conv["system_prompt"]}] if conv["system_prompt"] else []) + [
                {"role": m["role"], "content": m["content"]} for m in self.path_to(conv, user["id"])]
            known = {m["id"] for m in self.conversation(conv)["messages"]}
            body = {"model": self.model, "messages": messages, "stream": True, **self.settings, "seed": self.seed,
                    "metadata": {"conversation_id": conv["id"], "parent_id": str(user["id"])},
                    "truncate_history": True}
            text, finish = "", None
            with self.http.stream("POST", "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200, r.read().decode()
                for line in r.iter_lines():
                    if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                        continue
                    choice = json.loads(line[5:])["choices"][0]
                    text += choice["delta"].get("content") or ""
                    finish = choice.get("finish_reason") or finish
            assert finish in ("stop", "length")
            fresh = []
            for _ in range(40):  # the server stores the answer as the stream ends
                fresh = [m for m in self.conversation(conv)["messages"]
                         if m["id"] not in known and m["role"] == "assistant" and m["parent_id"] == user["id"]]
                if fresh:
                    break
                time.sleep(0.05)
            assert len(fresh) == 1, fresh
            answer = fresh[0]
            assert answer["content"] == text and answer["model"] == self.model
            if answer["content"].strip():
                return answer
        raise AssertionError("five blank answers in a row")

    def write_answer(self, conv: dict, user: dict, text: str) -> dict:
        """Not the page: an API client stores its own answer to compare the model's with (docs/api.md)."""
        r = self.http.post(f"/api/conversations/{conv['id']}/messages",
                           json={"role": "assistant", "content": text, "parent_id": user["id"]})
        assert r.status_code == 200, r.text
        return r.json()

    def choose_better(self, chosen: dict, rejected: dict) -> None:
        r = self.http.post("/api/rankings", json={"chosen_id": chosen["id"], "rejected_id": rejected["id"]})
        assert r.status_code == 200, r.text
        assert r.json()["chosen_id"] == chosen["id"] and r.json()["rejected_id"] == rejected["id"]

    def rate(self, msg: dict, rating: int) -> None:
        r = self.http.post(f"/api/messages/{msg['id']}/rating", json={"rating": rating})
        assert r.status_code == 200 and r.json() == {"message_id": msg["id"], "rating": rating or None}, r.text


def give_feedback(page: Page) -> list[dict]:
    """Rankings and thumbs as people give them; -> the pairs an export must write, in its order
    (rankings in the order given, then thumbs pairs by the liked answer's id, then the other's)."""
    rankings, thumbs = [], []

    def prompt(conv, user):
        return (([{"role": "system", "content": conv["system_prompt"]}] if conv["system_prompt"] else [])
                + [{"role": m["role"], "content": m["content"]} for m in page.path_to(conv, user["id"])])

    def expect(into, conv, user, chosen, rejected, source):
        into.append({"prompt": prompt(conv, user), "chosen": [{"role": "assistant", "content": chosen["content"]}],
                     "rejected": [{"role": "assistant", "content": rejected["content"]}], "source": source,
                     "conversation_id": conv["id"]})

    # five chats, each answered, then compared with a second answer and one of the two picked
    questions = ["Hello there!", "How are you today?", "What is your name?", "Tell me a joke.", "Good morning!"]
    for i, q in enumerate(questions):
        conv = page.new_chat(q, SYSTEM if i % 2 == 0 else "")
        user = page.send(conv, q)
        a = page.generate(conv, user)
        b = page.generate(conv, user)  # "Compare with a second answer"
        chosen, rejected = (b, a) if i % 2 == 0 else (a, b)
        page.choose_better(chosen, rejected)
        expect(rankings, conv, user, chosen, rejected, "ranking")
        if i == 1:  # thumbs that disagree with the ranking: the explicit judgement wins, no second pair
            page.rate(rejected, 1)
            page.rate(chosen, -1)
        if i == 2:  # a lone thumbs up (no sibling thumbed down: no pair), and a thumbs down taken back
            page.rate(chosen, 1)
            page.rate(rejected, -1)
            page.rate(rejected, 0)

    # a second turn, under the answer that was kept: the prompt is the whole path
    conv = page.new_chat("Two turns", SYSTEM)
    u1 = page.send(conv, "Hi!")
    a1 = page.generate(conv, u1)
    u2 = page.send(conv, "Can you say that again?", parent_id=a1["id"])
    a2, b2 = page.generate(conv, u2), page.generate(conv, u2)
    page.choose_better(a2, b2)
    expect(rankings, conv, u2, a2, b2, "ranking")
    assert [m["role"] for m in rankings[-1]["prompt"]] == ["system", "user", "assistant", "user"]

    # an answer written by the API client, preferred to the model's
    conv = page.new_chat("Written answer")
    user = page.send(conv, "How are you?")
    generated = page.generate(conv, user)
    written = page.write_answer(conv, user, WRITTEN)
    page.choose_better(written, generated)
    expect(rankings, conv, user, written, generated, "ranking")

    # thumbs only: three answers (two regenerations), one liked and two disliked -> two pairs
    conv = page.new_chat("Thumbs", SYSTEM)
    user = page.send(conv, "Say something nice.")
    x, y, z = (page.generate(conv, user) for _ in range(3))
    page.rate(x, 1)
    page.rate(y, -1)
    page.rate(z, -1)
    expect(thumbs, conv, user, x, y, "thumbs")
    expect(thumbs, conv, user, x, z, "thumbs")
    # ... and the second answer liked, the first disliked
    conv = page.new_chat("Thumbs again")
    user = page.send(conv, "What do you like?")
    x, y = page.generate(conv, user), page.generate(conv, user)
    page.rate(x, -1)
    page.rate(y, 1)
    expect(thumbs, conv, user, y, x, "thumbs")
    return rankings + thumbs


def latest_checkpoint(run_dir: Path) -> Path:
    ckpt = run_dir / (run_dir / "latest").read_text().strip()
    assert ckpt.is_dir(), ckpt
    return ckpt


def test_feedback_given_through_the_server_trains_models_that_serve(tiny_chat_ckpt, tmp_path):
    base = str(tiny_chat_ckpt)
    db, pairs_file = tmp_path / "picochat.db", tmp_path / "feedback.jsonl"
    rm_dir, dpo_dir, ppo_dir = tmp_path / "rm", tmp_path / "dpo", tmp_path / "ppo"

    # 1-2. feedback through the running server, exported while it runs
    srv = ServerProcess(base, db=db, env_extra=ENV | {"PICOCHAT_HOME": str(tmp_path / "home")})
    try:
        expected = give_feedback(Page(srv.url))
        r = run("feedback", "export", str(pairs_file), "--db", str(db), cwd=tmp_path)
    finally:
        log = srv.stop()
    assert "Traceback" not in log, log
    n_rank = sum(p["source"] == "ranking" for p in expected)
    assert len(expected) == 10 and n_rank == 7
    assert f"wrote 10 preference pairs ({n_rank} from rankings, {10 - n_rank} from thumbs)" in r.stdout
    assert "skipped" not in r.stdout
    rows = [json.loads(line) for line in pairs_file.read_text("utf-8").splitlines()]
    assert [{k: row[k] for k in ("prompt", "chosen", "rejected", "source", "conversation_id")} for row in rows] \
        == expected
    # the model that answered (the written answer's row names the conversation's model)
    assert {row["model"] for row in rows} == {Path(base).name}
    assert sum(row["chosen"][0]["content"] == WRITTEN for row in rows) == 1

    # 3. the three trainers read the export as it is
    r = run("reward", base, "--data", str(pairs_file), "--max-steps", "4", "--eval-every", "2", "--ckpt-every", "2",
            "--batch-size", "4", "--out-dir", str(rm_dir), "--no-progress", cwd=tmp_path)
    assert "skipped" not in r.stdout + r.stderr, r.stdout
    m = re.search(r"([\d,]+) training pairs \(([^)]*)\), ([\d,]+) held out", r.stdout)
    assert m and int(m[1]) + int(m[3]) == 10 and int(m[3]) >= 1, r.stdout
    kinds = dict(k.split() for k in m[2].split(", "))  # the export's sources: rankings and thumbs
    assert set(kinds) <= {"ranking", "thumbs"} and sum(map(int, kinds.values())) == int(m[1]), m[2]
    assert "held-out pairwise accuracy" in r.stdout
    heads = sorted(rm_dir.glob("checkpoints/*/score_head.safetensors"))
    assert [h.parent.name for h in heads] == ["step_0000002", "step_0000004"], heads
    metrics = [json.loads(line) for line in (rm_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("val/accuracy" in row for row in metrics)
    scalar = json.loads((latest_checkpoint(rm_dir) / "scalar.json").read_text())
    assert scalar["kind"] == "reward" and scalar["normalised_on"] >= 1

    r = run("dpo", base, "--data", str(pairs_file), "--max-steps", "4", "--eval-every", "2", "--ckpt-every", "4",
            "--batch-size", "4", "--out-dir", str(dpo_dir), "--no-progress", cwd=tmp_path)
    assert "skipped" not in r.stdout + r.stderr, r.stdout
    m = re.search(r"([\d,]+) training pairs \([^)]*\), ([\d,]+) held out", r.stdout)
    assert m and int(m[1]) + int(m[2]) == 10, r.stdout
    assert "held-out reward accuracy" in r.stdout
    assert (latest_checkpoint(dpo_dir) / "model.safetensors").is_file()

    r = run("rlhf", base, "--reward", str(rm_dir), "--prompts", "greetings:20", "--max-steps", "1",
            "--rollout-size", "4", "--minibatch-size", "2", "--max-new-tokens", "8", "--out-dir", str(ppo_dir),
            "--no-progress", cwd=tmp_path)
    assert f"reward {rm_dir}" in r.stdout and "done: 1 iterations" in r.stdout, r.stdout
    assert (latest_checkpoint(ppo_dir) / "value.safetensors").is_file()
    samples = [json.loads(line) for line in (ppo_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 1 and len(samples[0]["samples"]) == 4  # one rollout of 4 answers, scored by the RM
    assert all(isinstance(s["score"], float) for s in samples[0]["samples"])

    # the trained models moved away from the model that answered (and load as plain language models)
    import torch
    from picochat.checkpoints.io import load_model
    from picochat.model.scalar import load_scalar_model
    before = load_model(base)[0].state_dict()
    for run_dir in (dpo_dir, ppo_dir):
        after, tok, _ = load_model(run_dir)
        assert tok is not None
        assert any(not torch.equal(before[k], v) for k, v in after.state_dict().items()), run_dir
    rm, _, _ = load_scalar_model(rm_dir)
    assert rm.score.weight.shape == (1, rm.config.n_embd)

    # 4. the DPO and PPO models serve, and answer
    srv = ServerProcess(str(dpo_dir), str(ppo_dir), db=tmp_path / "served.db", env_extra=ENV)
    try:
        http = httpx.Client(base_url=srv.url, timeout=60)
        models = [c["id"] for c in http.get("/v1/models").json()["data"]]
        assert models == ["dpo", "ppo"]
        for name in models:
            r = http.post("/v1/chat/completions", json={
                "model": name, "max_tokens": 8, "seed": 0,
                "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello there!"}]})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["model"] == name and body["choices"][0]["message"]["role"] == "assistant"
            assert body["choices"][0]["finish_reason"] in ("stop", "length")
            assert 1 <= body["usage"]["completion_tokens"] <= 8
    finally:
        log = srv.stop()
    assert "Traceback" not in log, log
