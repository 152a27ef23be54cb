"""The one place that knows how ``tensorrt`` (TensorRT 10.x) and ``tensorrt_rtx`` (TensorRT-RTX) differ.

Both expose the same documented Python API shape (Builder, OnnxParser, IBuilderConfig, Runtime, ...);
what differs is handled here:

* import name and version (``tensorrt`` vs ``tensorrt_rtx``); ``auto`` prefers full TensorRT,
* networks: both are built strongly typed (TensorRT-RTX has nothing else; TensorRT 10 deprecates weak
  typing), so precision comes from the tensor types of the ONNX (see graph_passes/precision_cast.py),
* timing caches are real in TensorRT and no-ops in TensorRT-RTX (deprecated since RTX 1.2),
* TensorRT needs a CUDA GPU to build; TensorRT-RTX builds ahead of time on a CPU-only machine.

Type-checked against ``tensorrt-stubs`` (the documented TensorRT 10.x API): ``mypy exporter/trt_*.py``.
"""

from __future__ import annotations

import contextlib
import importlib
import warnings
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from exporter.errors import LrexportError

if TYPE_CHECKING:  # the documented TensorRT 10.x API (tensorrt-stubs); tensorrt_rtx mirrors it
    import tensorrt as trt

BACKENDS = ("tensorrt", "tensorrt-rtx")
BACKEND_CHOICES = ("auto", *BACKENDS)
_MODULES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}
INSTALL_HINT = "pip install tensorrt-rtx-cu13 (TensorRT-RTX, builds without a GPU) or pip install tensorrt"

_SEVERITY_NAMES = ("internal_error", "error", "warning", "info", "verbose")


def _import(module_name: str) -> ModuleType | None:
    """The backend module, or None when absent or only a stub/namespace package (no ``Builder``)."""
    try:
        mod = importlib.import_module(module_name)
    except Exception:  # ImportError, or a broken install raising OSError/RuntimeError while loading libs
        return None
    # `tensorrt-stubs` installs a bare `tensorrt/` folder of .pyi files, which imports as an empty namespace.
    if not hasattr(mod, "Builder") or not hasattr(mod, "OnnxParser"):
        return None
    return mod


def available_backends() -> list[str]:
    """Backends importable here, in ``auto`` preference order."""
    return [name for name in BACKENDS if _import(_MODULES[name]) is not None]


def normalize_backend(name: str) -> str:
    key = name.strip().lower().replace("_", "-")
    if key in ("rtx", "trt-rtx", "tensorrtrtx"):
        key = "tensorrt-rtx"
    if key in ("trt",):
        key = "tensorrt"
    if key not in BACKEND_CHOICES:
        raise LrexportError(f"unknown TensorRT backend {name!r}", f"use one of {', '.join(BACKEND_CHOICES)}")
    return key


class CollectingLogger:
    """Factory for an ILogger subclass (of the selected module) that keeps warnings and errors."""

    @staticmethod
    def create(mod: ModuleType, echo: bool = False) -> Any:
        base = mod.ILogger

        class _Logger(base):  # type: ignore[misc, valid-type]
            def __init__(self) -> None:
                base.__init__(self)
                self.messages: list[tuple[str, str]] = []
                self.echo = echo

            def log(self, severity: Any, msg: str) -> None:
                level = str(getattr(severity, "name", severity)).lower()
                if level in ("internal_error", "error", "warning"):
                    self.messages.append((level, msg))
                    if self.echo:
                        print(f"[{level}] {msg}")

            def warnings(self) -> list[str]:
                return [m for lvl, m in self.messages if lvl == "warning"]

            def errors(self) -> list[str]:
                return [m for lvl, m in self.messages if lvl != "warning"]

        return _Logger()


