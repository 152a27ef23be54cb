"""Atomic outputs, and what --force may replace.

Every output is built in a temporary sibling and moved into place only when the command ran; a failed or
interrupted run (Ctrl-C, SIGTERM, SIGHUP) leaves no partial output: no temp folder, no half-moved files,
not even the parent folders it had to create.

Nothing of the user's is ever replaced. Without --force nothing existing is; with --force only what
lrexport itself wrote: an output folder whose ``report.json`` lists every file in it, or a single file of
the kind the command writes (an ONNX model, a model archive, a JSON file lrexport writes, an engine with
its metadata). Never, even with --force, an input of the running command (registered with
:func:`reading` / :func:`add_inputs`), a folder holding one, nor the current folder or a folder above it.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import shutil
import signal
import tempfile
import threading
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from exporter.errors import LrexportError

# ------------------------------------------------------------------ the running command's inputs

_INPUTS: contextvars.ContextVar[tuple[Path, ...]] = contextvars.ContextVar("lrexport_inputs", default=())


def _input_paths(paths: Iterable[str | Path | None]) -> tuple[Path, ...]:
    """Each path as written (absolute: a symlink is the user's too) and as resolved."""
    found: list[Path] = []
    for p in paths:
        if p is None or str(p) in ("", "-"):
            continue
        found += [Path(os.path.abspath(p)), Path(p).resolve()]
    return tuple(found)


def add_inputs(*paths: str | Path | None) -> None:
    """Mark files the running command reads: no output may replace one or a folder holding one
    (inside a :func:`reading` scope, which forgets them when it ends)."""
    _INPUTS.set(_INPUTS.get() + _input_paths(paths))


@contextlib.contextmanager
def reading(*paths: str | Path | None) -> Iterator[None]:
    """Inside: ``paths`` (and whatever :func:`add_inputs` adds) are inputs that no output may replace."""
    token = _INPUTS.set(_INPUTS.get() + _input_paths(paths))
    try:
        yield
    finally:
        _INPUTS.reset(token)


def _input_at(path: Path) -> Path | None:
    """The input ``path`` names (itself, through a link, or a hard link to it), if any."""
    candidates = {Path(os.path.abspath(path)), path.resolve()}
    for known in _INPUTS.get():
        if known in candidates:
            return known
        with contextlib.suppress(OSError):
            if path.exists() and known.exists() and os.path.samefile(path, known):
                return known
    return None


def _input_inside(folder: Path) -> Path | None:
    roots = {Path(os.path.abspath(folder)), folder.resolve()}
    return next((p for p in _INPUTS.get() if any(r in p.parents for r in roots)), None)


# ------------------------------------------------------------------ what lrexport wrote

def _is_onnx(path: Path) -> bool:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return False
    return model.ir_version > 0 and model.HasField("graph")


def _json_object(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# The keys each JSON file lrexport writes always has: a parity report (check --report), a build's
# report.json, an engine's metadata, an input sidecar.
_JSON_KEYS = ({"ok", "reference", "precision", "results"}, {"ok", "out", "export", "parity", "files"},
              {"format", "lrexport_version", "engine_file"}, {"inputs", "shapes"})


def _is_lrexport_json(path: Path) -> bool:
    data = _json_object(path)
    return data is not None and any(keys <= data.keys() for keys in _JSON_KEYS)


def _is_engine(path: Path) -> bool:
    """An engine lrexport built has its metadata beside it; a TensorRT plan starts with 'ftrt'."""
    meta = path.with_name(path.name + ".json")
    if meta.is_file() and _is_lrexport_json(meta):
        return True
    with contextlib.suppress(OSError), open(path, "rb") as fh:
        return fh.read(4) == b"ftrt"
    return False


def _is_onnx_data(path: Path) -> bool:
    """``x.onnx.data``: external data, beside the ONNX model that names it."""
    owner = path.with_name(path.name[: -len(".data")]) if path.name.endswith(".data") else None
    return owner is not None and owner.is_file() and _is_onnx(owner)


def _is_text(path: Path) -> bool:
    try:
        path.read_bytes()[:1 << 20].decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    return True


def _is_timing_cache(path: Path) -> bool:
    """TensorRT's timing cache is opaque; it is one unless it is recognizably something else."""
    if path.stat().st_size == 0:
        return True
    return not (zipfile.is_zipfile(path) or _is_text(path) or _is_onnx(path))


# kind -> (what it is, in an error line; the test)
FILE_KINDS: dict[str, tuple[str, Callable[[Path], bool]]] = {
    "onnx": ("an ONNX model", _is_onnx),
    "data": ("an ONNX model's external data", _is_onnx_data),
    "model": ("a model archive", zipfile.is_zipfile),
    "json": ("a JSON file lrexport writes", _is_lrexport_json),
    "engine": ("an engine lrexport built", _is_engine),
    "timing-cache": ("a TensorRT timing cache", _is_timing_cache),
}


def _kind_of(path: Path, kind: str | None) -> str | None:
    """The kind a companion file has by its name (x.onnx.data, x.engine.json), else ``kind``."""
    for suffix, by_name in ((".data", "data"), (".json", "json"), (".engine", "engine"), (".onnx", "onnx")):
        if path.name.endswith(suffix):
            return by_name
    return kind


def _written_by_lrexport(path: Path, kind: str | None) -> bool:
    if kind is not None:
        return FILE_KINDS[kind][1](path)
    return any(test(path) for name, (_what, test) in FILE_KINDS.items() if name != "timing-cache")


def folder_manifest(folder: str | Path) -> set[str] | None:
    """The names lrexport wrote into an output folder (from its report.json), or None if it wrote none."""
    report = _json_object(Path(folder) / "report.json")
    if report is None or not {"out", "export", "parity", "files"} <= report.keys():
        return None
    files = report["files"]
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return None
    return {Path(f).name for f in files} | {"report.json"}


def _check_name(path: Path) -> None:
    """Refuse a name longer than the file system takes (one line, not an OSError after the work)."""
    parent = next((p for p in path.parents if os.path.isdir(p)), Path("."))
    try:
        limit = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    for part in path.parts:
        if len(os.fsencode(part)) > limit:
            raise LrexportError(f"output path {str(path)[:40]}... has a name of {len(os.fsencode(part))} bytes, "
                                f"more than the {limit} the file system allows", "choose a shorter output path")


def _check_not_cwd(out: Path, what: str) -> None:
    cwd = Path.cwd().resolve()
    resolved = out.resolve()
    if resolved == cwd or resolved in cwd.parents:
        where = "the current folder" if resolved == cwd else "a folder above the current one"
        raise LrexportError(f"{what} {out} is {where}; lrexport never replaces it, even with --force",
                            "choose a new folder, e.g. --out model.lrexport")


def check_target(out: str | Path, force: bool) -> None:
    """Refuse an output folder that would replace anything but an earlier lrexport output (and that only
    with ``force``): a file, the current folder or one above it, a folder holding an input of the command,
    a folder lrexport did not write or one with files it did not write."""
    out = Path(out)
    _check_name(out)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        kind = "a symbolic link" if out.is_symlink() else "a file"
        raise LrexportError(f"output path {out} exists and is {kind}", "choose a folder path for --out")
    _check_not_cwd(out, "output folder")
    if not out.is_dir():
        return
    held = _input_inside(out)
    if held is not None:
        raise LrexportError(f"output folder {out} holds {held.name}, an input of this command; lrexport never "
                            "replaces it, even with --force", "choose another --out")
    entries = {p.name for p in out.iterdir()}
    if not entries:
        return
    wrote = folder_manifest(out)
    if wrote is None:
        raise LrexportError(f"output folder {out} exists and was not written by lrexport (no report.json of "
                            "a build)", "--force replaces only an earlier lrexport output: choose another --out")
    extra = sorted(entries - wrote)
    if extra:
        raise LrexportError(f"output folder {out} holds {extra[0]}"
                            f"{f' and {len(extra) - 1} more' if len(extra) > 1 else ''}, which lrexport did "
                            "not write", "--force replaces only what lrexport wrote: move it out, or choose "
                            "another --out")
    if not force:
        raise LrexportError(f"output folder {out} exists and is not empty", "pass --force to replace it, or pick another --out")


def check_writable(path: str | Path) -> None:
    """Refuse, before any work, an output whose folder cannot exist (a file on the way) or be written."""
    path = Path(path)
    _check_name(path)
    for parent in path.parents:  # a relative path ends with '.', which exists
        if parent.exists():
            if not parent.is_dir():
                raise LrexportError(f"cannot write {path}: {parent} is a file, not a folder",
                                    "choose an output path inside a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise LrexportError(f"cannot write {path}: folder {parent} is not writable",
                                    "choose an output path in a folder you can write")
            return


def check_new_file(path: str | Path, force: bool, kind: str | None = None) -> Path:
    """Refuse, before any slow work, an output file that would replace an input of the command, a folder,
    an existing file without ``force``, or (even with it) a file that is not of ``kind`` (a key of
    :data:`FILE_KINDS`; None: any kind lrexport writes); or that cannot be written."""
    path = Path(path)
    _check_name(path)
    if _input_at(path) is not None:
        raise LrexportError(f"{path} is an input of this command; lrexport never overwrites it, even with --force",
                            "choose another output path")
    if path.is_dir():
        raise LrexportError(f"{path} is a folder", "give a file path")
    if path.exists() or path.is_symlink():
        if not force:
            raise LrexportError(f"{path} already exists", "pass --force to overwrite it")
        if path.is_symlink() or not path.is_file() or not _written_by_lrexport(path, kind):
            what = FILE_KINDS[kind][0] if kind is not None else "a file lrexport writes"
            raise LrexportError(f"{path} exists and is not {what}; --force replaces only what lrexport wrote",
                                "choose another output path")
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


def _file_target(path: Path, force: bool, kind: str | None) -> list[Path]:
    """Check ``path`` as :func:`check_new_file` does; then make the parent folders (returned, to remove
    on failure)."""
    check_new_file(path, force, kind)
    return _make_parents(path)


def _remove_created(created: list[Path]) -> None:
    for folder in created:
        with contextlib.suppress(OSError):
            folder.rmdir()  # only if still empty


def _temp_beside(target: Path, kind: str, created: list[Path]) -> Path:
    try:  # the name shortened: the temp name must fit where the target's name just fits
        return Path(tempfile.mkdtemp(prefix=f".{target.name[:120]}.{kind}-", dir=target.parent))
    except OSError as err:
        _remove_created(created)
        raise LrexportError(f"cannot create files in folder {target.parent} ({err.strerror})",
                            "choose an output path in a folder you can write") from None


# ------------------------------------------------------------------ interruptions

class Interrupted(KeyboardInterrupt):
    """SIGTERM (``timeout``, CI cancellation, ``docker stop``) or SIGHUP (the terminal closed): handled
    as Ctrl-C is, so every cleanup that removes partial output on KeyboardInterrupt runs for them too."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_TERMINATING = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s)
_HELD = (signal.SIGINT, *_TERMINATING)


def _raise_interrupted(signum: int, _frame: Any) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def interrupt_on_termination() -> Iterator[None]:
    """Inside (main thread only), SIGTERM and SIGHUP raise :class:`Interrupted` as Ctrl-C raises
    KeyboardInterrupt; the previous handlers come back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _raise_interrupted) for s in _TERMINATING}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C, SIGTERM and SIGHUP while outputs are being swapped into place, then deliver the first
    (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {s: signal.signal(s, lambda signum, _frame: pending.append(signum)) for s in _HELD}
    try:
        yield
    finally:  # None: the handler was not set from Python; put back Python's own
        for s, handler in previous.items():
            default = signal.default_int_handler if s == signal.SIGINT else signal.SIG_DFL
            signal.signal(s, handler if handler is not None else default)
    if pending:  # now delivered to the handler put back (Ctrl-C: KeyboardInterrupt; ours: Interrupted)
        signal.raise_signal(pending[0])


# ------------------------------------------------------------------ writing

@contextlib.contextmanager
def atomic_dir(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temp folder next to ``out``; on success it replaces ``out``, on failure it is removed.
    What is written into it must include a ``report.json`` naming its files (:func:`folder_manifest`), or
    a later ``force`` will not replace it."""
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


def atomic_write_file(path: str | Path, data: bytes | memoryview | str, force: bool = False,
                      kind: str | None = None) -> None:
    """Write a file via a temp file + rename; refuse what :func:`check_new_file` refuses. The data is on
    disk (fsync) before the rename, so a crash leaves the old file or the new one, never a torn one."""
    path = Path(path)
    created = _file_target(path, force, kind)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:120]}.tmp-", dir=path.parent)
    except OSError as err:
        _remove_created(created)
        raise LrexportError(f"cannot create files in folder {path.parent} ({err.strerror})",
                            "choose an output path in a folder you can write") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        check_new_file(path, force, kind)  # someone may have written there meanwhile
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        _remove_created(created)
        raise


@contextlib.contextmanager
def atomic_files(target: str | Path, force: bool = False, kind: str | None = None) -> Iterator[Path]:
    """Yield a temp folder; on success each file in it moves beside ``target`` (e.g. x.onnx and x.onnx.data),
    each checked as :func:`check_new_file` does (``kind`` for ``target``, by name for the others)."""
    target = Path(target)
    created = _file_target(target, force, kind)
    tmp = _temp_beside(target, "tmp", created)
    ok = False
    try:
        yield tmp
        moves = [(f, target.with_name(f.name)) for f in tmp.iterdir()]
        for _f, dest in moves:
            check_new_file(dest, force, kind if dest == target else _kind_of(dest, kind))
        with _interrupts_deferred():
            for f, dest in moves:
                os.replace(f, dest)
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
