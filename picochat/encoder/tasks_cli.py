"""``picochat tag MODEL TEXT...`` and ``picochat classify MODEL TEXT...``: a `picochat bert` model at work.

    picochat tag runs/bert-pos "The old man saw the boats in the harbour."
    The/DET old/ADJ man/NOUN saw/VERB the/DET boats/NOUN in/ADP the/DET harbour/NOUN ./.
    picochat classify runs/bert-genre "The committee voted 7-2 on Tuesday to approve the budget."
    press 0.91  (learned 0.05, general 0.03, fiction 0.01)

Text is split into words as the Brown corpus splits them (a contraction such as "don't" is one word,
punctuation its own). Tagging reads any length: a text longer than the model's rows is tagged in
pieces cut between words, every word once. Classification reads one passage and refuses one longer
than the model reads (as /v1/embeddings refuses it), rather than judge the beginning alone.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import torch

from ..cli_args import add_dataclass_args, dataclass_from_args
from ..errors import PicochatError

# abbreviations (U.S.), numbers (3.5, 1,000), words with inner apostrophes or hyphens, LaTeX quotes, dashes
WORD = re.compile(r"(?:[A-Za-z]\.){2,}|\d+(?:[.,:/]\d+)*|\w+(?:['’-]\w+)*|``|''|--|\.\.\.|[^\w\s]")


def words_of(text: str) -> list[str]:
    return WORD.findall(text)


@dataclass
class LabelConfig:
    model: str = ""
    """A `picochat bert pos` run for tag; a `picochat bert genre` or `picochat probe` run for classify (or a
    checkpoint folder)."""
    texts: list[str] = field(default_factory=list)
    """Texts to tag or classify."""
    json: bool = False
    """Print JSON instead of text."""


def _load(path: str, head: str, verb: str):
    from ..train.bert import load_bert_run
    model, tok, _ = load_bert_run(path)
    if model.task != head:
        kind = {"mlm": "masked-LM", "token": "tagging", "sequence": "classification"}[model.task]
        want = "pos" if head == "token" else "genre"
        raise PicochatError(f"{path} is a {kind} model; `picochat {verb}` needs a `picochat bert {want}` run")
    return model, tok


@torch.no_grad()
def tag(cfg: LabelConfig) -> list[list[tuple[str, str]]]:
    """[(word, tag), ...] per text; also prints them."""
    from ..train import bert_data as D
    if not cfg.texts:
        raise PicochatError('give a text: picochat tag runs/bert-pos "The old man saw the boats."')
    model, tok = _load(cfg.model, "token", "tag")
    out = []
    for text in cfg.texts:
        words = words_of(text)
        if not words:
            out.append([])
            continue
        rows = D.tagged_rows(tok, [[(w, "?") for w in words]], {"?": 0}, model.config.block_size)
        tags = []
        for ids, first in rows:  # first: 0 at each word's first piece, -100 elsewhere
            x = torch.tensor([ids])
            pred = model(x, torch.ones_like(x))[0].argmax(-1)  # (T,)
            tags += [model.labels[int(p)] for p, f in zip(pred, first) if f != D.IGNORE]
        out.append(list(zip(words, tags)))
    for pairs in out:
        print(json.dumps(pairs) if cfg.json else " ".join(f"{w}/{t}" for w, t in pairs))
    return out


@torch.no_grad()
def classify(cfg: LabelConfig) -> list[dict[str, float]]:
    """{label: probability} per text, most likely first; also prints them."""
    if not cfg.texts:
        raise PicochatError('give a text: picochat classify runs/bert-genre "The committee voted on Tuesday."')
    from ..train.genre_probe import Probe, is_probe
    if is_probe(cfg.model):  # a frozen pretrained encoder's layer + a linear classifier (`picochat probe`)
        probe = Probe(cfg.model)
        out = [probe(text, f"text {i}") for i, text in enumerate(cfg.texts)]
        _print_probs(out, cfg.json)
        return out
    model, tok = _load(cfg.model, "sequence", "classify")
    out = []
    for i, text in enumerate(cfg.texts):
        ids = tok.encode(text).ids
        if len(ids) > model.config.block_size:
            raise PicochatError(f"text {i} is {len(ids)} tokens; this model reads at most {model.config.block_size}: "
                                "classify a shorter passage")
        x = torch.tensor([ids])
        p = torch.softmax(model(x, torch.ones_like(x))[0].float(), -1)
        out.append({model.labels[j]: round(float(p[j]), 4) for j in p.argsort(descending=True).tolist()})
    _print_probs(out, cfg.json)
    return out


def _print_probs(out: list[dict[str, float]], as_json: bool) -> None:
    for probs in out:
        if as_json:
            print(json.dumps(probs))
        else:
            (best, pb), *rest = probs.items()
            print(f"{best} {pb:.2f}  (" + ", ".join(f"{k} {v:.2f}" for k, v in rest) + ")")


def add_parser(sub) -> None:
    import argparse
    for verb, fn, help_ in (("tag", tag, "part-of-speech tags (12 universal tags) with a `picochat bert pos` model"),
                            ("classify", classify, "genre of a passage with a `picochat bert genre` model")):
        p = sub.add_parser(verb, help=help_, description=__doc__.split("\n\n")[0],
                           epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
        add_dataclass_args(p, LabelConfig, positional=("model", "texts"))
        p.set_defaults(func=lambda args, fn=fn: fn(dataclass_from_args(LabelConfig, args)) and 0)
