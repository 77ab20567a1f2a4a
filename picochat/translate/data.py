"""The translation data: English number words -> French number words, written by num2words, held out by number.

    4207  ->  "four thousand, two hundred and seven"  ->  "quatre mille deux cent sept"

Every number in 0..max_number is one sentence pair. A fixed-seed shuffle of the numbers puts test_fraction of
them in the test set and val_fraction in the validation set; training never sees those numbers in any form,
so exact match on them measures whether the model learnt the rules (quatre-vingt-dix-sept = 4 * 20 + 10 + 7),
not the pairs.

Tokens are words, and the vocabularies are built from the training pairs (31 English words, 27 French plus
the hyphen). Words, not characters: a number is at most 7 English and 11 French words, against ~45 characters,
and a word-level model cannot misspell. The English side drops commas and hyphens ("ninety-nine" = "ninety
nine", as people type it); the French side keeps the hyphen as a token of its own, so "quatre-vingt-dix-sept"
is quatre - vingt - dix - sept: the decoder learns the four parts it shares with other numbers, and joining
the words back gives num2words' spelling exactly.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass

import torch

from ..errors import PicochatError

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIALS = (PAD, BOS, EOS)  # ids 0, 1, 2 in every vocabulary


def _num2words():
    try:
        from num2words import num2words
    except ImportError:
        raise PicochatError("the translator's data needs num2words: pip install num2words==0.5.14") from None
    return num2words


def english(n: int) -> str:
    return _num2words()(n, lang="en")


def french(n: int) -> str:
    return _num2words()(n, lang="fr")


def source_words(text: str) -> list[str]:
    """English text -> words: lowercase; commas and hyphens are spaces."""
    return re.sub(r"[,\-]", " ", text.lower()).split()


def target_words(text: str) -> list[str]:
    """French text -> words, the hyphen a word of its own: "vingt et un" -> vingt et un; "dix-sept" -> dix - sept."""
    return re.findall(r"[^\s-]+|-", text)


def join_target(words: list[str]) -> str:
    """The inverse of target_words: a hyphen glues its neighbours, other words are separated by a space."""
    out = ""
    for i, w in enumerate(words):
        out += w if (i == 0 or w == "-" or words[i - 1] == "-") else " " + w
    return out


class Vocab:
    """Words <-> ids; ids 0, 1, 2 are PAD, BOS, EOS. A word outside the vocabulary is refused, never mapped
    to an <unk>: the translator cannot translate a word it has never seen."""

    def __init__(self, words: list[str]):
        self.itos = list(SPECIALS) + sorted(set(words) - set(SPECIALS))
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    def unknown(self, words: list[str]) -> list[str]:
        return [w for w in dict.fromkeys(words) if w not in self.stoi]

    def check(self, words: list[str]) -> None:
        """Refuse the words outside the vocabulary, naming each once."""
        missing = self.unknown(words)
        if missing:
            raise PicochatError(f"unknown word{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}: "
                                f"the translator knows {' '.join(self.itos[len(SPECIALS):])}")

    def encode(self, words: list[str], bos: bool = False) -> list[int]:
        """ids of the words, then EOS (and BOS first, for the decoder's side)."""
        self.check(words)
        return ([self.stoi[BOS]] if bos else []) + [self.stoi[w] for w in words] + [self.stoi[EOS]]

    def decode(self, ids: list[int]) -> list[str]:
        return [self.itos[i] for i in ids if i >= len(SPECIALS)]


@dataclass
class Vocabs:
    source: Vocab
    target: Vocab
    shared: bool

    def to_json(self) -> str:
        return json.dumps({"source": self.source.itos, "target": self.target.itos, "shared": self.shared}, indent=1,
                          ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> "Vocabs":
        d = json.loads(text)
        src, tgt = Vocab([]), Vocab([])
        src.itos, tgt.itos = d["source"], d["target"]
        if tuple(src.itos[:3]) != SPECIALS or tuple(tgt.itos[:3]) != SPECIALS:
            raise PicochatError("vocab.json does not start with <pad> <bos> <eos>: not a translator vocabulary")
        src.stoi, tgt.stoi = ({w: i for i, w in enumerate(v.itos)} for v in (src, tgt))
        return cls(src, tgt, bool(d["shared"]))


def build_vocabs(pairs: list[tuple[str, str]], shared: bool) -> Vocabs:
    """Vocabularies from the (English, French) training pairs; shared: one vocabulary of both languages' words."""
    src = [w for en, _ in pairs for w in source_words(en)]
    tgt = [w for _, fr in pairs for w in target_words(fr)]
    if shared:
        both = Vocab(src + tgt)
        return Vocabs(both, both, True)
    return Vocabs(Vocab(src), Vocab(tgt), False)


def unseen_words(pairs: list[tuple[str, str]], vocabs: Vocabs) -> list[str]:
    """The words of the pairs outside the vocabularies, English first, each once (empty: all of them are known)."""
    return list(dict.fromkeys(vocabs.source.unknown([w for en, _ in pairs for w in source_words(en)])
                              + vocabs.target.unknown([w for _, fr in pairs for w in target_words(fr)])))


def split_numbers(max_number: int = 9999, test_fraction: float = 0.1, val_fraction: float = 0.05,
                  seed: int = 0) -> dict[str, list[int]]:
    """{"train", "val", "test"}: a fixed-seed shuffle of 0..max_number cut into three disjoint, sorted sets."""
    if max_number < 9:
        raise PicochatError(f"max_number must be at least 9 (the digits), got {max_number}")
    if not (0 < test_fraction < 1 and 0 <= val_fraction < 1 and test_fraction + val_fraction < 0.9):
        raise PicochatError(f"test_fraction {test_fraction} and val_fraction {val_fraction} must be fractions that "
                            "leave at least 10% of the numbers for training")
    numbers = list(range(max_number + 1))
    random.Random(seed).shuffle(numbers)
    n_test = max(1, round(test_fraction * len(numbers)))
    n_val = round(val_fraction * len(numbers))
    return {"test": sorted(numbers[:n_test]), "val": sorted(numbers[n_test:n_test + n_val]),
            "train": sorted(numbers[n_test + n_val:])}


def pairs_for(numbers: list[int]) -> list[tuple[str, str]]:
    return [(english(n), french(n)) for n in numbers]


class PairTensors:
    """Sentence pairs encoded once into two padded id matrices, src (N, S) and tgt (N, T) = [BOS] y [EOS] PAD..."""

    def __init__(self, pairs: list[tuple[str, str]], vocabs: Vocabs):
        self.pairs = pairs
        src = [vocabs.source.encode(source_words(en)) for en, _ in pairs]
        tgt = [vocabs.target.encode(target_words(fr), bos=True) for _, fr in pairs]
        self.src, self.tgt = pad_rows(src), pad_rows(tgt)

    def __len__(self) -> int:
        return len(self.pairs)

    def batch(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows idx, cut to their longest real source and target (less padding to compute on)."""
        src, tgt = self.src[idx], self.tgt[idx]
        return src[:, :int((src != 0).sum(1).max())], tgt[:, :int((tgt != 0).sum(1).max())]


def pad_rows(rows: list[list[int]]) -> torch.Tensor:
    out = torch.zeros(len(rows), max(map(len, rows), default=1), dtype=torch.long)  # PAD = 0
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def epoch_order(n: int, epoch: int, seed: int) -> list[int]:
    """A permutation of range(n) that depends only on (epoch, seed): batches are a pure function of the step,
    so a resumed run sees exactly the data it would have."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()
