"""``torch.save`` files: a state dict (read with ``weights_only=True``, safe) for a factory, or a pickled
module, which only ``trust_pickle`` unpickles (unpickling runs code from the file)."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from exporter.errors import LrexportError
from exporter.loading.common import LoadedModel, _short, _source
from exporter.loading.factory import build_from_factory, load_state_dict, state_dict_of
from exporter.loading.onnx_file import is_onnx_file


def load_torch_save(p: Path, factory: str | None, factory_kwargs: dict | str | None,
                    trust_pickle: bool) -> LoadedModel:
    try:
        with _source(p) as src:
            obj = torch.load(src, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" in str(err):
            if not trust_pickle:
                raise LrexportError(f"{p} is a pickled Python object, and unpickling runs code from the file",
                                    "pass --trust-pickle if you trust its source, or save a state dict / "
                                    "TorchScript / torch.export archive instead") from None
            obj = _load_trusted(p)
        else:
            raise _corrupt(p, err) from None
    except Exception as err:  # truncated zips, garbage bytes
        raise _corrupt(p, err) from None
    if isinstance(obj, nn.Module):
        return LoadedModel(obj.eval(), "pickle", str(p))
    state = state_dict_of(obj)
    if state is None:
        raise LrexportError(f"{p} holds a {type(obj).__name__}, neither a module nor a state dict",
                            "save the model or its state_dict()")
    return state_dict_model(p, state, factory, factory_kwargs)


def state_dict_model(p: Path, state: dict[str, torch.Tensor], factory: str | None,
                     factory_kwargs: dict | str | None) -> LoadedModel:
    """A state dict (from torch.save or safetensors) loaded into the model the factory builds."""
    if not factory:
        raise LrexportError(f"{p} is a state dict, which needs the code that builds the model",
                            "pass --factory package.module:function (and --factory-kwargs JSON)")
    model = build_from_factory(factory, factory_kwargs)
    load_state_dict(model, state, factory)
    return LoadedModel(model.eval(), "state-dict", str(p))


def _load_trusted(p: Path) -> Any:
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        with _source(p) as src:
            return torch.load(src, map_location="cpu", weights_only=False)
    except (AttributeError, ModuleNotFoundError) as err:
        raise LrexportError(f"pickled module {p} needs code that is not importable ({err})",
                            "put the model's package on PYTHONPATH") from None
    except Exception as err:
        raise _corrupt(p, err) from None


def _corrupt(p: Path, err: BaseException) -> LrexportError:
    if is_onnx_file(p):
        return LrexportError(f"{p} is an ONNX model; this command takes the PyTorch model it came from",
                             f"to check it against PyTorch use `lrexport check MODEL {p}`, to run the graph passes "
                             f"`lrexport optimize {p} OUT.onnx`, to look at it `lrexport inspect {p}`")
    return LrexportError(f"{p} is not a readable model archive ({_short(err)})",
                         "the file may be truncated or not a PyTorch file; re-save it")
