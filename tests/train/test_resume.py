"""Exact resume: SIGKILL mid-training then --resume reproduces an uninterrupted run bit for bit,
and a kill in the middle of writing a checkpoint leaves the previous one loadable."""
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import kill_when, picochat_cmd, subprocess_env

# a small model with dropout, so the RNG state has to be restored too
MODEL = ["--n-layer", "2", "--n-head", "2", "--n-embd", "64", "--block-size", "32", "--dropout", "0.1"]


def train_args(data: Path, out: Path, steps: int = 24) -> list[str]:
    return ["pretrain", str(data), "--out-dir", str(out), "--max-steps", str(steps), "--batch-size", "4",
            "--grad-accum", "2", "--ckpt-every", "4", "--eval-every", "8", "--log-every", "1",
            "--eval-windows", "4", "--dtype", "fp32", "--warmup-steps", "5", "--no-progress", *MODEL]


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run_bitwise(tiny_dataset, tmp_path):
    env = subprocess_env(OMP_NUM_THREADS="1")  # 1 thread: same reduction order in every run
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    subprocess.run(picochat_cmd(*train_args(tiny_dataset, ref)), env=env, check=True, capture_output=True)

    kill_when(picochat_cmd(*train_args(tiny_dataset, cut)), env, cut / "checkpoints" / "step_0000012")
    killed_at = max(losses(cut))
    assert killed_at < 24
    subprocess.run(picochat_cmd(*train_args(tiny_dataset, cut), "--resume"), env=env, check=True,
                   capture_output=True)

    a, b = losses(ref), losses(cut)
    assert sorted(a) == sorted(b) == list(range(1, 25))
    assert a == b  # every step's loss, bit for bit (JSON floats round-trip exactly)
    wa = load_file(str(ref / "checkpoints" / "step_0000024" / "model.safetensors"))
    wb = load_file(str(cut / "checkpoints" / "step_0000024" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


# Runs in a fresh interpreter (not a fork: forking a process whose OpenMP/oneDNN threads hold locks
# can deadlock the child). It saves checkpoint 1, then is SIGKILLed in the middle of saving checkpoint 2.
SAVE_AND_DIE = """
import os, signal, sys
import torch
import picochat.checkpoints.io as cio
from picochat.checkpoints.io import CheckpointManager
from picochat.model.config import ModelConfig
from picochat.model.gpt import GPT

run_dir, die_on = sys.argv[1], sys.argv[2]
model = GPT(ModelConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16))
mgr = CheckpointManager(run_dir, keep=3)
mgr.save(1, model, None, {"state.json": b"{}"})
real_replace, real_save = os.replace, cio.save_file

def dying_replace(src, dst):
    if die_on == "rename" and "step_0000002" in str(dst):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst)

def dying_save(state, path, metadata=None):
    real_save(state, path, metadata=metadata)
    if die_on == "weights":  # weights half-way: file cut short, directory not renamed yet
        with open(path, "r+b") as f:
            f.truncate(100)
        os.kill(os.getpid(), signal.SIGKILL)

os.replace = dying_replace  # the module os: what fsutil.atomic_dir renames with
cio.save_file = dying_save
torch.manual_seed(1)
mgr.save(2, GPT(model.config), None, {"state.json": b"{}"})
"""


@pytest.mark.parametrize("die_on", ["weights", "rename"])
def test_kill_during_checkpoint_write_keeps_previous_checkpoint(tmp_path, die_on):
    from picochat.checkpoints.io import load_model, resolve_checkpoint
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", SAVE_AND_DIE, str(run), die_on], env=subprocess_env(),
                          capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert resolve_checkpoint(run).name == "step_0000001"
    model, _, path = load_model(run)
    assert path.name == "step_0000001" and model.config.n_embd == 16


def test_resume_refuses_data_made_with_another_tokenizer(tmp_path):
    """Same vocabulary size, other ids (digits split or not): resuming would silently mix two tokenizations."""
    from tests.conftest import make_corpus
    from picochat.data.prepare import prepare_dataset
    from picochat.errors import PicochatError
    from picochat.train.pretrain import PretrainConfig, pretrain
    src = tmp_path / "corpus.jsonl"
    src.write_text("".join(json.dumps({"text": d + " In 1961, 23 + 45 = 68."}) + "\n" for d in make_corpus(20)))
    split = prepare_dataset(src, tmp_path / "split", vocab_size=320, split_digits=True)
    merged = prepare_dataset(src, tmp_path / "merged", vocab_size=320, split_digits=False)
    cfg = dict(out_dir=str(tmp_path / "run"), max_steps=2, batch_size=2, ckpt_every=2, eval_every=2,
               eval_windows=2, dtype="fp32", progress=False)
    model = dict(n_layer=1, n_head=2, n_embd=32, block_size=32)
    pretrain(PretrainConfig(data=str(split), **cfg), model)
    with pytest.raises(PicochatError, match="cannot resume: .* another tokenizer"):
        pretrain(PretrainConfig(data=str(merged), **(cfg | dict(max_steps=4, resume=True))), model)
    pretrain(PretrainConfig(data=str(split), **(cfg | dict(max_steps=4, resume=True))), model)  # its own data: fine
