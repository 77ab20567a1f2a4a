"""Translate sentences, score exact match on held-out numbers, and draw where the decoder looks.

Exact match: the decoded French, joined back into text, equals num2words' spelling character for character.
The cross-attention map shows, for each French word the decoder wrote (rows), how much weight it put on each
English word (columns), averaged over heads, one panel per decoder layer.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import PicochatError
from ..model.seq2seq import Seq2Seq
from .data import BOS, EOS, Vocabs, join_target, pad_rows, source_words


def check_decoding(beam: int, length_penalty: float) -> None:
    """The decoding options, refused alike by `picochat translate` and `picochat translate train`."""
    if beam < 1:
        raise PicochatError(f"--beam must be at least 1, got {beam}")
    if length_penalty < 0:
        raise PicochatError(f"--length-penalty must be >= 0, got {length_penalty}")
    if beam == 1 and length_penalty != 1.0:  # 1.0: the default of both commands
        raise PicochatError("--length-penalty ranks beam search hypotheses; give --beam 2 or more too")


def encode_sources(vocabs: Vocabs, texts: list[str], device=None) -> torch.Tensor:
    """English sentences -> padded source ids (B, S); unknown words (of every sentence) are refused by name."""
    words = [source_words(t) for t in texts]
    vocabs.source.check([w for ws in words for w in ws])
    return pad_rows([vocabs.source.encode(ws) for ws in words]).to(device)


@torch.no_grad()
def translate_ids(model: Seq2Seq, src: torch.Tensor, beam: int = 1, length_penalty: float = 1.0) -> list[list[int]]:
    if beam == 1:
        return model.greedy(src)
    return model.beam_search(src, beam=beam, length_penalty=length_penalty)


def translate_texts(model: Seq2Seq, vocabs: Vocabs, texts: list[str], beam: int = 1, length_penalty: float = 1.0,
                    batch_size: int = 256) -> list[str]:
    """English number words -> French, in batches (greedy for beam=1, else beam search)."""
    device = next(model.parameters()).device
    vocabs.source.check([w for t in texts for w in source_words(t)])  # every unknown word, before any work
    out: list[str] = []
    for s in range(0, len(texts), batch_size):
        src = encode_sources(vocabs, texts[s:s + batch_size], device)
        out += [join_target(vocabs.target.decode(ids)) for ids in translate_ids(model, src, beam, length_penalty)]
    return out


def exact_match(model: Seq2Seq, vocabs: Vocabs, pairs: list[tuple[str, str]], beam: int = 1,
                length_penalty: float = 1.0) -> dict:
    """{"exact_match": fraction of pairs translated exactly, "errors": [{"source", "expected", "got"}, ...]}."""
    if not pairs:
        return {"exact_match": None, "errors": []}
    was_training = model.training
    model.eval()
    got = translate_texts(model, vocabs, [en for en, _ in pairs], beam, length_penalty)
    model.train(was_training)
    errors = [{"source": en, "expected": fr, "got": g} for (en, fr), g in zip(pairs, got) if g != fr]
    return {"exact_match": round(1 - len(errors) / len(pairs), 4), "errors": errors}


@torch.no_grad()
def cross_attention(model: Seq2Seq, vocabs: Vocabs, text: str) -> tuple[list[str], list[str], list[torch.Tensor]]:
    """Greedy-translate one sentence, then re-read it with the maps on: (source words, target words, per layer
    (T, S) weights averaged over heads); rows are the words the decoder produced, EOS included."""
    device = next(model.parameters()).device
    src = encode_sources(vocabs, [text], device)
    ids = model.greedy(src)[0]
    tgt = torch.tensor([[vocabs.target.stoi[BOS]] + ids + [vocabs.target.stoi[EOS]]], device=device)
    model.eval()
    model(src, tgt, return_weights=True)  # teacher forcing on its own output: the same steps, all at once
    maps = [w[0].mean(0).float().cpu() for w in model.cross_attention_maps()]  # (T, S) each
    return source_words(text) + [EOS], vocabs.target.decode(ids) + [EOS], maps


def plot_cross_attention(model: Seq2Seq, vocabs: Vocabs, text: str, out_png) -> Path:
    """A heat map per decoder layer: rows = French words produced, columns = English words read."""
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..fsutil import atomic_write
    src, tgt, maps = cross_attention(model, vocabs, text)
    fig, axes = plt.subplots(1, len(maps), figsize=(3.2 + 3.0 * len(maps), 2.4 + 0.32 * len(tgt)), squeeze=False)
    for i, (ax, w) in enumerate(zip(axes[0], maps)):
        ax.imshow(w.numpy(), cmap="viridis", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(src)), src, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(len(tgt)), tgt if i == 0 else [""] * len(tgt), fontsize=8)
        ax.set_title(f"decoder layer {i + 1}", fontsize=9)
    fig.suptitle(f"cross-attention (mean over heads): {text!r} -> {join_target(tgt[:-1])!r}", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write(out_png, buf.getvalue())
    return Path(out_png)
