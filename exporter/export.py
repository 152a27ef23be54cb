"""Export a loaded model to ONNX with dynamic batch/sequence axes, and say which axes stayed dynamic.

The dynamo exporter (torch.export + torch.onnx) is the default: it keeps per-node module paths
(``pkg.torch.onnx.name_scopes``) that the parity report uses. The TorchScript exporter is a fallback
only (``exporter="torchscript"``): it is deprecated and exports some models wrongly.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import onnx
import onnx_ir as ir
import torch
from torch.fx.experimental.symbolic_shapes import is_concrete_int
from torch import nn

from exporter.errors import LrexportError
from exporter.loading import LoadedModel
from exporter.linear_attention.onnx_export import TRANSLATION_TABLE as LINEAR_ATTENTION_TRANSLATION
from exporter.patches import applied, select_patches
from exporter.served_range import ServedAxis, check_served, confirm_outside_guards, unserved_axes
from exporter.specs import InputSpec, parse_dim_expr
from graph_passes.ort_session import PROTO_LIMIT, has_external_data, held_bytes, proto_tensors, tensor_bytes

DEFAULT_OPSET = 18
MIN_OPSET = 17  # LayerNormalization
_AXIS_NAMES = {0: "batch", 1: "seq"}
_GUARDS = "__guards__"  # key in the reasons dict: conditions torch.export narrowed the ranges with


@dataclass
class PinnedAxis:
    """A dynamic axis the exporter fixed to one size, and why."""

    input: str
    axis: int
    requested: tuple[int, int]
    size: int
    reason: str

    def message(self) -> str:
        return (f"axis {self.axis} of input {self.input!r} became static ({self.size}; requested "
                f"{self.requested[0]}..{self.requested[1]}): {self.reason}")


@dataclass
class ExportResult:
    onnx_path: Path
    exporter: str
    opset: int
    seconds: float
    specs: list[InputSpec]  # the specs as exported (pinned axes made static)
    output_names: list[str]
    pinned: list[PinnedAxis] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    program: Any = field(default=None, repr=False)  # the exported program translated (dynamo); not saved
    patches: list[str] = field(default_factory=list)  # export patches applied (exporter/patches.py)

    def to_dict(self) -> dict:
        return {"onnx": str(self.onnx_path), "exporter": self.exporter, "opset": self.opset,
                "seconds": round(self.seconds, 3), "inputs": [s.to_dict() for s in self.specs],
                "outputs": self.output_names,
                "pinned_axes": [{"input": p.input, "axis": p.axis, "requested": list(p.requested),
                                 "size": p.size, "reason": p.reason} for p in self.pinned],
                "warnings": self.warnings, "patches": self.patches}


def dim_names(specs: Sequence[InputSpec],
              equal: dict[tuple[str, int], tuple[str, int]] | None = None) -> dict[tuple[str, int], str]:
    """Name each dynamic axis (axis 0 ``batch``, axis 1 ``seq``; ``seq_2`` for a second input's). Axes are
    independent unless ``equal`` says one must equal another (torch's suggested fix ``seq_2 = seq``): two
    inputs with the same range may still differ in length (an encoder's source and a decoder's target); a
    padding mask (``InputSpec.mask_for``) has its tokens' names."""
    names: dict[tuple[str, int], str] = {}
    used: set[str] = set()
    for spec in specs:
        for axis in spec.dynamic_axes:
            base = _AXIS_NAMES.get(axis, f"dim{axis}")
            name, k = base, 2
            while name in used:
                name, k = f"{base}_{k}", k + 1
            used.add(name)
            names[(spec.name, axis)] = name
    by_name = {s.name: s for s in specs}
    for spec in specs:  # a padding mask has its tokens' shape
        tokens = by_name.get(spec.mask_for or "")
        if tokens is not None and (tokens.min, tokens.max) == (spec.min, spec.max):
            for axis in spec.dynamic_axes:
                names[(spec.name, axis)] = names[(tokens.name, axis)]
    for key, other in (equal or {}).items():
        if key in names and other in names:
            names[key] = names[other]
    return names


def pin_shared_axes(specs: Sequence[InputSpec], pinned: Sequence["PinnedAxis"]) -> list[InputSpec]:
    """``specs`` with each pinned axis made static, and with it every axis that shares its name
    (:func:`dim_names`: a padding mask's axes are its tokens'), so the inputs stay the same length where the
    model takes them as one (parity never feeds 16 tokens with a 1-token mask)."""
    names = dim_names(specs)
    sizes = {names[(p.input, p.axis)]: p.size for p in pinned if (p.input, p.axis) in names}
    out = []
    for spec in specs:
        for axis in spec.dynamic_axes:
            if names[(spec.name, axis)] in sizes:
                spec = spec.with_static_axis(axis, sizes[names[(spec.name, axis)]])
        out.append(spec)
    return out


def torch_dynamic_shapes(specs: Sequence[InputSpec], auto: bool = False,
                         equal: dict[tuple[str, int], tuple[str, int]] | None = None) -> tuple[dict[int, Any], ...]:
    """torch.export dynamic_shapes for positional inputs in ``specs`` order."""
    names = dim_names(specs, equal)
    dims: dict[str, Any] = {}
    out = []
    for spec in specs:
        per_axis: dict[int, Any] = {}
        for axis in spec.dynamic_axes:
            name, step = names[(spec.name, axis)], spec.step(axis)
            if auto:
                per_axis[axis] = torch.export.Dim.AUTO
            elif step > 1:  # a derived dim: step * blocks
                blocks = f"{name}_blocks"
                dims.setdefault(blocks, torch.export.Dim(blocks, min=spec.min[axis] // step,
                                                         max=spec.max[axis] // step))
                per_axis[axis] = step * dims[blocks]
            else:
                dims.setdefault(name, torch.export.Dim(name, min=spec.min[axis], max=spec.max[axis]))
                per_axis[axis] = dims[name]
        out.append(per_axis)
    return tuple(out)


def example_args(specs: Sequence[InputSpec], seed: int = 0) -> tuple[torch.Tensor, ...]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return tuple(torch.from_numpy(s.random(s.export_shape(), rng)) for s in specs)


def order_specs(module: nn.Module, specs: Sequence[InputSpec]) -> list[InputSpec]:
    """Order specs like ``forward``'s parameters when the names match (else keep the given order)."""
    try:
        params = [p for p in inspect.signature(module.forward).parameters
                  if p not in ("self", "args", "kwargs")]
    except (TypeError, ValueError):
        return list(specs)
    names = [s.name for s in specs]
    if set(names) <= set(params):
        return sorted(specs, key=lambda s: params.index(s.name))
    return list(specs)


def flatten_outputs(out: Any) -> list[tuple[str, torch.Tensor]]:
    """A model's tensor outputs in the order the ONNX exporter writes them, with readable names:
    dict keys (HF ModelOutput too), else output / output_<i>. Non-tensor leaves (None) are dropped."""
    if isinstance(out, dict):
        named = []
        for key, value in out.items():
            leaves = [t for t in torch.utils._pytree.tree_flatten(value)[0] if isinstance(t, torch.Tensor)]
            named += [(str(key) if len(leaves) == 1 else f"{key}_{i}", t) for i, t in enumerate(leaves)]
        return named
    leaves = [t for t in torch.utils._pytree.tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
    if len(leaves) == 1:
        return [("output", leaves[0])]
    return [(f"output_{i}", t) for i, t in enumerate(leaves)]


def output_names_for(module: nn.Module, args: tuple) -> list[str]:
    with torch.no_grad():
        return [name for name, _ in flatten_outputs(module(*args))]


@contextlib.contextmanager
def _quiet():
    """Silence the exporter's progress chatter and warnings (lrexport reports its own progress)."""
    buf = io.StringIO()
    # onnxscript: a failed opset conversion logs a traceback at ERROR; the opset the file has is reported instead
    quiet = {"torch.onnx": logging.ERROR, "torch.export": logging.ERROR, "torch._dynamo": logging.ERROR,
             "torch.fx": logging.ERROR, "onnxscript": logging.CRITICAL}
    loggers = [logging.getLogger(n) for n in quiet]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(quiet[lg.name])
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf):
            warnings.simplefilter("ignore")
            yield buf
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


def _unsupported_op(err: BaseException, ep: Any) -> LrexportError | None:
    """Turn a 'no ONNX function for op X' failure into a one-line error naming the op and module."""
    text = str(err) + " " + str(err.__cause__ or "")
    m = re.search(r"OpOverload\(op='([\w.:]+)'", text) or re.search(r"No ONNX function found for ([\w.:]+)", text)
    if not m:
        return None
    op = m.group(1)
    module = "the model's top level"
    node_m = re.search(r"Error when translating node %(\w+)", text)
    if ep is not None and node_m:
        for node in ep.graph.nodes:
            if node.name == node_m.group(1):
                stack = node.meta.get("nn_module_stack") or {}
                if stack:
                    path, cls = list(stack.values())[-1]
                    cls_name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
                    module = f"module {path.replace('L__self___', '').strip() or '<root>'!r} ({cls_name.split('.')[-1]})"
                break
    return LrexportError(f"the ONNX exporter cannot handle op {op} in {module}",
                         "replace it with standard torch ops, or register an ONNX translation for it")


def _chain_text(err: BaseException, limit: int = 300) -> str:
    """``Type: first line`` of an error and of each error it was raised from (torch's converter says only
    which node failed; its cause says why), repeated texts once."""
    parts: list[str] = []
    seen: set[int] = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        first = str(cur).strip().splitlines()[0] if str(cur).strip() else ""
        if first and first not in parts:
            parts.append(first)
        cur = cur.__cause__ or cur.__context__
    return f"{type(err).__name__}: {': '.join(parts)}"[:limit] if parts else type(err).__name__


def _torch_export(module: nn.Module, args: tuple, specs: Sequence[InputSpec]
                  ) -> tuple[Any, dict[str, str], list[InputSpec]]:
    """torch.export with the requested ranges. Where torch's suggested fix makes an axis a multiple
    (``seq = 16*_seq``: the model splits it into blocks), retry with that derived dim, so the ONNX input
    says so and every parity size respects it; where the model forces an axis static, retry with
    automatic dims and keep torch's explanation as the reason. Returns the specs as exported."""
    reasons: dict[str, str] = {}
    specs = list(specs)
    equal: dict[tuple[str, int], tuple[str, int]] = {}
    for attempt in range(3):
        try:
            with _quiet():
                ep = torch.export.export(module, args, dynamic_shapes=torch_dynamic_shapes(specs, equal=equal),
                                         strict=False)
            return ep, reasons, specs
        except Exception as err:  # constraint violations come as torch._dynamo.exc.UserError
            text = str(err)
            if "Constraints violated" not in text and "constraint" not in text.lower():
                raise
            multiples = _suggested_multiples(text, specs)
            equals = _suggested_equal(text, specs, equal)
            if attempt == 2 or not (multiples or equals):
                break
            equal.update(equals)  # the model says these axes are one size (an add of two inputs, say)
            for (name, axis), step in multiples.items():  # a size the model cannot take is a one-line error
                specs = [spec.with_multiple(axis, step) if spec.name == name else spec for spec in specs]
    guards = [ln.strip()[2:] for ln in text.splitlines() if ln.strip().startswith("- Not all values")]
    if guards:
        reasons[_GUARDS] = "; ".join(guards)
    for line in text.splitlines():
        m = re.search(r"marked (\w+) as dynamic but your code (specialized it to be a constant \(\d+\))", line) \
            or re.search(r"values of (\w+) = .*?(inferred to be (?:a constant|equal to)[^.]*)", line)
        if m:
            reasons[m.group(1)] = (f"the model's code {m.group(2).strip()} (e.g. a layer sized by this axis, "
                                   "or control flow on it)")
    with _quiet():
        ep = torch.export.export(module, args, dynamic_shapes=torch_dynamic_shapes(specs, auto=True), strict=False)
    return ep, reasons, specs


def _suggested_multiples(text: str, specs: Sequence[InputSpec]) -> dict[tuple[str, int], int]:
    """(input, axis) -> multiple from torch's suggested fixes of the form ``seq = 16*_seq``."""
    by_dim = {name: key for key, name in dim_names(specs).items()}
    found = {}
    for m in re.finditer(r"^\s*(\w+) = (\d+)\*_\w+\s*$", text.split("Suggested fixes:")[-1], re.M):
        key = by_dim.get(m.group(1))
        if key is not None:
            found[key] = int(m.group(2))
    return found


def _suggested_equal(text: str, specs: Sequence[InputSpec], equal: dict[tuple[str, int], tuple[str, int]]
                     ) -> dict[tuple[str, int], tuple[str, int]]:
    """(input, axis) -> the (input, axis) torch's suggested fixes say it equals (``seq_2 = seq``), where both
    ranges agree (else the model cannot serve what was asked, which the export then reports)."""
    by_dim = {name: key for key, name in dim_names(specs, equal).items()}
    spec_of = {s.name: s for s in specs}
    found = {}
    for m in re.finditer(r"^\s*(\w+) = (\w+)\s*$", text.split("Suggested fixes:")[-1], re.M):
        key, other = by_dim.get(m.group(1)), by_dim.get(m.group(2))
        if key is None or other is None or key == other:
            continue
        a, b = spec_of[key[0]], spec_of[other[0]]
        if (a.min[key[1]], a.max[key[1]]) == (b.min[other[1]], b.max[other[1]]):
            found[key] = other
    return found


def _learn_multiples(module: nn.Module, args: tuple, specs: list[InputSpec]) -> list[InputSpec]:
    """The TorchScript trace never says that an axis must be a multiple (a model that splits the sequence into
    blocks); torch.export's suggested fixes do, so ask it (best effort: a model it cannot trace keeps its specs)."""
    if isinstance(module, torch.jit.ScriptModule):
        return specs
    try:
        with _quiet():
            torch.export.export(module, args, dynamic_shapes=torch_dynamic_shapes(specs), strict=False)
    except Exception as err:  # a size the model cannot take is a one-line error (InputSpec.with_multiple)
        for (name, axis), step in _suggested_multiples(str(err), specs).items():
            specs = [spec.with_multiple(axis, step) if spec.name == name else spec for spec in specs]
    return specs


def _static_axes(ep: Any, specs: Sequence[InputSpec], reasons: dict[str, str]) -> list[PinnedAxis]:
    placeholders = [n for n in ep.graph.nodes if n.op == "placeholder"
                    and n.name in ep.graph_signature.user_inputs]
    names = dim_names(specs)
    pinned = []
    for spec, node in zip(specs, placeholders):
        shape = node.meta["val"].shape
        for axis in spec.dynamic_axes:
            if is_concrete_int(shape[axis]):
                dim = names[(spec.name, axis)]
                reason = reasons.get(dim, "the model's code fixes it at the example size "
                                          "(a layer sized by this axis, or control flow on it)")
                pinned.append(PinnedAxis(spec.name, axis, (spec.min[axis], spec.max[axis]),
                                         int(shape[axis]), reason))
    return pinned


def _rename_dims(model: ir.Model, specs: Sequence[InputSpec]) -> None:
    """Give the graph's symbolic dims the readable names lrexport uses (batch, seq, ...); a derived
    dim keeps its form (``16*s11`` -> ``16*seq_blocks``)."""
    names = dim_names(specs)
    mapping: dict[str, str] = {}
    for spec, value in zip(specs, model.graph.inputs):
        for axis, dim in enumerate(value.shape or ()):
            sym = _symbol(dim)
            if sym is not None and (spec.name, axis) in names:
                parsed = parse_dim_expr(sym)
                name = names[(spec.name, axis)]
                if parsed and parsed[0] > 1:
                    mapping.setdefault(parsed[1], f"{name}_blocks")
                    mapping.setdefault(sym, f"{parsed[0]}*{name}_blocks")
                else:
                    mapping.setdefault(sym, name)
        pinned = {axis: spec.opt[axis] for axis, dim in enumerate(value.shape or ())
                  if _symbol(dim) is not None and axis not in spec.dynamic_axes}
        _reshape(value, lambda axis, dim: pinned.get(axis, dim))  # pinned by the exporter: say so in the graph too
    graph = model.graph
    for value in dict.fromkeys([*graph.inputs, *graph.outputs, *(v for node in graph for v in node.outputs)]):
        _reshape(value, lambda _axis, dim: mapping.get(_symbol(dim) or "", dim))


def _symbol(dim: Any) -> str | None:
    """The name of a symbolic dim; None for a fixed size or an unnamed dim."""
    return dim.value if isinstance(dim, ir.SymbolicDim) else None


def _reshape(value: ir.Value, change: Callable[[int, Any], Any]) -> None:
    """Give ``value`` a new shape, ``change(axis, dim)`` per dim (a deserialized shape is frozen)."""
    shape = value.shape
    if shape is None:
        return
    dims = [change(axis, dim) for axis, dim in enumerate(shape)]
    if dims != list(shape):
        value.shape = ir.Shape(dims, denotations=[shape.get_denotation(a) for a in range(shape.rank())])


def save_onnx(model: onnx.ModelProto | ir.Model, path: Path, base_dir: str | Path | None = None) -> None:
    """Save with the weights inline when they total less than 2 GB, else in one external-data file
    ``<name>.data``. ``base_dir``: where the external data of a model loaded without it lies.

    Large models go through onnx-ir, which writes each tensor from where it is (a torch tensor, a view of
    the message, an external file mapped lazily): the weights are never serialized into one message,
    nor copied as a whole."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    if isinstance(model, onnx.ModelProto):
        if not has_external_data(model) and held_bytes(model) < PROTO_LIMIT:
            onnx.save_model(model, str(path))
            data.unlink(missing_ok=True)
            return
        if base_dir is not None and tensor_bytes(model) >= PROTO_LIMIT and _link_weights(model, path, Path(base_dir)):
            return
        model = ir.serde.deserialize_model(model)  # views the message's tensors; the caller's message stays as it is
        if base_dir is not None:
            ir.external_data.set_base_dir(model.graph, base_dir)
    if tensor_bytes(model) < PROTO_LIMIT:
        ir.save(ir.external_data.load_to_model(model), path)
        data.unlink(missing_ok=True)
    else:
        ir.save(model, path, external_data=data.name)


def runnable_copy(onnx_path: str | Path, folder: str | Path, lowering: str = "portable") -> Path:
    """``onnx_path`` itself when no runtime needs anything lowered, else a copy in ``folder`` with its
    ``lrexport.LinearAttention`` nodes lowered: for the checks that run what export wrote (the served range)."""
    from graph_passes import PassOptions
    from graph_passes.linear_attention import LinearAttentionPass, has_linear_attention

    model = ir.load(str(onnx_path))
    if not has_linear_attention(model):
        return Path(onnx_path)
    LinearAttentionPass(PassOptions(linear_attention=lowering))(model)
    out = Path(folder) / "lowered.onnx"
    save_onnx(model, out)
    return out


def _link_weights(model: onnx.ModelProto, path: Path, base_dir: Path) -> bool:
    """Save a model whose weights all lie in one external-data file (a model loaded without them, after
    passes that left the weights as they were) with ``<name>.data`` a hard link to that file: no weight
    is read or copied. Tensors the passes dropped stay in the file, unread. False (nothing written) when
    the model holds more than small constants itself, or its weights lie in several files, or the file
    system cannot link."""
    locations = {entry.value for t in proto_tensors(model.graph) if t.data_location == onnx.TensorProto.EXTERNAL
                 for entry in t.external_data if entry.key == "location"}
    if len(locations) != 1 or held_bytes(model) >= PROTO_LIMIT // 32:
        return False
    src, data = base_dir / locations.pop(), path.with_name(path.name + ".data")
    if src.resolve() != data.resolve():
        data.unlink(missing_ok=True)
        try:
            os.link(src, data)
        except OSError:
            return False
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # small: its weights are external
    for t in proto_tensors(copy.graph):
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = data.name
    onnx.save_model(copy, str(path))
    return True


def max_opset(exporter: str = "dynamo") -> int:
    """The newest opset both the installed torch.onnx exporter and onnx (its checker, the passes) support."""
    from torch.onnx import _constants

    declared = getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET" if exporter == "torchscript"
                       else "ONNX_MAX_OPSET", DEFAULT_OPSET)
    return min(int(declared), onnx.defs.onnx_opset_version())


def check_opset(opset: int, exporter: str = "dynamo") -> None:
    """Refuse an opset outside what this export can write (one line naming the range), before any work:
    past the maximum, torch.onnx's version converter fails with a traceback and keeps its own opset."""
    newest = max_opset(exporter)
    if opset < MIN_OPSET:
        raise LrexportError(f"opset {opset} is too old", f"use --opset {MIN_OPSET} or newer (LayerNormalization)")
    if opset > newest:
        raise LrexportError(f"opset {opset} is newer than the {exporter} exporter supports here (torch "
                            f"{torch.__version__.split('+')[0]}, onnx {onnx.__version__}: up to opset {newest})",
                            f"use --opset {MIN_OPSET}..{newest} (default {DEFAULT_OPSET})")


def export_onnx(loaded: LoadedModel | nn.Module, specs: Sequence[InputSpec], path: str | Path, *,
                exporter: str = "dynamo", opset: int = DEFAULT_OPSET,
                progress: Callable[[str], None] | None = None, patches: bool = True) -> ExportResult:
    """Export to ``path`` (weights inline below 2 GB, else in ``<path>.data``) and verify with the checker and shape inference.

    With ``patches`` the export-hostile functions of known libraries are swapped for equal export-friendly
    ones while exporting (``exporter/patches.py``); the result lists them."""
    if exporter not in ("dynamo", "torchscript"):
        raise LrexportError(f"unknown exporter {exporter!r}", "use dynamo or torchscript")
    check_opset(opset, exporter)
    if not specs:
        raise LrexportError("no input spec for the model",
                            "pass --input NAME:DIMS:DTYPE (and --shapes for dynamic axes), or a sidecar .inputs.json")
    loaded = loaded if isinstance(loaded, LoadedModel) else LoadedModel(loaded, "module", "<module>")
    path = Path(path)
    say = progress or (lambda _msg: None)
    module = loaded.module
    specs = order_specs(module, specs)
    if loaded.exported_program is not None:  # the archive's own guards, before it runs or is exported again
        check_served(loaded.exported_program, specs, module)
    args = example_args(specs)
    chosen = select_patches(module) if patches else []
    with applied(module, chosen, eager_only=True):
        try:
            out_names = output_names_for(module, args)
        except LrexportError:  # a patch refusing what it cannot export, said by the patch
            raise
        except Exception as err:
            from exporter.model_errors import triton_without_gpu

            raise triton_without_gpu(err) or LrexportError(
                f"the model does not run on the given inputs ({type(err).__name__}: "
                f"{str(err).strip().splitlines()[0][:300]})",
                "check --input names, shapes and dtypes against the model's forward()") from None
    start = time.perf_counter()
    warnings_out: list[str] = list(loaded.notes)
    for patch in chosen:
        say(f"patch: {patch.label}")
    source = module
    if exporter == "dynamo" and loaded.kind == "torchscript":
        say("converting TorchScript to torch.export")
        try:
            from torch._export.converter import TS2EPConverter

            with _quiet():
                source = TS2EPConverter(module, args).convert().module()
        except Exception as err:
            warnings_out.append(f"TorchScript->torch.export conversion failed ({_chain_text(err)}); "
                                "used the TorchScript exporter instead")
            exporter = "torchscript"
    unserved: list[ServedAxis] = []  # guards narrower than asked: checked against the eager model below
    with applied(module, chosen):
        if exporter == "dynamo":
            model, program, specs, pinned = _export_dynamo(source, args, specs, opset, out_names, say, warnings_out,
                                                           unserved)
        else:
            model, pinned, specs = _export_torchscript(module, args, specs, opset, out_names, say)
            program = None
    exported_specs = pin_shared_axes(specs, pinned)
    for pin in pinned:
        warnings_out.append(pin.message())
    _rename_dims(model, exported_specs)
    written = model.opset_imports.get("", model.opset_imports.get("ai.onnx", opset))
    if written != opset:
        warnings_out.append(f"asked for opset {opset}, but torch.onnx's version converter left the model at opset "
                            f"{written}; the file is opset {written}")
    if tensor_bytes(model) < PROTO_LIMIT:
        proto = ir.to_proto(model)
        _verify(proto, say, warnings_out)
        save_onnx(proto, path)
    else:  # past 2 GB no message may hold the weights: written from the torch tensors, checked from the file
        save_onnx(model, path)
        _verify(path, say, warnings_out)
    if unserved:
        say("checking the sizes torch's guards exclude")
        confirm_outside_guards(path, module, exported_specs, unserved, warnings_out)
    seconds = time.perf_counter() - start
    return ExportResult(path, exporter, written, seconds, exported_specs, out_names, pinned, warnings_out, program,
                        [p.label for p in chosen])


def _verify(model: onnx.ModelProto | Path, say: Callable[[str], None], warnings_out: list[str]) -> None:
    """onnx.checker and strict shape inference; a model saved with external data is checked from its file
    (the checker then also finds the data file) and shape-inferred with its weights left on disk."""
    say("checking the ONNX model")
    try:
        onnx.checker.check_model(str(model) if isinstance(model, Path) else model, full_check=False)
    except onnx.checker.ValidationError as err:
        raise LrexportError(f"the exported model fails onnx.checker ({str(err).splitlines()[0][:200]})",
                            "report this as an lrexport bug with the model") from None
    try:
        proto = onnx.load(str(model), load_external_data=False) if isinstance(model, Path) else model
        onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    except Exception as err:
        warnings_out.append(f"ONNX shape inference: {str(err).splitlines()[0][:200]}")


def _export_dynamo(source: Any, args: tuple, specs: list[InputSpec], opset: int, out_names: list[str],
                   say: Callable[[str], None], warnings_out: list[str], unserved: list[ServedAxis],
                   ) -> tuple[ir.Model, Any, list[InputSpec], list[PinnedAxis]]:
    """torch.export ourselves (so every pinned or narrowed axis is seen), then torch.onnx on the program.
    Axes whose guards allow less than asked go to ``unserved``, for the caller to check the ONNX there."""
    say("torch.export")
    try:
        ep, reasons, specs = _torch_export(source, args, specs)
    except LrexportError:
        raise
    except Exception as err:
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
        raise LrexportError(f"torch.export failed ({type(err).__name__}: {first})",
                            "fix the model for torch.export, or try --exporter torchscript") from None
    pinned = _static_axes(ep, specs, reasons)
    served_specs = pin_shared_axes(specs, pinned)  # a pinned axis is reported as such; the others serve their range
    unserved.extend(unserved_axes(ep, served_specs))
    narrowed = _narrowed_axes(ep, specs, reasons)
    if narrowed and not unserved:  # the guard probe is the finer account; the caller checks what it found
        raise LrexportError(narrowed[0], "ask for sizes inside that range with --shapes")
    if _GUARDS in reasons:
        warnings_out.append(f"torch.export narrowed the requested ranges ({reasons[_GUARDS][:300]}) and exported "
                            "with automatic dims; the ONNX graph does not check these conditions, so parity at "
                            "min/max/odd decides")
    say("translating to ONNX")
    try:
        with _quiet():
            onnx_program = torch.onnx.export(ep, (), dynamo=True, opset_version=opset, optimize=True,
                                             input_names=[s.name for s in specs], output_names=out_names,
                                             custom_translation_table=LINEAR_ATTENTION_TRANSLATION)
    except Exception as err:
        if unserved:  # the range it serves is the first thing to fix; there is no ONNX to check it on
            raise unserved[0].error(specs) from None
        raise (_unsupported_op(err, ep) or LrexportError(
            f"ONNX translation failed ({type(err).__name__}: {str(err).strip().splitlines()[0][:300]})",
            "try --exporter torchscript")) from None
    return onnx_program.model, onnx_program.exported_program, specs, pinned


def _export_torchscript(module: nn.Module, args: tuple, specs: list[InputSpec], opset: int, out_names: list[str],
                        say: Callable[[str], None]) -> tuple[ir.Model, list[PinnedAxis], list[InputSpec]]:
    say("TorchScript exporter (fallback)")
    specs = _learn_multiples(module, args, specs)
    names = dim_names(specs)
    dynamic_axes = {s.name: {a: names[(s.name, a)] for a in s.dynamic_axes} for s in specs}
    buf = io.BytesIO()
    try:
        with _quiet():
            torch.onnx.export(module, args, buf, dynamo=False, opset_version=opset,
                              input_names=[s.name for s in specs], output_names=out_names,
                              dynamic_axes={k: v for k, v in dynamic_axes.items() if v})
    except Exception as err:
        m = re.search(r"(?:operator|op) '?([\w:.]+)'? (?:to ONNX opset|is not supported)", str(err))
        if m:
            raise LrexportError(f"the ONNX exporter cannot handle op {m.group(1)}",
                                "replace it with standard torch ops") from None
        raise LrexportError(f"TorchScript export failed ({type(err).__name__}: "
                            f"{str(err).strip().splitlines()[0][:300]})",
                            "try the default dynamo exporter") from None
    model = ir.from_proto(onnx.load_from_string(buf.getvalue()))
    return model, _static_from_onnx(model, specs), specs


def _bound(value: Any) -> int | None:
    """A range bound as an int (None for torch's int_oo)."""
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError, AttributeError):
        return None


def _narrowed_axes(ep: Any, specs: Sequence[InputSpec], reasons: dict[str, str]) -> list[str]:
    """Requested ranges the exported program cannot serve, read from its ``range_constraints``.

    torch.export retried with automatic dims narrows a range to what the model's guards allow (fla's
    ``if T <= 64`` branches, say). A lower bound of 2 for a requested 1 is torch's 0/1 specialization,
    which the graph serves; anything else narrower than requested is refused, with the range it serves."""
    placeholders = [n for n in ep.graph.nodes if n.op == "placeholder"
                    and n.name in ep.graph_signature.user_inputs]
    found = []
    for spec, node in zip(specs, placeholders):
        shape = node.meta["val"].shape
        for axis in spec.dynamic_axes:
            dim = shape[axis]
            expr = getattr(getattr(dim, "node", None), "expr", None)
            if expr is None or expr not in ep.range_constraints:
                continue  # a static axis (reported as pinned) or a derived dim (its blocks carry the range)
            vr = ep.range_constraints[expr]
            lo, hi = _bound(vr.lower), _bound(vr.upper)
            lo = lo if lo is not None else 0
            want_lo, want_hi = spec.min[axis], spec.max[axis]
            low_ok = want_lo >= lo or (want_lo <= 1 and lo == 2)
            if low_ok and (hi is None or want_hi <= hi):
                continue
            serves = f"{lo}..{want_hi if hi is None else min(hi, want_hi)}"
            why = reasons.get(_GUARDS, "the model's code branches on this size")
            found.append(f"axis {axis} of input {spec.name!r} was requested as {want_lo}..{want_hi}, but the "
                         f"exported model serves only {serves} ({why[:300]})")
    return found


def _static_from_onnx(model: ir.Model, specs: Sequence[InputSpec]) -> list[PinnedAxis]:
    """Requested dynamic axes that the TorchScript exporter wrote as fixed sizes."""
    pinned = []
    for spec, value in zip(specs, model.graph.inputs):
        dims = list(value.shape or ())
        for axis in spec.dynamic_axes:
            if axis < len(dims) and isinstance(dims[axis], int):
                pinned.append(PinnedAxis(spec.name, axis, (spec.min[axis], spec.max[axis]), dims[axis],
                                         "the TorchScript exporter traced it as a constant"))
    return pinned


MODEL_FORMATS = ("pt2", "torchscript", "state-dict", "pickle")


def save_model(module: nn.Module, specs: Sequence[InputSpec], path: str | Path, fmt: str = "pt2") -> Path:
    """Save a module for ``lrexport build`` (.pt2 with the specs' dynamic axes, TorchScript, state dict or
    pickle) and write its input spec beside it as ``<stem>.inputs.json``."""
    from exporter.specs import write_sidecar

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    args = example_args(specs)
    if fmt == "pt2":
        with _quiet():
            ep = torch.export.export(module, args, dynamic_shapes=torch_dynamic_shapes(specs), strict=False)
        torch.export.save(ep, str(path))
    elif fmt == "torchscript":
        with _quiet():
            torch.jit.save(torch.jit.trace(module, args), str(path))
    elif fmt == "state-dict":
        torch.save(module.state_dict(), str(path))
    elif fmt == "pickle":
        torch.save(module, str(path))
    else:
        raise LrexportError(f"unknown model format {fmt!r}", f"use one of {', '.join(MODEL_FORMATS)}")
    write_sidecar(path, [s.input_string() for s in specs], [s.shapes_string() for s in specs])
    return path
