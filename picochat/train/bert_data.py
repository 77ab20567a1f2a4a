"""Data for the encoder tasks: a WordPiece vocabulary, masked-LM inputs, tagged sentences and labelled passages.

The vocabulary is cased (a capital says "name" to a tagger) and learned with HF `tokenizers` on the
training documents only. Sentences arrive already split into words (the corpus's own tokens): each
word becomes one or more WordPiece tokens, and a word's tag is predicted at its first piece (-100,
ignored by the loss, everywhere else), as Devlin et al. did for named entities.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

from ..errors import PicochatError

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4
PAD, UNK, CLS, SEP, MASK = range(5)
IGNORE = -100


def train_wordpiece(texts: Iterable[str], vocab_size: int = 8000):
    """A cased BERT WordPiece tokenizer ([CLS] text [SEP]) learned from texts."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                                            show_progress=False))
    if [tok.token_to_id(t) for t in SPECIALS] != list(range(len(SPECIALS))):
        raise PicochatError("the WordPiece trainer did not put the special tokens first")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", CLS), ("[SEP]", SEP)])
    tok.decoder = decoders.WordPiece()
    return tok


def word_pieces(tok, words: Sequence[str]) -> list[list[int]]:
    """The WordPiece ids of each word (at least one: a word the normaliser empties becomes [UNK])."""
    enc = tok.encode(list(words), is_pretokenized=True, add_special_tokens=False)
    pieces: list[list[int]] = [[] for _ in words]
    for token_id, w in zip(enc.ids, enc.word_ids):
        if w is not None:
            pieces[w].append(token_id)
    return [p or [UNK] for p in pieces]


def tagged_rows(tok, sentences: Iterable[Sequence[tuple[str, str]]], tag_index: dict[str, int], max_len: int
                ) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) rows, [CLS] ... [SEP] around each, packing consecutive sentences of a document so a
    word is tagged with its neighbours in view and no row is mostly padding. A sentence starts a new row
    when it does not fit in what is left; one longer than a row is cut between words. Every word is
    tagged exactly once."""
    rows, ids, labels = [], [], []

    def flush():
        if ids:
            rows.append(([CLS, *ids, SEP], [IGNORE, *labels, IGNORE]))
            ids.clear(), labels.clear()
    room = max_len - 2
    for sentence in sentences:
        pieces = [p[:room] for p in word_pieces(tok, [w for w, _ in sentence])]  # (a 100-piece "word" is noise)
        if len(ids) + sum(map(len, pieces)) > room:
            flush()
        for p, (_, tag) in zip(pieces, sentence):
            if len(ids) + len(p) > room:
                flush()
            ids.extend(p)
            labels.extend([tag_index[tag]] + [IGNORE] * (len(p) - 1))
    flush()
    return rows


def text_rows(tok, sentences: Iterable[Sequence[str]], max_len: int) -> list[list[int]]:
    """Consecutive sentences (lists of words) packed into rows of at most max_len ids, for masked-LM."""
    rows, cur, room = [], [], max_len - 2
    for sentence in sentences:
        ids = [t for p in word_pieces(tok, sentence) for t in p]
        if cur and len(cur) + len(ids) > room:
            rows.append([CLS, *cur, SEP])
            cur = []
        while len(ids) > room:  # a sentence longer than a row: whole rows of it, then the rest
            rows.append([CLS, *ids[:room], SEP])
            ids = ids[room:]
        cur += ids
    if cur:
        rows.append([CLS, *cur, SEP])
    return rows


def pad(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    T = max(len(r) for r in rows)
    out = torch.full((len(rows), T), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def mask_tokens(ids: torch.Tensor, vocab_size: int, gen: torch.Generator, p: float = 0.15
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's corruption: choose p of the real tokens; of those 80% become [MASK], 10% a random token, 10%
    stay. -> (inputs, targets), targets -100 except at chosen positions (the loss is only there)."""
    real = ids >= len(SPECIALS)
    chosen = (torch.rand(ids.shape, generator=gen) < p) & real
    targets = torch.where(chosen, ids, torch.full_like(ids, IGNORE))
    roll = torch.rand(ids.shape, generator=gen)
    inputs = torch.where(chosen & (roll < 0.8), torch.full_like(ids, MASK), ids)
    rand_tok = torch.randint(len(SPECIALS), vocab_size, ids.shape, generator=gen)
    inputs = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), rand_tok, inputs)
    return inputs, targets


class Batches:
    """Micro-batch (step, micro) of `rows` (pure in its arguments: exact resume), in epochs of fresh
    permutations (sft.SampleOrder); micro counts over grad_accum x world, as the Trainer passes it."""

    def __init__(self, n_rows: int, batch: int, micros_per_step: int, seed: int):
        from .sft import SampleOrder
        self.order, self.batch, self.micros = SampleOrder(n_rows, seed), batch, micros_per_step

    def indices(self, step: int, micro: int) -> list[int]:
        first = (step * self.micros + micro) * self.batch
        return [self.order(i) for i in range(first, first + self.batch)]
