"""TensorRT engine builds (real TensorRT-RTX engines, ahead of time on the CPU), metadata, atomic writes,
parse-failure reports, range validation, and the mypy check of the full-TensorRT code path."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from trt_helpers import (
    BUILD_SAMPLES,
    ROOT,
    cast_copy,
    exported_chunked,
    exported_sample,
    sample_specs,
    stray_temp_files,
    unparseable_model,
    write_patched_stubs,
)

from exporter.errors import LrexportError
from exporter.specs import InputSpec
from exporter.trt_backend import available_backends, get_backend
from exporter.trt_build import (
    UnsupportedOnnxError,
    build_engine,
    meta_path_for,
    pass_hint,
    plan_engine,
)

try:
    import tensorrt_rtx as trt
except ImportError as _err:  # the tests that build skip, saying why; the others (mypy, hints) still run
    trt = None
    _WHY = f"tensorrt_rtx does not import ({_err}); pip install tensorrt-rtx-cu13"
needs_rtx = pytest.mark.skipif(trt is None, reason=_WHY if trt is None else "")
BACKEND = "tensorrt-rtx"


def _onnx_io(path: Path) -> tuple[dict[str, int], dict[str, int]]:
    m = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    ins = {v.name: v.type.tensor_type.elem_type for v in m.graph.input if v.name not in inits}
    outs = {v.name: v.type.tensor_type.elem_type for v in m.graph.output}
    return ins, outs


_ONNX_TO_NAME = {1: "float32", 7: "int64", 10: "float16"}


def _half_layers(onnx_path: Path) -> tuple[int, int, list[str]]:
    """Parse with TensorRT-RTX: (#layers with a HALF output, #layers, op names of normalization layers' dtypes)."""
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    assert parser.parse_from_file(str(onnx_path))
    half, norm_types = 0, []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        dtypes = [layer.get_output(j).dtype for j in range(layer.num_outputs)]
        half += any(dt == trt.DataType.HALF for dt in dtypes)
        if layer.type == trt.LayerType.NORMALIZATION:
            norm_types.append(str(dtypes[0]))
    return half, network.num_layers, norm_types


@needs_rtx
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("sample", BUILD_SAMPLES)
def test_build_sample(sample: str, precision: str, tmp_path: Path) -> None:
    onnx_path = exported_sample(sample)
    cast_report = None
    if precision != "fp32":  # the builder takes the model as given: cast first, as `lrexport build` does
        onnx_path, cast_report = cast_copy(onnx_path, precision)
    specs = sample_specs(sample)
    engine = tmp_path / f"{sample}.{precision}.engine"
    messages: list[str] = []
    res = build_engine(onnx_path, engine, specs=specs, precision=precision, backend=BACKEND,
                       progress=messages.append)
    # engine + metadata written, nothing left behind
    assert engine.is_file() and engine.stat().st_size == res.engine_bytes > 100_000
    assert res.meta_path == meta_path_for(engine) and res.meta_path.is_file()
    assert not stray_temp_files(tmp_path)
    assert res.unsupported_nodes == [] and res.backend == BACKEND and res.precision == precision
    assert messages and "building" in " ".join(messages)
    meta = json.loads(res.meta_path.read_text())
    assert meta["backend"] == BACKEND and meta["backend_version"] == trt.__version__
    assert meta["precision"] == precision and meta["engine_bytes"] == res.engine_bytes
    assert meta["engine_sha256"] == hashlib.sha256(engine.read_bytes()).hexdigest()
    assert meta["onnx_sha256"] == hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    data = onnx_path.with_name(onnx_path.name + ".data")
    assert meta["onnx_data_sha256"] == {data.name: hashlib.sha256(data.read_bytes()).hexdigest()}
    assert meta["lrexport_version"] == importlib.metadata.version("lrexport")
    # the GPU as torch sees it; without one the engine cannot be deserialized here, so the profiles are
    # the ones handed to the builder, with one they are read back from the engine
    import torch

    cuda = torch.cuda.is_available()
    assert (meta["gpu"] is not None) == cuda
    assert not cuda or meta["gpu"]["name"] == torch.cuda.get_device_name()
    assert meta["profiles_source"] == ("engine" if cuda else "builder")
    # profiles as requested, in the metadata file and in the result
    for profiles in (meta["profiles"], res.profiles):
        got = {e["name"]: e for e in profiles[0]["inputs"]}
        assert set(got) == {s.name for s in specs}
        for s in specs:
            assert (got[s.name]["min"], got[s.name]["opt"], got[s.name]["max"]) == (list(s.min), list(s.opt),
                                                                                     list(s.max))
    # I/O names and dtypes match the ONNX model (inputs/outputs keep their types in fp16 too)
    ins, outs = _onnx_io(onnx_path)
    assert {i["name"]: i["dtype"] for i in meta["inputs"]} == {k: _ONNX_TO_NAME[v] for k, v in ins.items()}
    assert {o["name"]: o["dtype"] for o in meta["outputs"]} == {k: _ONNX_TO_NAME[v] for k, v in outs.items()}
    assert res.network_onnx == onnx_path  # parsed as given, no second cast
    assert not any("casting" in m for m in messages) and f"({precision})" in " ".join(messages)
    if precision == "fp16":
        half, total, norms = _half_layers(onnx_path)
        assert half > total // 4, f"only {half}/{total} layers run in fp16"
        assert all("FLOAT" in t and "HALF" not in t for t in norms)  # LayerNorm kept in fp32
        assert cast_report and meta["float_types"]["fp16"] >= cast_report["initializers_cast"] > 0
    else:
        assert set(meta["float_types"]) == {"fp32"}
    json.dumps(res.to_dict())  # serializable


@needs_rtx
def test_builder_takes_the_model_as_given(tmp_path: Path) -> None:
    """One owner for the precision cast: the builder never casts. Asked for a precision the model does not
    hold, it refuses before building (a silent second cast before); planning reads the precision from the
    tensor types and writes nothing."""
    onnx_path, specs = exported_sample("lowrank_mlp"), sample_specs("lowrank_mlp")
    engine = tmp_path / "e.engine"
    with pytest.raises(LrexportError, match="holds fp32 tensors, not fp16.*cast it first"):
        build_engine(onnx_path, engine, specs=specs, precision="half", backend=BACKEND)
    fp16_path, _ = cast_copy(onnx_path, "fp16")
    with pytest.raises(LrexportError, match="holds fp16 tensors, not fp32"):
        build_engine(fp16_path, engine, specs=specs, precision="fp32", backend=BACKEND)
    plan = plan_engine(fp16_path, engine, specs=specs, backend=BACKEND)
    assert plan.precision == "fp16" and plan.float_types["fp16"] > 0
    assert plan.float_types["fp32"] > 0  # the float32 input and output and the Casts at the boundary
    assert [s.name for s in plan.specs] == ["x"] and plan.digest["onnx_sha256"]
    assert plan_engine(onnx_path, engine, specs=specs, backend=BACKEND).precision == "fp32"
    assert list(tmp_path.iterdir()) == []


@needs_rtx
def test_fp16_engine_smaller_than_fp32(tmp_path: Path) -> None:
    onnx_path, specs = exported_sample("lowrank_mlp"), sample_specs("lowrank_mlp")
    sources = {"fp32": onnx_path, "fp16": cast_copy(onnx_path, "fp16")[0], "bf16": cast_copy(onnx_path, "bf16")[0]}
    sizes = {p: build_engine(src, tmp_path / f"{p}.engine", specs=specs, precision=p,
                             backend=BACKEND).engine_bytes for p, src in sources.items()}
    assert sizes["fp16"] < 0.8 * sizes["fp32"] and sizes["bf16"] < 0.8 * sizes["fp32"]


@needs_rtx
def test_chunked_causal_builds_across_range(tmp_path: Path) -> None:
    """Pad-to-chunk + Reshape(n/chunk, chunk) must build for every n in 1..max (not just multiples of 16)."""
    onnx_path, specs = exported_chunked()
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    for n in (1, 17, 300):  # the ONNX itself handles n not divisible by the chunk
        assert sess.run(None, {"x": np.ones((1, n, 64), np.float32)})[0].shape == (1, n, 64)
    fp16_path, cast_report = cast_copy(onnx_path, "fp16")
    assert {"CumSum", "Div"} <= set(cast_report["kept_fp32_by_op"])
    for precision, source in (("fp32", onnx_path), ("fp16", fp16_path)):
        res = build_engine(source, tmp_path / f"chunked.{precision}.engine", specs=specs, precision=precision,
                           backend=BACKEND)
        assert res.engine_bytes > 0 and res.precision == precision
        assert res.profiles[0]["inputs"][0]["min"] == [1, 1, 64]
        assert res.profiles[0]["inputs"][0]["max"] == [3, 300, 64]


@needs_rtx
def test_parse_from_bytes_with_external_data(tmp_path: Path) -> None:
    onnx_path, specs = exported_sample("causal_block"), sample_specs("causal_block")
    assert onnx_path.with_name(onnx_path.name + ".data").is_file()  # weights really are external
    a = build_engine(onnx_path, tmp_path / "file.engine", specs=specs, backend=BACKEND, parse_from="file")
    b = build_engine(onnx_path, tmp_path / "bytes.engine", specs=specs, backend=BACKEND, parse_from="bytes")
    assert abs(a.engine_bytes - b.engine_bytes) < 0.01 * a.engine_bytes


@needs_rtx
def test_refuses_overwrite_without_force(tmp_path: Path) -> None:
    onnx_path, specs = exported_sample("lowrank_mlp"), sample_specs("lowrank_mlp")
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"previous engine")
    with pytest.raises(LrexportError, match="already exists.*--force"):
        build_engine(onnx_path, engine, specs=specs, backend=BACKEND)
    with pytest.raises(LrexportError, match="not an engine lrexport built"):  # force replaces only lrexport's
        build_engine(onnx_path, engine, specs=specs, backend=BACKEND, force=True)
    assert engine.read_bytes() == b"previous engine" and not meta_path_for(engine).exists()
    engine.unlink()
    build_engine(onnx_path, engine, specs=specs, backend=BACKEND)
    res = build_engine(onnx_path, engine, specs=specs, backend=BACKEND, force=True)
    assert engine.stat().st_size == res.engine_bytes and meta_path_for(engine).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.engine", "m.engine.json"]


