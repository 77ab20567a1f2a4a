"""`picochat sft` end to end on a small pretrained model: full and LoRA fine-tuning, exact resume after
a crash, the result loadable by every verb, and bad data reported with its file and line."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from picochat.checkpoints.io import load_model
from picochat.cli import main
from picochat.train.loop import Trainer

DATA = "addition2:160,greetings:40"


def args(base, out, *extra):
    return ["sft", str(base), "--data", DATA, "--out-dir", str(out), "--max-steps", "8", "--seq-len", "64",
            "--batch-size", "4", "--eval-every", "4", "--ckpt-every", "4", "--log-every", "1", "--lr", "1e-3",
            "--warmup-steps", "2", "--val-conversations", "10", "--dtype", "fp32", "--no-progress", *extra]


def losses(run):
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the same reduction order in every run: bitwise comparisons
    yield
    torch.set_num_threads(n)


def crash_after_checkpoint(monkeypatch, at_step):
    real = Trainer.save_checkpoint

    def save_then_die(self):
        real(self)
        if self.step == at_step:
            raise RuntimeError("killed")
    monkeypatch.setattr(Trainer, "save_checkpoint", save_then_die)


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True])
def test_sft_runs_resumes_exactly_and_loads(tiny_run, tmp_path, monkeypatch, one_thread, lora, capsys):
    extra = ("--lora-rank", "4", "--lora-targets", "q,v,o,lm_head") if lora else ()
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    assert main(args(tiny_run, ref, *extra)) == 0
    out = capsys.readouterr().out
    assert "trained tokens" in out and "done: step 8" in out
    with monkeypatch.context() as m:
        crash_after_checkpoint(m, 4)
        with pytest.raises(RuntimeError, match="killed"):
            main(args(tiny_run, cut, *extra))
    assert max(losses(cut)) == 4
    assert main(args(tiny_run, cut, *extra, "--resume")) == 0
    assert losses(ref) == losses(cut) and sorted(losses(ref)) == list(range(1, 9))
    rows = [json.loads(line) for line in (ref / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in r for r in rows)
    ckpt = ref / "checkpoints" / "step_0000008"
    weights = "adapter.safetensors" if lora else "model.safetensors"
    a, b = load_file(str(ckpt / weights)), load_file(str(cut / "checkpoints" / "step_0000008" / weights))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if lora:  # only the adapters are saved: a small file beside a reference to the base
        assert all("lora_" in k for k in a) and (ckpt / "adapter.json").is_file()
    model, tok, _ = load_model(ref)  # what chat, serve, generate and eval call
    base, _, _ = load_model(tiny_run)
    x = torch.tensor([[tok.special_tokens["<|user_start|>"], 5, 6, 7]])
    assert not torch.allclose(model(x)[0], base(x)[0])  # fine-tuning changed the model


def test_sft_reports_bad_data_with_file_and_line(tiny_run, tmp_path, capsys):
    data = tmp_path / "mine.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    lines = [json.dumps(good),
             json.dumps({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}),
             json.dumps({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "y"}]}),
             json.dumps({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]}),
             "{not json", json.dumps({"messages": [{"role": "user", "content": "x " * 200},
                                                   {"role": "assistant", "content": "long"}]})]
    data.write_text("\n".join(lines * 4) + "\n")
    out = tmp_path / "run"
    base_args = ["sft", str(tiny_run), "--out-dir", str(out), "--max-steps", "1", "--seq-len", "64",
                 "--batch-size", "2", "--val-conversations", "0", "--dtype", "fp32", "--no-progress"]
    assert main(base_args + ["--data", str(data)]) == 0
    printed = capsys.readouterr().out
    assert f"{data}:2:" in printed and "skipped 20 bad conversation" in printed, printed
    assert main(base_args + ["--data", str(data), "--strict"]) == 2
    assert f"{data}:2:" in capsys.readouterr().err
    assert main(base_args + ["--data", "no_such_set"]) == 2
    err = capsys.readouterr().err
    assert "addition2" in err and "chatterbot" in err  # the known sets are listed
