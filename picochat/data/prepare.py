"""Documents -> tokenized train/val shards that pretraining memory-maps (nanoGPT's prepare.py).

A prepared dataset is a folder::

    train.bin, val.bin   flat token ids (uint16 if the vocab fits, else uint32); every document
                         is preceded by <|endoftext|>, so a model always sees where a text starts
    tokenizer.json       the tokenizer that made them (Hugging Face format)
    meta.json            counts, dtype, tokenizer fingerprint; written LAST, so a folder without
                         it is an interrupted run and is never mistaken for a dataset

The split is by document (seeded shuffle), so no validation text leaks into training; the
tokenizer, when we train one, only ever sees the training documents.
"""
from __future__ import annotations

import json
import os
import random
import re
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..errors import PicochatError
from ..fsutil import atomic_open
from ..tokenizer import Tokenizer
from .corpus import load_documents

META = "meta.json"
VAL_FRACTION, SPLIT_SEED = 0.05, 0  # the default split: the pipeline's tokenizer stage must see the same
BATCH_DOCS = 64  # documents per encode_batch call: big enough to keep the threads busy


def picochat_home() -> Path:
    return Path(os.environ.get("PICOCHAT_HOME") or Path.home() / ".cache" / "picochat").expanduser()


def default_dataset_dir(vocab_size: int = 8192) -> Path:
    """Where the default (Brown corpus) dataset for ``vocab_size`` lives (digits split: the name says so,
    and datasets made before digits were split keep their own folder, brown-v<vocab>)."""
    return picochat_home() / "data" / f"brown-v{vocab_size}-split-digits"


def _halve(doc: str) -> list[str]:
    """Cut a lone document near its middle, at a paragraph, line or word break if there is one."""
    mid = len(doc) // 2
    for sep in (r"\n\s*\n", r"\n", r"\s+"):
        cuts = [m for m in re.finditer(sep, doc) if 0 < m.start() and m.end() < len(doc)]
        if cuts:
            m = min(cuts, key=lambda m: abs(m.start() - mid))
            return [doc[:m.start()], doc[m.end():]]
    return [doc]


