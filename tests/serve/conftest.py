"""Fixtures for the service: a small random chat model (fast, any text) and a running server process."""
from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import picochat_cmd, subprocess_env


@pytest.fixture(scope="session")
def tiny_chat_ckpt(tiny_dataset, tmp_path_factory) -> Path:
    """A random-weight GPT with a 512-token context and the picochat chat template: it answers
    gibberish, quickly, which is all the HTTP layer needs."""
    import torch
    from picochat.checkpoints.io import save_model
    from picochat.model.config import ModelConfig
    from picochat.model.gpt import GPT
    from picochat.tokenizer import Tokenizer
    tok = Tokenizer.load(Path(tiny_dataset) / "tokenizer.json")
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=64, block_size=512,
                            pos="rope", norm="rmsnorm", activation="swiglu", bias=False))
    return save_model(model, tmp_path_factory.mktemp("chat") / "tiny-chat", tokenizer=tok)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`picochat serve ...` in a subprocess; .url once /health answers."""

    def __init__(self, *args: str, db: Path, env_extra: dict | None = None, timeout: float = 120):
        import httpx
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.db = db
        self.proc = subprocess.Popen(
            picochat_cmd("serve", *args, "--port", str(self.port), "--db", str(db)),
            env=subprocess_env(**(env_extra or {})), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("server exited:\n" + self.proc.stdout.read().decode(errors="replace"))
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("server did not become healthy in time")

    def stop(self, sig=None) -> str:
        if self.proc.poll() is None:
            if sig is None:
                self.proc.terminate()
            else:
                os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.stdout.read().decode(errors="replace")


@pytest.fixture(scope="module")
def tiny_server(tiny_chat_ckpt, tmp_path_factory):
    srv = ServerProcess(str(tiny_chat_ckpt), db=tmp_path_factory.mktemp("db") / "picochat.db")
    yield srv
    srv.stop()