@dataclass
class Backend:
    """A loaded TensorRT flavour and its API differences."""

    name: str  # "tensorrt" | "tensorrt-rtx"
    module: ModuleType = field(repr=False)

    @property
    def version(self) -> str:
        return str(getattr(self.module, "__version__", "unknown"))

    @property
    def display(self) -> str:
        return f"{self.name} {self.version}"

    @property
    def is_rtx(self) -> bool:
        return self.name == "tensorrt-rtx"

    @property
    def builds_without_gpu(self) -> bool:
        """TensorRT-RTX compiles ahead of time on a CPU; full TensorRT needs a CUDA device to build."""
        return self.is_rtx

    @property
    def supports_timing_cache(self) -> bool:
        """TensorRT-RTX keeps the timing-cache API but ignores it (it has a runtime cache instead)."""
        return not self.is_rtx

    def logger(self, echo: bool = False) -> Any:
        return CollectingLogger.create(self.module, echo)

    def network_flags(self) -> int:
        """Strongly typed explicit-batch network (explicit batch is implicit in TensorRT 10 and RTX)."""
        flag = self.module.NetworkDefinitionCreationFlag.STRONGLY_TYPED
        return 1 << int(flag)

    def create_network(self, builder: trt.Builder) -> trt.INetworkDefinition:
        return builder.create_network(self.network_flags())

    def set_workspace(self, config: trt.IBuilderConfig, workspace_mb: int) -> None:
        pool: trt.MemoryPoolType = self.module.MemoryPoolType.WORKSPACE
        config.set_memory_pool_limit(pool, int(workspace_mb) << 20)

    def workspace_bytes(self, config: trt.IBuilderConfig) -> int:
        pool: trt.MemoryPoolType = self.module.MemoryPoolType.WORKSPACE
        return int(config.get_memory_pool_limit(pool))

    def disable_tf32(self, config: trt.IBuilderConfig) -> bool:
        """Keep float32 matmuls/convolutions in true float32: TF32 (on by default) rounds their inputs to a
        10-bit mantissa, ~1e-3 relative error, which fails fp32 parity. Returns whether the flag existed."""
        flag = getattr(self.module.BuilderFlag, "TF32", None)
        if flag is None:
            return False
        config.clear_flag(flag)
        return True

    def set_opt_level(self, config: trt.IBuilderConfig, level: int) -> None:
        if not 0 <= level <= 5:
            raise LrexportError(f"builder optimization level {level} out of range", "use 0..5 (default 3)")
        config.builder_optimization_level = level

    @contextlib.contextmanager
    def quiet(self) -> Iterator[None]:
        """Silence TensorRT-RTX's DeprecationWarnings on the no-op timing-cache calls."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            yield

    def load_timing_cache(self, config: trt.IBuilderConfig, blob: bytes) -> tuple[trt.ITimingCache, bool]:
        """Create the config's timing cache from ``blob`` (b"" = empty). Returns (cache, accepted)."""
        with self.quiet():
            cache = config.create_timing_cache(blob)
            accepted = bool(config.set_timing_cache(cache, False))
            if not accepted and blob:  # stale or from another TensorRT: start afresh
                cache = config.create_timing_cache(b"")
                config.set_timing_cache(cache, False)
        return cache, accepted

    def serialize_timing_cache(self, config: trt.IBuilderConfig) -> bytes:
        with self.quiet():
            cache = config.get_timing_cache()
            return bytes(cache.serialize()) if cache is not None else b""

    def runtime(self, logger: Any) -> trt.Runtime:
        rt: trt.Runtime = self.module.Runtime(logger)
        return rt

    def dims(self, shape: Sequence[int]) -> trt.Dims:
        d: trt.Dims = self.module.Dims([int(x) for x in shape])
        return d

    def dtype_name(self, dtype: Any) -> str:
        """TensorRT DataType -> numpy-style name ("float32", "float16", "bfloat16", "int64", ...)."""
        names = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8", "INT32": "int32",
                 "INT64": "int64", "BOOL": "bool", "UINT8": "uint8", "FP8": "float8", "INT4": "int4",
                 "FP4": "float4", "E8M0": "e8m0"}
        return names.get(str(getattr(dtype, "name", dtype)).upper(), str(dtype).lower())


def dims_list(dims: trt.Dims | Sequence[int]) -> list[int]:
    """A TensorRT Dims (or any int sequence) as a list; -1 marks a dynamic dimension."""
    return [int(dims[i]) for i in range(len(dims))]


def profile_entry(name: str, shapes: Sequence[trt.Dims | Sequence[int]]) -> dict:
    """One input's (min, opt, max) profile shapes as report data."""
    mn, op, mx = shapes
    return {"name": name, "min": dims_list(mn), "opt": dims_list(op), "max": dims_list(mx)}


def engine_profiles(engine: trt.ICudaEngine, names: Sequence[str]) -> list[dict]:
    """Every optimization profile of a deserialized engine, read back from the engine itself."""
    return [{"index": p, "inputs": [profile_entry(name, engine.get_tensor_profile_shape(name, p)) for name in names]}
            for p in range(engine.num_optimization_profiles)]


def get_backend(name: str = "auto") -> Backend:
    """Load a backend: ``tensorrt``, ``tensorrt-rtx``, or ``auto`` (full TensorRT where importable, else RTX)."""
    key = normalize_backend(name)
    candidates = BACKENDS if key == "auto" else (key,)
    for cand in candidates:
        mod = _import(_MODULES[cand])
        if mod is not None:
            return Backend(cand, mod)
    if key == "auto":
        raise LrexportError("no TensorRT backend is installed (neither tensorrt nor tensorrt_rtx imports)",
                            INSTALL_HINT)
    other = [b for b in available_backends() if b != key]
    alt = f"; or use --backend {other[0]} (installed)" if other else ""
    pkg = "tensorrt-rtx-cu13" if key == "tensorrt-rtx" else "tensorrt"
    raise LrexportError(f"TensorRT backend {key!r} is not installed (python module {_MODULES[key]!r} missing)",
                        f"pip install {pkg}{alt}")
