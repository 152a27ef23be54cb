"""Build a TensorRT / TensorRT-RTX engine from an ONNX file, with one optimization profile from the input specs.

Two steps, each readable and testable on its own: ``plan_engine`` checks everything that needs no
TensorRT run (arguments, paths, backend, the shape ranges against the ONNX inputs, the precision the
model holds) and ``build_planned`` parses, configures, builds and writes the engine and a metadata JSON
beside it (``model.engine`` -> ``model.engine.json``) atomically, together. ``build_engine`` is both.

The builder takes the model as it is given: networks are strongly typed, so the precision is whatever
the ONNX tensor types say. Casting to fp16/bf16 is the precision cast's job
(``graph_passes.precision_cast``, run by ``lrexport build --fp16``), done once, before this; the
metadata records the precision the model held. Parsing is ``parse_from_file`` (external data and
>2 GB models) or from bytes; unparseable nodes are reported by name and op type with the lrexport pass
that would help.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import onnx_ir as ir

from exporter.errors import LrexportError
from exporter.outputs import atomic_files, atomic_write_file, check_new_file, reading
from exporter.specs import InputSpec
from exporter.trt_backend import Backend, dims_list, engine_profiles, get_backend, profile_entry
from graph_passes.ort_session import PROTO_LIMIT, tensor_bytes
from graph_passes.precisions import float_type_counts, model_precision, normalize_precision

if TYPE_CHECKING:
    import tensorrt as trt

__all__ = ["EngineBuildResult", "EnginePlan", "build_engine", "build_planned", "plan_engine"]

META_FORMAT = 1


# op type -> what helps when TensorRT cannot parse it
PASS_HINTS: dict[str, str] = {
    "Einsum": "run the `einsum` pass (rewrites Einsum into MatMul/Transpose; TensorRT takes at most 2 operands)",
    "CumSum": "run the `causal-chunk` pass (chunked causal linear attention, no CumSum over the sequence)",
    "Det": "compute the determinant outside the exported graph",
    "LayerNormalization": "export with opset >= 17 or run the graph passes' LayerNorm fusion",
}
_GENERIC_HINT = ("export without this op, or run the lrexport graph passes (cleanup, lowrank, causal-chunk, einsum); "
                 "a custom op needs a TensorRT plugin")


def pass_hint(op_type: str, domain: str = "") -> str:
    if domain not in ("", "ai.onnx"):
        return f"custom op of domain {domain!r}: register a TensorRT plugin for it or remove it from the export"
    return PASS_HINTS.get(op_type, _GENERIC_HINT)


@dataclass
class UnsupportedNode:
    name: str
    op_type: str
    index: int | None
    reason: str
    hint: str

    def describe(self) -> str:
        where = f"#{self.index} " if self.index is not None and self.index >= 0 else ""
        return f"{where}{self.name or '<unnamed>'} ({self.op_type})"


class UnsupportedOnnxError(LrexportError):
    """TensorRT could not parse some ONNX nodes; ``.unsupported_nodes`` lists them."""

    def __init__(self, problem: str, hint: str, nodes: Sequence[UnsupportedNode]):
        super().__init__(problem, hint)
        self.unsupported_nodes = list(nodes)


@dataclass
class EngineBuildResult:
    engine_path: Path
    meta_path: Path
    backend: str
    backend_version: str
    precision: str  # what the model held (its tensor types), not what was asked
    build_seconds: float
    engine_bytes: int
    profiles: list[dict]
    unsupported_nodes: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    network_onnx: Path | None = None  # the ONNX parsed: the one given
    inputs: list[dict] = field(default_factory=list)
    outputs: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        out = asdict(self)
        for key in ("engine_path", "meta_path", "network_onnx"):
            out[key] = str(out[key]) if out[key] is not None else None
        return out


# --------------------------------------------------------------------------------------------- helpers

def lrexport_version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version
        try:
            return version("lrexport")
        except PackageNotFoundError:
            pass
    except ImportError:  # pragma: no cover
        pass
    try:
        import tomllib

        root = Path(__file__).resolve().parent.parent / "pyproject.toml"
        return str(tomllib.loads(root.read_text())["project"]["version"]) + "+src"
    except Exception:
        return "unknown"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file read in chunks (engines and weights can be GBs)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def gpu_info() -> dict | None:
    """Name and compute capability of the current CUDA GPU (via torch), or None."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        idx = torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(idx)
        return {"name": torch.cuda.get_device_name(idx), "compute_capability": f"{major}.{minor}"}
    except Exception:
        return None


