"""Atomic file writes: readers see the old content or the new one, never half of it.

Write to a temporary file in the same folder, fsync it, then os.replace() it over the target (a
rename within one filesystem is atomic), then fsync the folder so the rename itself survives a
power cut. Everything that persists state (checkpoints, shards, tokenizers, metrics) goes through here.

Private files (the conversation database, feedback exports: people's chats) are made 0600 in 0700
folders: other users of the machine must not read them, whatever the umask.
"""
from __future__ import annotations

import os
import stat
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator, Optional


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
def atomic_open(path: str | Path, mode: Optional[int] = None) -> Iterator[IO[bytes]]:
    """``with atomic_open(p) as f: f.write(...)``: p appears only if the block finishes.

    mode: the file's permission bits exactly (0o600 for private data); None keeps the umask's default.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a unique name in the same folder (so the rename is atomic)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        if mode is None:
            f = open(tmp, "wb")
        else:  # created with its mode, so it is never readable by others, not even for an instant
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            try:
                os.fchmod(fd, mode)  # exactly it: os.open's mode is filtered by the umask
                f = os.fdopen(fd, "wb")
            except BaseException:
                os.close(fd)
                raise
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # the new file keeps its own mode, not the old target's
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write(path: str | Path, data: bytes | str, mode: Optional[int] = None) -> None:
    with atomic_open(path, mode) as f:
        f.write(data.encode() if isinstance(data, str) else data)


def make_private_dirs(path: str | Path) -> None:
    """Create `path` and its missing parents as 0700. Folders that exist are left alone: they are the
    user's (a project folder, /tmp), and may be shared on purpose."""
    missing, p = [], Path(path)
    while not os.path.lexists(p):
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:  # made by another process meanwhile: not ours to change
            continue
        os.chmod(d, 0o700)  # mkdir's mode is filtered by the umask


def create_private_file(path: str | Path) -> bool:
    """Create `path` empty and 0600 unless it exists (then False), so that whoever opens it next (SQLite)
    never creates it with the umask's 0644 first."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    return True


def make_private(path: str | Path) -> None:
    """Drop the group's and others' permissions on `path` if it exists (0644 -> 0600); the owner's stay."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if mode & 0o077:
            os.chmod(path, mode & 0o700)
    except FileNotFoundError:
        return
    except PermissionError:  # someone else's file (shared with us on purpose): only its owner may chmod it
        return


def atomic_dir(out_dir: str | Path, fill, extra_files: Optional[dict] = None) -> Path:
    """Write a directory all at once: fill(tmp) writes its files into a temporary sibling, then
    extra_files ({name: bytes | callable(path)}) are added, everything is fsynced, and the directory is
    renamed into place (an existing one is moved aside first, removed after). A kill at any moment
    leaves either the old directory or the new one, never half of one."""
    import shutil
    import tempfile
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it owner-only; a checkpoint is an ordinary folder
    try:
        fill(tmp)
        for name, content in (extra_files or {}).items():
            content(tmp / name) if callable(content) else (tmp / name).write_bytes(content)
        for p in tmp.iterdir():
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        fsync_dir(tmp)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
        fsync_dir(out_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
