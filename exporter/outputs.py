"""Atomic output folders: build everything in a temporary sibling, then move it into place.

Nothing of the user's is overwritten unless they pass --force, and a failed run leaves no partial output.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from exporter.errors import LrexportError


def check_target(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise LrexportError(f"output path {out} exists and is a file", "choose a folder path for --out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise LrexportError(f"output folder {out} exists and is not empty", "pass --force to replace it, or pick another --out")


@contextlib.contextmanager
def atomic_dir(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temp folder next to ``out``; on success it replaces ``out``, on failure it is removed."""
    out = Path(out)
    check_target(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700; the result should look like any folder the user made
    try:
        yield tmp
        check_target(out, force)  # someone may have written there meanwhile
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "previous")
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_file(path: str | Path, data: bytes | str, force: bool = False) -> None:
    """Write a file via a temp file + rename; refuse to replace an existing file without force."""
    path = Path(path)
    if path.exists() and not force:
        raise LrexportError(f"{path} already exists", "pass --force to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_files(target: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temp folder; on success each file in it moves beside ``target`` (e.g. x.onnx and x.onnx.data)."""
    target = Path(target)
    if target.exists() and not force:
        raise LrexportError(f"{target} already exists", "pass --force to overwrite it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        for f in tmp.iterdir():
            os.replace(f, target.with_name(f.name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