def meta_path_for(engine_path: str | Path) -> Path:
    p = Path(engine_path)
    return p.with_name(p.name + ".json")


def source_digest(onnx_path: Path, model: ir.Model) -> dict:
    """sha256 of the .onnx file and of each external-data file its initializers reference."""
    files = dict.fromkeys(onnx_path.parent / v.const_value.location for v in model.graph.initializers.values()
                          if isinstance(v.const_value, ir.ExternalTensor))
    data = {}
    for p in files:
        if not p.is_file():
            raise LrexportError(f"external data file {p} referenced by {onnx_path.name} is missing",
                                "keep the .onnx.data file next to the .onnx (export again if it was lost)")
        data[p.name] = sha256_file(p)
    return {"onnx_sha256": sha256_file(onnx_path), "onnx_data_sha256": data}


# --------------------------------------------------------------------------------- spec validation

def onnx_inputs(model: ir.Model) -> list[dict]:
    """Graph inputs (initializers excluded): name, dtype name ("?" if untyped), dims (int, or None where
    symbolic/unknown)."""
    out = []
    for v in model.graph.inputs:
        if v.name in model.graph.initializers:
            continue
        dims = [d if isinstance(d, int) else None for d in (v.shape.dims if v.shape is not None else ())]
        out.append({"name": v.name, "dtype": v.dtype.numpy().name if v.dtype is not None else "?", "dims": dims})
    return out


def _check_spec_range(spec: InputSpec) -> None:
    if not (len(spec.min) == len(spec.opt) == len(spec.max)):
        raise LrexportError(f"shape range of input {spec.name!r} mixes ranks", "give min/opt/max the same rank")
    for axis, (lo, op, hi) in enumerate(zip(spec.min, spec.opt, spec.max)):
        if lo < 0 or not lo <= op <= hi:
            raise LrexportError(f"shape range of input {spec.name!r} is inconsistent on axis {axis} "
                                f"(min={lo}, opt={op}, max={hi})", "use 0 <= min <= opt <= max")


def _check_against_input(spec: InputSpec, inp: dict) -> None:
    name, dims = inp["name"], inp["dims"]
    _check_spec_range(spec)
    if spec.rank != len(dims):
        raise LrexportError(f"input {name!r}: shape range has rank {spec.rank} but the ONNX input has rank "
                            f"{len(dims)}", f"give {len(dims)} dimensions")
    for axis, d in enumerate(dims):
        if d is not None and not (spec.min[axis] == spec.max[axis] == d):
            raise LrexportError(f"input {name!r}: axis {axis} is fixed at {d} in the ONNX model but the range "
                                f"asks {spec.min[axis]}..{spec.max[axis]}",
                                f"use {d} on axis {axis}, or export with that axis dynamic")
    if inp["dtype"] != "?" and spec.dtype != inp["dtype"]:
        raise LrexportError(f"input {name!r} is {inp['dtype']} in the ONNX model but {spec.dtype} in the spec",
                            f"declare it as {inp['dtype']}")


def validate_specs(specs: Sequence[InputSpec], inputs: Sequence[dict]) -> list[InputSpec]:
    """Check the ranges against the ONNX inputs; return one spec per ONNX input (static ones filled in)."""
    by_name = {s.name: s for s in specs}
    names = [i["name"] for i in inputs]
    unknown = [s.name for s in specs if s.name not in names]
    if unknown:
        raise LrexportError(f"shape range given for {', '.join(map(repr, unknown))}, which the ONNX model has no "
                            f"input named", f"the model's inputs are: {', '.join(names) or '(none)'}")
    full: list[InputSpec] = []
    for inp in inputs:
        spec = by_name.get(inp["name"])
        if spec is None:
            if any(d is None for d in inp["dims"]):
                raise LrexportError(f"ONNX input {inp['name']!r} has dynamic dimensions but no shape range",
                                    f"pass --shapes {inp['name']}:min=...,opt=...,max=...")
            static = tuple(int(d) for d in inp["dims"])
            full.append(InputSpec(inp["name"], inp["dtype"], static, static, static))
            continue
        _check_against_input(spec, inp)
        full.append(spec)
    return full