def split_documents(docs: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, val) by document: a seeded shuffle picks the val documents, order is kept within each."""
    if not 0 < val_fraction < 1:
        raise PicochatError(f"val fraction must be between 0 and 1 (got {val_fraction}); 0.05 is typical")
    if len(docs) == 1:
        docs = _halve(docs[0])
    if len(docs) < 2:
        raise PicochatError("the source is a single short document without line or word breaks, which "
                            "cannot be split into train and val; give more text")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_val = min(len(docs) - 1, max(1, round(len(docs) * val_fraction)))
    val_ids = set(order[:n_val])
    return ([d for i, d in enumerate(docs) if i not in val_ids], [d for i, d in enumerate(docs) if i in val_ids])


def _write_split(path: Path, docs: list[str], tok: Tokenizer, dtype, desc: str) -> int:
    n_tokens = 0
    with atomic_open(path) as f, tqdm(total=sum(len(d) for d in docs), desc=desc, unit="char",
                                       unit_scale=True, leave=False, disable=None) as bar:
        for start in range(0, len(docs), BATCH_DOCS):
            batch = docs[start:start + BATCH_DOCS]
            ids: list[int] = []
            for doc_ids in tok.encode_batch(batch):
                ids.append(tok.eot_id)
                ids.extend(doc_ids)
            np.asarray(ids, dtype=dtype).tofile(f)
            n_tokens += len(ids)
            bar.update(sum(len(d) for d in batch))
    return n_tokens


def prepare_dataset(source: str | Path | None = None, out_dir: str | Path | None = None,
                    tokenizer: Tokenizer | str | Path | None = None, vocab_size: int = 8192,
                    val_fraction: float = VAL_FRACTION, seed: int = SPLIT_SEED, split_digits: bool = True) -> Path:
    """Tokenize ``source`` (see ``load_documents``) into ``out_dir``; returns ``out_dir``.

    ``tokenizer``: a Tokenizer, a tokenizer.json path, "gpt2", or None to train a ``vocab_size``
    BPE on the training documents (one token per digit unless ``split_digits`` is False).
    """
    out = Path(out_dir).expanduser() if out_dir is not None else default_dataset_dir(vocab_size)
    docs = list(load_documents(source))
    train_docs, val_docs = split_documents(docs, val_fraction, seed)
    if tokenizer is None:
        tok = Tokenizer.train(train_docs, vocab_size, split_digits=split_digits)
    else:
        tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.load(tokenizer)
    tok.eot_id  # fail now, not after tokenizing, if the tokenizer cannot separate documents
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32

    out.mkdir(parents=True, exist_ok=True)
    (out / META).unlink(missing_ok=True)  # from here on, the folder is incomplete until meta.json lands
    t0 = time.time()
    train_tokens = _write_split(out / "train.bin", train_docs, tok, dtype, "train")
    val_tokens = _write_split(out / "val.bin", val_docs, tok, dtype, "val")
    tok.save(out / "tokenizer.json")
    meta = {
        "dtype": np.dtype(dtype).name, "vocab_size": tok.vocab_size,
        "tokenizer_fingerprint": tok.fingerprint(), "eot_id": tok.eot_id,
        "train_tokens": train_tokens, "val_tokens": val_tokens,
        "train_bytes": sum(len(d.encode("utf-8", "replace")) for d in train_docs),
        "val_bytes": sum(len(d.encode("utf-8", "replace")) for d in val_docs),
        "train_documents": len(train_docs), "val_documents": len(val_docs),
        "source": "brown" if source is None else str(source), "seed": seed, "val_fraction": val_fraction,
        "requested_vocab_size": vocab_size if tokenizer is None else None,
        "split_digits": split_digits if tokenizer is None else None,
        "tokenize_seconds": round(time.time() - t0, 3),
    }
    with atomic_open(out / META) as f:
        f.write((json.dumps(meta, indent=2) + "\n").encode())
    return out


def load_meta(data_dir: str | Path) -> dict:
    """meta.json of a prepared dataset, checked against the shard sizes."""
    d = Path(data_dir).expanduser()
    how = f"make one with `picochat data prepare [SOURCE] --out {d}`"
    if not (d / META).is_file():
        state = "does not exist" if not d.exists() else "is not a prepared dataset (no meta.json)"
        raise PicochatError(f"{d} {state}; {how}")
    try:
        meta = json.loads((d / META).read_text("utf-8"))
        itemsize = np.dtype(meta["dtype"]).itemsize
        expected = {"train.bin": meta["train_tokens"] * itemsize, "val.bin": meta["val_tokens"] * itemsize}
    except (ValueError, KeyError, TypeError) as e:
        raise PicochatError(f"{d / META} is damaged ({type(e).__name__}: {e}); {how}") from None
    for name, size in expected.items():
        if not (d / name).is_file() or (d / name).stat().st_size != size:
            raise PicochatError(f"{d / name} is missing or not the size meta.json records; {how}")
    return meta


def ensure_default_dataset(vocab_size: int = 8192) -> Path:
    """The Brown dataset for ``vocab_size``, prepared on first use and reused afterwards.

    A file lock lets several processes (e.g. torchrun ranks) call this at once: one prepares,
    the others wait and reuse its result.
    """
    d = default_dataset_dir(vocab_size)
    d.mkdir(parents=True, exist_ok=True)
    with open(d / ".lock", "w") as lock:
        try:
            import fcntl
            fcntl.flock(lock, fcntl.LOCK_EX)
        except ImportError:  # Windows: no flock; concurrent first runs would just both prepare
            pass
        if _reusable(d, vocab_size):
            return d
        print(f"preparing the Brown corpus with a {vocab_size}-token BPE in {d} (once)...")
        return prepare_dataset(None, d, vocab_size=vocab_size)


def _reusable(d: Path, vocab_size: int) -> bool:
    try:
        meta = load_meta(d)
        tok = Tokenizer.load(d / "tokenizer.json")
    except PicochatError:
        return False
    # split_digits: a dataset prepared before digits were split (no such key) is made again
    return (meta.get("source") == "brown" and meta.get("requested_vocab_size") == vocab_size
            and meta.get("split_digits") is True
            and meta.get("tokenizer_fingerprint") == tok.fingerprint())
