"""Load a model file into a callable ``nn.Module`` without running code from the file by default.

Formats: TorchScript archives (``torch.jit.save``), ``torch.export`` archives (``.pt2``), a state dict
plus ``--factory pkg.module:function``, and full pickled modules (``torch.save(model)``) only with
``trust_pickle=True``, since unpickling runs arbitrary code.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import pickle
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import torch
from torch import nn

from exporter.errors import LrexportError
from exporter.specs import InputSpec, parse_dim_expr

@dataclass
class LoadedModel:
    module: nn.Module
    kind: str
    source: str
    exported_program: Any = None  # torch.export.ExportedProgram when loaded from .pt2
    inferred_specs: list[InputSpec] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # defaults taken while reading the file, shown as warnings
    limits: dict[tuple[str, int], tuple[int, int | None]] = field(default_factory=dict)  # archive's real ranges

    @property
    def parameter_count(self) -> int:
        seen: set[int] = set()
        total = 0
        tensors = list(self.module.parameters()) + list(self.module.buffers())
        if self.exported_program is not None:
            tensors = list(self.exported_program.state_dict.values())
        for t in tensors:
            if id(t) not in seen and t.is_floating_point():
                seen.add(id(t))
                total += t.numel()
        return total


def _zip_names(path: Path) -> list[str] | None:
    if not zipfile.is_zipfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return None


def detect_kind(path: Path) -> str:
    """Guess the archive kind from its contents (not its suffix)."""
    names = _zip_names(path)
    if names is None:
        return "torch-save"  # legacy (non-zip) torch.save / raw pickle, or corrupt
    if any(n.endswith("serialized_exported_program.json") or "/models/" in n and n.endswith(".json")
           for n in names):
        return "exported-program"
    if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
        return "torchscript"
    if any(n.endswith("data.pkl") for n in names):
        return "torch-save"
    return "unknown-zip"


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


def _state_dict_of(obj: Any) -> dict[str, torch.Tensor] | None:
    if isinstance(obj, dict):
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return obj
        for key in ("state_dict", "model_state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, dict):
                return _state_dict_of(inner)
    return None


def _load_state_dict(model: nn.Module, state: dict[str, torch.Tensor], factory: str) -> None:
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


UNBOUNDED_SPAN = 8  # an axis with no upper bound gets up to this many times its example size
MAX_DEFAULT_SIZE = 65536


def _bound(value: Any) -> int | None:
    """An integer range bound from torch, or None for an infinite one (torch's ``int_oo`` claims
    ``is_finite`` and fails ``int()``, so both are checked)."""
    try:
        out = int(value)
    except (TypeError, ValueError, AttributeError, OverflowError):
        return None
    return out if abs(out) < 2**62 else None


def _axis_range(ep: Any, expr: Any, example: int | None, what: str, notes: list[str]
                ) -> tuple[tuple[int, int, int, int], tuple[int, int | None]]:
    """(min, opt, max, multiple) of one symbolic axis of an archive, with a note for every default taken,
    and the range the archive really allows (no upper bound: None).

    torch's lower bound 0 (a ``Dim`` without ``min``) is a default, not a wish: such axes start at 1;
    a bound of 2 (``Dim.AUTO``: torch specializes 0 and 1) is kept. An unbounded axis (``int_oo``) gets
    up to ``UNBOUNDED_SPAN`` times its example size. A derived dim ``16*blocks`` keeps sizes multiples of 16."""
    step, symbol = parse_dim_expr(str(expr)) or (1, "")
    lower = upper = None
    for key, rng in ep.range_constraints.items():  # the expression's range, and step x its symbol's
        scale = 1 if key == expr else step if step > 1 and str(key) == symbol else 0
        lo_b, hi_b = _bound(rng.lower), _bound(rng.upper)
        if scale and lo_b is not None:
            lower = max(lower if lower is not None else lo_b * scale, lo_b * scale)
        if scale and hi_b is not None:
            upper = min(upper if upper is not None else hi_b * scale, hi_b * scale)
    lo = max(lower if lower is not None else 1, 1)
    lo = -(-lo // step) * step
    if lower is not None and lower < 1:
        notes.append(f"{what}: torch's lower bound {lower} is its default, not a size the model serves; using {lo}")
    ex = example if example else lo
    if upper is None:
        hi = min(max(ex * UNBOUNDED_SPAN, lo), MAX_DEFAULT_SIZE) // step * step
        notes.append(f"{what} has no upper bound in the archive (Dim.AUTO or a Dim without max): using "
                     f"{lo}..{hi} ({UNBOUNDED_SPAN}x the example size {ex}); choose it with --shapes")
    else:
        hi = min(upper, MAX_DEFAULT_SIZE) // step * step
        if upper > MAX_DEFAULT_SIZE:
            notes.append(f"{what} allows up to {upper}: checking up to {hi}; choose it with --shapes")
    opt = min(max(ex // step * step, lo), hi)
    return (lo, opt, hi, step), (lower or 0, upper)


_INDEX_PASSTHROUGH = {"view", "reshape", "_reshape_alias", "clone", "contiguous", "_to_copy", "to", "unsqueeze",
                      "squeeze", "flatten", "expand", "slice", "select", "permute", "transpose", "t", "alias",
                      "lift_fresh_copy", "detach"}


def embedding_sizes(ep: Any) -> dict[str, int]:
    """User input name -> the smallest embedding table its values index (through view-like ops), read
    from an exported program's graph: the valid token ids are 0..size-1."""
    user_inputs = set(ep.graph_signature.user_inputs)
    sizes: dict[str, int] = {}
    for node in ep.graph.nodes:
        if node.op != "call_function" or getattr(node.target, "__name__", "").split(".")[0] != "embedding":
            continue
        weight, idx = node.args[0], node.args[1]
        while getattr(idx, "op", None) == "call_function" and \
                getattr(idx.target, "__name__", "").split(".")[0] in _INDEX_PASSTHROUGH:
            idx = idx.args[0]
        val = getattr(weight, "meta", {}).get("val")
        if getattr(idx, "op", None) == "placeholder" and idx.name in user_inputs and val is not None:
            size = _bound(val.shape[0])
            if size:
                sizes[idx.name] = min(size, sizes.get(idx.name, size))
    return sizes