# ------------------------------------------------------------------------------------------ parsing

def _scan_unsupported(parser: trt.OnnxParser, nodes: Sequence[ir.Node]) -> list[UnsupportedNode]:
    found = []
    supported: dict[str, bool] = {}
    for idx, node in enumerate(nodes):
        custom = node.domain not in ("", "ai.onnx")
        if node.op_type not in supported:
            supported[node.op_type] = bool(parser.supports_operator(node.op_type))
        if custom or not supported[node.op_type]:
            found.append(UnsupportedNode(node.name or "", node.op_type, idx, "operator not supported by the parser",
                                         pass_hint(node.op_type, node.domain)))
    return found


def parser_errors(parser: trt.OnnxParser, nodes: Sequence[ir.Node] = ()) -> list[UnsupportedNode]:
    """The parser's errors as nodes (name, op type, index); ``nodes``: the graph's, in order."""
    found: list[UnsupportedNode] = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        idx = int(err.node())
        name = str(err.node_name() or "")
        op = str(err.node_operator() or "")
        domain = ""
        if 0 <= idx < len(nodes):
            name, op, domain = name or nodes[idx].name or "", op or nodes[idx].op_type, nodes[idx].domain
        reason = f"{getattr(err.code(), 'name', err.code())}: {err.desc()}".strip()
        found.append(UnsupportedNode(name, op or "?", idx if idx >= 0 else None, reason, pass_hint(op, domain)))
    return found


def _merge(a: list[UnsupportedNode], b: list[UnsupportedNode]) -> list[UnsupportedNode]:
    seen: dict[tuple[str, str], UnsupportedNode] = {}
    for n in [*a, *b]:
        key = (n.name, n.op_type)
        if key not in seen or (seen[key].reason.startswith("operator not") and not n.reason.startswith("operator")):
            seen[key] = n
    return list(seen.values())


def _raise_unparsed(onnx_path: Path, nodes: list[UnsupportedNode], logger_errors: list[str]) -> None:
    if not nodes:
        detail = logger_errors[-1] if logger_errors else "no detail from the parser"
        raise LrexportError(f"TensorRT could not parse {onnx_path.name} ({detail})",
                            "check the model with onnx.checker, or run the lrexport graph passes")
    listed = "; ".join(n.describe() for n in nodes[:8]) + (f"; +{len(nodes) - 8} more" if len(nodes) > 8 else "")
    hints = list(dict.fromkeys(n.hint for n in nodes))
    raise UnsupportedOnnxError(f"TensorRT could not parse {len(nodes)} node(s) of {onnx_path.name}: {listed}",
                               " / ".join(hints), nodes)


# ------------------------------------------------------------------------------------------- plan

@dataclass
class EnginePlan:
    """A build checked before TensorRT runs: where it reads and writes, with which backend and options,
    the model's precision (from its tensor types) and one shape range per ONNX input."""

    onnx_path: Path
    engine_path: Path
    backend: Backend
    precision: str
    float_types: dict[str, int]
    specs: list[InputSpec]
    digest: dict
    nodes: list[ir.Node] = field(repr=False)
    parse_from: str = "file"
    opt_level: int | None = None
    workspace_mb: int | None = None
    timing_cache: Path | None = None
    force: bool = False
    warnings: list[str] = field(default_factory=list)

    @property
    def meta_path(self) -> Path:
        return meta_path_for(self.engine_path)


def _check_arguments(onnx_path: Path, engine_path: Path, parse_from: str, opt_level: int | None,
                     workspace_mb: int | None, force: bool) -> None:
    if parse_from not in ("file", "bytes"):
        raise LrexportError(f"unknown parse mode {parse_from!r}", "use 'file' or 'bytes'")
    if opt_level is not None and not 0 <= opt_level <= 5:
        raise LrexportError(f"builder optimization level {opt_level} out of range", "use 0..5 (default 3)")
    if workspace_mb is not None and workspace_mb <= 0:
        raise LrexportError(f"workspace limit {workspace_mb} MB must be positive", "give a size in MB, e.g. 1024")
    if not onnx_path.is_file():
        raise LrexportError(f"ONNX file {onnx_path} does not exist", "export the model first (lrexport export)")
    with reading(onnx_path):
        check_new_file(engine_path, force, "engine")
    if not engine_path.parent.is_dir():
        raise LrexportError(f"output folder {engine_path.parent} does not exist", "create it first")


