"""Byte-level BPE: train with Hugging Face ``tokenizers``, encode and decode with ``tiktoken``.

A tokenizer here is three things: the pre-tokenization regex (GPT-2's), the *ranks* (every
ordinary token's bytes -> id, where the id is also the merge priority), and the special tokens.
Training uses HF ``tokenizers`` (Rust, ~1 s for Brown at 8192); encoding uses ``tiktoken`` built
from the same ranks, which is 3-10x faster than HF and gives the same ids (tests check both).

Id layout of a tokenizer trained here (GPT-2's own file keeps GPT-2's ids)::

    0..255            the 256 single bytes, id == byte value, so any UTF-8 text is encodable
    256..V-1-S        merges, in the order training learned them (id == rank == priority)
    V-S..V-1          the S special tokens, <|endoftext|> first

Special-token strings typed in plain text are encoded as ordinary text; only
``encode(..., allowed_special=...)`` (the chat template) can produce their ids.
``save`` writes a Hugging Face ``tokenizer.json``, so ``tokenizers`` / ``transformers`` read it.
"""
from __future__ import annotations

import hashlib
import json
import lzma
import os
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import AbstractSet, Iterable, Literal, Sequence

import tiktoken

from .errors import PicochatError
from .fsutil import atomic_write

EOT = "<|endoftext|>"
SPECIAL_TOKENS = [EOT, "<|system_start|>", "<|system_end|>", "<|user_start|>", "<|user_end|>",
                  "<|assistant_start|>", "<|assistant_end|>"]
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# GPT-2's regex with every digit a pre-token of its own (as Llama and SmolLM2 do): "1234" is always the
# same four tokens, never "12"+"34" or " 123"+"4", so a model sees the place value of each digit.
# README ("The digit question") has the measurement that made this picochat's default.
DIGITS_PATTERN = GPT2_PATTERN.replace(" ?\\p{N}+", "\\p{N}")


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, used by vocab.bpe / tokenizer.json to spell bytes."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@lru_cache(maxsize=1)
def _unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def _spell(b: bytes) -> str:
    table = bytes_to_unicode()
    return "".join(table[x] for x in b)


def _unspell(s: str, where: str) -> bytes:
    try:
        table = _unicode_to_bytes()
        return bytes(table[c] for c in s)
    except KeyError:
        raise PicochatError(f"{where}: token {s!r} is not byte-level BPE; only byte-level "
                            f"(GPT-2 style) tokenizers are supported") from None


