"""Engine loading and refusal (corruption, other backend/version/GPU) on the CPU; running and timing on a GPU."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from trt_helpers import cast_copy, exported_sample, sample_specs

from exporter import trt_engine
from exporter.errors import LrexportError
from exporter.specs import random_feeds
from exporter.trt_backend import Backend
from exporter.trt_build import build_engine, meta_path_for
from exporter.trt_engine import check_engine, gpu_available, load_engine, run_engine, time_engine

BACKEND = "tensorrt-rtx"


def _has_gpu() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


needs_gpu = pytest.mark.skipif(not _has_gpu(), reason="no CUDA GPU (torch.cuda.is_available() is False)")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Engines built once for the module; every test that needs one skips, saying why, without tensorrt_rtx."""
    pytest.importorskip("tensorrt_rtx", reason="tensorrt_rtx is not installed (pip install tensorrt-rtx-cu13)")
    out = tmp_path_factory.mktemp("engines")
    engines = {}
    for sample, precision in (("lowrank_mlp", "fp32"), ("lowrank_mlp", "fp16"), ("causal_lm", "fp32")):
        source = exported_sample(sample) if precision == "fp32" else cast_copy(exported_sample(sample), precision)[0]
        engines[f"{sample}.{precision}"] = build_engine(
            source, out / f"{sample}.{precision}.engine", specs=sample_specs(sample),
            precision=precision, backend=BACKEND).engine_path
    return engines


@pytest.fixture
def engine_copy(built: dict[str, Path], tmp_path: Path) -> Path:
    src = built["lowrank_mlp.fp32"]
    dst = tmp_path / src.name
    shutil.copy(src, dst)
    shutil.copy(meta_path_for(src), meta_path_for(dst))
    return dst


def _edit_meta(engine: Path, **changes: object) -> None:
    path = meta_path_for(engine)
    meta = json.loads(path.read_text())
    meta.update(changes)
    path.write_text(json.dumps(meta))


def test_check_engine_accepts_a_good_engine(built: dict[str, Path]) -> None:
    info = check_engine(built["lowrank_mlp.fp32"], BACKEND)
    assert info.backend.name == BACKEND and info.meta["precision"] == "fp32"
    assert [i["name"] for i in info.inputs] == ["x"] and info.profiles[0]["inputs"][0]["max"] == [4, 512, 512]
    assert check_engine(built["causal_lm.fp32"]).inputs[0]["dtype"] == "int64"  # auto picks the builder's backend


def test_corrupted_engine_refused(engine_copy: Path) -> None:
    data = bytearray(engine_copy.read_bytes())
    data[len(data) // 2] ^= 0xFF
    engine_copy.write_bytes(bytes(data))
    with pytest.raises(LrexportError, match="corrupted.*sha256.*--force"):
        check_engine(engine_copy)


def test_truncated_engine_refused(engine_copy: Path) -> None:
    engine_copy.write_bytes(engine_copy.read_bytes()[:1000])
    with pytest.raises(LrexportError, match="corrupted: 1000 bytes"):
        check_engine(engine_copy)


def test_other_backend_version_refused(engine_copy: Path) -> None:
    _edit_meta(engine_copy, backend_version="0.9.0")
    with pytest.raises(LrexportError, match=r"built with tensorrt-rtx 0\.9\.0 but tensorrt-rtx .* is installed"):
        check_engine(engine_copy)


def test_other_backend_refused(engine_copy: Path) -> None:
    _edit_meta(engine_copy, backend="tensorrt")
    with pytest.raises(LrexportError, match="built with tensorrt"):
        check_engine(engine_copy)
    with pytest.raises(LrexportError, match="built with tensorrt, not tensorrt-rtx|not installed"):
        check_engine(engine_copy, backend="tensorrt-rtx")


def test_other_gpu_refused(engine_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _edit_meta(engine_copy, gpu={"name": "NVIDIA A100", "compute_capability": "8.0"})
    monkeypatch.setattr(trt_engine, "gpu_info", lambda: {"name": "NVIDIA H100", "compute_capability": "9.0"})
    monkeypatch.setattr(Backend, "is_rtx", property(lambda self: False))  # full TensorRT: engines are per-GPU
    with pytest.raises(LrexportError, match=r"built for NVIDIA A100 \(sm 8\.0\) but this GPU is NVIDIA H100"):
        check_engine(engine_copy)


def test_missing_or_bad_metadata_refused(engine_copy: Path) -> None:
    meta = meta_path_for(engine_copy)
    meta.write_text("{not json")
    with pytest.raises(LrexportError, match="not valid JSON"):
        check_engine(engine_copy)
    meta.unlink()
    with pytest.raises(LrexportError, match="has no metadata file"):
        check_engine(engine_copy)
    with pytest.raises(LrexportError, match="does not exist"):
        check_engine(engine_copy.with_name("nope.engine"))


def test_gpu_available_reports_reason() -> None:
    ok, why = gpu_available()
    assert isinstance(ok, bool) and why
    assert ok == _has_gpu()


@pytest.mark.skipif(_has_gpu(), reason="a GPU is present: covered by the GPU tests")
def test_no_gpu_is_a_clear_error(built: dict[str, Path]) -> None:
    feeds = random_feeds(sample_specs("lowrank_mlp"), "min")
    for call in (lambda: run_engine(built["lowrank_mlp.fp32"], feeds),
                 lambda: time_engine(built["lowrank_mlp.fp32"], feeds, 3),
                 lambda: load_engine(built["lowrank_mlp.fp32"])):
        with pytest.raises(LrexportError, match="no CUDA GPU"):
            call()


# ------------------------------------------------------------------------------------------- GPU

def _torch_ref(sample: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
    import torch

    from samples import SAMPLES

    with torch.no_grad():
        return SAMPLES[sample].factory()(*[torch.from_numpy(v) for v in feeds.values()]).numpy()


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("key,rtol", [("lowrank_mlp.fp32", 1e-3), ("lowrank_mlp.fp16", 2e-2), ("causal_lm.fp32", 1e-3)])
def test_run_engine_matches_torch(built: dict[str, Path], key: str, rtol: float) -> None:
    sample = key.split(".")[0]
    specs = sample_specs(sample)
    for case in ("min", "opt", "odd"):
        feeds = random_feeds(specs, case, seed=1)
        out = run_engine(built[key], feeds)
        ref = _torch_ref(sample, feeds)
        got = next(iter(out.values()))
        assert got.shape == ref.shape
        scale = float(np.abs(ref).max()) or 1.0
        assert float(np.abs(got - ref).max()) <= rtol * scale + 1e-4, case


@pytest.mark.gpu
@needs_gpu
def test_engine_profiles_read_back(built: dict[str, Path]) -> None:
    loaded = load_engine(built["lowrank_mlp.fp32"])
    spec = sample_specs("lowrank_mlp")[0]
    entry = loaded.profiles()[0]["inputs"][0]
    assert (entry["min"], entry["opt"], entry["max"]) == (list(spec.min), list(spec.opt), list(spec.max))


@pytest.mark.gpu
@needs_gpu
def test_time_engine_and_out_of_profile(built: dict[str, Path]) -> None:
    feeds = random_feeds(sample_specs("lowrank_mlp"), "opt")
    ms = time_engine(built["lowrank_mlp.fp32"], feeds, repeats=5)
    assert 0 < ms < 1000
    with pytest.raises(LrexportError, match="outside the engine's profile"):
        run_engine(built["lowrank_mlp.fp32"], {"x": np.zeros((8, 8, 512), np.float32)})
