"""Shared fixtures: small generated corpora and datasets, so tests never depend on big downloads."""
import os
import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Engines and schedulers take the plain decode step in tests (and in the CLIs the tests start): the
# compiled one costs ~20-60 s of compiling per model. tests/engine/test_fast_path.py asks for it by name.
os.environ.setdefault("PICOCHAT_FAST", "plain")


def make_corpus(n_docs: int = 60, seed: int = 0) -> list[str]:
    """Documents of simple, learnable English-like sentences (subject verb object, with a pattern)."""
    rng = random.Random(seed)
    subjects = ["the cat", "a dog", "my friend", "the old man", "our teacher", "the river", "a child"]
    verbs = ["sees", "likes", "follows", "finds", "paints", "remembers", "crosses"]
    objects = ["the garden", "a red ball", "the bridge", "a small house", "the evening sky", "an apple"]
    docs = []
    for _ in range(n_docs):
        sents = []
        for _ in range(rng.randint(20, 40)):
            s = f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}."
            sents.append(s[0].upper() + s[1:])
        docs.append(" ".join(sents))
    return docs


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one thread, and a 2-thread team stalls at every op while another process
    holds a core (a shared 2-core machine: 20 us vs 2.7 ms for a small multiply, measured). A module
    uses it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A prepared dataset (vocab 320) from the generated corpus."""
    from picochat.data.prepare import prepare_dataset
    root = tmp_path_factory.mktemp("tiny_dataset")
    src = root / "corpus.jsonl"
    import json
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in make_corpus()))
    return prepare_dataset(src, out_dir=root / "data", vocab_size=320, val_fraction=0.1, seed=0)


def picochat_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "picochat.cli", *args]


def kill_when(cmd: list[str], env: dict, marker: Path, timeout: float = 120) -> None:
    """Start cmd and SIGKILL it as soon as marker exists (e.g. a checkpoint directory): a crash mid-run."""
    import signal
    import subprocess
    import time
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not marker.exists() and time.time() < deadline:
        assert proc.poll() is None, "the run finished before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def subprocess_env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def tiny_run(tiny_dataset, tmp_path_factory) -> Path:
    """A small GPT trained for a few seconds on the generated corpus (it learns the sentence pattern)."""
    from picochat.train.pretrain import PretrainConfig, pretrain
    out = tmp_path_factory.mktemp("tiny_run") / "run"
    cfg = PretrainConfig(data=str(tiny_dataset), out_dir=str(out), max_steps=150, batch_size=8, lr=3e-3,
                         warmup_steps=10, eval_every=50, ckpt_every=150, eval_windows=8, progress=False,
                         dtype="fp32")
    pretrain(cfg, dict(n_layer=2, n_head=2, n_embd=64, block_size=64))
    return out
