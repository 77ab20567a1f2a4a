"""``picochat data prepare``: text -> train.bin / val.bin token shards for pretraining.
``picochat data chat``: list the chat sets, or write a mixture of them as JSONL (see chat_data)."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from ..cli_args import add_dataclass_args, dataclass_from_args
from ..errors import PicochatError
from .prepare import load_meta, picochat_home, prepare_dataset


@dataclass
class PrepareArgs:
    source: str | None = None
    """a text file, a folder of text files, a .jsonl file with a "text" field; if omitted, the
    embedded Brown corpus"""
    out: str | None = None
    """output folder; if omitted, $PICOCHAT_HOME/data/<source>-v<vocab size>"""
    tokenizer: str | None = None
    """a tokenizer.json, a folder holding one, or gpt2; if omitted, train a new BPE on the train split"""
    vocab_size: Optional[int] = None
    """vocabulary size of the tokenizer to train (default 8192; not with --tokenizer)"""
    split_digits: Optional[bool] = None
    """train the tokenizer with every digit a token of its own (the default; not with --tokenizer)"""
    val_fraction: float = 0.05
    """fraction of documents held out for validation (at least one)"""
    seed: int = 0
    """seed of the shuffle that picks the validation documents"""


def _default_out(cfg: PrepareArgs) -> Path:
    name = "brown" if cfg.source in (None, "brown") else Path(cfg.source).stem or "data"
    suffix = (f"v{cfg.vocab_size}{'-split-digits' if cfg.split_digits is not False else ''}"
              if cfg.tokenizer is None else Path(cfg.tokenizer).stem)
    return picochat_home() / "data" / f"{name}-{suffix}"


def prepare(args: argparse.Namespace) -> None:
    cfg = dataclass_from_args(PrepareArgs, args)
    if cfg.tokenizer is not None and (cfg.split_digits is not None or cfg.vocab_size is not None):
        raise PicochatError("--vocab-size and --split-digits / --no-split-digits choose how a new tokenizer is "
                            "trained; with --tokenizer the given tokenizer decides; drop one of them")
    cfg.vocab_size = cfg.vocab_size or 8192
    out = Path(cfg.out) if cfg.out else _default_out(cfg)
    prepare_dataset(cfg.source, out, cfg.tokenizer, cfg.vocab_size, cfg.val_fraction, cfg.seed,
                    split_digits=cfg.split_digits is not False)
    meta = load_meta(out)
    print(f"{'split':<6} {'documents':>10} {'tokens':>12} {'bytes':>12} {'bytes/token':>12}")
    for split in ("train", "val"):
        tokens, n_bytes = meta[f"{split}_tokens"], meta[f"{split}_bytes"]
        print(f"{split:<6} {meta[f'{split}_documents']:>10,} {tokens:>12,} {n_bytes:>12,} "
              f"{n_bytes / max(tokens, 1):>12.2f}")
    print(f"wrote {out} (vocab {meta['vocab_size']:,}, {meta['dtype']}, "
          f"tokenizer {meta['tokenizer_fingerprint']})")


@dataclass
class ChatDataArgs:
    list: bool = False
    """show every chat set: name, size of its train and test splits, availability, description"""
    data: str | None = None
    """a mixture spec: comma-separated NAME[:N], e.g. arithmetic:20000,chatterbot,identity:500,my.jsonl"""
    split: Literal["train", "test"] = "train"
    """train, or test: the held-out split of generated tasks (and of chatterbot/python_faq)"""
    seed: int = 0
    """seed of the sampling and the shuffle"""
    out: str | None = None
    """write the conversations here as JSONL ({"messages": [...]} per line)"""
    strict: bool = False
    """stop at the first bad conversation instead of skipping it"""
    show: int = 0
    """print this many conversations of the mixture"""


def chat_data(args: argparse.Namespace) -> None:
    from .chat_data import list_sets, load_mixture, write_jsonl
    cfg = dataclass_from_args(ChatDataArgs, args)
    if cfg.list:
        print(f"{'name':<15} {'train':>10} {'test':>9}  {'available':<9}  description")
        for r in list_sets():
            size = lambda v: "-" if v is None else f"{v:,}"  # noqa: E731
            print(f"{r['name']:<15} {size(r['size']):>10} {size(r['test_size']):>9}  "
                  f"{'yes' if r['available'] else 'no':<9}  {r['description']}")
        return
    if not cfg.data:
        raise PicochatError("name the data: --data arithmetic:20000,chatterbot,my.jsonl "
                            "(or --list to see the sets)")
    conversations, report = load_mixture(cfg.data, split=cfg.split, seed=cfg.seed, strict=cfg.strict)
    for conv in conversations[:cfg.show]:
        for m in conv:
            print(f"[{m['role']}] {m['content']}")
        print()
    for name, count in report["sets"].items():
        print(f"{name:<30} {count:>8,} conversations")
    print(f"{'total':<30} {len(conversations):>8,}   skipped {report['skipped']:,}")
    for p in report["problems"][:20]:
        print(f"  skipped {p}")
    if len(report["problems"]) > 20:
        print(f"  ... and {len(report['problems']) - 20} more")
    if cfg.out:
        print(f"wrote {write_jsonl(conversations, cfg.out)}")


@dataclass
class PairsArgs:
    model: str = ""
    """The SFT model whose answers are sampled and judged (a run, checkpoint, smollm2 or .gguf)."""
    tasks: str = "addition2"
    """Checkable tasks (comma-separated; `picochat data chat --list`) whose questions are asked."""
    questions: int = 1000
    """Questions per task."""
    split: str = "train"
    """Which split's questions: train (for training) or test (held-out pairs, never trained on)."""
    samples: int = 4
    """Answers sampled per question."""
    temperature: float = 1.0
    """Sampling temperature of those answers."""
    max_tokens: int = 64
    """Longest sampled answer (an answer cut here is never a pair's rejected one: it did not end)."""
    pairs_per_question: int = 2
    """Pairs kept per question: the model's wrong answers first, then truncated / rambling / off-topic ones."""
    reference: bool = False
    """For a question none of the samples got right, pair the task's reference answer (default: skip it)."""
    seed: int = 0
    """Seed of the questions and of the sampling."""
    out: str = "pairs.jsonl"
    """Where to write the pairs (JSONL, trl's conversational preference format; written atomically)."""

    def __post_init__(self):
        if not self.model:
            raise PicochatError("name the model whose answers to judge: picochat data pairs MODEL --tasks addition2")
        if self.split not in ("train", "test"):
            raise PicochatError(f"--split must be train or test, got {self.split!r}")
        if not 0 < self.temperature <= 5:
            raise PicochatError(f"--temperature must be in (0, 5], got {self.temperature}")
        if not [t for t in self.tasks.split(",") if t.strip()]:
            raise PicochatError("--tasks is empty: name checkable tasks, e.g. --tasks addition2")
        if self.max_tokens < 1:
            raise PicochatError(f"--max-tokens must be at least 1, got {self.max_tokens}")


