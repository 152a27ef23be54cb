"""Load a built engine with its metadata, refuse ones that cannot be trusted, and run or time it on a GPU.

Checks that need no GPU (``check_engine``): the metadata JSON exists and parses, the engine's size and sha256
match it (corruption, truncation, a swapped file), it was built by the backend and version importable here,
and, where both are known, for this GPU's compute capability. ``load_engine`` then deserializes (GPU).
Buffers are torch CUDA tensors; ``execute_async_v3`` runs on a torch stream.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from exporter.errors import LrexportError
from exporter.specs import InputSpec, random_feeds
from exporter.table import fmt_shape
from exporter.trt_backend import Backend, dims_list, engine_profiles, get_backend
from exporter.trt_build import META_FORMAT, gpu_info, meta_path_for, sha256_file

if TYPE_CHECKING:
    import tensorrt as trt

_REBUILD = "rebuild it with `lrexport build ... --force`"


def _nvidia_device_present() -> bool:
    """Whether the NVIDIA driver shows any GPU on this machine (without asking torch)."""
    gpus = Path("/proc/driver/nvidia/gpus")
    return (gpus.is_dir() and any(gpus.iterdir())) or any(Path("/dev").glob("nvidia[0-9]*"))


def gpu_available() -> tuple[bool, str]:
    """(True, device description) or (False, why not), naming the first missing piece: the GPU itself,
    then a CUDA build of torch (engine buffers are torch CUDA tensors), then the driver."""
    try:
        import torch
    except ImportError:
        return False, "torch is not installed"
    if not torch.cuda.is_available():
        if not _nvidia_device_present():
            return False, "no CUDA GPU on this machine"
        if not getattr(torch.version, "cuda", None):
            return False, "this torch build has no CUDA support (install a CUDA build of torch)"
        return False, "the CUDA GPU is not usable by torch (check the NVIDIA driver and CUDA_VISIBLE_DEVICES)"
    info = gpu_info() or {}
    return True, f"{info.get('name', 'CUDA GPU')} (sm {info.get('compute_capability', '?')})"


def _require_gpu() -> None:
    ok, why = gpu_available()
    if not ok:
        raise LrexportError(f"no CUDA GPU to run the TensorRT engine ({why})",
                            "run on a machine with an NVIDIA GPU and CUDA-enabled torch, or skip the engine check")


@dataclass
class EngineMeta:
    engine_path: Path
    meta: dict
    backend: Backend = field(repr=False)

    @property
    def inputs(self) -> list[dict]:
        return list(self.meta.get("inputs", []))

    @property
    def outputs(self) -> list[dict]:
        return list(self.meta.get("outputs", []))

    @property
    def profiles(self) -> list[dict]:
        return list(self.meta.get("profiles", []))


def read_meta(engine_path: str | Path) -> dict:
    engine_path = Path(engine_path)
    meta_path = meta_path_for(engine_path)
    if not meta_path.is_file():
        raise LrexportError(f"engine {engine_path.name} has no metadata file {meta_path.name}",
                            f"engines are only trusted with the metadata lrexport writes; {_REBUILD}")
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as err:
        raise LrexportError(f"engine metadata {meta_path} is not valid JSON ({err})", _REBUILD) from None
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
        raise LrexportError(f"engine metadata {meta_path} has an unknown format", _REBUILD)
    return meta


def specs_from_meta(meta: dict) -> list[InputSpec]:
    """Input specs from an engine's metadata (its profile ranges; integer inputs get values 0..1,
    which any embedding accepts: pass --input with a value range for realistic token ids)."""
    dtypes = {i["name"]: i["dtype"] for i in meta.get("inputs", [])}
    specs = []
    for inp in (meta.get("profiles") or [{}])[0].get("inputs", []):
        dtype = dtypes.get(inp["name"], "float32")
        is_int = dtype.startswith("int")
        specs.append(InputSpec(inp["name"], dtype, tuple(inp["min"]), tuple(inp["opt"]), tuple(inp["max"]),
                               0.0 if is_int else None, 1.0 if is_int else None))
    return specs


def check_engine(engine_path: str | Path, backend: str = "auto") -> EngineMeta:
    """Everything that can be checked without a GPU; raises LrexportError on the first problem."""
    engine_path = Path(engine_path)
    if not engine_path.is_file():
        raise LrexportError(f"engine {engine_path} does not exist", "build it first (lrexport build)")
    meta = read_meta(engine_path)
    size = engine_path.stat().st_size
    if size != meta.get("engine_bytes"):
        raise LrexportError(f"engine {engine_path.name} is corrupted: {size} bytes, metadata says "
                            f"{meta.get('engine_bytes')}", _REBUILD)
    if sha256_file(engine_path) != meta.get("engine_sha256"):
        raise LrexportError(f"engine {engine_path.name} is corrupted (sha256 differs from its metadata)", _REBUILD)
    built_with = str(meta.get("backend"))
    try:
        be = get_backend(built_with if backend == "auto" else backend)
    except LrexportError as err:
        raise LrexportError(f"engine {engine_path.name} was built with {built_with} "
                            f"{meta.get('backend_version')}, which is not installed here ({err.problem})",
                            f"install it or {_REBUILD}") from None
    if be.name != built_with:
        raise LrexportError(f"engine {engine_path.name} was built with {built_with}, not {be.name}",
                            f"use --backend {built_with} or {_REBUILD}")
    if be.version != meta.get("backend_version"):
        raise LrexportError(f"engine {engine_path.name} was built with {built_with} {meta.get('backend_version')} "
                            f"but {be.display} is installed (engines are not portable across versions)", _REBUILD)
    built_gpu = meta.get("gpu") or {}
    here = gpu_info() or {}
    if built_gpu.get("compute_capability") and here.get("compute_capability") and \
            built_gpu["compute_capability"] != here["compute_capability"] and not be.is_rtx:
        raise LrexportError(f"engine {engine_path.name} was built for {built_gpu.get('name')} (sm "
                            f"{built_gpu['compute_capability']}) but this GPU is {here.get('name')} (sm "
                            f"{here['compute_capability']})", f"build the engine on this GPU: {_REBUILD}")
    return EngineMeta(engine_path, meta, be)


class LoadedEngine:
    """A deserialized engine with an execution context (one optimization profile, index 0)."""

    def __init__(self, info: EngineMeta):
        _require_gpu()
        self.info = info
        be = info.backend
        self.backend = be
        self._logger = be.logger()
        self.runtime: trt.Runtime = be.runtime(self._logger)
        data = info.engine_path.read_bytes()
        engine: trt.ICudaEngine | None = self.runtime.deserialize_cuda_engine(data)
        if engine is None:
            errs = self._logger.errors()
            raise LrexportError(f"{be.display} could not load engine {info.engine_path.name}"
                                f" ({errs[-1] if errs else 'incompatible or corrupted'})", _REBUILD)
        self.engine: trt.ICudaEngine = engine
        context: trt.IExecutionContext | None = engine.create_execution_context()
        if context is None:
            raise LrexportError(f"could not create an execution context for {info.engine_path.name}",
                                "free GPU memory and retry")
        self.context: trt.IExecutionContext = context
        self.input_names: list[str] = []
        self.output_names: list[str] = []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if engine.get_tensor_mode(name) == be.module.TensorIOMode.INPUT:
                self.input_names.append(name)
            else:
                self.output_names.append(name)

    def profiles(self) -> list[dict]:
        """Profile shapes read back from the engine."""
        return engine_profiles(self.engine, self.input_names)

    def _np_dtype(self, name: str) -> Any:
        dt = self.engine.get_tensor_dtype(name)
        if self.backend.dtype_name(dt) == "bfloat16":
            return "bfloat16"
        return np.dtype(self.backend.module.nptype(dt))

    def _prepare(self, feeds: dict[str, np.ndarray]) -> tuple[dict[str, Any], dict[str, Any], Any]:
        import torch

        missing = [n for n in self.input_names if n not in feeds]
        extra = [n for n in feeds if n not in self.input_names]
        if missing or extra:
            raise LrexportError(f"engine inputs are {self.input_names}; feeds miss {missing} / have extra {extra}",
                                "feed exactly the engine's inputs")
        device = torch.device("cuda")
        ins: dict[str, Any] = {}
        for name in self.input_names:
            arr = np.asarray(feeds[name])
            want = self._np_dtype(name)
            if want == "bfloat16":
                t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).to(device, torch.bfloat16)
            else:
                if arr.dtype != want:
                    if arr.dtype.kind != want.kind:
                        raise LrexportError(f"input {name!r} is {arr.dtype} but the engine expects {want}",
                                            f"feed {want} values")
                    arr = arr.astype(want)
                t = torch.from_numpy(np.ascontiguousarray(arr)).to(device)
            if not self.context.set_input_shape(name, tuple(arr.shape)):
                prof = self.engine.get_tensor_profile_shape(name, 0)
                raise LrexportError(f"input {name!r} shape {fmt_shape(arr.shape)} is outside the engine's profile "
                                    f"(min {fmt_shape(dims_list(prof[0]))}, max {fmt_shape(dims_list(prof[2]))})",
                                    "rebuild with a wider --shapes range")
            ins[name] = t
            self.context.set_tensor_address(name, t.data_ptr() if t.numel() else _scratch(device).data_ptr())
        outs: dict[str, Any] = {}
        for name in self.output_names:
            shape = tuple(dims_list(self.context.get_tensor_shape(name)))
            if any(d < 0 for d in shape):
                raise LrexportError(f"output {name!r} has a data-dependent shape {fmt_shape(shape)}",
                                    "lrexport runs engines with shapes known from the inputs only")
            want = self._np_dtype(name)
            tdt = torch.bfloat16 if want == "bfloat16" else torch.from_numpy(np.empty(0, dtype=want)).dtype
            t = torch.empty(shape, dtype=tdt, device=device)
            outs[name] = t
            self.context.set_tensor_address(name, t.data_ptr() if t.numel() else _scratch(device).data_ptr())
        stream = torch.cuda.Stream()
        return ins, outs, stream

    def _execute(self, stream: Any) -> None:
        if not self.context.execute_async_v3(stream.cuda_stream):
            errs = self._logger.errors()
            raise LrexportError(f"TensorRT execution failed ({errs[-1] if errs else 'no detail'})",
                                "check the input shapes against the profile")

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        ins, outs, stream = self._prepare(feeds)
        torch.cuda.current_stream().synchronize()
        self._execute(stream)
        stream.synchronize()
        del ins
        return {n: (t.float() if t.dtype == torch.bfloat16 else t).cpu().numpy() for n, t in outs.items()}

    def time(self, feeds: dict[str, np.ndarray], repeats: int = 50, warmup: int = 5) -> float:
        import torch

        ins, outs, stream = self._prepare(feeds)
        torch.cuda.current_stream().synchronize()
        for _ in range(max(warmup, 1)):
            self._execute(stream)
        stream.synchronize()
        times = []
        for _ in range(max(repeats, 1)):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            self._execute(stream)
            end.record(stream)
            end.synchronize()
            times.append(float(start.elapsed_time(end)))
        del ins, outs
        return float(statistics.median(times))


_SCRATCH: dict[str, Any] = {}


def _scratch(device: Any) -> Any:
    """A small live buffer for zero-sized tensors (TensorRT wants a non-null address)."""
    import torch

    if "buf" not in _SCRATCH:
        _SCRATCH["buf"] = torch.empty(256, dtype=torch.uint8, device=device)
    return _SCRATCH["buf"]


def load_engine(engine_path: str | Path, backend: str = "auto") -> LoadedEngine:
    """Check the engine against its metadata (no GPU needed), then deserialize it (GPU needed)."""
    info = check_engine(engine_path, backend)
    return LoadedEngine(info)


def run_engine(engine_path: str | Path, feeds: dict[str, np.ndarray], backend: str = "auto") -> dict[str, np.ndarray]:
    """Run the engine once on the GPU; returns outputs as numpy arrays by name."""
    _require_gpu()
    return LoadedEngine(check_engine(engine_path, backend)).run(feeds)


def time_engine(engine_path: str | Path, feeds: dict[str, np.ndarray], repeats: int = 50,
                backend: str = "auto") -> float:
    """Median GPU time of one execution in milliseconds (CUDA events around execute_async_v3)."""
    _require_gpu()
    return LoadedEngine(check_engine(engine_path, backend)).time(feeds, repeats)


@dataclass
class EngineTiming:
    """One run of an engine on random inputs (output shapes and dtypes) and its median latency."""

    engine: str
    feeds: dict[str, np.ndarray] = field(repr=False)
    outputs: dict[str, np.ndarray] = field(repr=False)
    median_ms: float
    repeats: int

    def to_dict(self) -> dict[str, Any]:
        return {"engine": self.engine, "median_ms": self.median_ms, "repeats": self.repeats,
                "inputs": {k: list(v.shape) for k, v in self.feeds.items()},
                "outputs": {k: list(v.shape) for k, v in self.outputs.items()}}

    def format_text(self) -> str:
        return "\n".join([f"{k}: {fmt_shape(v.shape)} {v.dtype}" for k, v in self.outputs.items()]
                         + [f"median latency {self.median_ms:.3f} ms over {self.repeats} runs"])


def run_and_time(engine_path: str | Path, specs: Sequence[InputSpec] = (), *, repeats: int = 50, seed: int = 0,
                 backend: str = "auto") -> EngineTiming:
    """``lrexport run``: check the engine (no GPU needed: a corrupted or foreign engine is refused first),
    then, on a GPU, run it once on random inputs at the opt shapes (``specs``, else its profile) and time it."""
    info = check_engine(engine_path, backend)
    feeds = random_feeds(list(specs) or specs_from_meta(info.meta), "opt", seed)
    ok, why = gpu_available()
    if not ok:
        raise LrexportError(f"cannot run {engine_path}: {why}", "run it on a machine with a CUDA GPU")
    engine = LoadedEngine(info)
    outputs = engine.run(feeds)
    return EngineTiming(str(engine_path), feeds, outputs, engine.time(feeds, repeats), repeats)