@needs_rtx
def test_failed_build_leaves_nothing(tmp_path: Path) -> None:
    """causal_block materializes an n*d*d state: a 1 MB workspace cannot hold it; nothing may be written."""
    onnx_path, specs = exported_sample("causal_block"), sample_specs("causal_block")
    engine = tmp_path / "oom.engine"
    with pytest.raises(LrexportError, match="failed to build"):
        build_engine(onnx_path, engine, specs=specs, backend=BACKEND, workspace_mb=1)
    assert list(tmp_path.iterdir()) == []


@needs_rtx
def test_builder_options_recorded(tmp_path: Path) -> None:
    onnx_path, specs = exported_sample("lowrank_mlp"), sample_specs("lowrank_mlp")
    cache = tmp_path / "timing.cache"
    res = build_engine(onnx_path, tmp_path / "o.engine", specs=specs, backend=BACKEND, opt_level=0,
                       workspace_mb=1024, timing_cache=cache)
    meta = json.loads(res.meta_path.read_text())
    assert meta["builder"]["opt_level"] == 0 and meta["builder"]["workspace_bytes"] == 1024 << 20
    # TensorRT-RTX has no timing cache: say so, and do not write a useless file
    assert any("timing cache" in w for w in res.warnings) and not cache.exists()
    with pytest.raises(LrexportError, match="optimization level"):
        build_engine(onnx_path, tmp_path / "x.engine", specs=specs, backend=BACKEND, opt_level=9)


