"""Scheduler.run_on_model: other torch work on the model's own thread, between two decode turns."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from picochat.engine.engine import SamplingParams
from picochat.engine.scheduler import Request, Scheduler
from picochat.errors import PicochatError
from picochat.model.config import ModelConfig
from picochat.model.gpt import GPT


def tiny():
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=300, n_layer=2, n_head=2, n_embd=32, block_size=512)).eval()


def long_request(events: list, done: threading.Event, max_tokens: int = 300, delay: float = 0.005) -> Request:
    """A generation that cannot stop early (no stop tokens) and takes a while (its callback sleeps)."""
    def on_event(ev):
        events.append((time.monotonic(), len(ev.token_ids), ev.finish_reason))
        time.sleep(delay)
        if ev.finish_reason:
            done.set()
    return Request([1, 2, 3, 4], SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=0), on_event)


def test_idle_scheduler_runs_a_side_job_on_the_model_thread():
    s = Scheduler(tiny(), None, max_batch=2).start()
    try:
        assert s.run_on_model(lambda: threading.current_thread().name).result(timeout=10) == s.worker._thread.name
        with pytest.raises(ZeroDivisionError):  # the job's exception is the caller's
            s.run_on_model(lambda: 1 / 0).result(timeout=10)
        assert s.run_on_model(lambda: 42).result(timeout=10) == 42  # the loop survived it
    finally:
        s.stop()


def test_side_job_runs_between_turns_while_generating():
    m = tiny()
    s = Scheduler(m, None, max_batch=2).start()
    events, done = [], threading.Event()
    try:
        s.submit(long_request(events, done))
        deadline = time.monotonic() + 30
        while len(events) < 5:
            assert time.monotonic() < deadline, "the generation did not start"
            time.sleep(0.01)

        def job():  # real torch work on the model, with the generation mid-way
            with torch.no_grad():
                m(torch.tensor([[5, 6, 7]]), return_attention=True)
            return threading.current_thread().name, len(events), s.stats()["active_sequences"]
        name, seen, active = s.run_on_model(job).result(timeout=30)
        assert name == s.worker._thread.name and active == 1 and 5 <= seen < 300
        assert done.wait(60)
        tokens = sum(n for _, n, _ in events)
        assert events[-1][2] == "length" and tokens == 300  # the generation went on, untouched
    finally:
        s.stop()


def test_before_start_and_after_stop():
    s = Scheduler(tiny(), None)
    # not started: the model thread is free, so the job runs on it at once
    assert s.run_on_model(lambda: threading.current_thread().name).result(timeout=10) == s.worker._thread.name
    s.start()
    s.stop()
    with pytest.raises(PicochatError, match="stopped"):
        s.run_on_model(lambda: 1).result(timeout=10)
    s.start()  # an app may run its lifespan twice
    try:
        assert s.run_on_model(lambda: 7).result(timeout=10) == 7
    finally:
        s.stop()


def test_jobs_still_queued_at_stop_fail_cleanly():
    s = Scheduler(tiny(), None).start()
    gate, started = threading.Event(), threading.Event()

    def blocker():
        started.set()
        gate.wait(10)
        return "first"
    first = s.run_on_model(blocker)
    assert started.wait(10)
    second = s.run_on_model(lambda: "second")  # queued behind the running job
    stopper = threading.Thread(target=s.stop)
    stopper.start()
    time.sleep(0.1)
    gate.set()
    stopper.join(30)
    assert first.result(timeout=10) == "first"
    with pytest.raises(PicochatError, match="stopped"):
        second.result(timeout=10)
