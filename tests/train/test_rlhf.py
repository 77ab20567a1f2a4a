"""Reward model, PPO, GRPO and DPO on a tiny model: they learn what the data says, keep their invariants,
refuse what they cannot use, and resume exactly after a kill."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from picochat.checkpoints.io import load_model, load_state, save_model
from picochat.errors import PicochatError
from picochat.model.config import ModelConfig
from picochat.model.gpt import GPT
from picochat.tokenizer import Tokenizer

TEXT = ("what is 12 + 34? 12 + 34 = 46. the answer is 7. yes, that is right. no, that is wrong. "
        "hello there, how are you? i am fine. ") * 40


def _model_dir(path: Path, tok, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32, block_size=96))
    return save_model(model, path, tok)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train([TEXT], 300)


@pytest.fixture(scope="module")
def base(tok, tmp_path_factory) -> Path:
    return _model_dir(tmp_path_factory.mktemp("rl") / "base", tok)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    """Learnable preferences: an answer that says yes beats one that says no, whatever the question."""
    rows = []
    for i in range(80):
        q = [{"role": "user", "content": f"is {i} + {i} = {2 * i}?"}]
        rows.append({"prompt": q, "chosen": [{"role": "assistant", "content": f"yes, that is right {i}."}],
                     "rejected": [{"role": "assistant", "content": f"no, that is wrong {i}."}], "kind": "wrong"})
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _same_weights(a: Path, b: Path, name: str = "model.safetensors") -> None:
    sa, sb = load_state(a / name), load_state(b / name)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _kill_after(run: Path, step: int) -> None:
    """What a kill right after checkpoint `step` leaves: later checkpoints never written."""
    for ck in (run / "checkpoints").glob("step_*"):
        if int(ck.name.split("_")[1]) > step:
            shutil.rmtree(ck)
    (run / "latest").write_text(f"checkpoints/step_{step:07d}\n")


# ---------------------------------------------------------------- reward model

def test_reward_model_learns_the_preference_and_is_centred_on_the_sft_answers(base, pairs, tmp_path):
    from picochat.model.scalar import load_scalar_model
    from picochat.train.reward import RewardConfig, train_reward
    rows = train_reward(RewardConfig(base=str(base), data=str(pairs), out_dir=str(tmp_path / "rm"), max_steps=40,
                                     lr=3e-3, batch_size=8, eval_every=20, ckpt_every=20, progress=False,
                                     dtype="fp32", norm_prompts=16))
    evals = [r for r in rows if "val/accuracy" in r]
    assert evals[-1]["val/accuracy"] == 1.0 and evals[-1]["val/margin"] > 0.5
    assert "train/accuracy" in rows[0]
    rm, rm_tok, meta = load_scalar_model(tmp_path / "rm")
    assert meta["kind"] == "reward" and meta["normalised_on"] > 0
    # the offset recorded is the SFT answers' mean raw score; loading subtracts it
    raw = load_state(tmp_path / "rm" / "checkpoints" / "step_0000040" / "score_head.safetensors")["bias"]
    assert torch.allclose(rm.score.bias, raw - meta["offset"])
    with pytest.raises(PicochatError, match="not a reward model"):
        load_scalar_model(base)


def test_reward_training_resumes_exactly(base, pairs, tmp_path):
    from picochat.train.reward import RewardConfig, train_reward
    kw = dict(base=str(base), data=str(pairs), max_steps=6, lr=3e-3, batch_size=8, eval_every=3, ckpt_every=3,
              keep_checkpoints=5, progress=False, dtype="fp32", norm_prompts=4)
    train_reward(RewardConfig(out_dir=str(tmp_path / "a"), **kw))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    _kill_after(tmp_path / "b", 3)
    train_reward(RewardConfig(out_dir=str(tmp_path / "b"), resume=True, **kw))
    for name in ("model.safetensors", "score_head.safetensors"):
        _same_weights(tmp_path / "a" / "checkpoints" / "step_0000006", tmp_path / "b" / "checkpoints" / "step_0000006",
                      name)


# ---------------------------------------------------------------- DPO

def test_dpo_moves_the_policy_toward_the_chosen_answers_and_resumes_exactly(base, pairs, tmp_path):
    from picochat.train.dpo import DPOConfig, dpo
    kw = dict(base=str(base), data=str(pairs), max_steps=30, lr=3e-3, batch_size=8, eval_every=15, ckpt_every=15,
              keep_checkpoints=5, progress=False, dtype="fp32", beta=0.5)
    rows = dpo(DPOConfig(out_dir=str(tmp_path / "a"), **kw))
    first = next(r for r in rows if "rewards/margins" in r)
    assert "rewards/chosen" in first and "rewards/accuracies" in first
    last = [r for r in rows if "val/rewards/accuracies" in r][-1]
    assert last["val/rewards/accuracies"] == 1.0 and last["val/rewards/margins"] > 0
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    _kill_after(tmp_path / "b", 15)
    dpo(DPOConfig(out_dir=str(tmp_path / "b"), resume=True, **kw))
    _same_weights(tmp_path / "a" / "checkpoints" / "step_0000030", tmp_path / "b" / "checkpoints" / "step_0000030")


def test_dpo_with_lora_saves_an_adapter_that_loads(base, pairs, tmp_path):
    from picochat.train.dpo import DPOConfig, dpo
    dpo(DPOConfig(base=str(base), data=str(pairs), out_dir=str(tmp_path / "d"), max_steps=4, batch_size=4,
                  progress=False, dtype="fp32", lora_rank=4, lr=1e-3))
    ck = tmp_path / "d" / "checkpoints" / "step_0000004"
    assert (ck / "adapter.safetensors").is_file() and not (ck / "model.safetensors").exists()
    model, tok, _ = load_model(tmp_path / "d")
    assert model.config.vocab_size == tok.vocab_size


# ---------------------------------------------------------------- PPO / GRPO

def _rl(base, tmp_path, name, **kw):
    from picochat.train.ppo import RLHFConfig, rlhf
    args = dict(policy=str(base), reward="check", prompts="addition2:64", out_dir=str(tmp_path / name), max_steps=3,
                rollout_size=8, minibatch_size=4, ppo_epochs=2, max_new_tokens=6, ckpt_every=1,
                keep_checkpoints=10, progress=False, dtype="fp32", lr=1e-3, sample_every=1) | kw
    if args.get("algo") == "grpo":
        args.setdefault("group_size", 4)
    return rlhf(RLHFConfig(**args))


def test_first_minibatch_of_a_real_rollout_has_ratio_one(base, tok):
    """The PPO invariant on real rollouts: old log-probs come from the same rows in the same shapes."""
    from picochat.chat_template import pick_template
    from picochat.model.scalar import ScalarModel
    from picochat.train.ppo import PolicyAndValue, RLHFConfig, rl_loss
    from picochat.train.rollout import Checker, make_rollout, rl_prompts
    import contextlib
    cfg = RLHFConfig(policy=str(base), reward="check", rollout_size=8, minibatch_size=4, max_new_tokens=6)
    policy, _, _ = load_model(base)
    ref, _, _ = load_model(base)
    value = ScalarModel(load_model(base)[0])
    items = rl_prompts("addition2:8")
    ro = make_rollout(cfg, policy, ref, value, Checker(), items, tok, pick_template(tok), 0,
                      contextlib.nullcontext, 0.05)
    assert ro.stats["objective/kl"] == 0.0  # policy == reference
    rows = ro.order[0][:4]
    batch = (ro.ids[rows], ro.mask[rows], ro.old_logp[rows], ro.ref_logp[rows], ro.advantages[rows],
             ro.returns[rows], ro.values[rows])
    _, stats = rl_loss(cfg, PolicyAndValue(policy, value), batch, ro.stats)
    assert stats["val/ratio"] == 1.0 and stats["policy/approxkl_avg"] == 0.0 and stats["policy/clipfrac_avg"] == 0.0
    assert stats["val/clipfrac_avg"] == 0.0
    # the answer mask covers exactly the sampled tokens (and the stop token when there was one)
    for b, (_, text, _) in enumerate(ro.samples):
        answer = ro.ids[b, 1:][ro.mask[b] > 0].tolist()
        plain = tok.decode([t for t in answer if t not in tok.special_tokens.values()])
        assert plain == text and len(answer) >= 1


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_rl_runs_logs_trl_metrics_and_resumes_exactly(base, tmp_path, algo):
    rows = _rl(base, tmp_path, "a", algo=algo, eval_tasks="addition2", eval_n=8, eval_every=3)
    trl = {"objective/kl", "objective/entropy", "objective/rlhf_reward", "objective/scores", "policy/clipfrac_avg",
           "policy/approxkl_avg", "val/ratio", "loss/policy_avg", "val/num_eos_tokens"}
    if algo == "ppo":
        trl |= {"loss/value_avg"}
    train = [r for r in rows if "objective/kl" in r]
    assert len(train) == 3 and trl <= set(train[0])
    assert any("eval/accuracy_addition2" in r for r in rows)
    out = tmp_path / "a"
    assert (out / "rlhf.png").stat().st_size > 1000 and (out / "baseline.json").is_file()
    assert len((out / "samples.jsonl").read_text().splitlines()) == 3
    cycle = json.loads((out / "run.json").read_text())["optimizer_steps_per_iteration"]
    shutil.copytree(out, tmp_path / "b")
    _kill_after(tmp_path / "b", cycle)
    _rl(base, tmp_path, "b", algo=algo, eval_tasks="addition2", eval_n=8, eval_every=3, resume=True)
    last = f"step_{3 * cycle:07d}"
    _same_weights(out / "checkpoints" / last, tmp_path / "b" / "checkpoints" / last)
    if algo == "ppo":
        _same_weights(out / "checkpoints" / last, tmp_path / "b" / "checkpoints" / last, "value.safetensors")
    model, _, _ = load_model(out)  # the policy checkpoint is an ordinary, servable model
    assert model.config.n_layer == 2
    _kill_after(tmp_path / "b", cycle)
    with pytest.raises(PicochatError, match="--ppo-epochs 2 .now 1."):  # steps would fall mid-iteration
        _rl(base, tmp_path, "b", algo=algo, resume=True, ppo_epochs=1)


def test_ppo_with_a_reward_model_and_lora(base, pairs, tmp_path):
    from picochat.train.reward import RewardConfig, train_reward
    train_reward(RewardConfig(base=str(base), data=str(pairs), out_dir=str(tmp_path / "rm"), max_steps=2,
                              batch_size=4, progress=False, dtype="fp32", norm_prompts=4))
    rows = _rl(base, tmp_path, "p", reward=str(tmp_path / "rm"), prompts="greetings:16", max_steps=2,
               lora_rank=4, kl_target=1.0)
    assert rows[-1]["objective/kl_coef"] != 0.05 or rows[0]["objective/kl"] == 0  # the adaptive controller ran
    ck = tmp_path / "p" / "checkpoints"
    latest = sorted(ck.glob("step_*"))[-1]
    assert (latest / "adapter.safetensors").is_file() and (latest / "value.safetensors").is_file()
    load_model(tmp_path / "p")


def test_a_reward_model_with_another_tokenizer_is_refused(base, pairs, tmp_path):
    from picochat.train.reward import RewardConfig, train_reward
    other = _model_dir(tmp_path / "other", Tokenizer.train([TEXT + " zebra quagga"], 310))
    train_reward(RewardConfig(base=str(other), data=str(pairs), out_dir=str(tmp_path / "rm"), max_steps=1,
                              batch_size=4, progress=False, dtype="fp32", norm_prompts=2))
    with pytest.raises(PicochatError, match="different tokenizers") as e:
        _rl(base, tmp_path, "x", reward=str(tmp_path / "rm"))
    assert "\n" not in str(e.value)


def test_bad_rl_options_are_refused_by_name(base):
    from picochat.train.ppo import RLHFConfig
    for kw, msg in [({"reward": ""}, "--reward"), ({"rollout_size": 10, "minibatch_size": 4}, "--rollout-size"),
                    ({"algo": "grpo", "rollout_size": 8, "group_size": 3, "minibatch_size": 4}, "--group-size"),
                    ({"grad_accum": 2}, "--grad-accum"), ({"kl_target": -1.0}, "--kl-target"),
                    ({"kl_target": 3.0, "kl_coef": 0.0}, "--kl-target"), ({"compile": True}, "--compile"),
                    ({"batch_size": 4}, "--batch-size"), ({"cliprange": -0.1}, "--cliprange"),
                    ({"group_size": 4}, "--group-size is not used by --algo ppo"),
                    ({"algo": "grpo", "gamma": 0.9, "lam": 0.9}, "--gamma, --lam are not used by --algo grpo"),
                    ({"kl_horizon": 500}, "--kl-horizon"), ({"eval_n": 50}, "--eval-n"),
                    ({"lora_targets": "q,v"}, "--lora-rank")]:
        with pytest.raises(PicochatError, match=msg):
            RLHFConfig(policy=str(base), **({"reward": "check"} | kw))
    with pytest.raises(PicochatError, match="checkable"):
        from picochat.train.ppo import rlhf
        rlhf(RLHFConfig(policy=str(base), reward="check", prompts="greetings:8", rollout_size=8, minibatch_size=4))


def test_options_that_would_do_nothing_are_refused(base, pairs):
    from picochat.train.dpo import DPOConfig
    from picochat.train.reward import RewardConfig
    with pytest.raises(PicochatError, match="--val-fraction"):
        RewardConfig(base=str(base), data=str(pairs), val_data=str(pairs), val_fraction=0.2)
    with pytest.raises(PicochatError, match="--lora-rank"):
        DPOConfig(base=str(base), data=str(pairs), lora_alpha=8.0)
    with pytest.raises(PicochatError, match="--eval-tasks"):
        DPOConfig(base=str(base), data=str(pairs), eval_n=10)
