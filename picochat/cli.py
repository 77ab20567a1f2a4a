"""``picochat <verb> [model] ...``: one grammar for every stage of the pipeline.

Each verb lives in the module that does the work; that module exposes ``add_parser(subparsers)``
which registers its options and sets ``func`` (a plain Python function taking the parsed args).
Mistakes a user can fix raise ``PicochatError`` and are printed as one line, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from .errors import PicochatError

# verb -> module exposing add_parser(subparsers); order is the order in --help
VERBS = {
    "tokenizer": "picochat.tokenizer_cli",
    "data": "picochat.data.cli",
    "pretrain": "picochat.train.pretrain",
    "sft": "picochat.train.sft",
    "reward": "picochat.train.reward",
    "rlhf": "picochat.train.ppo",
    "dpo": "picochat.train.dpo",
    "bert": "picochat.train.bert",
    "probe": "picochat.train.genre_probe",
    "embed": "picochat.encoder.cli",
    "tag": "picochat.encoder.tasks_cli",  # and `classify`
    "translate": "picochat.translate.cli",
    "attention": "picochat.inspect.cli",
    "vision": "picochat.vision.cli",
    "vlm": "picochat.train.vlm",
    "generate": "picochat.generate",
    "import": "picochat.import_cli",
    "merge-lora": "picochat.train.lora_cli",
    "chat": "picochat.chat",
    "serve": "picochat.serve.cli",
    "feedback": "picochat.serve.feedback_cli",
    "eval": "picochat.eval.cli",
    "pipeline": "picochat.pipeline.cli",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="picochat",
        description="ChatGPT from first principles: tokenizer, transformer, training, chat.",
    )
    from . import __version__
    parser.add_argument("--version", action="version", version=f"picochat {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="<verb>", required=True)
    for module in VERBS.values():
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except PicochatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `picochat ... | head` should not print a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
