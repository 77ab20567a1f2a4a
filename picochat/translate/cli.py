"""``picochat translate``: train the encoder-decoder translator, or translate English number words into French.

    picochat translate train --out-dir runs/translate            # ~3 min on 2 cores; --help lists every option
    picochat translate runs/translate "four thousand two hundred and seven" --beam 4
    -> quatre mille deux cent sept

MODEL is a run directory (its latest checkpoint) or a checkpoint folder. A folder literally named `train`
is written ./train. --beam 1 is greedy decoding.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field

from ..cli_args import add_dataclass_args, dataclass_from_args
from ..errors import PicochatError


@dataclass
class TranslateConfig:
    model: str = ""
    """A translator: the run directory of `picochat translate train`, or one of its checkpoint folders."""
    texts: list[str] = field(default_factory=list)
    """English number words to translate, e.g. "four thousand two hundred and seven" (one per argument)."""
    beam: int = 1
    """Beam width: 1 = greedy decoding, more = beam search."""
    length_penalty: float = 1.0
    """Beam search ranks hypotheses by score / length^length_penalty (0 = summed log-probs, 1 = per-token mean)."""
    json: bool = False
    """Print one JSON object {"source", "translation"} per text instead of the plain translation."""

    def __post_init__(self):
        from .evaluate import check_decoding
        check_decoding(self.beam, self.length_penalty)


def translate(cfg: TranslateConfig) -> list[str]:
    """The plain-Python form of `picochat translate MODEL TEXT...`: prints and returns the translations."""
    from .evaluate import translate_texts
    from .train import load_translator
    if not cfg.model:
        raise PicochatError('name a translator: picochat translate runs/translate "four thousand two hundred"')
    model, vocabs, _ = load_translator(cfg.model)  # a bad folder is refused before the texts are looked at
    texts = cfg.texts
    if not texts:
        raise PicochatError('give English number words to translate: picochat translate MODEL "twenty-one"')
    blank = [i + 1 for i, t in enumerate(texts) if not t.strip()]
    if blank:
        raise PicochatError(f"text {', '.join(map(str, blank))} is empty; "
                            'give English number words, e.g. "twenty-one"')
    out = translate_texts(model, vocabs, texts, beam=cfg.beam, length_penalty=cfg.length_penalty)
    for src, fr in zip(texts, out):
        print(json.dumps({"source": src, "translation": fr}, ensure_ascii=False) if cfg.json else fr)
    return out


def train(args) -> int:
    from .train import TranslateTrainConfig, translate_train
    results = translate_train(dataclass_from_args(TranslateTrainConfig, args))
    beam = next(k for k in results if k.startswith("beam"))
    print(f"held-out exact match on {results['test_numbers']} numbers: greedy {results['greedy_exact_match']:.2%}, "
          f"{beam.split('_')[0]} {results[beam]:.2%} (training {results['train_seconds']:.0f} s); "
          f"results.json and attention.png in {args.out_dir}")
    return 0


class _ModelOrCommand(argparse._SubParsersAction):
    """`translate train ...` is the training command; anything else is `translate MODEL TEXT...` (the "run" one)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if values and values[0] not in self._name_parser_map:
            values = ["run", *values]
        super().__call__(parser, namespace, values, option_string)


def add_parser(sub) -> None:
    from .train import TranslateTrainConfig
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("translate", help="the encoder-decoder translator: train it, or translate numbers to French",
                       description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1], formatter_class=fmt)
    cmds = p.add_subparsers(dest="translate_command", metavar="{train,MODEL}", required=True, action=_ModelOrCommand)
    cmds.choices = None  # the model folder is free text; _ModelOrCommand routes it to "run"
    t = cmds.add_parser("train", help="train a translator on English -> French number words (held out by number)",
                        description=__import__("picochat.translate.train", fromlist=["x"]).__doc__.split("\n\n")[0])
    add_dataclass_args(t, TranslateTrainConfig)
    t.set_defaults(func=train)
    r = cmds.add_parser("run", prog="picochat translate",
                        help="MODEL TEXT... : translate English number words with a trained translator",
                        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1], formatter_class=fmt)
    add_dataclass_args(r, TranslateConfig, positional=("model", "texts"))
    r.set_defaults(func=lambda args: translate(dataclass_from_args(TranslateConfig, args)) and 0)
