"""`picochat chat` in a real pseudo-terminal: Ctrl-C (the byte 0x03, turned into SIGINT by the tty)
stops the answer being streamed and the program asks for the next message."""
from __future__ import annotations

import fcntl
import os
import pty
import select
import signal
import subprocess
import termios
import time

import pytest

from tests.conftest import picochat_cmd, subprocess_env


class Tty:
    def __init__(self, cmd):
        self.master, slave = pty.openpty()
        # a new session whose controlling terminal is the pty: the tty driver then turns 0x03 into SIGINT
        self.proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=subprocess_env(),
                                     start_new_session=True, preexec_fn=self._child_setup)
        os.close(slave)
        self.out = b""

    @staticmethod
    def _child_setup():
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        # a test run started in the background by a non-interactive shell (`make test &`) ignores SIGINT,
        # and a child inherits that, so Python would never raise KeyboardInterrupt: give it the default,
        # as a terminal would
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    def read_until(self, done, timeout: float = 120) -> bytes:
        """Read until done(output) (or a bytes needle appears in it)."""
        check = (lambda out: done in out) if isinstance(done, bytes) else done
        deadline = time.time() + timeout
        while not check(self.out):
            if time.time() > deadline:
                raise AssertionError(f"timed out; output so far: {self.out[-500:]!r}")
            r, _, _ = select.select([self.master], [], [], 0.2)
            if r:
                try:
                    self.out += os.read(self.master, 4096)
                except OSError:
                    break
        return self.out

    def write(self, data: bytes):
        os.write(self.master, data)

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        os.close(self.master)


@pytest.mark.slow
def test_ctrl_c_stops_the_answer_not_the_program():
    tty = Tty(picochat_cmd("chat", "smollm2", "--temperature", "0", "--max-tokens", "400"))
    try:
        tty.read_until(b"\n> ")
        tty.write(b"Write a very long story about a dragon.\r")
        mark = len(tty.read_until(b"dragon."))
        tty.read_until(lambda out: len(out) > mark + 80)  # part of the answer has streamed
        tty.write(b"\x03")
        tty.read_until(b"[stopped]", timeout=30)
        tty.read_until(b"\n> ", timeout=30)
        assert tty.proc.poll() is None  # still running, waiting for the next message
        tty.write(b"/quit\r")
        assert tty.proc.wait(timeout=30) == 0
    finally:
        tty.close()
