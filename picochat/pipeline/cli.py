"""`picochat pipeline`: tokenizer -> data -> pretrain -> SFT -> eval -> report card, resumable by stage."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..cli_args import add_dataclass_args, dataclass_from_args
from .run import STAGES, Pipeline, PipelineConfig


def pipeline(cfg: PipelineConfig, stages: tuple[str, ...] = STAGES) -> dict:
    """The plain-Python form of `picochat pipeline`; returns state.json's contents."""
    state = Pipeline(cfg).run(stages)
    if "report" in state["stages"]:
        print(Path(state["stages"]["report"]["markdown"]).read_text("utf-8"))
        print(f"chat with it: picochat chat {cfg.out_dir}/sft   (or picochat serve {cfg.out_dir}/sft)")
    return state


def add_parser(sub) -> None:
    from . import run
    p = sub.add_parser("pipeline", help="the whole recipe from scratch: tokenizer, pretrain, SFT, eval, report card",
                       description=run.__doc__.split("\n\n")[0], epilog="\n\n".join(run.__doc__.split("\n\n")[1:]),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(p, PipelineConfig)
    p.set_defaults(func=lambda args: pipeline(dataclass_from_args(PipelineConfig, args)) and 0)
