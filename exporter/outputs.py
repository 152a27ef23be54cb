"""Atomic output folders: build everything in a temporary sibling, then move it into place.

Nothing of the user's is overwritten unless they pass --force, and a failed or interrupted run leaves no
partial output: no temp folder, no half-moved files, not even the parent folders it had to create.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator

from exporter.errors import LrexportError


def check_target(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise LrexportError(f"output path {out} exists and is a file", "choose a folder path for --out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise LrexportError(f"output folder {out} exists and is not empty", "pass --force to replace it, or pick another --out")


def check_writable(path: str | Path) -> None:
    """Refuse, before any work, an output whose folder cannot exist (a file on the way) or be written."""
    path = Path(path)
    for parent in path.parents:  # a relative path ends with '.', which exists
        if parent.exists():
            if not parent.is_dir():
                raise LrexportError(f"cannot write {path}: {parent} is a file, not a folder",
                                    "choose an output path inside a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise LrexportError(f"cannot write {path}: folder {parent} is not writable",
                                    "choose an output path in a folder you can write")
            return


def check_new_file(path: str | Path, force: bool) -> Path:
    """Refuse, before any slow work, an output file that exists without ``force`` or cannot be written."""
    path = Path(path)
    if path.exists() and not force:
        raise LrexportError(f"{path} already exists", "pass --force to overwrite it")
    check_writable(path)
    return path


def _make_parents(path: Path) -> list[Path]:
    """Create ``path``'s missing parent folders; return those created (innermost first) to undo on failure."""
    check_writable(path)
    created = []
    for parent in path.parents:
        if parent.exists():
            break
        created.append(parent)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LrexportError(f"cannot create folder {path.parent} ({err.strerror})",
                            "choose an output path in a folder you can write") from None
    return created


def _file_target(path: Path, force: bool) -> list[Path]:
    """Refuse to replace a file without ``force``, or a folder at all; then make the parent folders
    (returned, to remove on failure)."""
    if path.exists() and not force:
        raise LrexportError(f"{path} already exists", "pass --force to overwrite it")
    if path.is_dir():
        raise LrexportError(f"{path} is a folder", "give a file path")
    return _make_parents(path)


def _remove_created(created: list[Path]) -> None:
    for folder in created:
        with contextlib.suppress(OSError):
            folder.rmdir()  # only if still empty


def _temp_beside(target: Path, kind: str, created: list[Path]) -> Path:
    try:
        return Path(tempfile.mkdtemp(prefix=f".{target.name}.{kind}-", dir=target.parent))
    except OSError as err:
        _remove_created(created)
        raise LrexportError(f"cannot create files in folder {target.parent} ({err.strerror})",
                            "choose an output path in a folder you can write") from None


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C while outputs are being swapped into place, then deliver it (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, _frame: pending.append(signum))
    try:
        yield
    finally:  # None: the handler was not set from Python; put back Python's own
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
    if pending:
        raise KeyboardInterrupt


@contextlib.contextmanager
def atomic_dir(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temp folder next to ``out``; on success it replaces ``out``, on failure it is removed."""
    out = Path(out)
    check_target(out, force)
    created = _make_parents(out)
    tmp = _temp_beside(out, "tmp", created)
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700; the result should look like any folder the user made
    try:
        yield tmp
        check_target(out, force)  # someone may have written there meanwhile
        with _interrupts_deferred():
            old = None
            if out.exists():
                old = _temp_beside(out, "old", [])
                os.replace(out, old / "previous")
            os.replace(tmp, out)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_created(created)
        raise


def atomic_write_file(path: str | Path, data: bytes | memoryview | str, force: bool = False) -> None:
    """Write a file via a temp file + rename; refuse to replace an existing file without force. The data
    is on disk (fsync) before the rename, so a crash leaves the old file or the new one, never a torn one."""
    path = Path(path)
    created = _file_target(path, force)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    except OSError as err:
        _remove_created(created)
        raise LrexportError(f"cannot create files in folder {path.parent} ({err.strerror})",
                            "choose an output path in a folder you can write") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        _remove_created(created)
        raise


@contextlib.contextmanager
def atomic_files(target: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temp folder; on success each file in it moves beside ``target`` (e.g. x.onnx and x.onnx.data)."""
    target = Path(target)
    created = _file_target(target, force)
    tmp = _temp_beside(target, "tmp", created)
    ok = False
    try:
        yield tmp
        with _interrupts_deferred():
            for f in tmp.iterdir():
                os.replace(f, target.with_name(f.name))
        ok = True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not ok:
            _remove_created(created)


def relocated(data: Any, tmp: str | Path, dest: str | Path) -> Any:
    """``data`` (a report's dicts, lists and path strings) with every path inside the temporary folder
    ``tmp`` renamed to where it ends up under ``dest``: reports must name files that exist."""
    tmp, dest = Path(tmp), Path(dest)
    if isinstance(data, dict):
        return {k: relocated(v, tmp, dest) for k, v in data.items()}
    if isinstance(data, list):
        return [relocated(v, tmp, dest) for v in data]
    if isinstance(data, (str, Path)) and data:
        path = Path(data)
        if path == tmp or tmp in path.parents:
            moved = dest / path.relative_to(tmp)
            return moved if isinstance(data, Path) else str(moved)
    return data
