"""Build a TensorRT / TensorRT-RTX engine from an ONNX file, with one optimization profile from the input specs.

``build_engine`` validates the shape ranges against the ONNX inputs before building, casts the model to
fp16/bf16 when asked (strongly typed networks take their precision from tensor types), parses with
``parse_from_file`` (external data and >2 GB models) or from bytes, reports unparseable nodes by name and
op type with the lrexport pass that would help, and writes the engine atomically plus a metadata JSON
beside it (``model.engine`` -> ``model.engine.json``).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from exporter.errors import LrexportError
from exporter.specs import InputSpec
from exporter.trt_backend import Backend, dims_list, get_backend

if TYPE_CHECKING:
    import tensorrt as trt

PRECISIONS = ("fp32", "fp16", "bf16")
_PRECISION_ALIASES = {"float32": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}
META_FORMAT = 1
_TWO_GB = 2**31 - 1

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


def normalize_precision(precision: str) -> str:
    key = _PRECISION_ALIASES.get(precision.strip().lower(), precision.strip().lower())
    if key not in PRECISIONS:
        raise LrexportError(f"unknown precision {precision!r}", f"use one of {', '.join(PRECISIONS)}")
    return key


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
    precision: str
    build_seconds: float
    engine_bytes: int
    profiles: list[dict]
    unsupported_nodes: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    network_onnx: Path | None = None  # the ONNX actually parsed (the cast copy for fp16/bf16)
    inputs: list[dict] = field(default_factory=list)
    outputs: list[dict] = field(default_factory=list)
    cast_report: dict | None = None

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


@contextlib.contextmanager
def _atomic_target(path: Path) -> Iterator[Path]:
    """Yield a temp path in the target's folder; on success os.replace() it over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp creates 0600; give the final file normal permissions
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: Path, data: bytes | memoryview) -> None:
    with _atomic_target(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def _external_data_files(onnx_path: Path, model: Any) -> list[Path]:
    files: list[Path] = []
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                p = onnx_path.parent / entry.value
                if p not in files:
                    files.append(p)
    return files


def source_digest(onnx_path: Path, model: Any) -> dict:
    """sha256 of the .onnx file and of each external-data file it references."""
    data = {}
    for p in _external_data_files(onnx_path, model):
        if not p.is_file():
            raise LrexportError(f"external data file {p} referenced by {onnx_path.name} is missing",
                                "keep the .onnx.data file next to the .onnx (export again if it was lost)")
        data[p.name] = sha256_file(p)
    return {"onnx_sha256": sha256_file(onnx_path), "onnx_data_sha256": data}


# --------------------------------------------------------------------------------- spec validation

_ONNX_DTYPES = {1: "float32", 10: "float16", 16: "bfloat16", 11: "float64", 7: "int64", 6: "int32", 9: "bool",
                2: "uint8", 3: "int8"}


def onnx_inputs(model: Any) -> list[dict]:
    """Graph inputs (initializers excluded): name, dtype, dims (int, or None where symbolic/unknown)."""
    inits = {i.name for i in model.graph.initializer}
    out = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dims: list[int | None] = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        out.append({"name": vi.name, "dtype": _ONNX_DTYPES.get(tt.elem_type, str(tt.elem_type)), "dims": dims})
    return out


def _check_spec_range(spec: InputSpec) -> None:
    if not (len(spec.min) == len(spec.opt) == len(spec.max)):
        raise LrexportError(f"shape range of input {spec.name!r} mixes ranks", "give min/opt/max the same rank")
    for axis, (lo, op, hi) in enumerate(zip(spec.min, spec.opt, spec.max)):
        if lo < 0 or not lo <= op <= hi:
            raise LrexportError(f"shape range of input {spec.name!r} is inconsistent on axis {axis} "
                                f"(min={lo}, opt={op}, max={hi})", "use 0 <= min <= opt <= max")


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
        name, dims = inp["name"], inp["dims"]
        spec = by_name.get(name)
        if spec is None:
            if any(d is None for d in dims):
                raise LrexportError(f"ONNX input {name!r} has dynamic dimensions but no shape range",
                                    f"pass --shapes {name}:min=...,opt=...,max=...")
            static = tuple(int(d) for d in dims)
            full.append(InputSpec(name, inp["dtype"], static, static, static))
            continue
        _check_spec_range(spec)
        if spec.rank != len(dims):
            raise LrexportError(f"input {name!r}: shape range has rank {spec.rank} but the ONNX input has rank "
                                f"{len(dims)}", f"give {len(dims)} dimensions")
        for axis, d in enumerate(dims):
            if d is not None and not (spec.min[axis] == spec.max[axis] == d):
                raise LrexportError(f"input {name!r}: axis {axis} is fixed at {d} in the ONNX model but the range "
                                    f"asks {spec.min[axis]}..{spec.max[axis]}",
                                    f"use {d} on axis {axis}, or export with that axis dynamic")
        if inp["dtype"] in _ONNX_DTYPES.values() and spec.dtype != inp["dtype"]:
            raise LrexportError(f"input {name!r} is {inp['dtype']} in the ONNX model but {spec.dtype} in the spec",
                                f"declare it as {inp['dtype']}")
        full.append(spec)
    return full


# ------------------------------------------------------------------------------------------ parsing

def _scan_unsupported(parser: trt.OnnxParser, model: Any) -> list[UnsupportedNode]:
    found = []
    supported: dict[str, bool] = {}
    for idx, node in enumerate(model.graph.node):
        custom = node.domain not in ("", "ai.onnx")
        if node.op_type not in supported:
            supported[node.op_type] = bool(parser.supports_operator(node.op_type))
        if custom or not supported[node.op_type]:
            found.append(UnsupportedNode(node.name, node.op_type, idx, "operator not supported by the parser",
                                         pass_hint(node.op_type, node.domain)))
    return found


def parser_errors(parser: trt.OnnxParser, model: Any | None = None) -> list[UnsupportedNode]:
    """The parser's errors as nodes (name, op type, index), deduplicated."""
    nodes: list[UnsupportedNode] = []
    graph_nodes = list(model.graph.node) if model is not None else []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        idx = int(err.node())
        name = str(err.node_name() or "")
        op = str(err.node_operator() or "")
        domain = ""
        if 0 <= idx < len(graph_nodes):
            gnode = graph_nodes[idx]
            name = name or gnode.name
            op = op or gnode.op_type
            domain = gnode.domain
        reason = f"{getattr(err.code(), 'name', err.code())}: {err.desc()}".strip()
        nodes.append(UnsupportedNode(name, op or "?", idx if idx >= 0 else None, reason, pass_hint(op, domain)))
    return nodes


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
    hints = []
    for n in nodes:
        if n.hint not in hints:
            hints.append(n.hint)
    raise UnsupportedOnnxError(f"TensorRT could not parse {len(nodes)} node(s) of {onnx_path.name}: {listed}",
                               " / ".join(hints), nodes)


# --------------------------------------------------------------------------------------------- build

def _cast_for_precision(onnx_path: Path, engine_path: Path, precision: str, model: Any,
                        warnings: list[str], say: Callable[[str], None]) -> tuple[Path, dict | None]:
    """The ONNX file to parse for ``precision``: a cast copy, unless the model is float32-only or already cast
    (progress says which, so a build that cast the model before does not announce a second cast)."""
    if precision == "fp32":
        say("fp32: no precision cast")
        return onnx_path, None
    low_types = {10, 16}
    if any(init.data_type in low_types for init in model.graph.initializer):
        say(f"{onnx_path.name} already holds fp16/bf16 weights: parsed as is")
        warnings.append(f"{onnx_path.name} already holds fp16/bf16 weights: parsed as is (no precision cast)")
        return onnx_path, None
    say(f"casting to {precision}")
    from graph_passes.precision_cast import cast_precision_file

    stem = engine_path.stem if engine_path.stem.endswith(f".{precision}") else f"{engine_path.stem}.{precision}"
    target = engine_path.with_name(f"{stem}.onnx")
    report = cast_precision_file(onnx_path, target, precision)
    return target, report


def _engine_profiles(be: Backend, data: memoryview, names: list[str]) -> list[dict]:
    runtime = be.runtime(be.logger())
    engine: trt.ICudaEngine | None = runtime.deserialize_cuda_engine(bytes(data))
    if engine is None:
        raise RuntimeError("deserialize_cuda_engine returned None")
    out = []
    for p in range(engine.num_optimization_profiles):
        entries = []
        for name in names:
            mn, op, mx = engine.get_tensor_profile_shape(name, p)
            entries.append({"name": name, "min": dims_list(mn), "opt": dims_list(op), "max": dims_list(mx)})
        out.append({"index": p, "inputs": entries})
    return out


def build_engine(onnx_path: str | Path, engine_path: str | Path, *, specs: Sequence[InputSpec],
                 precision: str = "fp32", backend: str = "auto", timing_cache: Path | None = None,
                 opt_level: int | None = None, workspace_mb: int | None = None, force: bool = False,
                 progress: Callable[[str], None] | None = None, parse_from: str = "file") -> EngineBuildResult:
    """Build a serialized engine for ``onnx_path`` and write it plus ``<engine>.json`` metadata.

    ``parse_from``: "file" (``parse_from_file``: external data and >2 GB models) or "bytes" (the model bytes
    handed to ``parse`` with the file's folder as the external-data base path).
    """
    say = progress or (lambda _msg: None)
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    precision = normalize_precision(precision)
    if parse_from not in ("file", "bytes"):
        raise LrexportError(f"unknown parse mode {parse_from!r}", "use 'file' or 'bytes'")
    if opt_level is not None and not 0 <= opt_level <= 5:
        raise LrexportError(f"builder optimization level {opt_level} out of range", "use 0..5 (default 3)")
    if workspace_mb is not None and workspace_mb <= 0:
        raise LrexportError(f"workspace limit {workspace_mb} MB must be positive", "give a size in MB, e.g. 1024")
    if not onnx_path.is_file():
        raise LrexportError(f"ONNX file {onnx_path} does not exist", "export the model first (lrexport export)")
    meta_path = meta_path_for(engine_path)
    if engine_path.exists() and not force:
        raise LrexportError(f"engine {engine_path} already exists", "pass --force to overwrite it")
    if not engine_path.parent.is_dir():
        raise LrexportError(f"output folder {engine_path.parent} does not exist", "create it first")
    be: Backend = get_backend(backend)
    if not be.builds_without_gpu and gpu_info() is None:
        raise LrexportError(f"{be.display} needs a CUDA GPU to build engines and none is visible",
                            "build on a GPU machine, or use --backend tensorrt-rtx (builds ahead of time on a CPU)")

    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    full_specs = validate_specs(specs, onnx_inputs(model))
    digest = source_digest(onnx_path, model)
    warnings: list[str] = []

    t0 = time.perf_counter()
    network_onnx, cast_report = _cast_for_precision(onnx_path, engine_path, precision, model, warnings, say)
    net_model = model if network_onnx == onnx_path else onnx.load(str(network_onnx), load_external_data=False)

    logger = be.logger()
    builder: trt.Builder = be.module.Builder(logger)
    network: trt.INetworkDefinition = be.create_network(builder)
    parser: trt.OnnxParser = be.module.OnnxParser(network, logger)
    say(f"parsing {network_onnx.name} with {be.display} ({parse_from})")
    pre_scan = _scan_unsupported(parser, net_model)
    if parse_from == "file":
        ok = parser.parse_from_file(str(network_onnx))
    else:
        full = onnx.load(str(network_onnx), load_external_data=True)
        if full.ByteSize() > _TWO_GB:
            raise LrexportError(f"{network_onnx.name} is over 2 GB with its weights inline",
                                "parse it from the file (parse_from='file'), which reads external data")
        ok = parser.parse(full.SerializeToString(), str(network_onnx))
    if not ok or pre_scan:
        _raise_unparsed(network_onnx, _merge(parser_errors(parser, net_model), pre_scan), logger.errors())

    # ---- network I/O and the optimization profile
    spec_by_name = {s.name: s for s in full_specs}
    inputs: list[dict] = []
    outputs: list[dict] = []
    profile: trt.IOptimizationProfile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor: trt.ITensor = network.get_input(i)
        spec = spec_by_name.get(tensor.name)
        if spec is None:
            raise LrexportError(f"TensorRT network input {tensor.name!r} has no shape range",
                                f"pass --shapes {tensor.name}:min=...,opt=...,max=...")
        shape = dims_list(tensor.shape)
        if len(shape) != spec.rank:
            raise LrexportError(f"input {tensor.name!r}: TensorRT sees rank {len(shape)}, the range has {spec.rank}",
                                "fix the --shapes rank")
        if tensor.is_shape_tensor:
            raise LrexportError(f"input {tensor.name!r} is a shape tensor", "export with it as a regular input")
        profile.set_shape(tensor.name, be.dims(spec.min), be.dims(spec.opt), be.dims(spec.max))
        inputs.append({"name": tensor.name, "dtype": be.dtype_name(tensor.dtype), "shape": shape})
    for i in range(network.num_outputs):
        out: trt.ITensor = network.get_output(i)
        outputs.append({"name": out.name, "dtype": be.dtype_name(out.dtype), "shape": dims_list(out.shape)})

    config: trt.IBuilderConfig = builder.create_builder_config()
    if network.num_inputs:
        if not profile:
            raise LrexportError("TensorRT rejected the optimization profile", "check the --shapes ranges")
        if config.add_optimization_profile(profile) < 0:
            raise LrexportError("TensorRT rejected the optimization profile", "check the --shapes ranges")
    if precision == "fp32":
        be.disable_tf32(config)
    if opt_level is not None:
        be.set_opt_level(config, opt_level)
    if workspace_mb is not None:
        be.set_workspace(config, workspace_mb)
    cache_accepted = None
    if timing_cache is not None:
        timing_cache = Path(timing_cache)
        if not be.supports_timing_cache:
            warnings.append(f"{be.name} has no timing cache (the API is a no-op there); {timing_cache.name} "
                            "was neither read nor written")
            timing_cache = None
        else:
            blob = timing_cache.read_bytes() if timing_cache.is_file() else b""
            _, cache_accepted = be.load_timing_cache(config, blob)
            if blob and not cache_accepted:
                warnings.append(f"timing cache {timing_cache} was rejected (other TensorRT version?); "
                                "started afresh")

    profiles = [{"index": 0, "inputs": [
        {"name": name, "min": dims_list(mn), "opt": dims_list(op), "max": dims_list(mx)}
        for name, (mn, op, mx) in ((inp["name"], profile.get_shape(inp["name"])) for inp in inputs)]}]

    say("building serialized engine")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        errs = logger.errors()
        raise LrexportError(f"TensorRT failed to build the engine ({errs[-1] if errs else 'no detail'})",
                            "check the shape ranges and precision; retry with a lower --opt-level or larger "
                            "--workspace")
    build_seconds = time.perf_counter() - t0
    data = memoryview(serialized).cast("B")
    engine_bytes = data.nbytes
    engine_sha = hashlib.sha256(data).hexdigest()

    if timing_cache is not None:
        atomic_write_bytes(timing_cache, be.serialize_timing_cache(config))

    # ---- write engine + metadata atomically
    if engine_path.exists() and not force:  # appeared while we were building
        raise LrexportError(f"engine {engine_path} already exists", "pass --force to overwrite it")
    say(f"writing {engine_path.name} ({engine_bytes / 2**20:.1f} MiB)")
    atomic_write_bytes(engine_path, data)
    warnings.extend(logger.warnings())
    gpu = gpu_info()
    profiles_source = "builder"
    if gpu is not None:  # read the profiles back from the engine itself where it can be deserialized
        try:
            readback = _engine_profiles(be, data, [i["name"] for i in inputs])
            if readback != profiles:
                warnings.append(f"engine reports profiles {readback}, requested {profiles}")
            profiles, profiles_source = readback, "engine"
        except Exception as err:  # noqa: BLE001 - diagnostics only
            warnings.append(f"could not read the profiles back from the engine ({err})")
    meta = {
        "format": META_FORMAT,
        "lrexport_version": lrexport_version(),
        "backend": be.name,
        "backend_version": be.version,
        "precision": precision,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "build_seconds": round(build_seconds, 3),
        "engine_file": engine_path.name,
        "engine_bytes": engine_bytes,
        "engine_sha256": engine_sha,
        "source_onnx": os.path.relpath(onnx_path, engine_path.parent),  # relative: the folder may move
        **digest,
        "network_onnx": os.path.relpath(network_onnx, engine_path.parent),
        "profiles": profiles,
        "profiles_source": profiles_source,
        "inputs": inputs,
        "outputs": outputs,
        "gpu": gpu,
        "builder": {"opt_level": config.builder_optimization_level, "workspace_bytes": be.workspace_bytes(config),
                    "timing_cache": str(timing_cache) if timing_cache else None,
                    "timing_cache_accepted": cache_accepted},
        "cast_report": cast_report,
        "warnings": warnings,
    }
    atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n")
    say(f"done in {build_seconds:.2f}s")
    return EngineBuildResult(engine_path=engine_path, meta_path=meta_path, backend=be.name,
                             backend_version=be.version, precision=precision, build_seconds=build_seconds,
                             engine_bytes=engine_bytes, profiles=profiles, unsupported_nodes=[],
                             warnings=warnings, network_onnx=network_onnx, inputs=inputs, outputs=outputs,
                             cast_report=cast_report)
