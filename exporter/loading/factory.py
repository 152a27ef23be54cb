"""A model built by the user's code: ``--factory package.module:function``, and a state dict loaded into it."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from exporter.errors import LrexportError


def import_factory(spec: str):
    """Import ``package.module:function`` (the current directory is importable, like ``python -m``)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise LrexportError(f"bad factory {spec!r}", "write it as package.module:function")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except SystemExit as err:  # its code exits, as a script does: lrexport must not exit with it
        raise LrexportError(f"factory module {module_name!r} calls sys.exit({err.code!r}) when it is imported",
                            "run its script code only under `if __name__ == \"__main__\":`") from None
    except Exception as err:  # ImportError, SyntaxError, errors raised at import time
        raise LrexportError(f"factory module {module_name!r} does not import ({type(err).__name__}: {err})",
                            "check the name and that its package is on PYTHONPATH") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise LrexportError(f"factory {spec!r}: {module_name} has no callable {attr!r}",
                            "name a function or class that returns the nn.Module")
    return fn


def build_from_factory(spec: str, kwargs: dict | str | None = None) -> nn.Module:
    if isinstance(kwargs, str):
        try:
            kwargs = json.loads(kwargs) if kwargs.strip() else {}
        except ValueError as err:
            raise LrexportError(f"--factory-kwargs is not valid JSON ({err})",
                                'write a JSON object, e.g. \'{"rank": 64}\'') from None
    if kwargs is not None and not isinstance(kwargs, dict):
        raise LrexportError("--factory-kwargs must be a JSON object", 'e.g. \'{"rank": 64}\'')
    fn = import_factory(spec)
    try:
        model = fn(**(kwargs or {}))
    except SystemExit as err:
        raise LrexportError(f"factory {spec!r} calls sys.exit({err.code!r})",
                            "return the nn.Module instead of exiting") from None
    except Exception as err:
        raise LrexportError(f"factory {spec!r} raised {type(err).__name__}: {err}",
                            "check --factory-kwargs") from None
    if not isinstance(model, nn.Module):
        raise LrexportError(f"factory {spec!r} returned {type(model).__name__}, not an nn.Module",
                            "return the model instance")
    return model


def state_dict_of(obj: Any) -> dict[str, torch.Tensor] | None:
    if isinstance(obj, dict):
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return obj
        for key in ("state_dict", "model_state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, dict):
                return state_dict_of(inner)
    return None


def load_state_dict(model: nn.Module, state: dict[str, torch.Tensor], factory: str) -> None:
    own = model.state_dict()
    problems = [f"{k} is {list(v.shape)} in the file but {list(own[k].shape)} in the model"
                for k, v in state.items() if k in own and own[k].shape != v.shape][:2]
    if problems:
        raise LrexportError(f"state dict does not fit the model from {factory!r}: {'; '.join(problems)}",
                            "check --factory and --factory-kwargs match the checkpoint")
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys:
        problems.append(f"missing {', '.join(result.missing_keys[:3])}"
                        + (f" (+{len(result.missing_keys) - 3})" if len(result.missing_keys) > 3 else ""))
    if result.unexpected_keys:
        problems.append(f"unexpected {', '.join(result.unexpected_keys[:3])}"
                        + (f" (+{len(result.unexpected_keys) - 3})" if len(result.unexpected_keys) > 3 else ""))
    if problems:
        raise LrexportError(f"state dict does not fit the model from {factory!r}: {'; '.join(problems)}",
                            "check --factory and --factory-kwargs match the checkpoint")
