"""`picochat serve` refuses bad settings with one clear line, before loading anything."""
from __future__ import annotations

import socket
import subprocess

import pytest

from tests.conftest import picochat_cmd, subprocess_env


def run(*args):
    return subprocess.run(picochat_cmd("serve", *args), env=subprocess_env(), capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("args,needle", [
    (["--max-batch", "0"], "--max-batch"),
    (["--port", "70000"], "--port"),
    (["/no/such/checkpoint"], "/no/such/checkpoint"),
])
def test_bad_settings(args, needle, tmp_path):
    from tests.serve.conftest import free_port
    r = run(*args, *([] if "--port" in args else ["--port", str(free_port())]), "--db", str(tmp_path / "x.db"))
    assert r.returncode == 2
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_port_in_use(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = run("--port", str(port), "--db", str(tmp_path / "x.db"))
    assert r.returncode == 2 and "cannot listen" in r.stderr and "Traceback" not in r.stderr


def test_help_lists_the_options():
    r = subprocess.run(picochat_cmd("serve", "--help"), env=subprocess_env(), capture_output=True, text=True)
    assert r.returncode == 0
    for opt in ("--api-key", "--max-batch", "--max-queue", "--db", "--quantize", "--host"):
        assert opt in r.stdout