def valid_unicode(text: str) -> str:
    """``text`` with lone surrogates (which UTF-8 cannot hold) replaced by U+FFFD, as tiktoken does."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


class Tokenizer:
    """An immutable byte-level BPE tokenizer (see the module docstring for the id layout)."""

    def __init__(self, ranks: dict[bytes, int], special_tokens: dict[str, int],
                 merges: Sequence[tuple[bytes, bytes]], pattern: str = GPT2_PATTERN, name: str = "picochat"):
        if set(ranks.values()) & set(special_tokens.values()):
            raise PicochatError(f"{name}: a special token shares its id with an ordinary token")
        self.ranks = ranks
        self.merges = list(merges)
        self.pattern = pattern
        self.name = name
        self._special = dict(special_tokens)
        self._enc = tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks,
                                      special_tokens=self._special)

    # ---------------------------------------------------------------- construction
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int,
              special_tokens: list[str] = SPECIAL_TOKENS, split_digits: bool = True) -> "Tokenizer":
        """Learn ``vocab_size - 256 - len(special_tokens)`` merges from ``texts``.

        The result may be smaller than ``vocab_size`` if the text runs out of pairs to merge.
        <|endoftext|> is always a special token (it separates documents). ``split_digits``: every digit
        is its own token (DIGITS_PATTERN); False keeps GPT-2's regex, which merges runs of digits.
        """
        from tokenizers import Regex, Tokenizer as HFTokenizer, models, pre_tokenizers, trainers

        specials = list(dict.fromkeys([EOT, *special_tokens]))
        minimum = 256 + len(specials)
        if vocab_size < minimum:
            raise PicochatError(f"vocab size {vocab_size} is too small: it must hold 256 byte tokens and "
                                f"{len(specials)} special tokens; use --vocab-size {minimum} or more")
        pattern = DIGITS_PATTERN if split_digits else GPT2_PATTERN
        hf = HFTokenizer(models.BPE())
        if split_digits:
            hf.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        else:
            hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(specials), show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        hf.train_from_iterator((valid_unicode(t) for t in texts), trainer)
        learned = json.loads(hf.to_str())["model"]["merges"]
        ranks = {bytes([b]): b for b in range(256)}
        merges = []
        for a, b in learned:
            pair = (_unspell(a, "trained"), _unspell(b, "trained"))
            merges.append(pair)
            ranks.setdefault(pair[0] + pair[1], len(ranks))
        return cls(ranks, {s: len(ranks) + i for i, s in enumerate(specials)}, merges, pattern)

    @classmethod
    def from_gpt2_files(cls, encoder_json_path: str | Path, vocab_bpe_path: str | Path) -> "Tokenizer":
        """OpenAI's GPT-2 tokenizer from its two files (encoder.json: token -> id, vocab.bpe: merges)."""
        return cls._from_gpt2_text(Path(encoder_json_path).read_text("utf-8"),
                                   Path(vocab_bpe_path).read_text("utf-8"), str(encoder_json_path))

    @classmethod
    def _from_gpt2_text(cls, encoder_json: str, vocab_bpe: str, where: str) -> "Tokenizer":
        try:
            encoder = json.loads(encoder_json)
        except json.JSONDecodeError as e:
            raise PicochatError(f"{where} is not valid JSON ({e}); expected GPT-2's encoder.json") from None
        specials = {t: i for t, i in encoder.items() if t.startswith("<|") and t.endswith("|>")}
        ranks = {_unspell(t, where): i for t, i in encoder.items() if t not in specials}
        merges = [tuple(_unspell(x, where) for x in line.split(" "))
                  for line in vocab_bpe.splitlines()[1:] if line]
        return cls(ranks, specials, merges, GPT2_PATTERN, name="gpt2")

    @classmethod
    def gpt2(cls) -> "Tokenizer":
        """The real GPT-2 tokenizer (50,257 ids, <|endoftext|> = 50256), from files in this package."""
        return _gpt2()

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """Read a Hugging Face tokenizer.json (a file, or a folder holding one), or the name "gpt2"."""
        if str(path) == "gpt2":
            return cls.gpt2()
        path = Path(path).expanduser()
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise PicochatError(f"no tokenizer at {path}; train one with `picochat tokenizer train "
                                f"--out {path}`, or use `gpt2`")
        try:
            spec = json.loads(path.read_text("utf-8"))
            model = spec["model"]
            if model.get("type", "BPE") != "BPE":
                raise PicochatError(f"{path} holds a {model['type']} model; only BPE tokenizers are supported")
            added = {t["content"]: t["id"] for t in spec.get("added_tokens") or []}
            vocab, raw_merges = model["vocab"], model["merges"]
            pattern = _pattern_from_pretokenizer(spec.get("pre_tokenizer"), path)
            if spec.get("normalizer"):
                raise PicochatError(f"{path} uses a normalizer, which picochat does not support")
        except (ValueError, KeyError, TypeError, AttributeError) as e:  # JSONDecodeError is a ValueError
            raise PicochatError(f"{path} is not a valid tokenizer.json ({type(e).__name__}: {e}); "
                                f"retrain it with `picochat tokenizer train`") from None
        specials = {t: i for t, i in added.items()}
        ranks = {_unspell(t, str(path)): i for t, i in vocab.items() if t not in added}
        merges = [tuple(_unspell(x, str(path)) for x in (m.split(" ") if isinstance(m, str) else m))
                  for m in raw_merges]
        _check_merge_order(ranks, merges, path)
        return cls(ranks, specials, merges, pattern, name=path.stem)

    def add_special_tokens(self, tokens: Iterable[str]) -> "Tokenizer":
        """A copy with the missing ``tokens`` appended as new special ids (e.g. chat tokens for GPT-2)."""
        specials = dict(self._special)
        for t in tokens:
            specials.setdefault(t, max(self.vocab_size, max(specials.values(), default=-1) + 1))
        return Tokenizer(self.ranks, specials, self.merges, self.pattern, self.name)

    # ---------------------------------------------------------------- persistence
    def to_hf_json(self) -> dict:
        """This tokenizer as a Hugging Face tokenizer.json document."""
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
        if self.pattern == GPT2_PATTERN:
            pre = byte_level
        else:
            pre = {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": self.pattern}, "behavior": "Isolated", "invert": False},
                {**byte_level, "use_regex": False}]}
        added = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                  "normalized": False, "special": True} for s, i in sorted(self._special.items(), key=lambda x: x[1])]
        return {
            "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": None, "pre_tokenizer": pre,
            "post_processor": {**byte_level, "trim_offsets": False},
            "decoder": byte_level,
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      # tiktoken takes a pre-token that is itself a token whole; tell HF to do the same
                      "ignore_merges": True,
                      "vocab": {_spell(b): i for b, i in sorted(self.ranks.items(), key=lambda x: x[1])},
                      "merges": [[_spell(a), _spell(b)] for a, b in self.merges]},
        }

    def to_hf(self):
        """A ``tokenizers.Tokenizer`` equivalent to this one (slower; for interop and tests)."""
        from tokenizers import Tokenizer as HFTokenizer
        return HFTokenizer.from_str(json.dumps(self.to_hf_json()))

    def save(self, path: str | Path) -> Path:
        """Write tokenizer.json atomically (``path`` is the file, or a folder to put it in)."""
        path = Path(path).expanduser()
        if path.is_dir():
            path = path / "tokenizer.json"
        atomic_write(path, json.dumps(self.to_hf_json(), ensure_ascii=False).encode("utf-8"))
        return path

    def fingerprint(self) -> str:
        """16 hex digits identifying the ids this tokenizer produces (regex, ranks, specials)."""
        if not hasattr(self, "_fingerprint"):
            h = hashlib.sha256(self.pattern.encode())
            for b, i in sorted(self.ranks.items(), key=lambda x: x[1]):
                h.update(b"%d:%s;" % (i, b.hex().encode()))
            for s, i in sorted(self._special.items(), key=lambda x: x[1]):
                h.update(b"special %d:%s;" % (i, s.encode()))
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    # ---------------------------------------------------------------- encode / decode
    def encode(self, text: str, allowed_special: Literal["all"] | AbstractSet[str] = frozenset()) -> list[int]:
        """Text -> ids. Special-token strings are ordinary text unless listed in ``allowed_special``.

        Lone surrogates (not encodable as UTF-8, e.g. "a\\ud800b") are replaced with U+FFFD.
        """
        if not allowed_special:
            return self._enc.encode_ordinary(text)
        return self._enc.encode(text, allowed_special=self._allowed(allowed_special), disallowed_special=())

    def encode_batch(self, texts: Sequence[str], num_threads: int = 0,
                     allowed_special: Literal["all"] | AbstractSet[str] = frozenset()) -> list[list[int]]:
        """``encode`` over many texts on ``num_threads`` threads (0: one per CPU, at most 8)."""
        threads = num_threads or min(8, os.cpu_count() or 1)
        if not allowed_special:
            return self._enc.encode_ordinary_batch(list(texts), num_threads=threads)
        return self._enc.encode_batch(list(texts), num_threads=threads,
                                      allowed_special=self._allowed(allowed_special), disallowed_special=())

    def _allowed(self, allowed: Literal["all"] | AbstractSet[str]) -> AbstractSet[str]:
        if allowed == "all":
            return set(self._special)
        unknown = set(allowed) - set(self._special)
        if unknown:
            raise ValueError(f"not special tokens of this tokenizer: {sorted(unknown)}")
        return set(allowed)

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        if hasattr(ids, "tolist"):  # numpy arrays and torch tensors
            ids = ids.tolist()
        try:
            return self._enc.decode_bytes(ids)
        except (KeyError, OverflowError, TypeError):
            valid = set(self.ranks.values()) | set(self._special.values())
            bad = next((i for i in ids if not isinstance(i, int) or i not in valid), ids)
            raise PicochatError(f"token id {bad} is not in this tokenizer (vocab size {self.vocab_size}); "
                                f"was it made with a different tokenizer?") from None

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text. Byte sequences that are not valid UTF-8 (a cut multi-byte character)
        become U+FFFD instead of raising, as ``bytes.decode(errors="replace")`` does."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, id: int) -> bytes:
        return self.decode_bytes([id])

    def id_to_token(self, id: int) -> str:
        """A special token's name, or an ordinary token's text (U+FFFD for a partial character)."""
        return self.token_bytes(id).decode("utf-8", errors="replace")

    def token_to_id(self, token: str) -> int:
        """The id of a special token, or of a string that is exactly one ordinary token."""
        if token in self._special:
            return self._special[token]
        try:
            return self._enc.encode_single_token(token)
        except KeyError:
            raise KeyError(f"{token!r} is not a single token of this tokenizer") from None

    @property
    def vocab_size(self) -> int:
        """One more than the largest id (the size of a model's embedding table)."""
        return self._enc.max_token_value + 1

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special)

    @property
    def eot_id(self) -> int:
        """<|endoftext|>: separates documents in pretraining data and starts every sequence."""
        if EOT not in self._special:
            raise PicochatError(f"tokenizer {self.name} has no {EOT} token; picochat needs one to separate documents")
        return self._special[EOT]

    def __repr__(self) -> str:
        return (f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size}, "
                f"specials={len(self._special)}, fingerprint={self.fingerprint()})")


