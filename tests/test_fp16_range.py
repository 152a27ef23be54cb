"""fp16 range analysis, the automatic float32 keep-list, the faithful fp16/bf16 evaluator and bf16 honesty:
real exports, real ONNX Runtime, the onnx reference evaluator on numpy float16 / ml_dtypes bfloat16."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import ROOT, error_line
from onnx import TensorProto, helper, numpy_helper
from trt_helpers import export_model, exported_sample, sample_specs

import graph_passes
from exporter.compare import Tolerance, compare_arrays
from exporter.faithful import FaithfulRunner
from exporter.fp16_range import analyze_ranges, cast_with_range_analysis
from exporter.parity import case_feeds
from exporter.specs import build_specs, parity_cases, random_feeds
from graph_passes.precision_cast import cast_precision
from samples import SAMPLES

FP16_SAFE = [n for n in SAMPLES if n not in ("gain_square", "noncausal_encoder", "causal_block")]
# linear attention: running / normalizer sums over the sequence, float32 by design up to their division
GROWING_SUMS = ("causal_block", "causal_lm", "noncausal_encoder")


def _ort(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def _passed(name: str) -> onnx.ModelProto:
    """The sample as `build` casts it: exported, then the default graph passes."""
    model, _ = graph_passes.run_passes(onnx.load(str(exported_sample(name))), None)
    return model


def _build(cli, sample_file, tmp_path, name, *flags):
    out = tmp_path / "o"
    res = cli("build", sample_file(name), "--out", out, "--backend", "onnxruntime", "-q", *flags)
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").is_file() else None
    return res, report


def _rows(report: dict, backend: str) -> list[dict]:
    return [r for r in report["parity"]["results"] if r["backend"] == backend]


def test_gain_square_builds_in_fp16_with_its_overflowing_nodes_kept(cli, sample_file, tmp_path):
    res, report = _build(cli, sample_file, tmp_path, "gain_square", "--fp16")
    assert res.code == 0, res.out + res.err
    assert "parity: PASS" in res.out.splitlines()  # a line of its own, before the files written
    ort_rows, faithful_rows = _rows(report, "onnxruntime-fp16"), _rows(report, "fp16 faithful")
    assert [r["case"] for r in faithful_rows] == ["min", "odd"] and len(ort_rows) == 4
    assert all(r["ok"] for r in ort_rows + faithful_rows)
    assert all(o["nonfinite"] == 0 for r in faithful_rows for o in r["outputs"])
    kept = {row["op_type"]: row for row in report["precision"]["kept_for_range"]}
    assert set(kept) == {"Mul", "Div"}  # e = h * h, and the division that reads it: nothing else
    assert kept["Mul"]["reason"] == f"produces {kept['Mul']['value']!r}" and kept["Mul"]["max_abs"] > 65504
    assert kept["Div"]["reason"] == f"reads {kept['Mul']['value']!r}"
    for row in kept.values():
        assert f"kept in float32: {row['node']} ({row['op_type']}) in module '<root>'" in res.out
    flagged = {v["op_type"]: v for v in report["precision"]["range"]["flagged"]}
    assert flagged["Constant"]["max_abs"] == 160000.0  # the divisor: fp16 would clip it to 65504
    assert report["precision"]["low_fraction"] == 5 / 7


def test_fp16_force_leaves_the_overflow_and_fp16_arithmetic_shows_it(cli, sample_file, tmp_path):
    """The measurement behind the faithful evaluator: ONNX Runtime CPU returns finite numbers for the
    overflowing cast model; float16 arithmetic (and a GPU) gives Inf/NaN everywhere."""
    res, report = _build(cli, sample_file, tmp_path, "gain_square", "--fp16", "--fp16-force")
    assert res.code == 1 and "parity: FAIL" in res.out
    assert report["precision"]["kept_for_range"] == [] and report["precision"]["unsafe"]
    assert re.search(r"warning: left in fp16 \(--fp16-force\): node_mul_\d+ \(Mul\)", res.out)
    ort_nonfinite = sum(o["nonfinite"] for r in _rows(report, "onnxruntime-fp16") for o in r["outputs"])
    faithful = _rows(report, "fp16 faithful")
    assert ort_nonfinite == 0
    assert all(o["nonfinite"] == o["total"] and o["mismatches"] == 0 for r in faithful for o in r["outputs"])
    for r in faithful:  # the table's fail/total counts each NaN once: 64/64, not 128/64
        (line,) = [ln for ln in res.out.splitlines() if ln.split()[:3] == ["fp16", "faithful", r["case"]]]
        assert f" {r['outputs'][0]['total']}/{r['outputs'][0]['total']} " in line
    (drift,) = [d for d in report["parity"]["drift"] if d["backend"] == "fp16 faithful" and d["case"] == "min"]
    assert drift["location"]["op_type"] == "Mul" and drift["location"]["nonfinite"] > 0


def test_fp16_keep_module_glob(cli, sample_file, tmp_path):
    res, report = _build(cli, sample_file, tmp_path, "gain_square", "--fp16", "--fp16-force", "--fp16-keep", "pro*")
    rows = report["precision"]["kept_for_range"]
    assert rows and {r["module"] for r in rows} == {"proj"} and {r["reason"] for r in rows} == {"--fp16-keep"}
    assert {r["op_type"] for r in rows} == {"MatMul", "Add"}
    res = cli("build", sample_file("gain_square"), "--out", tmp_path / "bad", "--fp16", "--fp16-keep", "nope*",
              "--backend", "onnxruntime", "-q")
    assert res.code == 2
    line = error_line(res)
    assert "--fp16-keep 'nope*' matches no module" in line and "proj" in line and "out" in line
    res = cli("build", sample_file("gain_square"), "--out", tmp_path / "f32", "--fp16-force", "-q")
    assert res.code == 2 and "add --fp16 (or --bf16)" in error_line(res)
    assert not (tmp_path / "f32").exists()


@pytest.mark.parametrize("name", list(SAMPLES))
def test_keep_list_keeps_nothing_extra(name):
    """No blanket fallback: of the nodes the structural rules leave in fp16, the range keep-list takes
    back under 10% on every sample, and nothing at all on the fp16-safe ones."""
    model = _passed(name)
    specs = sample_specs(name)
    feeds = list(case_feeds(specs, parity_cases(specs), 0).values())
    _, structural = cast_precision(model, "fp16")
    _, info = cast_with_range_analysis(model, "fp16", feeds)
    if name in FP16_SAFE:
        assert info["kept_on_request"] == [] and info["range"]["flagged"] == []
        assert info["low_nodes"] == structural["low_nodes"]
    elif name == "noncausal_encoder":  # sum over n of phi(k) v^T as a MatMul: 5.4e3 at n = 512
        (row,) = info["kept_for_range"]
        assert row["op_type"] == "MatMul" and 4094 < row["max_abs"] < 65504
    elif name == "causal_block":  # its running sums are the lowered linear-attention op: float32 by its tag
        assert info["kept_for_range"] == [] and info["range"]["flagged"] == []
    else:  # gain_square: the squaring Mul and the Div that reads it, out of 7
        assert len(info["kept_on_request"]) == 2 and structural["low_nodes"] == 7
    if name != "gain_square":
        assert info["low_nodes"] / structural["low_nodes"] > 0.9
    assert info["low_fraction"] == info["low_nodes"] / info["compute_nodes"]


@pytest.mark.parametrize("name", list(SAMPLES))
def test_build_fp16_node_share(name, cli, sample_file, tmp_path):
    """`build --fp16` on every sample: ORT and faithful parity pass, and more than 90% of the float-computing
    nodes are fp16. gain_square keeps its 2 overflowing nodes of 7. The linear-attention samples keep their
    growing sums float32 by design (the n = 4096 test shows why): there, more than 90% of the nodes outside
    those sums are fp16, and every float32 node is a sum, LayerNorm/Softmax or measured out of range."""
    res, report = _build(cli, sample_file, tmp_path, name, "--fp16")
    assert res.code == 0 and "parity: PASS" in res.out.splitlines(), res.out + res.err
    assert {r["backend"] for r in report["parity"]["results"] if r["ok"]} >= {"onnxruntime-fp16", "fp16 faithful"}
    info = report["precision"]
    why, low, total = info["kept_fp32_why"], info["low_nodes"], info["compute_nodes"]
    assert len(why) == total - low
    # the growing sums: CumSums and their readers, or the lowered linear-attention op (causal-chunk writes it)
    sums = set(info["kept_for_growing_sums"]) | {n for n, w in why.items()
                                                 if w.startswith("linear-attention recurrence")}
    ranged = {r["node"] for r in info["kept_for_range"]}
    assert all(w.startswith(("LayerNorm", "Softmax")) or n in sums or n in ranged for n, w in why.items())
    if name == "gain_square":
        assert low == 5 and total == 7 and len(ranged) == 2
    elif name in GROWING_SUMS:
        assert sums and low / (total - len(sums)) > 0.9
    else:
        assert not sums and info["low_fraction"] > 0.9


def test_fail_total_counts_each_element_once():
    """An all-NaN row reads 256/256, not 512/256: a NaN is nonfinite, not also a mismatch."""
    comp = compare_arrays("y", np.full(256, np.nan), np.ones(256), Tolerance(1e-2, 1e-2))
    assert (comp.mismatches, comp.nonfinite, comp.total) == (0, 256, 256)
    mixed = np.r_[np.full(4, np.nan), np.full(3, np.inf), np.full(5, 2.0), np.ones(4)]
    comp = compare_arrays("y", mixed, np.ones(16), Tolerance(1e-2, 1e-2))
    assert (comp.mismatches, comp.nonfinite) == (5, 7) and not comp.ok


def _tiny(nodes, inits, opset: int = 18, dtype=TensorProto.FLOAT) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", dtype, ["n", 4])],
                              [helper.make_tensor_value_info("y", dtype, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=9)


def test_range_analysis_flags_mostly_subnormal_values_and_the_keep_fixes_them():
    """x * 1e-6 * 1e6: in fp16 the middle value is subnormal (fewer than 10 bits), the output 5% off."""
    model = _tiny([helper.make_node("Mul", ["x", "small"], ["t"], name="shrink"),
                   helper.make_node("Mul", ["t", "big"], ["y"], name="grow")],
                  [numpy_helper.from_array(np.array(1e-6, np.float32), "small"),
                   numpy_helper.from_array(np.array(1e6, np.float32), "big")])
    x = np.random.default_rng(0).uniform(0.5, 1.0, (64, 4)).astype(np.float32)
    ranges = analyze_ranges(model, [{"x": x}], "fp16")
    problems = {v.value: v.problem for v in ranges.flagged}
    assert problems == {"t": "precision", "small": "precision", "big": "overflow"}
    assert ranges.values["t"].subnormal_share == 1.0
    forced, _ = cast_precision(model, "fp16")
    kept, info = cast_with_range_analysis(model, "fp16", [{"x": x}])
    assert sorted(info["kept_on_request"]) == ["grow", "shrink"]
    err_forced = np.abs(FaithfulRunner(forced, "fp16").run({"x": x})["y"] - x).max()
    err_kept = np.abs(FaithfulRunner(kept, "fp16").run({"x": x})["y"] - x).max()
    assert err_forced > 0.03 and err_kept < 1e-3


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
def test_faithful_evaluator_rounds_each_op_and_accumulates_in_float32(dtype):
    onnx_type = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.BFLOAT16
    ones = np.ones((1, 4096), dtype)
    model = _tiny([helper.make_node("MatMul", ["x", "w"], ["m"]),
                   helper.make_node("ReduceSum", ["x"], ["s"], keepdims=1),
                   helper.make_node("Add", ["m", "s"], ["y"])],
                  [numpy_helper.from_array(np.ones((4096, 1), dtype), "w")], dtype=onnx_type)
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 4096
    precision = "fp16" if dtype == np.float16 else "bf16"
    got = FaithfulRunner(model, precision).run({"x": ones})["y"]
    assert got.item() == 8192.0  # in-type accumulation stalls at 2048 (fp16) / 256 (bf16)
    square = _tiny([helper.make_node("Mul", ["x", "x"], ["y"])], [], dtype=onnx_type)
    big = np.full((1, 4), 300.0, dtype)
    out = FaithfulRunner(square, precision).run({"x": big})["y"]
    assert (np.isinf(out) if dtype == np.float16 else out == 90112.0).all()  # bf16: 90000 to 8 bits


def test_bf16_is_checked_by_the_faithful_row(cli, sample_file, tmp_path):
    res, report = _build(cli, sample_file, tmp_path, "causal_lm", "--bf16")
    assert res.code == 0, res.out + res.err
    assert "skipped: onnxruntime-bf16: ONNX Runtime cannot run the bf16 model (no bf16 kernel for Elu)" in res.out
    rows = _rows(report, "bf16 faithful")
    assert [r["case"] for r in rows] == ["min", "odd"] and all(r["ok"] for r in rows)
    assert report["parity"]["unchecked"] == {} and "parity: PASS" in res.out


def test_bf16_that_nothing_ran_is_not_a_pass(cli, sample_file, tmp_path, monkeypatch):
    """When neither ONNX Runtime nor the faithful evaluator can run the bf16 model and no GPU runs the
    engine: exit 0, but the verdict says bf16 was not checked, and why."""
    import exporter.faithful as faithful
    from exporter.errors import LrexportError

    def refuse(self, model, precision, cases=()):
        raise LrexportError("the faithful bf16 evaluator cannot load the model (no kernel)", "")

    monkeypatch.setattr(faithful.FaithfulRunner, "__init__", refuse)
    res, report = _build(cli, sample_file, tmp_path, "causal_lm", "--bf16")
    assert res.code == 0, res.out + res.err
    (verdict,) = [ln for ln in res.out.splitlines() if ln.startswith("parity:")]
    assert verdict == ("parity: bf16 not checked: ONNX Runtime has no bf16 kernel for Elu; the faithful bf16 "
                       "evaluator cannot load the model (no kernel); no GPU ran an engine (checked rows pass)")
    assert "PASS" not in verdict
    assert set(report["parity"]["unchecked"]) == {"bf16"} and report["ok"] is True
    assert {r["backend"] for r in report["parity"]["results"]} == {"onnxruntime"}


@pytest.mark.parametrize("name,spec", [("causal_block", (["x:1x256x512:float32"],
                                                          ["x:min=1x1x512,opt=1x256x512,max=1x4096x512"])),
                                        ("causal_lm", (["ids:1x128:int64:0..255"],
                                                       ["ids:min=1x1,opt=1x128,max=1x4096"]))])
def test_long_causal_sequence_in_fp16_keeps_its_sums_float32(name, spec, tmp_path):
    """n = 4096 in float16 arithmetic: the running sums (the lowered linear-attention op causal-chunk writes),
    the normalizer and the division stay float32 (the normalizer passes 65504 there); what is left in fp16 is
    bounded, not growing with n; the output stays accurate."""
    specs = build_specs(*spec)
    model, _ = graph_passes.run_passes(onnx.load(str(export_model(SAMPLES[name].factory(), specs,
                                                                  tmp_path / "m.onnx"))), None)
    feeds = random_feeds(specs, "max", 0)
    low, info = cast_with_range_analysis(model, "fp16", [feeds])
    assert info["range"]["flagged"] == [] and info["kept_for_range"] == []
    ranges = analyze_ranges(model, [feeds], "fp16")
    assert max(v.max_abs for v in ranges.values.values() if v.problem is None) < 65504 / 16
    runner = FaithfulRunner(low, "fp16", ("max",))
    values = runner.intermediates(feeds, widen=False)
    cumsums = [n for n in low.graph.node if any(p.key == "lrexport.keep_float32" for p in n.metadata_props)
               and n.op_type in ("MatMul", "CumSum")]  # the recurrence's sums: grow with n
    divs = [n for n in low.graph.node if n.op_type == "Div" and any(
        values[i].size > 1 and np.abs(values[i]).max() > 1000 for i in n.input)]
    assert len(cumsums) >= 2 and divs
    assert all(values[n.output[0]].dtype == np.float32 for n in cumsums)
    assert all(values[i].dtype == np.float32 for n in divs for i in n.input)
    assert max(float(np.abs(values[i]).max()) for n in divs for i in n.input) > 65504  # fp16 would be Inf
    ref = _ort(model, feeds)[0]
    got = runner.run(feeds)[runner.output_names[0]]
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 2e-3 and np.abs(got - ref).max() < 1e-2
    # why they must be float32: the same model with the growing sums in fp16 (measured: rel L2 0.46 on
    # causal_block, 0.042 on causal_lm, against 7.5e-4 and 6.3e-4 above)
    untagged = onnx.ModelProto()
    untagged.CopyFrom(model)
    for n in untagged.graph.node:  # without the lowering's float32 tags
        kept = [p for p in n.metadata_props if not p.key.startswith("lrexport.")]
        del n.metadata_props[:]
        n.metadata_props.extend(kept)
    unsafe, _ = cast_precision(untagged, "fp16", keep_fp32_ops=("LayerNormalization", "Softmax"))
    bad = FaithfulRunner(unsafe, "fp16", ("max",)).run(feeds)[runner.output_names[0]]
    assert not np.isfinite(bad).all() or np.linalg.norm(bad - ref) / np.linalg.norm(ref) > 2e-2


def test_readme_fp16_example_runs(cli, tmp_path):
    """The README's gain-then-square commands, as written, and the lines it shows."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### fp16 / bf16", 1)[1]
    commands, shown = re.findall(r"```\n(.*?)```", section, re.S)[:2]
    from samples.make import main as make_main

    for line in commands.strip().splitlines():
        argv = shlex.split(line)
        if argv[:3] == ["python", "-m", "samples.make"]:
            assert make_main([*argv[3:-1], str(tmp_path / argv[-1])]) == 0
        else:
            assert argv[0] == "lrexport"
            res = cli(*[str(tmp_path / a) if a.endswith(".pt2") else a for a in argv[1:]], "-q",
                      cwd=tmp_path)
            assert res.code == 0, res.out + res.err
    for line in shown.splitlines():
        if line.startswith("  kept in float32") or line.startswith("parity:"):
            assert line in res.out.splitlines()
        elif line.startswith("fp16 faithful"):
            assert any(ln.split()[:3] == line.split()[:3] and ln.endswith("ok") for ln in res.out.splitlines())