def pairs(args: argparse.Namespace) -> None:
    import json
    import time
    import torch
    from ..chat_template import pick_template
    from ..checkpoints.io import load_model
    from ..fsutil import atomic_write
    from .honest_pairs import honest_pairs
    cfg = dataclass_from_args(PairsArgs, args)
    model, tokenizer, _ = load_model(cfg.model)
    if tokenizer is None:
        raise PicochatError(f"{cfg.model} has no tokenizer.json; it cannot answer questions")
    model.eval()
    t0 = time.time()
    with torch.inference_mode():
        rows, report = honest_pairs(model, tokenizer, pick_template(tokenizer),
                                    [t.strip() for t in cfg.tasks.split(",") if t.strip()], cfg.questions,
                                    samples=cfg.samples, split=cfg.split, seed=cfg.seed,
                                    temperature=cfg.temperature, max_tokens=cfg.max_tokens,
                                    pairs_per_question=cfg.pairs_per_question, reference=cfg.reference)
    atomic_write(cfg.out, "".join(json.dumps(r) + "\n" for r in rows))
    print(f"{report['questions']:,} questions x {cfg.samples} samples in {time.time() - t0:.0f}s: "
          f"{report['sampled_correct'] / max(report['samples'], 1):.1%} of the samples correct; "
          f"{report['pairs']:,} pairs ({', '.join(f'{k} {v}' for k, v in report['kinds'].items())}); "
          f"chosen from the model's own answers for {report['chosen_model']:,} questions, from their right "
          f"starts for {report['chosen_edited']:,}"
          + (f", the reference for {report['chosen_reference']:,}" if cfg.reference else
             f"; {report['skipped_no_right_answer']:,} questions without a right answer skipped") + f" -> {cfg.out}")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("data", help="prepare pretraining shards and chat data", description=__doc__)
    sub = p.add_subparsers(dest="data_command", metavar="<command>", required=True)
    pp = sub.add_parser("prepare", help="tokenize a corpus into train.bin / val.bin",
                        description="Split a corpus by document, tokenize it, and write train.bin, val.bin, "
                                    "tokenizer.json and meta.json.")
    add_dataclass_args(pp, PrepareArgs, positional=("source",))
    pp.set_defaults(func=prepare)
    pc = sub.add_parser("chat", help="list chat sets, or write a mixture of them as JSONL",
                        description="Chat conversations in OpenAI messages form: generated tasks with a "
                                    "held-out split, chatterbot-corpus, the Python FAQ and your JSONL files. "
                                    "Bad conversations are reported as path:line and skipped (or, with "
                                    "--strict, rejected).")
    add_dataclass_args(pc, ChatDataArgs)
    pc.set_defaults(func=chat_data)
    pr = sub.add_parser("pairs", help="honest preference pairs: a model's answers to checkable questions, judged",
                        description=__import__("picochat.data.honest_pairs", fromlist=["x"]).__doc__.split("\n\n")[0])
    add_dataclass_args(pr, PairsArgs, positional=("model",))
    pr.set_defaults(func=pairs)
