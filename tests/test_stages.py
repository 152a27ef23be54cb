"""The build as typed stages (each with its own report section), the one precision table, and the
commands' API functions (export-step, factorize) used without the command line."""

from __future__ import annotations

import json

import onnx_ir as ir
import pytest
from trt_helpers import ln_softmax_model

from exporter import (BuildOptions, LrexportError, build, export_step_model, factorize_model, load_model,
                      resolve_specs)
from exporter.stages import CastStage, PassesStage
from graph_passes.precision_cast import cast_precision
from graph_passes.precisions import float_type_counts, model_precision, normalize_low_precision, normalize_precision


def test_one_precision_table() -> None:
    """The build options, the engine builder and the precision cast accept the same names and aliases."""
    from exporter.stages import check_options
    from exporter.trt_build import plan_engine

    assert [normalize_precision(p) for p in ("FP32", "float", " half ", "float16", "bfloat16")] == [
        "fp32", "fp32", "fp16", "fp16", "bf16"]
    assert normalize_low_precision("half") == "fp16" and normalize_low_precision("bfloat16") == "bf16"
    options = BuildOptions(out=".", precision="half")
    check_options(options)
    assert options.precision == "fp16"
    with pytest.raises(LrexportError, match="cannot cast to precision 'fp32'.*fp32 needs no cast"):
        normalize_low_precision("fp32")
    for refuse in (lambda: normalize_precision("int8"), lambda: check_options(BuildOptions(out=".", precision="int8")),
                   lambda: plan_engine("missing.onnx", "e.engine", specs=[], precision="int8")):
        with pytest.raises(LrexportError, match="unknown precision 'int8'.*use one of fp32, fp16, bf16"):
            refuse()


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_model_precision_reads_the_tensor_types(precision: str) -> None:
    model = ln_softmax_model()
    assert model_precision(float_type_counts(ir.from_proto(model))) == "fp32"
    cast, report = cast_precision(model, precision)
    counts = float_type_counts(ir.from_proto(cast))
    assert model_precision(counts) == precision
    assert counts[precision] >= report["initializers_cast"] > 0
    assert counts["fp32"] > 0  # LayerNorm, Softmax and the float32 input/output stay float32


def test_build_reports_each_stage_in_order(sample_file, tmp_path) -> None:
    """passes -> cast -> parity as typed stages; each writes its own text section and JSON key, and the
    stage objects name the files where they end up."""
    loaded = load_model(sample_file("lowrank_mlp"))
    report = build(loaded, resolve_specs(loaded), BuildOptions(out=tmp_path / "o", precision="fp16",
                                                               backend="onnxruntime", cases=["min"]))
    assert isinstance(report.passes, PassesStage) and isinstance(report.precision, CastStage)
    assert report.engine is None and report.ok
    assert report.precision.onnx_path == tmp_path / "o" / "model.fp16.onnx" and report.precision.onnx_path.is_file()
    data = json.loads((tmp_path / "o" / "report.json").read_text())
    assert data["passes"]["table"] == report.passes.report.format_table()
    assert data["precision"]["summary"] == report.precision.info["summary"] and data["engine"] is None
    assert list(data["seconds"]) == ["export", "passes", "precision", "parity"]
    text = report.format_text()
    starts = [text.index(report.passes.text_lines()[0]), text.index(report.precision.text_lines()[0]),
              text.index("parity vs pytorch")]
    assert starts == sorted(starts)


def test_export_step_model_without_the_command_line(sample_file, tmp_path) -> None:
    loaded = load_model(sample_file("causal_lm"))
    specs = resolve_specs(loaded)
    with pytest.raises(LrexportError, match="should end in .onnx"):
        export_step_model(loaded, specs, tmp_path / "step.bin")
    result = export_step_model(loaded, specs, tmp_path / "step.onnx", chunk_max=8, length=20)
    assert result.ok and result.step.onnx_path == tmp_path / "step.onnx"
    assert [c for c, _ in result.parity.results] == [1, 7, 8]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step.onnx"]
    assert result.to_dict()["engine"] is None and result.format_text().startswith(result.step.format_text())
    with pytest.raises(LrexportError, match="already exists"):
        export_step_model(loaded, specs, tmp_path / "step.onnx")


def test_factorize_model_without_the_command_line(tmp_path) -> None:
    loaded = load_model(None, factory="samples.models:causal_lm", factory_kwargs={"rank": None})
    specs = resolve_specs(loaded, ["ids:2x64:int64:0..255"], ["ids:min=1x1,opt=2x64,max=2x256"])
    report = factorize_model(loaded, specs, tmp_path / "low.pt2", fraction=0.5)
    assert report.params_after < 0.6 * report.params_before
    assert report.output_rel_error is not None and 0 < report.output_rel_error < 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["low.inputs.json", "low.pt2"]
    with pytest.raises(LrexportError, match="already exists"):
        factorize_model(loaded, specs, tmp_path / "low.pt2", rank=4)
