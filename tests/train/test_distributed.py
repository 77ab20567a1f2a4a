"""2 processes under torchrun (gloo, CPU) = 1 process with twice the gradient accumulation."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import subprocess_env

ARGS = ["--max-steps", "6", "--batch-size", "4", "--ckpt-every", "6", "--eval-every", "6", "--log-every", "1",
        "--eval-windows", "4", "--dtype", "fp32", "--warmup-steps", "2", "--no-progress",
        "--n-layer", "2", "--n-head", "2", "--n-embd", "64", "--block-size", "32"]


def run(cmd: list[str]) -> None:
    r = subprocess.run(cmd, env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_with_double_accumulation(tiny_dataset, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run([sys.executable, "-m", "picochat.cli", "pretrain", str(tiny_dataset), "--out-dir", str(one),
         "--grad-accum", "4", *ARGS])
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "picochat.cli", "pretrain", str(tiny_dataset), "--out-dir", str(two), "--grad-accum", "2", *ARGS])
    a, b = losses(one), losses(two)
    assert len(a) == len(b) == 6
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5
    run_info = json.loads((two / "run.json").read_text())
    assert run_info["world"] == 2
    wa = load_file(str(one / "checkpoints" / "step_0000006" / "model.safetensors"))
    wb = load_file(str(two / "checkpoints" / "step_0000006" / "model.safetensors"))
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5
    # and it is not trivially equal: a run with half the data per step differs
    half = tmp_path / "half"
    run([sys.executable, "-m", "picochat.cli", "pretrain", str(tiny_dataset), "--out-dir", str(half),
         "--grad-accum", "2", *ARGS])
    assert max(abs(x - y) for x, y in zip(a, losses(half))) > 1e-3
