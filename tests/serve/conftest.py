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


@pytest.fixture(scope="module")
def tiny_api(tiny_chat_ckpt, tmp_path_factory):
    """The app over the tiny chat model with a store, in-process: (TestClient, host)."""
    from tests.serve.test_api import make_client
    c, host, store = make_client(tiny_chat_ckpt, tmp_path_factory.mktemp("api"))
    with c:
        yield c, host
    store.close()


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


# `picochat vlm train` for 2 steps on a tiny model (9 image tokens per picture): a model that sees, whose
# answers are nonsense but depend on the picture, which is all the server's plumbing needs
TINY_VLM = ["--train-scenes", "30", "--val-scenes", "8", "--test-scenes", "8", "--vocab-size", "300",
            "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "256", "--vit-layers", "1",
            "--vit-heads", "2", "--vit-embd", "32", "--val-questions", "12", "--examples", "1", "--batch-size", "8",
            "--warmup-steps", "1", "--eval-every", "2", "--ckpt-every", "2", "--log-every", "1", "--max-steps", "2",
            "--vit-pretrain-steps", "2", "--no-progress"]


@pytest.fixture(scope="session")
def tiny_vlm_run(tmp_path_factory) -> Path:
    import torch
    from picochat import cli
    run = tmp_path_factory.mktemp("vlm") / "tiny-vlm"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main(["vlm", "train", "--out-dir", str(run), *TINY_VLM]) == 0
    finally:
        torch.set_num_threads(threads)
    return run

@pytest.fixture(scope="module")
def vlm_server(tiny_vlm_run, tiny_chat_ckpt, tmp_path_factory):
    """`picochat serve` of the tiny model that sees beside the tiny text-only one, one per test module."""
    srv = ServerProcess(str(tiny_vlm_run), str(tiny_chat_ckpt), "--dtype", "fp32", "--max-context", "256",
                        db=tmp_path_factory.mktemp("db") / "picochat.db", env_extra={"OMP_NUM_THREADS": "1"})
    yield srv
    srv.stop()


def png_bytes(color=(220, 40, 40), size=(40, 30), fmt="PNG") -> bytes:
    """A one-colour picture's file bytes."""
    import io
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def data_url(data: bytes, media: str = "image/png") -> str:
    import base64
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


def picture_message(data: bytes, text: str = "Describe the picture.", media: str = "image/png") -> dict:
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(data, media)}},
                                        {"type": "text", "text": text}]}


class DirectEngine:
    """The oracle: what `picochat chat RUN --image` generates (greedy) for one conversation with pictures,
    with the engine alone, no server."""

    def __init__(self, run):
        from picochat.chat_template import pick_template, stop_token_ids
        from picochat.checkpoints.io import load_model
        from picochat.checkpoints.vlm import load_image_encoder
        from picochat.engine.engine import Engine
        model, self.tok, _ = load_model(str(run))
        self.enc = load_image_encoder(str(run))
        self.engine = Engine(model, self.tok)
        self.stops = stop_token_ids(self.tok, pick_template(self.tok))

    def embeds(self, turns: list[tuple[str, list[bytes], str]]):
        """turns: (role, pictures, text); -> (prompt ids, PromptEmbeds or None)."""
        from picochat.chat_template import render_conversation
        from picochat.checkpoints.vlm import embed_images, image_token_id
        from picochat.engine.engine import PromptEmbeds
        msgs = [{"role": role, "content": [{"type": "image"} for _ in pics] + [{"type": "text", "text": text}]}
                for role, pics, text in turns]
        ids, _ = render_conversation(msgs, self.tok, add_generation_prompt=True, image_tokens=self.enc.n_tokens)
        pics = [p for _, ps, _ in turns for p in ps]
        if not pics:
            return ids, None
        return ids, PromptEmbeds.at_markers(ids, image_token_id(self.tok, self.enc), embed_images(self.enc, pics))

    def answer(self, turns, max_tokens: int = 12) -> str:
        from picochat.engine.engine import SamplingParams
        ids, embeds = self.embeds(turns)
        params = SamplingParams(max_tokens=max_tokens, temperature=0, stop_token_ids=self.stops)
        return self.engine.generate([ids], params, embeds=[embeds])[0].text