def test_faithful_gather_elements_past_32_rows():
    """The stock reference GatherElements (np.choose) breaks past 32 choices; BERT gathers its token
    type ids by position that way."""
    graph = helper.make_graph([helper.make_node("GatherElements", ["x", "i"], ["y"], axis=1)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.INT64, [1, 128]),
                               helper.make_tensor_value_info("i", TensorProto.INT64, [1, 23])],
                              [helper.make_tensor_value_info("y", TensorProto.INT64, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    x = np.arange(128, dtype=np.int64)[None] * 3
    idx = np.array([list(range(22)) + [-1]], dtype=np.int64)
    got = FaithfulRunner(model, "fp16").run({"x": x, "i": idx})["y"]
    assert got.tolist() == [[3 * i for i in range(22)] + [381]]


def test_bert_fp16_build_runs_the_faithful_row(cli, tmp_path):
    pytest.importorskip("transformers")
    import third_party_models as tpm

    inputs, shapes = tpm.SPECS["bert_factorized"]
    args = [a for i in inputs for a in ("--input", i)] + [a for s in shapes for a in ("--shapes", s)]
    res = cli("build", "--factory", "third_party_models:bert_factorized", *args, "--out", tmp_path / "o", "--fp16",
              "--backend", "onnxruntime", "--json", "-q")
    assert res.code == 0, res.out[-3000:] + res.err[-3000:]
    report = json.loads(res.out)
    rows = _rows(report, "fp16 faithful")
    assert [r["case"] for r in rows] == ["min", "odd"] and all(r["ok"] for r in rows)
    # the additive attention mask (float32's lowest value) is the one value kept for range
    (row,) = report["precision"]["kept_for_range"]
    assert row["op_type"] == "Where" and row["max_abs"] > 1e38