def _held_precision(onnx_path: Path, model: ir.Model, asked: str | None) -> tuple[str, dict[str, int]]:
    """The precision the model holds; an ``asked`` precision it does not hold is refused (the builder
    does not cast: that would be a second, unreported cast)."""
    counts = float_type_counts(model)
    held = model_precision(counts)
    if asked is not None and normalize_precision(asked) != held:
        raise LrexportError(f"{onnx_path.name} holds {held} tensors, not {normalize_precision(asked)}",
                            "cast it first (graph_passes.precision_cast.cast_precision_file, or lrexport build "
                            f"--{normalize_precision(asked)}), or leave the precision out")
    return held, dict(counts)


def plan_engine(onnx_path: str | Path, engine_path: str | Path, *, specs: Sequence[InputSpec],
                precision: str | None = None, backend: str = "auto", timing_cache: Path | None = None,
                opt_level: int | None = None, workspace_mb: int | None = None, force: bool = False,
                parse_from: str = "file") -> EnginePlan:
    """Check a build without running TensorRT's parser or builder (raises LrexportError on bad input).

    ``precision``: what the caller cast the model to, checked against its tensor types (None: take them).
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if precision is not None:
        normalize_precision(precision)
    _check_arguments(onnx_path, engine_path, parse_from, opt_level, workspace_mb, force)
    be: Backend = get_backend(backend)
    if not be.builds_without_gpu and gpu_info() is None:
        raise LrexportError(f"{be.display} needs a CUDA GPU to build engines and none is visible",
                            "build on a GPU machine, or use --backend tensorrt-rtx (builds ahead of time on a CPU)")
    model = ir.load(onnx_path)  # external data stays on disk until read
    held, counts = _held_precision(onnx_path, model, precision)
    full_specs = validate_specs(specs, onnx_inputs(model))
    plan = EnginePlan(onnx_path, engine_path, be, held, counts, full_specs, source_digest(onnx_path, model),
                      list(model.graph), parse_from, opt_level, workspace_mb, force=force)
    if timing_cache is not None and not be.supports_timing_cache:
        plan.warnings.append(f"{be.name} has no timing cache (the API is a no-op there); {Path(timing_cache).name} "
                             "was neither read nor written")
    elif timing_cache is not None:
        with reading(onnx_path):  # read and rewritten: refused here if it is the model or not a cache
            plan.timing_cache = check_new_file(timing_cache, True, "timing-cache")
    return plan


# ------------------------------------------------------------------------------------------ apply

def _parse(plan: EnginePlan, say: Callable[[str], None]) -> tuple[Any, trt.Builder, trt.INetworkDefinition]:
    """Parse the ONNX into a strongly typed network; unparseable nodes raise with names and hints."""
    be = plan.backend
    logger = be.logger()
    builder: trt.Builder = be.module.Builder(logger)
    network: trt.INetworkDefinition = be.create_network(builder)
    parser: trt.OnnxParser = be.module.OnnxParser(network, logger)
    say(f"parsing {plan.onnx_path.name} ({plan.precision}) with {be.display} ({plan.parse_from})")
    pre_scan = _scan_unsupported(parser, plan.nodes)
    if plan.parse_from == "file":
        ok = parser.parse_from_file(str(plan.onnx_path))
    else:
        import onnx

        if tensor_bytes(onnx.load(str(plan.onnx_path), load_external_data=False)) >= PROTO_LIMIT:
            raise LrexportError(f"{plan.onnx_path.name} is over 2 GB with its weights inline",
                                "parse it from the file (parse_from='file'), which reads external data")
        full = onnx.load(str(plan.onnx_path), load_external_data=True)
        ok = parser.parse(full.SerializeToString(), str(plan.onnx_path))
    if not ok or pre_scan:
        _raise_unparsed(plan.onnx_path, _merge(parser_errors(parser, plan.nodes), pre_scan), logger.errors())
    return logger, builder, network


def _tensor_info(be: Backend, tensor: trt.ITensor) -> dict:
    return {"name": tensor.name, "dtype": be.dtype_name(tensor.dtype), "shape": dims_list(tensor.shape)}


def _profile(plan: EnginePlan, builder: trt.Builder, network: trt.INetworkDefinition
             ) -> tuple[trt.IOptimizationProfile, list[dict], list[dict]]:
    """The optimization profile from the specs, and the network's inputs and outputs as report data."""
    be, by_name = plan.backend, {s.name: s for s in plan.specs}
    profile: trt.IOptimizationProfile = builder.create_optimization_profile()
    inputs = [_tensor_info(be, network.get_input(i)) for i in range(network.num_inputs)]
    for i, info in enumerate(inputs):
        name, spec = info["name"], by_name.get(info["name"])
        if spec is None:
            raise LrexportError(f"TensorRT network input {name!r} has no shape range",
                                f"pass --shapes {name}:min=...,opt=...,max=...")
        if len(info["shape"]) != spec.rank:
            raise LrexportError(f"input {name!r}: TensorRT sees rank {len(info['shape'])}, the range has "
                                f"{spec.rank}", "fix the --shapes rank")
        if network.get_input(i).is_shape_tensor:
            raise LrexportError(f"input {name!r} is a shape tensor", "export with it as a regular input")
        profile.set_shape(name, be.dims(spec.min), be.dims(spec.opt), be.dims(spec.max))
    outputs = [_tensor_info(be, network.get_output(i)) for i in range(network.num_outputs)]
    return profile, inputs, outputs