def module_embedding_sizes(module: nn.Module, specs: list[InputSpec]) -> dict[str, int]:
    """The same for an nn.Module: run it once on all-zero inputs (a valid token id for any table) and
    see which ``nn.Embedding`` reads each integer input (the tensor itself or a view of it)."""
    ints = [s for s in specs if not s.dtype.startswith(("float", "bool"))]
    tables = [m for m in module.modules() if isinstance(m, nn.Embedding)]
    if not ints or not tables:
        return {}
    feeds = {s.name: torch.zeros(s.export_shape(), dtype=getattr(torch, s.dtype)) for s in specs}
    sizes: dict[str, int] = {}

    def hook(mod: nn.Module, args: tuple) -> None:
        idx = args[0] if args else None
        base = getattr(idx, "_base", None)
        for s in ints:
            if idx is feeds[s.name] or (base is not None and base is feeds[s.name]):
                sizes[s.name] = min(mod.num_embeddings, sizes.get(s.name, mod.num_embeddings))

    handles = [m.register_forward_pre_hook(hook) for m in tables]
    try:
        with torch.no_grad():
            module(*[feeds[s.name] for s in specs])
    except Exception:  # the caller's export reports a model that does not run
        return {}
    finally:
        for h in handles:
            h.remove()
    return sizes


