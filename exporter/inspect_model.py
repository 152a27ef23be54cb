"""``lrexport inspect``: what is in an ONNX file or a model file, at a glance."""

from __future__ import annotations

import collections
import math
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from exporter.errors import LrexportError
from exporter.loading import is_onnx_file, load_model
from exporter.table import format_table


def read_onnx(path: str | Path, load_external_data: bool = True) -> onnx.ModelProto:
    """Load an ONNX file, or say in one line why it is not one (missing, empty, damaged, no graph)."""
    path = Path(path)
    if not path.is_file():
        raise LrexportError(f"ONNX file {path} does not exist", "check the path")
    if path.stat().st_size == 0:
        raise LrexportError(f"ONNX file {path} is empty", "re-export it (lrexport export)")
    try:
        model = onnx.load(str(path), load_external_data=load_external_data)
    except Exception as err:
        _missing_external_data(path)
        raise LrexportError(f"{path} is not a readable ONNX file ({type(err).__name__})",
                            "check the path, or re-export it (a truncated copy?)") from None
    if not model.HasField("graph"):
        raise LrexportError(f"{path} holds no ONNX graph", "check the path, or re-export it")
    if not load_external_data:  # the weights are read later, from their files: those must be there
        _missing_external_data(path)
    return model


def _missing_external_data(path: Path) -> None:
    """Name the external-data file (``model.onnx.data``) that a model refers to and that is not there."""
    try:
        model = ir.load(str(path))  # external tensors stay lazy: nothing is read yet
    except Exception:
        return
    for graph in (model.graph, *model.graph.subgraphs()):
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor) and not Path(tensor.path).is_file():
                raise LrexportError(f"{path} keeps its weights in {path.parent / tensor.location}, which does "
                                    "not exist", f"put {Path(tensor.location).name} beside {path.name} (under "
                                    "that name), or re-export the model")


def _describe(v: ir.Value) -> dict[str, Any]:
    """Name, dtype and dims (int, symbolic name, or ``"?"``) of a graph input or output."""
    dims = ["?" if d is None else d if isinstance(d, int) else (d.value or "?") for d in (v.shape or [])]
    return {"name": v.name, "dtype": v.dtype.numpy().name if v.dtype is not None else "?", "dims": dims}


def inspect_onnx(path: Path) -> dict[str, Any]:
    model = ir.from_proto(read_onnx(path, load_external_data=False))  # weights stay on disk
    graph = model.graph
    inputs = [_describe(v) for v in graph.inputs]
    return {"kind": "onnx", "path": str(path),
            "opset": {domain or "ai.onnx": version for domain, version in model.opset_imports.items()},
            "ir_version": model.ir_version,
            "producer": f"{model.producer_name or ''} {model.producer_version or ''}".strip(),
            "inputs": inputs, "outputs": [_describe(v) for v in graph.outputs],
            "dynamic_axes": {i["name"]: [a for a, d in enumerate(i["dims"]) if isinstance(d, str)] for i in inputs},
            "parameters": sum(math.prod(tuple(v.shape or ())) for v in graph.initializers.values()),
            "nodes": len(graph), "op_histogram": dict(collections.Counter(n.op_type for n in graph).most_common()),
            "external_data": any(isinstance(v.const_value, ir.ExternalTensor) for v in graph.initializers.values())}


def inspect_path(path: str | Path, *, factory: str | None = None, factory_kwargs: str | None = None,
                 trust_pickle: bool = False, trust_remote_code: bool = False) -> dict[str, Any]:
    p = Path(path)
    if not p.exists():
        raise LrexportError(f"{p} does not exist", "check the path")
    if p.suffix == ".onnx" or is_onnx_file(p):
        return inspect_onnx(p)
    loaded = load_model(p, factory=factory, factory_kwargs=factory_kwargs, trust_pickle=trust_pickle,
                        trust_remote_code=trust_remote_code)
    from exporter.specs import read_sidecar, build_specs

    side = read_sidecar(p)
    specs = build_specs(*side) if side else loaded.inferred_specs
    modules = _module_histogram(loaded)
    return {"kind": loaded.kind, "path": str(p), "class": type(loaded.module).__name__,
            "parameters": loaded.parameter_count, "inputs": [s.to_dict() for s in specs],
            "module_histogram": dict(modules.most_common()),
            "notes": list(loaded.notes) + ([] if side else list(loaded.spec_notes))}


def _module_histogram(loaded) -> collections.Counter:
    """Module classes by count; for a torch.export archive, from the recorded module stack (its
    unflattened module holds only generic containers)."""
    if loaded.exported_program is None:
        return collections.Counter(type(m).__name__ for m in loaded.module.modules())
    classes: dict[str, str] = {}
    for node in loaded.exported_program.graph.nodes:
        for path, cls in (node.meta.get("nn_module_stack") or {}).values():
            name = (cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))).rsplit(".", 1)[-1]
            if not name.startswith("_"):  # torch.export's own bookkeeping entries
                classes[path] = name
    return collections.Counter(classes.values())


def format_inspection(info: dict[str, Any]) -> str:
    lines = [f"{info['path']}: {info['kind']}, {info['parameters']:,} parameters"]
    if info["kind"] == "onnx":
        opsets = ", ".join(f"{domain} {version}" for domain, version in info["opset"].items())
        lines.append(f"opset {opsets or '-'}, IR {info['ir_version']}, {info['nodes']} nodes"
                     + (", external data" if info["external_data"] else ""))
        rows = [["input", i["name"], i["dtype"], "x".join(map(str, i["dims"]))] for i in info["inputs"]]
        rows += [["output", o["name"], o["dtype"], "x".join(map(str, o["dims"]))] for o in info["outputs"]]
        lines.append(format_table(["", "name", "dtype", "dims"], rows))
        lines.append(format_table(["op", "count"], list(info["op_histogram"].items())))
    else:
        lines.append(f"class {info['class']}")
        rows = [[i["name"], i["dtype"], "x".join(map(str, i["min"])), "x".join(map(str, i["opt"])),
                 "x".join(map(str, i["max"])), "x".join(map(str, i["multiple"])),
                 f"{i['low']:g}..{i['high']:g}" if i["low"] is not None else "-"] for i in info["inputs"]]
        lines.append(format_table(["input", "dtype", "min", "opt", "max", "multiple of", "values"], rows) if rows
                     else "inputs: unknown (no sidecar .inputs.json; pass --input to build)")
        lines += [f"warning: {n}" for n in info["notes"]]
        lines.append(format_table(["module", "count"], list(info["module_histogram"].items())))
    return "\n".join(lines)
