"""Where pretraining text comes from: the embedded Brown corpus, or the user's own files.

Everything downstream (tokenizer training, train/val split, token shards) works on *documents*:
plain strings, split at natural boundaries so that a validation split never shares a document
with the training split. ``load_documents`` turns any supported source into such a stream:

- ``None`` / ``"brown"``: the 500 documents of the Brown corpus shipped in this package
  (see BROWN_NOTICE.md; rebuilt by scripts/build_brown_corpus.py)
- a ``.jsonl`` file: one document per line, from its ``"text"`` field
- any other file: read as UTF-8 text, cut at blank lines into chunks of about 20 KB, so even a
  single book can be split into train and val by chunk
- a folder: every file below it (sorted, recursive, hidden and binary files skipped), as above
"""
from __future__ import annotations

import json
import lzma
import re
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Iterator

from ..errors import PicochatError
from ..tokenizer import valid_unicode

BROWN_RESOURCE = "brown.jsonl.xz"
CHUNK_CHARS = 20_000  # target size of a document cut from a long text file
_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n")  # \r in the class so \r\n\r\n counts too


@lru_cache(maxsize=1)
def _brown() -> tuple[dict, ...]:
    raw = resources.files(__package__).joinpath(BROWN_RESOURCE).read_bytes()
    lines = lzma.decompress(raw).decode("utf-8").splitlines()
    return tuple(json.loads(line) for line in lines)


def brown_documents() -> list[dict]:
    """The embedded Brown corpus: 500 dicts {"id": "ca01", "genre": "news", "text": ...}."""
    return [dict(d) for d in _brown()]


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PicochatError(
            f"{path} is not UTF-8 text (invalid byte 0x{data[e.start]:02x} at byte offset {e.start}); "
            f"convert it first, e.g. `iconv -f latin1 -t utf-8 {path} > {path.stem}.utf8{path.suffix}`"
        ) from None


def split_text(text: str, chunk_chars: int = CHUNK_CHARS) -> list[str]:
    """Cut text at blank lines into documents of about ``chunk_chars`` characters each.

    Text between cuts is kept exactly (only blank lines at a cut and trailing whitespace go), so
    code and indentation survive. A chunk without any blank line stays whole, however long.
    """
    docs, start = [], 0
    for m in _BLANK_LINE.finditer(text):
        if m.start() - start >= chunk_chars:
            docs.append(text[start:m.start()])
            start = m.end()
    docs.append(text[start:])
    docs = [re.sub(r"\A(?:[ \t\r\f\v]*\n)+", "", d).rstrip() for d in docs]
    return [d for d in docs if d.strip()]


def _jsonl_documents(path: Path) -> Iterator[str]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise PicochatError(f"{path} line {lineno} is not UTF-8 (byte offset {e.start} in the line); "
                                    f"convert the file with `iconv -t utf-8`") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise PicochatError(f"{path} line {lineno} is not valid JSON ({e.msg}); "
                                    f"each line must be an object like {{\"text\": \"...\"}}") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise PicochatError(f"{path} line {lineno} has no string \"text\" field; "
                                    f"each line must be an object like {{\"text\": \"...\"}}")
            if record["text"].strip():  # JSON can spell lone surrogates ("\ud800"); UTF-8 cannot
                yield valid_unicode(record["text"])


def _file_documents(path: Path) -> Iterator[str]:
    if path.suffix.lower() == ".jsonl":
        yield from _jsonl_documents(path)
    else:
        yield from split_text(_read_text(path))


def _looks_binary(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\0" in f.read(8192)


def _folder_files(folder: Path) -> list[Path]:
    files = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).parts
        if p.is_file() and not any(part.startswith(".") for part in rel) and not _looks_binary(p):
            files.append(p)
    return files


def load_documents(source: str | Path | None = None) -> Iterator[str]:
    """Yield the documents of ``source`` (see the module docstring for what a source can be).

    Raises PicochatError for a missing path at call time, and while iterating for undecodable
    files, bad JSONL lines, or a source with no text at all.
    """
    if source is None or str(source) == "brown":
        return (d["text"] for d in _brown())
    path = Path(source).expanduser()
    if not path.exists():
        raise PicochatError(f"{path} does not exist; give a text file, a .jsonl file, a folder, "
                            f"or nothing to use the embedded Brown corpus")

    def generate() -> Iterator[str]:
        files = _folder_files(path) if path.is_dir() else [path]
        n = 0
        for f in files:
            for doc in _file_documents(f):
                n += 1
                yield doc
        if n == 0:
            what = f"{path} (a folder of {len(files)} text files)" if path.is_dir() else str(path)
            raise PicochatError(f"no text found in {what}; give a source with some non-blank text")

    return generate()