def _specs_from_exported_program(ep: Any, notes: list[str],
                                  limits: dict[tuple[str, int], tuple[int, int | None]]) -> list[InputSpec]:
    """Input names, dtypes and dynamic ranges recorded in a torch.export archive (``limits`` gets the
    range each axis really allows, to check --shapes against)."""
    names = list(ep.graph_signature.user_inputs)
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    vocab = embedding_sizes(ep)
    examples = None
    if getattr(ep, "example_inputs", None):
        args, kwargs = ep.example_inputs
        examples = list(args) + list(kwargs.values())
    specs = []
    for i, name in enumerate(names):
        val = placeholders[name].meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        example = examples[i] if examples and i < len(examples) and isinstance(examples[i], torch.Tensor) else None
        lo: list[int] = []
        op: list[int] = []
        hi: list[int] = []
        steps: list[int] = []
        for axis, dim in enumerate(val.shape):
            if isinstance(dim, int):
                bounds, limits[(name, axis)] = (dim, dim, dim, 1), (dim, dim)
            else:
                bounds, limits[(name, axis)] = _axis_range(
                    ep, dim.node.expr, int(example.shape[axis]) if example is not None else None,
                    f"axis {axis} of input {name!r}", notes)
            for dims, value in zip((lo, op, hi, steps), bounds):
                dims.append(value)
        dtype = str(val.dtype).replace("torch.", "")
        low = high = None
        if name in vocab:
            low, high = 0.0, float(vocab[name] - 1)
        elif not val.dtype.is_floating_point and example is not None and example.numel():
            low, high = float(example.min()), float(example.max())
        specs.append(InputSpec(name, dtype, tuple(lo), tuple(op), tuple(hi), low, high,
                               tuple(steps) if any(x > 1 for x in steps) else ()))
    return specs


