"""The comparator's rules and the parity report: a drifting output is named, located and fails."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import samples
from exporter import check_parity, export_onnx, load_model
from exporter.compare import Tolerance, compare_arrays, parse_output_tolerance
from exporter.errors import LrexportError
from exporter.specs import build_specs


def test_element_fails_only_past_both_atol_and_rtol():
    ref = np.array([1000.0, 1e-6, 1.0])
    act = np.array([1000.5, 2e-6, 1.0])  # abs 0.5 but rel 5e-4; rel 1 but abs 1e-6
    comp = compare_arrays("y", act, ref, Tolerance(atol=1e-3, rtol=1e-3))
    assert comp.ok and comp.mismatches == 0
    comp = compare_arrays("y", act, ref, Tolerance(atol=1e-7, rtol=1e-4))
    assert not comp.ok and comp.mismatches == 2
    assert comp.worst_index == (0,) and comp.max_abs == pytest.approx(0.5)
    assert comp.min_atol == pytest.approx(0.5)  # atol that would let it pass at rtol 1e-4
    assert compare_arrays("y", act, ref, Tolerance(atol=comp.min_atol, rtol=1e-4)).ok


def test_nan_or_inf_always_fails():
    ref = np.ones(4)
    comp = compare_arrays("y", np.array([1.0, np.nan, 1.0, np.inf]), ref, Tolerance(1e9, 1e9))
    assert not comp.ok and comp.nonfinite == 2


def test_statistics():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal(1000)
    comp = compare_arrays("y", ref * 1.001, ref, Tolerance(1e-5, 1e-5))
    assert comp.rel_l2 == pytest.approx(1e-3, rel=1e-3)
    assert comp.cosine == pytest.approx(1.0)
    assert comp.max_rel == pytest.approx(1e-3, rel=1e-6)
    assert comp.min_rtol == pytest.approx(1e-3, rel=1e-6)


def test_output_tolerance_syntax():
    assert parse_output_tolerance("logits:atol=1e-3,rtol=0.01") == ("logits", Tolerance(1e-3, 0.01))
    with pytest.raises(LrexportError, match="bad output tolerance"):
        parse_output_tolerance("logits:tol=1")


@pytest.fixture(scope="module")
def mlp_onnx(tmp_path_factory):
    sample = samples.get("lowrank_mlp")
    model = sample.factory()
    specs = build_specs(sample.inputs, ["x:min=1x1x512,opt=2x16x512,max=2x64x512"])
    path = tmp_path_factory.mktemp("parity") / "mlp.onnx"
    export_onnx(model, specs, path)
    return model, specs, path


def _tampered(path, tmp_path, scale=1.01):
    """A copy of the ONNX file with its largest weight scaled: parity must catch it."""
    model = onnx.load(str(path))
    init = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    arr = numpy_helper.to_array(init) * scale
    init.CopyFrom(numpy_helper.from_array(arr.astype(np.float32), init.name))
    out = tmp_path / "tampered.onnx"
    onnx.save(model, str(out))
    return out


def test_tampered_model_fails_with_output_and_location(mlp_onnx, tmp_path):
    model, specs, path = mlp_onnx
    report = check_parity(model, _tampered(path, tmp_path), specs=specs)
    assert not report.ok
    (result, comp), *_ = report.failures()
    assert comp.output == "output" and comp.mismatches > 0 and len(comp.worst_index) == 3
    assert comp.module == "norm"  # the module that produced the output, from the exporter's metadata
    with pytest.raises(AssertionError, match="drifts") as info:
        report.assert_ok()
    assert "FAIL" in str(info.value) and "worst at" in str(info.value)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["ok"] is False and data["results"][0]["outputs"][0]["output"] == "output"


def test_per_output_tolerance_override(mlp_onnx, tmp_path):
    model, specs, path = mlp_onnx
    bad = _tampered(path, tmp_path, scale=1.0005)
    assert not check_parity(model, bad, specs=specs).ok
    assert check_parity(model, bad, specs=specs, per_output={"out*": Tolerance(1e-1, 1e-1)}).ok


def test_python_api_with_spec_strings(mlp_onnx):
    model, _, path = mlp_onnx
    report = check_parity(model, path, shapes=["x:min=1x1x512,opt=2x16x512,max=2x64x512"], cases=["min", "max"])
    assert report.ok and [r.case for r in report.results] == ["min", "max"]


def test_fixture_from_the_pytest_plugin(lrexport_parity, mlp_onnx):
    model, specs, path = mlp_onnx
    report = lrexport_parity(model, path, specs=specs)
    assert report.ok


def test_input_names_that_do_not_match_the_onnx_file(mlp_onnx):
    model, _, path = mlp_onnx
    with pytest.raises(LrexportError, match="do not match the ONNX inputs"):
        check_parity(model, path, inputs=["tokens:1x4x512"])


def test_model_that_produces_nan_is_reported(tmp_path):
    loaded = load_model(None, factory="badmodels:nan_model")
    specs = build_specs(["x:2x4x16"])
    export_onnx(loaded, specs, tmp_path / "nan.onnx")
    with pytest.raises(LrexportError, match="produces NaN/Inf in output 'output'"):
        check_parity(loaded, tmp_path / "nan.onnx", specs=specs)


def test_drift_from_pytorch_is_located_at_the_first_wrong_operation(tmp_path):
    """A wrong bias in the ONNX file: the first intermediate that departs from PyTorch is that Linear's."""
    from exporter.localize import localize_against_torch
    from exporter.specs import random_feeds

    sample = samples.get("lowrank_mlp")
    model = sample.factory()
    specs = build_specs(sample.inputs, sample.shapes)
    result = export_onnx(model, specs, tmp_path / "m.onnx")
    proto = onnx.load(str(result.onnx_path))
    feeds = random_feeds(specs, "odd", 0)
    assert localize_against_torch(result.program, proto, feeds, ["x"]) is None  # as exported: no drift
    (bias,) = [i for i in proto.graph.initializer if i.name == "ff.fc2.up.bias"]
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + np.float32(0.05), bias.name))
    loc = localize_against_torch(result.program, proto, feeds, ["x"])
    assert loc is not None and loc.module == "ff.fc2.up" and loc.op_type == "Add"
    assert loc.max_abs == pytest.approx(0.05, rel=1e-3)
    assert "module 'ff.fc2.up'" in loc.describe()


def test_output_module_paths_are_the_innermost_module(mlp_onnx):
    from exporter.parity import output_modules

    _, _, path = mlp_onnx
    assert output_modules(onnx.load(str(path))) == {"output": "norm"}
