"""Converted GGUF weights cached in picochat's format: the cached model equals the freshly converted one exactly,
the cache is keyed by the file's content, a damaged cache is converted again, and a cached SmolLM2 loads in
bf16 within a few hundred MB."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from picochat.checkpoints.io import load_model
from tests.checkpoints.test_gguf import write_tiny_gguf


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("PICOCHAT_NO_CACHE", raising=False)
    return tmp_path / "home"


def logits(model, ids=(1, 5, 9, 3, 7)):
    with torch.no_grad():
        return model(torch.tensor([list(ids)]))[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_cached_model_is_the_converted_one(home, tmp_path, monkeypatch, dtype):
    f = tmp_path / "tiny.gguf"
    write_tiny_gguf(f)
    monkeypatch.setenv("PICOCHAT_NO_CACHE", "1")
    fresh, tok, _ = load_model(f, dtype=dtype)
    assert not (home / "converted").exists()  # PICOCHAT_NO_CACHE writes nothing
    monkeypatch.delenv("PICOCHAT_NO_CACHE")
    first, _, _ = load_model(f, dtype=dtype)      # converts, writes the cache
    folders = [p for p in (home / "converted").iterdir() if p.is_dir()]
    assert len(folders) == 1 and folders[0].name.endswith({torch.float32: "-fp32", torch.bfloat16: "-bf16"}[dtype])
    cached, tok2, _ = load_model(f, dtype=dtype)  # reads it
    assert all(p.dtype == dtype for p in cached.parameters()) and tok2.encode("hello world") == tok.encode("hello world")
    assert torch.equal(logits(fresh), logits(first)) and torch.equal(logits(fresh), logits(cached))
    assert cached.lm_head.weight is cached.tok_emb.weight  # (tied, as converted)


def test_the_cache_follows_the_file_and_survives_damage(home, tmp_path):
    f = tmp_path / "tiny.gguf"
    write_tiny_gguf(f)
    a, _, _ = load_model(f)
    write_tiny_gguf(f, tied=False)  # another model under the same name: another key, never stale weights
    b, _, _ = load_model(f)
    assert len([p for p in (home / "converted").iterdir() if p.is_dir()]) == 2
    assert not b.config.tie_embeddings and a.config.tie_embeddings
    folder = next(p for p in (home / "converted").iterdir() if p.is_dir() and p.name.endswith("-fp32")
                  and not json.loads((p / "config.json").read_text())["model"]["tie_embeddings"])
    (folder / "model.safetensors").write_bytes(b"damaged")
    with pytest.warns(UserWarning, match="unreadable"):
        again, _, _ = load_model(f)
    assert torch.equal(logits(again), logits(b))


@pytest.mark.slow
def test_a_cached_smollm2_loads_within_700_mb(home):
    """The acceptance: after the first run, `picochat chat smollm2` loads in bf16 (what auto picks here)
    or fp32 with its peak RSS under 700 MB (the fp32 GGUF conversion peaks near 1.7 GB)."""
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over execve from the forking parent (this test process)
    code = ("import torch, sys\nfrom picochat.checkpoints.io import load_model\n"
            "m, t, _ = load_model('smollm2', dtype=getattr(torch, sys.argv[1]))\n"
            "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
            "print(int(hwm.split()[1]) // 1024)")
    peaks = {}
    for dtype in ("bfloat16", "float32"):
        for run in ("first", "cached"):
            out = subprocess.run([sys.executable, "-c", code, dtype], capture_output=True, text=True, check=True)
            peaks[dtype, run] = int(out.stdout.split()[-1])
    assert peaks["bfloat16", "cached"] < 700 and peaks["float32", "cached"] < 700, peaks
    assert peaks["bfloat16", "first"] > peaks["bfloat16", "cached"], peaks
