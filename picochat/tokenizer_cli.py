"""``picochat tokenizer train|encode|show``: make a BPE tokenizer and look at what it does to text."""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass

from .cli_args import add_dataclass_args, dataclass_from_args
from .errors import PicochatError
from .tokenizer import Tokenizer


@dataclass
class TrainArgs:
    vocab_size: int = 8192
    """total number of token ids: 256 bytes + learned merges + 7 special tokens"""
    split_digits: bool = True
    """every digit a token of its own (Llama's and SmolLM2's choice); --no-split-digits keeps GPT-2's runs"""
    out: str = "tokenizer.json"
    """where to write the tokenizer (Hugging Face tokenizer.json format)"""


@dataclass
class EncodeArgs:
    text: str | None = None
    """the text to encode; if omitted, read standard input"""
    tokenizer: str = "gpt2"
    """a tokenizer.json, a folder holding one, or gpt2"""
    json: bool = False
    """print a JSON list instead of space-separated ids"""
    special: bool = False
    """let special-token strings in the text (e.g. <|endoftext|>) become their special ids"""


@dataclass
class ShowArgs:
    text: str | None = None
    """the text to show; if omitted, read standard input"""
    tokenizer: str = "gpt2"
    """a tokenizer.json, a folder holding one, or gpt2"""
    color: bool = True
    """mark tokens with alternating background colours (off when stdout is not a terminal)"""
    special: bool = False
    """let special-token strings in the text (e.g. <|endoftext|>) become their special ids"""


def train(args: argparse.Namespace) -> None:
    from .data.corpus import load_documents

    cfg = dataclass_from_args(TrainArgs, args)
    docs = [doc for source in (args.inputs or [None]) for doc in load_documents(source)]
    t0 = time.time()
    tok = Tokenizer.train(docs, cfg.vocab_size, split_digits=cfg.split_digits)
    seconds = time.time() - t0
    path = tok.save(cfg.out)
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    n_tokens = sum(map(len, tok.encode_batch(docs)))
    what = "the Brown corpus" if not args.inputs else ", ".join(args.inputs)
    print(f"trained a {tok.vocab_size:,}-token BPE on {what}: {len(docs):,} documents, "
          f"{n_bytes / 1e6:.2f} MB, in {seconds:.2f} s")
    if tok.vocab_size < cfg.vocab_size:
        print(f"note: the text ran out of pairs to merge before reaching {cfg.vocab_size:,} tokens")
    print(f"compression: {n_bytes / max(n_tokens, 1):.2f} bytes/token ({n_tokens:,} tokens)")
    print(f"saved {path} (fingerprint {tok.fingerprint()})")


def _read_text(text: str | None) -> str:
    if text is not None:
        return text
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PicochatError(f"standard input is not UTF-8 (byte offset {e.start}); "
                            f"convert it with `iconv -t utf-8`") from None


def encode(args: argparse.Namespace) -> None:
    cfg = dataclass_from_args(EncodeArgs, args)
    tok = Tokenizer.load(cfg.tokenizer)
    ids = tok.encode(_read_text(cfg.text), allowed_special="all" if cfg.special else frozenset())
    print(json.dumps(ids) if cfg.json else " ".join(map(str, ids)))


BACKGROUNDS = (153, 223, 194, 217, 189)  # light blue, yellow, green, pink, lavender (xterm-256)


def segments(tok: Tokenizer, ids: list[int]) -> list[str]:
    """The text of each token; tokens that split a multi-byte character are shown together."""
    out, pending = [], b""
    for i in ids:
        pending += tok.token_bytes(i)
        try:
            out.append(pending.decode("utf-8"))
            pending = b""
        except UnicodeDecodeError as e:
            if e.reason != "unexpected end of data":  # not a cut character: give up on it
                out.append(pending.decode("utf-8", errors="replace"))
                pending = b""
    if pending:
        out.append(pending.decode("utf-8", errors="replace"))
    return out


def show(args: argparse.Namespace) -> None:
    cfg = dataclass_from_args(ShowArgs, args)
    tok = Tokenizer.load(cfg.tokenizer)
    text = _read_text(cfg.text)
    ids = tok.encode(text, allowed_special="all" if cfg.special else frozenset())
    parts = segments(tok, ids)
    if cfg.color and sys.stdout.isatty():
        painted = []
        for k, part in enumerate(parts):
            bg = f"\x1b[48;5;{BACKGROUNDS[k % len(BACKGROUNDS)]}m\x1b[30m"
            # colour each line separately so a background never runs on past a newline
            painted.append("\n".join(f"{bg}{line}\x1b[0m" if line else "" for line in part.split("\n")))
        print("".join(painted))
    else:
        print("|".join(parts))
    n_bytes = len(text.encode("utf-8", errors="surrogatepass"))
    print(f"{len(ids):,} tokens, {len(text):,} characters, {n_bytes:,} bytes "
          f"({n_bytes / max(len(ids), 1):.2f} bytes/token) with {cfg.tokenizer}")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("tokenizer", help="train a BPE tokenizer, encode text, show token boundaries",
                              description=__doc__)
    sub = p.add_subparsers(dest="tokenizer_command", metavar="<command>", required=True)

    t = sub.add_parser("train", help="train a byte-level BPE tokenizer",
                       description="Train a byte-level BPE (GPT-2 pre-tokenization) with Hugging Face tokenizers.")
    t.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="text files, folders or .jsonl files with a \"text\" field "
                        "(default: the embedded Brown corpus)")
    add_dataclass_args(t, TrainArgs)
    t.set_defaults(func=train)

    e = sub.add_parser("encode", help="print the token ids of a text", description="Print the token ids of a text.")
    add_dataclass_args(e, EncodeArgs, positional=("text",))
    e.set_defaults(func=encode)

    s = sub.add_parser("show", help="print a text with its token boundaries marked",
                       description="Print a text with token boundaries marked by colour (or '|').")
    add_dataclass_args(s, ShowArgs, positional=("text",))
    s.set_defaults(func=show)