def _configure(plan: EnginePlan, builder: trt.Builder, profile: trt.IOptimizationProfile, has_inputs: bool
               ) -> tuple[trt.IBuilderConfig, bool | None]:
    """The builder config: the profile, no TF32 for fp32 models, the user's options, the timing cache
    (returns whether the cache read was accepted; None without one)."""
    be = plan.backend
    config: trt.IBuilderConfig = builder.create_builder_config()
    if has_inputs and (not profile or config.add_optimization_profile(profile) < 0):
        raise LrexportError("TensorRT rejected the optimization profile", "check the --shapes ranges")
    if plan.precision == "fp32":
        be.disable_tf32(config)
    if plan.opt_level is not None:
        be.set_opt_level(config, plan.opt_level)
    if plan.workspace_mb is not None:
        be.set_workspace(config, plan.workspace_mb)
    if plan.timing_cache is None:
        return config, None
    blob = plan.timing_cache.read_bytes() if plan.timing_cache.is_file() else b""
    _, accepted = be.load_timing_cache(config, blob)
    if blob and not accepted:
        plan.warnings.append(f"timing cache {plan.timing_cache} was rejected (other TensorRT version?); "
                             "started afresh")
    return config, accepted


def _read_back_profiles(plan: EnginePlan, data: memoryview, requested: list[dict], gpu: dict | None
                        ) -> tuple[list[dict], str]:
    """The profiles as the engine itself reports them where a GPU can deserialize it, else as requested."""
    if gpu is None:
        return requested, "builder"
    try:
        engine = plan.backend.runtime(plan.backend.logger()).deserialize_cuda_engine(bytes(data))
        if engine is None:
            raise RuntimeError("deserialize_cuda_engine returned None")
        readback = engine_profiles(engine, [e["name"] for e in requested[0]["inputs"]])
    except Exception as err:  # noqa: BLE001 - diagnostics only
        plan.warnings.append(f"could not read the profiles back from the engine ({err})")
        return requested, "builder"
    if readback != requested:
        plan.warnings.append(f"engine reports profiles {readback}, requested {requested}")
    return readback, "engine"


