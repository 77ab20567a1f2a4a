"""Training a mixture-of-experts GPT: the loop adds the routers' auxiliary losses, logs the load per expert,
plots it, and a SIGKILLed run resumes bit for bit like a dense one."""
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from picochat.cli import main
from picochat.model.config import ModelConfig
from picochat.model.gpt import GPT
from picochat.train.loop import TrainConfig, Trainer
from picochat.train.metrics import read_metrics
from tests.conftest import kill_when, picochat_cmd, subprocess_env

# as tests/train/test_resume.py, with 4 experts top-2 in each block (and dropout inside the experts)
MODEL = ["--n-layer", "2", "--n-head", "2", "--n-embd", "64", "--block-size", "32", "--dropout", "0.1",
         "--moe-experts", "4", "--moe-top-k", "2", "--ffn-hidden", "64"]


def train_args(data: Path, out: Path, steps: int = 24) -> list[str]:
    return ["pretrain", str(data), "--out-dir", str(out), "--max-steps", str(steps), "--batch-size", "4",
            "--grad-accum", "2", "--ckpt-every", "4", "--eval-every", "8", "--log-every", "1",
            "--eval-windows", "4", "--dtype", "fp32", "--warmup-steps", "5", "--no-progress", *MODEL]


def train_rows(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run / "metrics.jsonl") if "loss" in r}


@pytest.mark.slow
def test_moe_sigkill_then_resume_matches_uninterrupted_run_bitwise(tiny_dataset, tmp_path):
    env = subprocess_env(OMP_NUM_THREADS="1")  # 1 thread: same reduction order in every run
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    subprocess.run(picochat_cmd(*train_args(tiny_dataset, ref)), env=env, check=True, capture_output=True)

    kill_when(picochat_cmd(*train_args(tiny_dataset, cut)), env, cut / "checkpoints" / "step_0000012")
    assert max(train_rows(cut)) < 24
    subprocess.run(picochat_cmd(*train_args(tiny_dataset, cut), "--resume"), env=env, check=True,
                   capture_output=True)

    a, b = train_rows(ref), train_rows(cut)
    assert sorted(a) == sorted(b) == list(range(1, 25))
    keys = ("loss", "grad_norm", "moe/balance_loss", "moe/z_loss", "moe/load")
    assert [[a[s][k] for k in keys] for s in a] == [[b[s][k] for k in keys] for s in a]  # bit for bit
    wa = load_file(str(ref / "checkpoints" / "step_0000024" / "model.safetensors"))
    wb = load_file(str(cut / "checkpoints" / "step_0000024" / "model.safetensors"))
    assert any(".experts.3." in k for k in wa) and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (cut / "moe_load.png").stat().st_size > 10_000


def test_moe_pretrain_logs_balance_z_and_load_and_plots_it(tiny_dataset, tmp_path):
    from picochat.checkpoints.io import load_model
    from picochat.train.pretrain import PretrainConfig, pretrain
    out = tmp_path / "run"
    rows = pretrain(PretrainConfig(data=str(tiny_dataset), out_dir=str(out), max_steps=6, batch_size=4,
                                   log_every=2, eval_every=6, ckpt_every=6, eval_windows=2, dtype="fp32",
                                   warmup_steps=1, progress=False),
                    dict(n_layer=3, n_head=2, n_embd=32, block_size=32, moe_experts=4, moe_top_k=2))
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == [2, 4, 6]
    for r in train:
        assert r["moe/balance_loss"] >= 1.0 - 1e-6 and r["moe/z_loss"] > 0  # 1 is the balanced minimum
        load = r["moe/load"]
        assert len(load) == 3 and all(len(layer) == 4 for layer in load)  # (layers, experts)
        assert all(abs(sum(layer) - 1) < 1e-3 for layer in load)
    assert any("val_loss" in r for r in rows)
    assert (out / "moe_load.png").stat().st_size > 10_000
    model, _, _ = load_model(out)
    assert model.config.moe_experts == 4 and len(model.blocks[2].ffn.experts) == 4


@pytest.mark.parametrize("coefs, moves", [((0.01, 0.001), True), ((0.0, 0.0), False)])
def test_the_loop_adds_the_auxiliary_losses_to_the_stage_loss(tmp_path, coefs, moves):
    """The stage's loss is multiplied by 0: only the balance and z-losses can move the router."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32, moe_experts=4,
                            moe_aux_loss_coef=coefs[0], moe_z_loss_coef=coefs[1]))
    before = model.blocks[0].ffn.router.weight.detach().clone()
    x = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), max_steps=1, warmup_steps=0, weight_decay=0.0, lr=1e-2,
                      dtype="fp32", progress=False, device="cpu")
    trainer = Trainer(cfg, model, lambda step, micro: (x, x), lambda m, b: 0.0 * m(*b)[1])
    rows = trainer.fit()
    moved = not torch.equal(model.blocks[0].ffn.router.weight.detach(), before)
    assert moved == moves
    assert rows[0]["loss"] == 0.0 and "moe/balance_loss" in rows[0]  # logged loss = the stage's loss only


def test_moe_options_without_experts_are_refused(tmp_path, capsys):
    code = main(["pretrain", "--out-dir", str(tmp_path / "r"), "--moe-top-k", "1"])
    assert code == 2 and "--moe-experts" in capsys.readouterr().err
    code = main(["pretrain", "--out-dir", str(tmp_path / "r"), "--moe-experts", "4", "--moe-top-k", "5"])
    assert code == 2 and "moe_top_k=5" in capsys.readouterr().err


@pytest.mark.slow
def test_moe_two_process_ddp_matches_one_process_with_double_accumulation(tiny_dataset, tmp_path):
    """8 experts, top-1, 64 tokens per micro-batch: some expert often gets no token on a rank, and must still
    take part in the step (DDP waits for a gradient of every parameter)."""
    import sys
    args = ["pretrain", str(tiny_dataset), "--max-steps", "6", "--batch-size", "2", "--ckpt-every", "6",
            "--eval-every", "6", "--log-every", "1", "--eval-windows", "4", "--dtype", "fp32", "--warmup-steps", "2",
            "--no-progress", "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32",
            "--moe-experts", "8", "--moe-top-k", "1"]
    env = subprocess_env(OMP_NUM_THREADS="1")
    one, two = tmp_path / "one", tmp_path / "two"
    for cmd in ([sys.executable, "-m", "picochat.cli", *args, "--out-dir", str(one), "--grad-accum", "4"],
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                 "-m", "picochat.cli", *args, "--out-dir", str(two), "--grad-accum", "2"]):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    a, b = train_rows(one), train_rows(two)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert any(0.0 in layer for r in a.values() for layer in r["moe/load"])  # an idle expert did occur
    for s in a:
        assert abs(a[s]["loss"] - b[s]["loss"]) < 1e-5
        assert abs(a[s]["moe/balance_loss"] - b[s]["moe/balance_loss"]) < 1e-5
        assert a[s]["moe/load"] == b[s]["moe/load"]  # counts summed over both processes
    wa = load_file(str(one / "checkpoints" / "step_0000006" / "model.safetensors"))
    wb = load_file(str(two / "checkpoints" / "step_0000006" / "model.safetensors"))
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5
