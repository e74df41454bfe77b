"""Durable files: what a commit points to is on disk before the commit, and a rename survives a power cut.

Writing a file, ``fsync`` on it, renaming it into place and ``fsync`` on its folder is what makes a new file
durable on Linux file systems; the folder's ``fsync`` is what keeps the rename itself. alseg's state commits
only after the files it records went through here.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path


def fsync_file(path: str | Path) -> None:
    """Flush a file's data to disk."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (new, renamed or removed names) to disk; a no-op where folders cannot be opened."""
    with contextlib.suppress(OSError):
        fd = os.open(str(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_tree(path: str | Path) -> None:
    """Flush every file and folder under ``path`` (a model folder before its commit)."""
    root = Path(path)
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            p = Path(dirpath) / name
            if not p.is_symlink():
                fsync_file(p)
        fsync_dir(dirpath)


def replace(tmp: str | Path, path: str | Path) -> None:
    """``os.replace(tmp, path)`` made durable: the file flushed before, its folder after."""
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


def copy_file(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` atomically (temporary file, fsync, rename)."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        with open(src, "rb") as fi, open(tmp, "wb") as fo:
            shutil.copyfileobj(fi, fo, 1 << 20)
            fo.flush()
            os.fsync(fo.fileno())
        os.replace(tmp, dst)
        fsync_dir(dst.parent)
    finally:
        if tmp.exists():
            tmp.unlink()
