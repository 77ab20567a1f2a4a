"""`picochat pipeline`: a chat model from nothing but the embedded Brown corpus, one stage after another.

    tokenizer   BPE on Brown's training documents (one token per digit: README, "The digit question")
    data        Brown -> train.bin / val.bin with that tokenizer
    pretrain    the tiny GPT learns English                       (picochat pretrain)
    sft         ... then learns to answer: arithmetic, greetings, who it is   (picochat sft)
    eval        held-out task accuracy, chat bits per byte, and a few sample answers   (picochat eval)
    report      report.md + report.png: one row per stage, the loss curves, the accuracies

Every stage is resumable: a finished stage is recorded in ``state.json`` (atomically) and skipped when
the pipeline runs again, and a stage killed halfway continues from its last checkpoint (pretrain and sft
checkpoint every --ckpt-every steps and resume exactly). Changing an option that a finished stage depended on is
refused, since the result would mix two recipes; ``--restart`` starts the run over.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

from ..errors import PicochatError
from ..fsutil import atomic_write

STAGES = ("tokenizer", "data", "pretrain", "sft", "eval", "report")

# What each stage's result depends on: changing one of these after the stage finished is refused.
DEPENDS = {
    "tokenizer": ("vocab_size", "split_digits"),
    "data": (),
    "pretrain": ("preset", "pretrain_steps", "seed"),
    "sft": ("sft_data", "sft_steps", "sft_lr", "sft_batch_size", "sft_seq_len"),
    "eval": ("eval_n", "eval_tasks"),
    "report": (),
}

# Questions the report card asks the finished model, with words an answer "in kind" must hold (whole
# words, any case). 22 + 55 is a held-out pair (chat_tasks.is_test_key): SFT never saw it.
SAMPLES = [
    ("Hello!", ("hello", "hi", "hey", "greetings")),
    ("How are you?", ("well", "fine", "good", "great")),
    ("Who are you?", ("picochat",)),
    ("What is 22 + 55?", ("77",)),
    ("Thank you!", ("welcome", "glad", "pleasure")),
]


@dataclass
class PipelineConfig:
    out_dir: str = "runs/pipeline"
    """Where every stage writes (tokenizer.json, data/, pretrain/, sft/, eval.json, report.md, report.png)."""
    vocab_size: int = 8192
    """Tokenizer vocabulary size."""
    split_digits: bool = True
    """One token per digit in the tokenizer (see README, "The digit question")."""
    preset: str = "tiny"
    """Model and pretraining schedule preset (picochat/model/config.py, picochat/train/pretrain.py)."""
    pretrain_steps: int = 800
    """Pretraining optimizer steps (the tiny preset's batch is 16 x 256 tokens)."""
    sft_data: str = "addition2:6000,addition:20000,greetings:600,identity:400,chatterbot:400"
    """Chat mixture for SFT (`picochat data chat --list`); generated tasks keep their held-out split out."""
    sft_steps: int = 1100
    """SFT optimizer steps."""
    sft_lr: float = 1e-3
    """SFT peak learning rate."""
    sft_batch_size: int = 16
    """SFT packed rows per step."""
    sft_seq_len: int = 256
    """SFT tokens per packed row."""
    eval_n: int = 200
    """Held-out questions per task in the eval stage."""
    eval_tasks: Optional[str] = None
    """Comma-separated tasks to evaluate (default: every task with an exact answer)."""
    seed: int = 1337
    """Seed for initialisation and data order."""
    ckpt_every: int = 100
    """Pretrain and SFT checkpoint every this many steps: a killed stage resumes from the last one."""
    restart: bool = False
    """Delete the run directory's previous results and start over."""
    progress: bool = True
    """Progress bars."""

    def __post_init__(self):
        # everything checkable is checked before any work (or --restart's deletion): a typo in --sft-data
        # must not surface after ten minutes of pretraining
        from ..data.chat_data import check_spec
        from ..data.chat_tasks import TASKS
        from ..model.config import PRESETS
        for name in ("vocab_size", "pretrain_steps", "sft_steps", "sft_batch_size", "sft_seq_len", "eval_n",
                     "ckpt_every"):
            if getattr(self, name) < 1:
                raise PicochatError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.sft_lr < 1:
            raise PicochatError(f"--sft-lr must be between 0 and 1, got {self.sft_lr}")
        if self.preset not in PRESETS:
            raise PicochatError(f"unknown --preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        check_spec(self.sft_data)
        for t in (self.eval_tasks or "").split(","):
            if t.strip() and t.strip() not in TASKS:
                raise PicochatError(f"unknown task {t.strip()!r} in --eval-tasks; tasks: {', '.join(TASKS)}")


class Pipeline:
    """Runs the stages in order, skipping the finished ones; state.json records what each produced."""

    def __init__(self, cfg: PipelineConfig, log: Callable[[str], None] = print):
        self.cfg, self.log = cfg, log
        self.out = Path(cfg.out_dir).expanduser()
        self.state_path = self.out / "state.json"
        if cfg.restart and self.out.exists():
            if not self.state_path.is_file():
                raise PicochatError(f"{self.out} is not a pipeline run (no state.json); refusing to delete it")
            # renamed first, so a kill during the deletion cannot leave old checkpoints under the real name
            trash = self.out.with_name(f".{self.out.name}.deleting-{os.getpid()}")
            self.out.rename(trash)
            shutil.rmtree(trash)
        if not self.state_path.is_file() and any((self.out / d).exists() for d in ("pretrain", "sft")):
            raise PicochatError(f"{self.out} holds pretrain/ or sft/ but no state.json, so it is not known what made "
                                f"them; delete it or choose another --out-dir")
        self.out.mkdir(parents=True, exist_ok=True)
        self.state = self._load_state()

    def _load_state(self) -> dict:
        if not self.state_path.is_file():
            return {"config": asdict(self.cfg), "stages": {}}
        try:
            state = json.loads(self.state_path.read_text("utf-8"))
            old = state["config"]
            begun = [*state["stages"], *state.get("started", [])]  # finished, or half done and resumable
            for info in state["stages"].values():
                float(info["seconds"])
        except (ValueError, KeyError, TypeError) as e:
            raise PicochatError(f"{self.state_path} is damaged ({e!r}); run again with --restart") from None
        changed = list(dict.fromkeys(f"--{k.replace('_', '-')} {old.get(k)!r} -> {getattr(self.cfg, k)!r}"
                                     for stage in begun for k in DEPENDS.get(stage, ())
                                     if old.get(k) != getattr(self.cfg, k)))
        if changed:
            raise PicochatError(f"{self.out} was made with other options ({'; '.join(changed)}); its stages would "
                                f"mix two recipes. Use a new --out-dir, or --restart to start over")
        state["config"] = asdict(self.cfg)
        return state

    def _save(self) -> None:
        atomic_write(self.state_path, json.dumps(self.state, indent=2) + "\n")

    def run(self, stages: tuple[str, ...] = STAGES) -> dict:
        for name in stages:
            if self.state["stages"].get(name, {}).get("done"):
                self.log(f"pipeline: {name} already done ({self.state['stages'][name]['seconds']:.0f}s); skipped")
                continue
            # a stage started before and run again continues from its checkpoint: the report says so
            started = self.state.setdefault("started", [])
            resumed = name in started
            if not resumed:
                started.append(name)
                self._save()
            self.log(f"pipeline: {name} ..." + (" (interrupted before: resuming)" if resumed else ""))
            t0 = time.time()
            earlier = self.state.setdefault("partial_seconds", {}).get(name, 0.0)
            try:
                info = getattr(self, f"stage_{name}")()
            except BaseException:
                # time spent before an error or Ctrl-C counts toward the stage's wall time (a SIGKILL's cannot)
                self.state["partial_seconds"][name] = round(earlier + time.time() - t0, 1)
                self._save()
                raise
            info.update(done=True, seconds=round(earlier + time.time() - t0, 1), resumed=resumed)
            self.state["stages"][name] = info
            self._save()
            self.log(f"pipeline: {name} done in {info['seconds']:.0f}s")
        return self.state

    # ------------------------------------------------------------------ stages
    def stage_tokenizer(self) -> dict:
        from ..data.corpus import load_documents
        from ..data.prepare import SPLIT_SEED, VAL_FRACTION, split_documents
        from ..tokenizer import Tokenizer
        train_docs, _ = split_documents(list(load_documents(None)), VAL_FRACTION, SPLIT_SEED)  # the data stage's
        tok = Tokenizer.train(train_docs, self.cfg.vocab_size, split_digits=self.cfg.split_digits)
        tok.save(self.out / "tokenizer.json")
        return {"vocab_size": tok.vocab_size, "fingerprint": tok.fingerprint(),
                "example": [tok.decode([i]) for i in tok.encode("23 + 45 = 68")]}

    def stage_data(self) -> dict:
        from ..data.prepare import load_meta, prepare_dataset
        prepare_dataset(None, self.out / "data", tokenizer=self.out / "tokenizer.json")  # default split, as above
        meta = load_meta(self.out / "data")
        return {"tokens": meta["train_tokens"], "val_tokens": meta["val_tokens"],
                "bytes_per_token": round(meta["train_bytes"] / meta["train_tokens"], 3)}

    def stage_pretrain(self) -> dict:
        from ..train.pretrain import TRAIN_PRESETS, PretrainConfig, pretrain
        recipe = dict(TRAIN_PRESETS.get(self.cfg.preset, {}))
        recipe.update(max_steps=self.cfg.pretrain_steps, ckpt_every=self.cfg.ckpt_every)
        rows = pretrain(PretrainConfig(data=str(self.out / "data"), preset=self.cfg.preset,
                                       out_dir=str(self.out / "pretrain"), seed=self.cfg.seed, resume=True,
                                       progress=self.cfg.progress, **recipe))
        return _train_summary(rows, self.out / "pretrain")

    def stage_sft(self) -> dict:
        from ..train.sft import SFTConfig, sft
        c = self.cfg
        rows = sft(SFTConfig(base=str(self.out / "pretrain"), data=c.sft_data, out_dir=str(self.out / "sft"),
                             max_steps=c.sft_steps, lr=c.sft_lr, batch_size=c.sft_batch_size, seq_len=c.sft_seq_len,
                             warmup_steps=min(50, c.sft_steps // 10), eval_every=100, ckpt_every=c.ckpt_every,
                             seed=c.seed, resume=True, progress=c.progress))
        return _train_summary(rows, self.out / "sft")

    def stage_eval(self) -> dict:
        from ..eval.chat_eval import evaluate
        tasks = None if self.cfg.eval_tasks is None else [t.strip() for t in self.cfg.eval_tasks.split(",")]
        results = evaluate(str(self.out / "sft"), tasks=tasks, n=self.cfg.eval_n, progress=self.cfg.progress)
        results["samples"] = ask_samples(str(self.out / "sft"))
        atomic_write(self.out / "eval.json", json.dumps(results, indent=2) + "\n")
        return {"accuracy": {k: v["accuracy"] for k, v in results["tasks"].items()},
                "chat_bpb": results["chat_bpb"],
                "in_kind": sum(s["in_kind"] for s in results["samples"]), "samples": len(results["samples"])}

    def stage_report(self) -> dict:
        from .report import write_report
        md, png = write_report(self.out, self.state, self.cfg)
        return {"markdown": str(md), "png": str(png)}


def ask_samples(model_spec: str) -> list[dict]:
    """The report card's questions, answered greedily, each marked in kind or not (see SAMPLES)."""
    import torch
    from ..chat_template import pick_template
    from ..checkpoints.io import load_model
    from ..eval.chat_eval import generate_replies
    model, tok, _ = load_model(model_spec)
    model.eval()
    with torch.inference_mode():
        replies = generate_replies(model, tok, pick_template(tok), [[{"role": "user", "content": q}] for q, _ in SAMPLES],
                                   max_tokens=40)
    return [{"question": q, "reply": r, "in_kind": any(re.search(rf"\b{w}\b", r, re.IGNORECASE) for w in want)}
            for (q, want), r in zip(SAMPLES, replies)]


def _train_summary(rows: list[dict], run_dir: Path) -> dict:
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_loss" in r]
    out = {"steps": train[-1]["step"] if train else 0, "tokens": train[-1]["tokens"] if train else 0,
           "loss": round(train[-1]["loss"], 4) if train else None, "run_dir": str(run_dir)}
    if val:
        out["val_loss"] = round(val[-1]["val_loss"], 4)
        if "val_bpb" in val[-1]:
            out["val_bpb"] = round(val[-1]["val_bpb"], 4)
    return out
