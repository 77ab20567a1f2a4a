"""The reward model, DPO, PPO and GRPO with LoRA on SmolLM2's real weights: each trains, writes an adapter
run that loads, and the adapters change what the model computes. Tiny sizes: the mechanics, not a result."""
import json

import pytest

from picochat.checkpoints.io import load_model, load_state, resolve_checkpoint

pytestmark = pytest.mark.slow
LORA = dict(lora_rank=4, lora_targets="q,v", progress=False, dtype="bf16")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    rows = [{"prompt": [{"role": "user", "content": f"What is the capital of {c}?"}],
             "chosen": [{"role": "assistant", "content": f"The capital of {c} is {a}."}],
             "rejected": [{"role": "assistant", "content": "I like turtles."}]}
            for c, a in [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
                         ("Germany", "Berlin"), ("Egypt", "Cairo")]]
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _adapter_moved(run) -> None:
    ck = resolve_checkpoint(run)
    state = load_state(ck / "adapter.safetensors")
    assert any(k.endswith("lora_B.q") or "lora_B" in k for k in state)
    assert any(float(v.abs().max()) > 0 for k, v in state.items() if "lora_B" in k)  # B starts at 0: it trained


def test_smollm2_reward_dpo_ppo_grpo_with_lora(pairs, tmp_path):
    from picochat.train.dpo import DPOConfig, dpo
    from picochat.train.ppo import RLHFConfig, rlhf
    from picochat.train.reward import RewardConfig, train_reward
    rm = tmp_path / "rm"
    train_reward(RewardConfig(base="smollm2", data=str(pairs), out_dir=str(rm), max_steps=2, batch_size=2,
                              lr=1e-3, norm_prompts=2, val_fraction=0.34, **LORA))
    _adapter_moved(rm)
    assert (resolve_checkpoint(rm) / "score_head.safetensors").is_file()
    dpo(DPOConfig(base="smollm2", data=str(pairs), out_dir=str(tmp_path / "dpo"), max_steps=2, batch_size=2,
                  lr=1e-3, val_fraction=0.34, **LORA))
    _adapter_moved(tmp_path / "dpo")
    rl = dict(policy="smollm2", max_steps=1, rollout_size=4, minibatch_size=2, ppo_epochs=1, max_new_tokens=8,
              lr=1e-3, **LORA)
    rows = rlhf(RLHFConfig(reward=str(rm), prompts="greetings:8", out_dir=str(tmp_path / "ppo"), **rl))
    assert rows[0]["objective/kl"] == pytest.approx(0.0, abs=1e-3) and "loss/value_avg" in rows[0]
    _adapter_moved(tmp_path / "ppo")
    assert (resolve_checkpoint(tmp_path / "ppo") / "value.safetensors").is_file()
    rlhf(RLHFConfig(algo="grpo", group_size=2, reward="check", prompts="addition2:4", out_dir=str(tmp_path / "grpo"),
                    **rl))
    model, tok, _ = load_model(tmp_path / "ppo")  # base + adapter, merged: any verb can serve it
    assert model.config.vocab_size == 49152 and tok is not None
