"""Load a ``torch.export`` archive (.pt2), and when torch cannot, say what in the archive it tripped on.

``torch.export.load`` logs the real error with its whole traceback (about 20 lines on stderr) and raises
a generic "check the warnings above"; here that log record is caught and its error read instead. Three
causes get their own line: a custom op the archive's graph calls that no imported library registered
(``transformers::grouped_mm_fallback`` exists only once transformers is imported), a node torch cannot
read back (a higher-order op such as the grad-mode switch ``torch.utils.checkpoint`` leaves in the
graph), and a member missing from the zip (a weight).
"""

from __future__ import annotations

import json
import logging
import re
import zipfile
from pathlib import Path
from typing import Any, Iterator

import torch

from exporter.errors import LrexportError

# what torch's higher-order ops in an exported graph stand for in the model's code
_HIGHER_ORDER = {
    "wrap_with_set_grad_enabled": "a grad-mode switch inside forward: torch.no_grad / enable_grad, or "
                                  "torch.utils.checkpoint (activation checkpointing)",
    "wrap_with_autocast": "an autocast region inside forward",
}


class _Capture(logging.Handler):
    """Keeps the errors torch logs (with exc_info) instead of printing their tracebacks."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.errors: list[BaseException] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            self.errors.append(record.exc_info[1])


def load_archive(p: Path) -> Any:
    """``torch.export.load(p)``; an archive torch cannot load is one LrexportError saying why."""
    from exporter.loading import _source

    logger = logging.getLogger("torch.export")  # torch's logging setup gives it a handler of its own
    capture, handlers, propagate = _Capture(), list(logger.handlers), logger.propagate
    logger.handlers, logger.propagate = [capture], False
    try:
        with _source(p) as src:
            return torch.export.load(src)
    except Exception as err:
        raise archive_error(p, capture.errors[0] if capture.errors else err) from None
    finally:
        logger.handlers, logger.propagate = handlers, propagate


def archive_error(p: Path, err: BaseException) -> LrexportError:
    from exporter.loading import _short

    missing = unregistered_ops(p)
    if missing:
        ns = missing[0].split("::")[0]
        more = f" (and {', '.join(missing[1:4])})" if len(missing) > 1 else ""
        return LrexportError(
            f"{p} uses the custom op {missing[0]}{more}, which is not registered in this Python",
            f"import the library that defines it ({ns}) before loading the archive (in Python: import it, then "
            "exporter.load_model), or build from the model's code with --factory")
    text = str(err)
    m = re.search(r"failed locating file (\S+?):? file not found", text)
    if m:
        return LrexportError(f"torch.export archive {p} is incomplete: it has no member {m.group(1)}",
                             "the file was cut or changed after torch.export.save; save it again")
    m = re.search(r"[Nn]ode(?:\.meta)? '?(\w+)'?", text)
    target = _node_target(p, m.group(1)) if m else None
    if m is not None and target:
        op = target.rsplit(".", 1)[-1]
        what = f": {_HIGHER_ORDER[op]}" if op in _HIGHER_ORDER else ""
        return LrexportError(
            f"torch cannot load its own archive {p}: torch.export.load fails on node {m.group(1)!r} "
            f"({target}{what}) ({_short(err)})",
            "build from the model's code instead (--factory; lrexport exports it without saving), or save the "
            "model without that construct in forward")
    return LrexportError(f"torch.export archive {p} could not be loaded ({_short(err)})",
                         "re-save it with torch.export.save")


def _graphs(p: Path) -> Iterator[Any]:
    """The serialized programs (``*/models/*.json``) of an archive, parsed; nothing for an unreadable one."""
    try:
        with zipfile.ZipFile(p) as zf:
            for name in zf.namelist():
                if "/models/" in name and name.endswith(".json"):
                    yield json.loads(zf.read(name))
    except (OSError, zipfile.BadZipFile, ValueError):
        return


def _nodes(obj: Any) -> Iterator[dict]:
    """Every serialized node (a dict with a ``target``), also those of nested graphs."""
    if isinstance(obj, dict):
        if isinstance(obj.get("target"), str):
            yield obj
        for value in obj.values():
            yield from _nodes(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _nodes(value)


def _node_target(p: Path, name: str) -> str | None:
    """The op of the graph node torch's error names: the node making a value of that name, else (torch
    names a node after its op, ``wrap_with_set_grad_enabled_1``) the op of that name."""
    targets: list[str] = []
    for graph in _graphs(p):
        for node in _nodes(graph):
            if name in re.findall(r"'name': '(\w+)'", str(node.get("outputs"))):
                return node["target"]
            targets.append(node["target"])
    return next((t for t in targets if re.fullmatch(re.escape(t.split(".")[3 if t.count(".") > 2 else -1]) + r"(_\d+)?", name)), None)


def unregistered_ops(p: Path) -> list[str]:
    """``namespace::op`` of each op the archive's graphs call that torch.ops does not know here."""
    missing: list[str] = []
    for graph in _graphs(p):
        for node in _nodes(graph):
            parts = node["target"].split(".")
            if len(parts) < 4 or parts[:2] != ["torch", "ops"] or parts[2] == "higher_order":
                continue
            ns, op = parts[2], parts[3]
            try:
                getattr(getattr(torch.ops, ns), op)
            except (AttributeError, RuntimeError):
                name = f"{ns}::{op}"
                if name not in missing:
                    missing.append(name)
    return missing