def _runs_at(module: nn.Module, specs: list[InputSpec], shapes: list[tuple[int, ...]]) -> bool:
    """Whether the program runs at these input shapes (guards included) with finite float outputs."""
    import numpy as np

    rng = np.random.default_rng(0)
    args = [torch.from_numpy(s.random(shape, rng)) for s, shape in zip(specs, shapes)]
    try:
        with torch.no_grad():
            out = module(*args)
    except Exception:  # a guard, or an op that needs the size >= 2
        return False
    leaves = [t for t in torch.utils._pytree.tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
    return all(torch.isfinite(t).all() for t in leaves if t.is_floating_point())


def _serve_size_one(module: nn.Module, specs: list[InputSpec], limits: dict[tuple[str, int], tuple[int, int | None]],
                    notes: list[str]) -> list[InputSpec]:
    """Axes that start at 2 only by torch's 0/1 specialization start at 1 where the program runs there (one
    forward, the other axes at the example's sizes), so an engine serves batch 1 and one token. ``Dim.AUTO`` writes ``[2, inf)``:
    torch assumes sizes 0 and 1 are special and adds no guard for them. A ``Dim`` with ``min=2`` has a ``max``
    (lrexport's own archives always do) and is left as asked."""
    from dataclasses import replace

    ones = [(i, axis) for i, spec in enumerate(specs) for axis in spec.dynamic_axes
            if spec.min[axis] == 2 and spec.step(axis) == 1 and limits.get((spec.name, axis)) == (2, None)]
    if not ones:
        return specs
    base = [list(s.opt) for s in specs]  # the example's sizes: the other axes where the guards surely hold
    together = [list(b) for b in base]
    for i, axis in ones:
        together[i][axis] = 1
    fine = ones if _runs_at(module, specs, [tuple(t) for t in together]) else []
    if not fine and len(ones) > 1:
        for i, axis in ones:
            shapes = [list(b) for b in base]
            shapes[i][axis] = 1
            if _runs_at(module, specs, [tuple(t) for t in shapes]):
                fine.append((i, axis))
    specs = list(specs)
    for i, axis in fine:
        spec = specs[i]
        specs[i] = replace(spec, min=tuple(1 if a == axis else d for a, d in enumerate(spec.min)))
        limits[(spec.name, axis)] = (1, limits[(spec.name, axis)][1])
        notes.append(f"axis {axis} of input {spec.name!r}: the archive's lower bound 2 is torch's 0/1 "
                     "specialization and the program runs at 1, so it starts at 1")
    return specs


def load_model(path: str | Path | None, *, factory: str | None = None, factory_kwargs: dict | str | None = None,
               trust_pickle: bool = False) -> LoadedModel:
    """Load a model file (or build one from a factory alone when ``path`` is None)."""
    if path is None:
        if not factory:
            raise LrexportError("no model given", "pass a model file or --factory package.module:function")
        return LoadedModel(build_from_factory(factory, factory_kwargs).eval(), "module", factory)
    p = Path(path)
    if not p.exists():
        raise LrexportError(f"model file {p} does not exist", "check the path")
    if p.is_dir():
        raise LrexportError(f"model path {p} is a directory", "pass the model file itself")
    if p.stat().st_size == 0:
        raise LrexportError(f"model file {p} is empty", "re-save the model (torch.jit.save / torch.export.save)")
    kind = detect_kind(p)
    if kind == "torchscript":
        try:
            with _source(p) as src:
                module = torch.jit.load(src, map_location="cpu")
        except Exception as err:
            raise LrexportError(f"TorchScript archive {p} could not be loaded ({_short(err)})",
                                "re-save it with torch.jit.save") from None
        return LoadedModel(module.eval(), "torchscript", str(p))
    if kind == "exported-program":
        from exporter.archive import load_archive

        ep = load_archive(p)
        notes: list[str] = []
        limits: dict[tuple[str, int], tuple[int, int | None]] = {}
        specs = _specs_from_exported_program(ep, notes, limits)
        module = ep.module()
        specs = _serve_size_one(module, specs, limits, notes)
        return LoadedModel(module, "exported-program", str(p), ep, specs, notes, limits)
    if kind == "unknown-zip":
        raise LrexportError(f"{p} is a zip archive but not a TorchScript, torch.export or torch.save file",
                            "save the model with torch.jit.save, torch.export.save or torch.save")
    # torch.save: a state dict (safe to read) or a pickled module (runs code: needs trust)
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
    state = _state_dict_of(obj)
    if state is None:
        raise LrexportError(f"{p} holds a {type(obj).__name__}, neither a module nor a state dict",
                            "save the model or its state_dict()")
    if not factory:
        raise LrexportError(f"{p} is a state dict, which needs the code that builds the model",
                            "pass --factory package.module:function (and --factory-kwargs JSON)")
    model = build_from_factory(factory, factory_kwargs)
    _load_state_dict(model, state, factory)
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


@contextlib.contextmanager
def _source(p: Path) -> Iterator[str | BinaryIO]:
    """What torch's loaders take for ``p``: its path, or an open file where the name is not UTF-8 (torch's
    C++ reader cannot take such a path, and fails with an error that blames the file)."""
    name = str(p)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        with open(p, "rb") as f:
            yield f
        return
    yield name


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__


def is_onnx_file(p: Path) -> bool:
    """True when the file parses as an ONNX model with a graph (read without its external data)."""
    import onnx_ir as ir

    try:
        model = ir.load(str(p))  # weights stay on disk
    except Exception:
        return False
    return bool(model.ir_version and (len(model.graph) or model.graph.inputs))


def _corrupt(p: Path, err: BaseException) -> LrexportError:
    if is_onnx_file(p):
        return LrexportError(f"{p} is an ONNX model; this command takes the PyTorch model it came from",
                             f"to check it against PyTorch use `lrexport check MODEL {p}`, to run the graph passes "
                             f"`lrexport optimize {p} OUT.onnx`, to look at it `lrexport inspect {p}`")
    return LrexportError(f"{p} is not a readable model archive ({_short(err)})",
                         "the file may be truncated or not a PyTorch file; re-save it")
