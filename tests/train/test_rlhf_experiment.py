"""The README's RLHF experiment (`make rlhf`), run end to end at toy sizes: every stage runs, resumes, and
the results table is written. The numbers themselves come from the full run, reported in the README."""
import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, subprocess_env

pytestmark = pytest.mark.slow


def test_the_experiment_script_runs_every_stage(tmp_path):
    out = tmp_path / "exp"
    cmd = [sys.executable, str(ROOT / "scripts" / "rlhf_experiment.py"), "--out", str(out),
           "--sft-steps", "6", "--questions", "24", "--rm-steps", "2", "--rl-steps", "1", "--dpo-steps", "2", "--eval-n", "8", "--reference"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(OMP_NUM_THREADS="1"), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(res["accuracy"]) == {"sft", "ppo", "grpo_check", "grpo_rm", "dpo"}
    assert (out / "results.md").read_text().count("|") > 20 and (out / "rlhf_experiment.png").is_file()
    for stage in ("ppo", "grpo_check", "grpo_rm"):
        assert (out / stage / "rlhf.png").is_file() and (out / stage / "samples.jsonl").is_file()
    again = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(OMP_NUM_THREADS="1"), timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]  # a rerun resumes every finished stage