@needs_rtx
def test_unparseable_nodes_reported_by_name_and_op(tmp_path: Path) -> None:
    bad = unparseable_model(tmp_path / "bad.onnx")
    with pytest.raises(UnsupportedOnnxError) as info:
        build_engine(bad, tmp_path / "bad.engine", specs=[], backend=BACKEND)
    err = info.value
    found = {(n.name, n.op_type) for n in err.unsupported_nodes}
    assert ("det_node", "Det") in found and ("custom_foo", "Foo") in found
    assert ("relu_in", "Relu") not in found
    assert "det_node (Det)" in str(err) and "custom_foo (Foo)" in str(err) and "\n" not in str(err)
    assert "plugin" in err.hint  # custom domain op
    assert not (tmp_path / "bad.engine").exists() and not stray_temp_files(tmp_path)


def test_pass_hints() -> None:
    assert "`einsum` pass" in pass_hint("Einsum")
    assert "`causal-chunk` pass" in pass_hint("CumSum")
    assert "plugin" in pass_hint("Foo", "my.domain")


@needs_rtx
def test_inconsistent_ranges_rejected(tmp_path: Path) -> None:
    onnx_path = exported_sample("linformer_encoder")
    engine = tmp_path / "r.engine"
    ok = sample_specs("linformer_encoder")[0]
    cases = {
        "no input named": [replace(ok, name="y")],
        "fixed at 128": [InputSpec("x", "float32", (1, 64, 128), (2, 128, 128), (8, 256, 128))],
        "rank 2": [InputSpec("x", "float32", (1, 128), (2, 128), (8, 128))],
        "float32 in the ONNX model but int64": [replace(ok, dtype="int64")],
        "no shape range": [],
    }
    bogus = InputSpec("x", "float32", (1, 128, 128), (2, 128, 128), (8, 128, 128))
    object.__setattr__(bogus, "min", (9, 128, 128))  # bypass InputSpec's own check: min > max
    cases["inconsistent on axis 0"] = [bogus]
    for message, specs in cases.items():
        with pytest.raises(LrexportError, match=message):
            build_engine(onnx_path, engine, specs=specs, backend=BACKEND)
        assert not engine.exists()
    with pytest.raises(LrexportError, match="opt outside"):
        InputSpec("x", "float32", (1, 128, 128), (9, 128, 128), (8, 128, 128))


