"""`picochat eval MODEL [--tasks a,b]`: exact-match accuracy on the held-out chat tasks and chat bits per byte.

MODEL is smollm2, a .gguf file, or a picochat checkpoint or run directory; every model gets the same
questions, the same greedy decoding and the same answer rule (picochat/eval/chat_eval.py), so the
numbers compare across models. Prints a table; --out also writes the full results (with example
replies) as JSON.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Literal, Optional

from ..cli_args import add_dataclass_args, dataclass_from_args
from ..errors import PicochatError
from .chat_eval import DEFAULT_BPB_DATA


@dataclass
class EvalConfig:
    model: str = ""
    """smollm2, a .gguf file, or a picochat checkpoint or run directory."""
    tasks: Optional[str] = None
    """Comma-separated task names (default: every task with an exact answer; `picochat data chat --list` shows them)."""
    n: int = 200
    """Held-out questions per task."""
    seed: int = 0
    """Seed of the held-out questions (the same seed gives the same questions for every model)."""
    max_tokens: int = 32
    """Longest reply, in tokens; a reply cut off here is scored as it stands."""
    batch_size: int = 32
    """Questions generated together (left-padded batches through the engine)."""
    bpb_data: str = DEFAULT_BPB_DATA
    """Chat mixture whose held-out split scores bits per byte ("" or none: skip)."""
    out: Optional[str] = None
    """Write the results as JSON here (default: print the table only)."""
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 where the CPU runs it natively (about 2x faster), else fp32; fp32 for reference numbers."""
    device: str = "auto"
    """cpu, cuda, mps or auto."""


def run(cfg: EvalConfig, out=None) -> dict:
    from ..fsutil import atomic_write
    from .chat_eval import evaluate, format_table
    out = out or sys.stdout
    if not cfg.model:
        raise PicochatError("name a model: picochat eval smollm2 (or a .gguf file, or a checkpoint directory)")
    tasks = None if cfg.tasks is None else [t.strip() for t in cfg.tasks.split(",") if t.strip()]
    bpb = None if cfg.bpb_data.strip().lower() in ("", "none") else cfg.bpb_data
    results = evaluate(cfg.model, tasks=tasks, n=cfg.n, seed=cfg.seed, max_tokens=cfg.max_tokens,
                       batch_size=cfg.batch_size, bpb_data=bpb, dtype=cfg.dtype, device=cfg.device)
    out.write(f"{cfg.model} ({results['template']} template, {results['dtype']}, {results['seconds']:.0f}s)\n")
    out.write(format_table(results) + "\n")
    if cfg.out:
        atomic_write(cfg.out, json.dumps(results, indent=2) + "\n")
        out.write(f"wrote {cfg.out}\n")
    out.flush()
    return results


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="accuracy on held-out chat tasks and chat bits per byte, for any model",
                       description=__doc__.split("\n\n")[0])
    add_dataclass_args(p, EvalConfig, positional=("model",))
    p.set_defaults(func=lambda args: run(dataclass_from_args(EvalConfig, args)) and 0)
