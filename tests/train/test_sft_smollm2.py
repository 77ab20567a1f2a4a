"""SmolLM2 learns a new name with LoRA and keeps what it knew: the short version of the README's run
(`picochat sft smollm2 --data identity --replay ... --lora-rank 8`). Real weights, real generation."""
import pytest
import torch

from picochat.chat_template import pick_template
from picochat.checkpoints.io import load_model
from picochat.eval.chat_eval import generate_replies
from picochat.model.lora import has_lora
from picochat.train.sft import SFTConfig, sft

pytestmark = pytest.mark.slow
QUESTIONS = ["Who are you?", "What is the capital of France?"]
# the README's run (identity:300, --replay 200, 40 steps of 8 x 256 tokens), scaled down to about a minute
RECIPE = dict(data="identity:150", replay=32, replay_max_tokens=32, lora_rank=8, lora_targets="q,k,v,o",
              max_steps=16, lr=2e-3, seq_len=192, batch_size=4, warmup_steps=2, eval_every=16, ckpt_every=16,
              val_conversations=10, progress=False)


def ask(spec: str) -> list[str]:
    model, tok, _ = load_model(spec, dtype=torch.bfloat16)
    model.eval()
    with torch.inference_mode():  # no system prompt: the adapter run is asked exactly as the base is here
        return generate_replies(model, tok, pick_template(tok), [[{"role": "user", "content": q}] for q in QUESTIONS],
                                max_tokens=32)


def test_smollm2_lora_learns_its_name_and_still_knows_paris(tmp_path):
    who, paris = ask("smollm2")
    assert "picochat" not in who.lower() and "paris" in paris.lower()  # the baseline, in the same run
    out = tmp_path / "lora"
    sft(SFTConfig(base="smollm2", out_dir=str(out), **RECIPE))
    who, paris = ask(str(out))
    assert "picochat" in who.lower(), who
    assert "paris" in paris.lower(), paris
    model, _, _ = load_model(str(out))
    assert not has_lora(model)  # loaded merged into plain weights: every verb can use it
