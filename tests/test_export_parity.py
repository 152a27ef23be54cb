"""Every sample through the real dynamo export and ONNX Runtime parity at min/opt/max/odd shapes."""

from __future__ import annotations

import onnx
import pytest

import samples
from exporter import check_parity, export_onnx, load_model
from exporter.errors import LrexportError
from exporter.specs import build_specs


@pytest.mark.parametrize("name", list(samples.SAMPLES))
def test_sample_exports_and_matches_pytorch(name, sample_file, tmp_path):
    sample = samples.get(name)
    loaded = load_model(sample_file(name, "pt2"))
    specs = build_specs(sample.inputs, sample.shapes)
    result = export_onnx(loaded, specs, tmp_path / "model.onnx")
    model = onnx.load(str(result.onnx_path))
    onnx.checker.check_model(model)
    assert model.opset_import[0].version >= 17
    assert not (tmp_path / "model.onnx.data").exists()  # weights inline below 2 GB
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims[0] == "batch"
    assert dims[1] == ("seq" if name != "linformer_encoder" else 128)
    scopes = [p for n in model.graph.node for p in n.metadata_props if p.key == "pkg.torch.onnx.name_scopes"]
    assert scopes, "the dynamo exporter's module paths must be kept"
    report = check_parity(loaded, result.onnx_path, specs=result.specs)
    report.assert_ok()
    expected_cases = ["min", "opt", "max"] + (["odd"] if name != "linformer_encoder" else [])
    assert [r.case for r in report.results] == expected_cases
    assert report.reference == "pytorch float64"
    odd = [r for r in report.results if r.case == "odd"]
    if odd and name != "causal_lm":
        assert odd[0].shapes[specs[0].name][1] % 64 != 0


def test_axis_pinned_by_the_model_is_reported_with_its_reason(tmp_path):
    model = samples.get("linformer_encoder").factory()
    specs = build_specs(["x:2x128x128:float32"], ["x:min=1x16x128,opt=2x128x128,max=4x512x128"])
    result = export_onnx(model, specs, tmp_path / "lin.onnx")
    (pin,) = result.pinned
    assert (pin.input, pin.axis, pin.size, pin.requested) == ("x", 1, 128, (16, 512))
    assert "constant (128)" in pin.reason
    assert any("axis 1 of input 'x' became static (128" in w for w in result.warnings)
    dims = onnx.load(str(result.onnx_path)).graph.input[0].type.tensor_type.shape.dim
    assert dims[1].dim_value == 128  # the graph says so too, not a misleading 'seq'
    assert result.specs[0].dynamic_axes == (0,)
    check_parity(model, result.onnx_path, specs=result.specs).assert_ok()


def test_torchscript_archive_goes_through_the_dynamo_exporter(sample_file, tmp_path):
    loaded = load_model(sample_file("causal_lm", "torchscript"))
    specs = build_specs(samples.get("causal_lm").inputs, samples.get("causal_lm").shapes)
    result = export_onnx(loaded, specs, tmp_path / "ts.onnx")
    assert result.exporter == "dynamo" and not result.pinned
    check_parity(loaded, result.onnx_path, specs=specs).assert_ok()


def test_torchscript_exporter_fallback(tmp_path):
    model = samples.get("lowrank_mlp").factory()
    specs = build_specs(samples.get("lowrank_mlp").inputs, samples.get("lowrank_mlp").shapes)
    result = export_onnx(model, specs, tmp_path / "fallback.onnx", exporter="torchscript")
    assert result.exporter == "torchscript"
    dims = onnx.load(str(result.onnx_path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims[:2]] == ["batch", "seq"]
    check_parity(model, result.onnx_path, specs=specs).assert_ok()


def test_unsupported_op_names_the_op_and_module(tmp_path):
    model = load_model(None, factory="badmodels:custom_op_model")
    with pytest.raises(LrexportError) as info:
        export_onnx(model, build_specs(["x:2x4x16"]), tmp_path / "bad.onnx")
    message = str(info.value)
    assert "lrexport_tests.mystery" in message and "'odd'" in message and "Mystery" in message
    assert not (tmp_path / "bad.onnx").exists()


def test_old_opset_and_missing_specs_are_refused(tmp_path):
    model = samples.get("lowrank_mlp").factory()
    with pytest.raises(LrexportError, match="opset 13 is too old"):
        export_onnx(model, build_specs(["x:1x4x512"]), tmp_path / "m.onnx", opset=13)
    with pytest.raises(LrexportError, match="no input spec"):
        export_onnx(model, [], tmp_path / "m.onnx")


def test_input_spec_that_does_not_match_the_model(tmp_path):
    model = samples.get("lowrank_mlp").factory()
    with pytest.raises(LrexportError, match="does not run on the given inputs") as info:
        export_onnx(model, build_specs(["x:1x4x256"]), tmp_path / "m.onnx")
    assert "\n" not in str(info.value)


def test_large_models_use_one_external_data_file(tmp_path, monkeypatch):
    """Past the 2 GB protobuf limit weights go to <model>.onnx.data (threshold lowered to test it)."""
    import exporter.export as export_module

    monkeypatch.setattr(export_module, "PROTO_LIMIT", 1024)
    model = samples.get("lowrank_mlp").factory()
    specs = build_specs(samples.get("lowrank_mlp").inputs, samples.get("lowrank_mlp").shapes)
    result = export_onnx(model, specs, tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").stat().st_size > 1_000_000
    assert (tmp_path / "big.onnx").stat().st_size < 200_000
    check_parity(model, result.onnx_path, specs=specs, cases=["odd"]).assert_ok()
    loaded = onnx.load(str(result.onnx_path))
    export_module.save_onnx(loaded, tmp_path / "again.onnx")
    assert all(i.data_location != onnx.TensorProto.EXTERNAL for i in loaded.graph.initializer)  # caller's copy intact