def _metadata(plan: EnginePlan, result: EngineBuildResult, sha: str, profiles_source: str, gpu: dict | None,
              builder: dict) -> dict:
    return {
        "format": META_FORMAT,
        "lrexport_version": lrexport_version(),
        "backend": result.backend,
        "backend_version": result.backend_version,
        "precision": result.precision,
        "float_types": plan.float_types,  # how many tensors of each float type the model held
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "build_seconds": round(result.build_seconds, 3),
        "engine_file": plan.engine_path.name,
        "engine_bytes": result.engine_bytes,
        "engine_sha256": sha,
        "source_onnx": os.path.relpath(plan.onnx_path, plan.engine_path.parent),  # relative: the folder may move
        **plan.digest,
        "profiles": result.profiles,
        "profiles_source": profiles_source,
        "inputs": result.inputs,
        "outputs": result.outputs,
        "gpu": gpu,
        "builder": builder,
        "warnings": result.warnings,
    }


def build_planned(plan: EnginePlan, progress: Callable[[str], None] | None = None) -> EngineBuildResult:
    """Parse, configure and build a planned engine; write it and its metadata (nothing on failure)."""
    say = progress or (lambda _msg: None)
    be, t0 = plan.backend, time.perf_counter()
    logger, builder, network = _parse(plan, say)
    profile, inputs, outputs = _profile(plan, builder, network)
    config, cache_accepted = _configure(plan, builder, profile, bool(inputs))
    requested = [{"index": 0, "inputs": [profile_entry(i["name"], profile.get_shape(i["name"])) for i in inputs]}]
    say("building serialized engine")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        errs = logger.errors()
        raise LrexportError(f"TensorRT failed to build the engine ({errs[-1] if errs else 'no detail'})",
                            "check the shape ranges and precision; retry with a lower --opt-level or larger "
                            "--workspace")
    build_seconds = time.perf_counter() - t0
    data = memoryview(serialized).cast("B")
    if plan.timing_cache is not None:
        atomic_write_file(plan.timing_cache, be.serialize_timing_cache(config), force=True, kind="timing-cache")
    if plan.engine_path.exists() and not plan.force:  # appeared while we were building
        raise LrexportError(f"engine {plan.engine_path} already exists", "pass --force to overwrite it")
    say(f"writing {plan.engine_path.name} ({data.nbytes / 2**20:.1f} MiB)")
    with atomic_files(plan.engine_path, force=plan.force, kind="engine") as tmp:  # engine and metadata appear together
        (tmp / plan.engine_path.name).write_bytes(data)
        plan.warnings.extend(logger.warnings())
        gpu = gpu_info()
        profiles, profiles_source = _read_back_profiles(plan, data, requested, gpu)
        result = EngineBuildResult(
            engine_path=plan.engine_path, meta_path=plan.meta_path, backend=be.name, backend_version=be.version,
            precision=plan.precision, build_seconds=build_seconds, engine_bytes=data.nbytes, profiles=profiles,
            warnings=plan.warnings, network_onnx=plan.onnx_path, inputs=inputs, outputs=outputs)
        builder_info = {"opt_level": config.builder_optimization_level,
                        "workspace_bytes": be.workspace_bytes(config),
                        "timing_cache": str(plan.timing_cache) if plan.timing_cache else None,
                        "timing_cache_accepted": cache_accepted}
        meta = _metadata(plan, result, hashlib.sha256(data).hexdigest(), profiles_source, gpu, builder_info)
        (tmp / plan.meta_path.name).write_text(json.dumps(meta, indent=2) + "\n")
    say(f"done in {build_seconds:.2f}s")
    return result


def build_engine(onnx_path: str | Path, engine_path: str | Path, *, specs: Sequence[InputSpec],
                 precision: str | None = None, backend: str = "auto", timing_cache: Path | None = None,
                 opt_level: int | None = None, workspace_mb: int | None = None, force: bool = False,
                 progress: Callable[[str], None] | None = None, parse_from: str = "file") -> EngineBuildResult:
    """Build a serialized engine for ``onnx_path`` as it is and write it plus ``<engine>.json`` metadata.

    ``precision``: the precision the model was cast to, checked against its tensor types (None: whatever
    they are). ``parse_from``: "file" (``parse_from_file``: external data and >2 GB models) or "bytes"
    (the model bytes handed to ``parse`` with the file's folder as the external-data base path).
    """
    plan = plan_engine(onnx_path, engine_path, specs=specs, precision=precision, backend=backend,
                       timing_cache=timing_cache, opt_level=opt_level, workspace_mb=workspace_mb, force=force,
                       parse_from=parse_from)
    return build_planned(plan, progress)
