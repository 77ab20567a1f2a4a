"""``picochat data prepare``: text -> train.bin / val.bin token shards for pretraining."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from ..cli_args import add_dataclass_args, dataclass_from_args
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
    vocab_size: int = 8192
    """vocabulary size of the tokenizer to train (ignored with --tokenizer)"""
    val_fraction: float = 0.05
    """fraction of documents held out for validation (at least one)"""
    seed: int = 0
    """seed of the shuffle that picks the validation documents"""


def _default_out(cfg: PrepareArgs) -> Path:
    name = "brown" if cfg.source in (None, "brown") else Path(cfg.source).stem or "data"
    suffix = f"v{cfg.vocab_size}" if cfg.tokenizer is None else Path(cfg.tokenizer).stem
    return picochat_home() / "data" / f"{name}-{suffix}"


def prepare(args: argparse.Namespace) -> None:
    cfg = dataclass_from_args(PrepareArgs, args)
    out = Path(cfg.out) if cfg.out else _default_out(cfg)
    prepare_dataset(cfg.source, out, cfg.tokenizer, cfg.vocab_size, cfg.val_fraction, cfg.seed)
    meta = load_meta(out)
    print(f"{'split':<6} {'documents':>10} {'tokens':>12} {'bytes':>12} {'bytes/token':>12}")
    for split in ("train", "val"):
        tokens, n_bytes = meta[f"{split}_tokens"], meta[f"{split}_bytes"]
        print(f"{split:<6} {meta[f'{split}_documents']:>10,} {tokens:>12,} {n_bytes:>12,} "
              f"{n_bytes / max(tokens, 1):>12.2f}")
    print(f"wrote {out} (vocab {meta['vocab_size']:,}, {meta['dtype']}, "
          f"tokenizer {meta['tokenizer_fingerprint']})")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("data", help="prepare token shards for pretraining", description=__doc__)
    sub = p.add_subparsers(dest="data_command", metavar="<command>", required=True)
    pp = sub.add_parser("prepare", help="tokenize a corpus into train.bin / val.bin",
                        description="Split a corpus by document, tokenize it, and write train.bin, val.bin, "
                                    "tokenizer.json and meta.json.")
    add_dataclass_args(pp, PrepareArgs, positional=("source",))
    pp.set_defaults(func=prepare)