@needs_rtx
def test_user_errors(tmp_path: Path) -> None:
    specs = sample_specs("lowrank_mlp")
    with pytest.raises(LrexportError, match="does not exist"):
        build_engine(tmp_path / "missing.onnx", tmp_path / "e.engine", specs=specs, backend=BACKEND)
    onnx_path = exported_sample("lowrank_mlp")
    with pytest.raises(LrexportError, match="unknown precision 'int8'.*fp32, fp16, bf16"):
        build_engine(onnx_path, tmp_path / "e.engine", specs=specs, precision="int8", backend=BACKEND)
    with pytest.raises(LrexportError, match="unknown TensorRT backend"):
        build_engine(onnx_path, tmp_path / "e.engine", specs=specs, backend="onnxruntime")
    assert get_backend("auto").name in available_backends()


@needs_rtx
@pytest.mark.skipif("tensorrt" in available_backends(), reason="full TensorRT is installed here")
def test_missing_backend_says_what_to_install(tmp_path: Path) -> None:
    # tensorrt-stubs installs a bare `tensorrt/` namespace folder: it must not count as TensorRT
    with pytest.raises(LrexportError, match="pip install tensorrt.*--backend tensorrt-rtx"):
        build_engine(exported_sample("lowrank_mlp"), tmp_path / "e.engine", specs=sample_specs("lowrank_mlp"),
                     backend="tensorrt")
    assert get_backend("auto").name == "tensorrt-rtx"


@needs_rtx
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("sample", ["lowrank_mlp", "lowrank_nopay", "lowrank_block", "causal_block", "causal_lm",
                                    "noncausal_encoder", "linformer_encoder"])
def test_build_after_graph_passes(sample: str, precision: str, tmp_path: Path) -> None:
    """Every sample after the default graph passes (chunked causal form, fused pairs, lowered einsums) parses
    and builds across its whole shape range."""
    from exporter.specs import random_feeds
    from graph_passes import run_passes

    specs = sample_specs(sample)
    feeds = [random_feeds(specs, case, i) for i, case in enumerate(("min", "odd"))]
    optimized, report = run_passes(onnx.load(str(exported_sample(sample))), feeds=feeds)
    # the Linformer has nothing to rewrite (its E/F sequence projections must not be fused)
    assert any(p.changed for p in report.passes) == (sample != "linformer_encoder")
    path = tmp_path / "model.onnx"
    onnx.save(optimized, str(path))
    if precision != "fp32":
        from graph_passes.precision_cast import cast_precision_file

        cast_precision_file(path, tmp_path / f"model.{precision}.onnx", precision)
        path = tmp_path / f"model.{precision}.onnx"
    res = build_engine(path, tmp_path / "model.engine", specs=specs, precision=precision, backend=BACKEND)
    assert res.unsupported_nodes == [] and res.engine_bytes > 100_000
    got = {e["name"]: (e["min"], e["max"]) for e in res.profiles[0]["inputs"]}
    assert got == {s.name: (list(s.min), list(s.max)) for s in specs}


def test_mypy_trt_modules() -> None:
    """The full-tensorrt path (and the rest of the project) type-checks against tensorrt-stubs (patched copy:
    the stubs have syntax errors)."""
    pytest.importorskip("mypy")
    try:
        write_patched_stubs()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    files = ["exporter", "graph_passes", "samples"]  # includes trt_backend.py, trt_build.py, trt_engine.py
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "mypy", "--config-file", "mypy.ini", *files], cwd=ROOT,
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Success" in proc.stdout
    # negative control: the stubs really are used (a misspelt TensorRT method must fail)
    probe = ROOT / ".work" / "mypy_probe_trt.py"
    probe.write_text("from __future__ import annotations\nfrom typing import TYPE_CHECKING\n"
                     "if TYPE_CHECKING:\n    import tensorrt as trt\n\n"
                     "def f(c: trt.IBuilderConfig) -> None:\n    c.set_memory_pool_limt(0, 1)\n")
    try:
        bad = subprocess.run([sys.executable, "-m", "mypy", "--config-file", "mypy.ini", str(probe)], cwd=ROOT,
                             capture_output=True, text=True, env=env, timeout=300)
    finally:
        probe.unlink()
    assert bad.returncode != 0 and "set_memory_pool_limt" in bad.stdout


@needs_rtx
def test_fp32_builds_clear_tf32() -> None:
    """TF32 (TensorRT's default) rounds fp32 matmul inputs to 10 mantissa bits: fp32 engines must not use it."""
    be = get_backend(BACKEND)
    builder = trt.Builder(trt.Logger(trt.Logger.ERROR))
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.TF32)
    assert config.get_flag(trt.BuilderFlag.TF32)
    assert be.disable_tf32(config) and not config.get_flag(trt.BuilderFlag.TF32)
