"""The one OS thread that does all of a model's torch work (see ModelThread)."""
from __future__ import annotations

import queue
import threading
from concurrent.futures import Future


class ModelThread:
    """One OS thread that does all of a model's torch work: loading it, then running its scheduler loop.

    Why not load in the main thread and decode in another: once two threads have used torch's OpenMP
    pool, their worker teams compete for the cores. Measured on 2 cores: a 2-thread decode in a second
    thread ran at half the speed (22 vs 45 tok/s) of the same decode in the thread that loaded the model;
    benchmarks/serve_load.py's one-client level went from 22 to 33 tok/s when the server moved to this.
    """

    def __init__(self, name: str = "picochat-model"):
        self._jobs: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            fn, fut = self._jobs.get()
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as e:  # handed to the caller, who re-raises it
                fut.set_exception(e)

    def submit(self, fn) -> Future:
        fut: Future = Future()
        self._jobs.put((fn, fut))
        return fut

    def call(self, fn):
        """Run fn() on the model thread and return its result (or raise its exception) here."""
        return self.submit(fn).result()
