"""Atomic file writes: readers see the old content or the new one, never half of it.

Write to a temporary file in the same folder, fsync it, then os.replace() it over the target (a
rename within one filesystem is atomic), then fsync the folder so the rename itself survives a
power cut. Everything that persists state (checkpoints, shards, tokenizers, metrics) goes through here.
"""
from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator


def fsync_dir(path: str | Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_open(path: str | Path) -> Iterator[IO[bytes]]:
    """``with atomic_open(p) as f: f.write(...)``: p appears only if the block finishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a unique name in the same folder (so the rename is atomic); open() keeps the user's umask
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write(path: str | Path, data: bytes | str) -> None:
    with atomic_open(path) as f:
        f.write(data.encode() if isinstance(data, str) else data)
