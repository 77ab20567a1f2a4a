"""`picochat pipeline` end to end at toy size: every stage runs, the report card is written, a finished
stage is skipped, a stage killed halfway resumes from its checkpoint, and mixing recipes is refused."""
import json

import pytest

from picochat.cli import main
from picochat.errors import PicochatError
from picochat.pipeline.run import STAGES, Pipeline, PipelineConfig

pytestmark = pytest.mark.slow

TOY = dict(vocab_size=600, pretrain_steps=6, sft_steps=4, sft_data="addition2:300,greetings:40,identity:40",
           sft_seq_len=128, sft_batch_size=4, eval_n=4, eval_tasks="addition2,compare", ckpt_every=2,
           progress=False)


def test_pipeline_runs_resumes_and_reports(tmp_path, monkeypatch, capsys):
    from picochat.train import loop
    out = tmp_path / "run"
    cfg = PipelineConfig(out_dir=str(out), **TOY)

    # kill the pretrain stage at step 5 (after the checkpoint of step 4), as Ctrl-C or a crash would
    real_step = loop.Trainer.train_step

    def dying_step(self):
        if self.step == 4 and "pretrain" in str(self.run_dir):
            raise KeyboardInterrupt
        return real_step(self)
    monkeypatch.setattr(loop.Trainer, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        Pipeline(cfg).run()
    state = json.loads((out / "state.json").read_text())
    assert set(state["stages"]) == {"tokenizer", "data"} and "pretrain" in state["started"]
    assert state["partial_seconds"]["pretrain"] > 0  # the interrupted attempt's time is kept
    monkeypatch.setattr(loop.Trainer, "train_step", real_step)
    loads = []  # (stage run dir, checkpoint found, step it continues from)
    real_load = loop.Trainer.load_checkpoint

    def spy_load(self):
        found = real_load(self)
        loads.append((self.run_dir.name, found, self.step))
        return found
    monkeypatch.setattr(loop.Trainer, "load_checkpoint", spy_load)

    # run again through the CLI: tokenizer and data are skipped, pretrain continues from step 4
    args = ["pipeline", "--out-dir", str(out), "--vocab-size", "600", "--pretrain-steps", "6", "--sft-steps", "4",
            "--sft-data", TOY["sft_data"], "--sft-seq-len", "128", "--sft-batch-size", "4", "--eval-n", "4",
            "--eval-tasks", "addition2,compare", "--ckpt-every", "2", "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "tokenizer already done" in printed and "pretrain ... (interrupted before: resuming)" in printed
    state = json.loads((out / "state.json").read_text())
    assert list(state["stages"]) == list(STAGES) and all(s["done"] for s in state["stages"].values())
    assert state["stages"]["pretrain"]["resumed"] and not state["stages"]["sft"]["resumed"]
    assert loads == [("pretrain", True, 4), ("sft", False, 0)]  # pretrain continued from its step-4 checkpoint
    assert state["stages"]["pretrain"]["seconds"] > state["partial_seconds"]["pretrain"]
    assert state["stages"]["sft"]["steps"] == 4 and state["stages"]["tokenizer"]["vocab_size"] == 600

    # the report card: a row per stage, the task table, the samples, and a real PNG
    md = (out / "report.md").read_text()
    for row in ("| tokenizer |", "| pretrain |", "| sft |", "| eval |", "| addition2 |", "| compare |",
                "| Hello! |", "report.png"):
        assert row in md
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    evals = json.loads((out / "eval.json").read_text())
    assert evals["tasks"]["addition2"]["n"] == 4 and len(evals["samples"]) >= 5
    assert "# picochat pipeline report card" in printed  # the CLI prints the card

    # a third run does nothing; changing a finished stage's recipe is refused by name
    assert main(args) == 0
    assert "sft already done" in capsys.readouterr().out
    assert main(args[:6] + ["9"] + args[7:]) == 2
    assert "--pretrain-steps 6 -> 9" in capsys.readouterr().err
    # the SFT model is a run directory every verb loads: eval, and serve (API and web page)
    assert main(["eval", str(out / "sft"), "--tasks", "addition2", "--n", "2", "--bpb-data", ""]) == 0
    import httpx
    from openai import OpenAI
    from tests.serve.conftest import ServerProcess
    srv = ServerProcess(str(out / "sft"), db=tmp_path / "picochat.db")
    try:
        client = OpenAI(base_url=srv.url + "/v1", api_key="unused")
        model = client.models.list().data[0].id
        reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello!"}],
                                               max_tokens=8, temperature=0)
        assert reply.usage.completion_tokens > 0 and reply.choices[0].finish_reason in ("stop", "length")
        assert "<html" in httpx.get(srv.url + "/").text.lower()
    finally:
        srv.stop()


def test_restart_refuses_a_folder_that_is_not_a_pipeline(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(PicochatError, match="not a pipeline run"):
        Pipeline(PipelineConfig(out_dir=str(tmp_path), restart=True))
    assert (tmp_path / "precious.txt").exists()
