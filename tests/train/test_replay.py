"""SFT self-replay: the base model's own greedy answers mixed into the training data (a cut answer without
its end token), made once per run, never from validation questions, refused on resume if its options changed."""
import json

import pytest
import torch

from picochat.chat_template import pick_template
from picochat.checkpoints.io import load_model
from picochat.errors import PicochatError
from picochat.eval.chat_eval import greedy_results
from picochat.train import replay as replay_mod
from picochat.train.replay import render_replay, replay_questions
from picochat.train.sft import SFTConfig, sft


@pytest.fixture(scope="module")
def greeter(tiny_run, tmp_path_factory):
    """tiny_run after a short SFT on greetings: it answers, and ends many of its answers."""
    out = tmp_path_factory.mktemp("greeter") / "sft"
    sft(SFTConfig(base=str(tiny_run), data="greetings:300", out_dir=str(out), max_steps=150, seq_len=64,
                  batch_size=8, lr=3e-3, eval_every=150, ckpt_every=150, dtype="fp32", progress=False))
    return out


def test_replay_is_the_base_models_own_finished_answers(greeter, tmp_path, monkeypatch):
    out = tmp_path / "sft"
    cfg = dict(base=str(greeter), data="greetings:40", out_dir=str(out), max_steps=2, seq_len=64, batch_size=4,
               replay=40, replay_prompts="greetings", replay_max_tokens=16, eval_every=2, ckpt_every=2,
               dtype="fp32", progress=False, val_conversations=4, seed=3)
    sft(SFTConfig(**cfg))
    kept = [json.loads(line) for line in (out / "replay.jsonl").read_text().splitlines()]
    made = json.loads((out / "replay.json").read_text())
    assert made["kept"] == len(kept) and made["asked"] == 40

    # ask the base every question the replay asked: the kept set is exactly its finished answers
    model, tok, _ = load_model(greeter)
    model.eval()
    from picochat.data.chat_data import load_mixture
    # sft's validation conversations: the first of the mixture, as sft reads it (rows of 64 + 1 tokens)
    convs, _ = load_mixture("greetings:40", split="train", seed=3, max_tokens=65, tokenizer=tok)
    val_questions = {m["content"] for c in convs[:min(4, len(convs) // 10)] for m in c if m["role"] == "user"}
    asked = replay_questions("greetings", 40, seed=3, exclude=val_questions)
    assert made["questions"] == asked
    assert not val_questions & set(asked)  # validation questions are never replayed into training
    with torch.inference_mode():
        res = greedy_results(model, tok, pick_template(tok), [[{"role": "user", "content": q}] for q in asked],
                             max_tokens=16)
    want = [[q, r.text, r.finish_reason == "stop"] for q, r in zip(asked, res) if r.text.strip()]
    assert [[c["messages"][0]["content"], c["messages"][1]["content"], c["finished"]] for c in kept] == want
    finished = [c["finished"] for c in kept]
    assert any(finished) and not all(finished)  # some answers ended, some were cut at 16 tokens

    # a finished answer is trained with its end-of-turn token, a cut one without: the model never learns
    # to stop where the cut fell
    end = tok.special_tokens["<|assistant_end|>"]
    for item, (ids, mask) in zip(kept, render_replay(kept, tok, pick_template(tok))):
        trained = [i for i, m in zip(ids, mask) if m]
        answer = tok.encode(item["messages"][1]["content"])
        assert trained == (answer + [end] if item["finished"] else answer)
    assert json.loads((out / "run.json").read_text())["replayed"] == len(kept)

    # resuming reuses the stored set instead of asking the base again ...
    monkeypatch.setattr(replay_mod, "self_replay", lambda *a, **k: pytest.fail("replay made twice"))
    sft(SFTConfig(**(cfg | dict(max_steps=4, resume=True))))
    assert json.loads((out / "run.json").read_text())["replayed"] == len(kept)
    # ... and refuses to continue with other replay options
    for change in (dict(replay_max_tokens=20), dict(replay=0, replay_prompts=None, replay_max_tokens=None)):
        with pytest.raises(PicochatError, match="cannot resume: .* replayed with --replay"):
            sft(SFTConfig(**(cfg | dict(max_steps=6, resume=True) | change)))


def test_replay_options_need_replay(tiny_run, tmp_path):
    with pytest.raises(PicochatError, match="give --replay N too"):
        SFTConfig(base=str(tiny_run), replay_prompts="greetings")
    with pytest.raises(PicochatError, match="unknown chat set 'nosuchset'; known sets"):
        sft(SFTConfig(base=str(tiny_run), data="greetings:40", out_dir=str(tmp_path / "x"), max_steps=1,
                      replay=3, replay_prompts="nosuchset", progress=False))