@lru_cache(maxsize=1)
def _gpt2() -> Tokenizer:
    folder = resources.files("picochat.assets").joinpath("gpt2")
    read = lambda name: lzma.decompress(folder.joinpath(name).read_bytes()).decode("utf-8")  # noqa: E731
    return Tokenizer._from_gpt2_text(read("encoder.json.xz"), read("vocab.bpe.xz"), "picochat/assets/gpt2")


def _pattern_from_pretokenizer(pre: dict | None, where: Path) -> str:
    """The split regex of a byte-level pre-tokenizer, which tiktoken needs as ``pat_str``."""
    unsupported = PicochatError(f"{where}: unsupported pre_tokenizer {json.dumps(pre)[:120]}; picochat reads "
                                f"ByteLevel(use_regex) or Sequence[Split(Regex), ByteLevel] byte-level BPE")
    if not pre:
        raise unsupported
    if pre["type"] == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return GPT2_PATTERN
    if pre["type"] == "Sequence":
        parts = pre["pretokenizers"]
        if (len(parts) == 2 and parts[0]["type"] == "Split" and "Regex" in parts[0]["pattern"]
                and parts[0].get("behavior") == "Isolated" and not parts[0].get("invert")
                and parts[1]["type"] == "ByteLevel" and not parts[1].get("use_regex", True)
                and not parts[1].get("add_prefix_space")):
            return parts[0]["pattern"]["Regex"]
    raise unsupported


def _check_merge_order(ranks: dict[bytes, int], merges: list[tuple[bytes, ...]], where: Path) -> None:
    """tiktoken uses a token's id as its merge priority, so ids must follow the merge list."""
    seen: set[int] = set()
    last = -1
    for i, pair in enumerate(merges):
        if len(pair) != 2:
            raise PicochatError(f"{where}: merge #{i} {pair!r} is not a pair; the file is corrupt")
        rank = ranks.get(pair[0] + pair[1])
        if rank is None:
            raise PicochatError(f"{where}: merge #{i} makes a token missing from the vocab; the file is corrupt")
        if rank in seen:  # a second merge spelling the same token: tiktoken ranks it by the first
            continue
        if rank < last:
            raise PicochatError(f"{where}: token ids do not follow the merge order, which picochat's "
                                f"tiktoken encoder requires; re-save the tokenizer with ids in merge order")
        seen.add(rank)
        last = rank
