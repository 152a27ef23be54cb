"""``lrexport build`` / ``optimize`` of models calling the linear-attention op: the lowering follows the
backend (ONNX Runtime alone: ``com.microsoft.LinearAttention``; a TensorRT-RTX engine: the portable standard
ops), ``--linear-attention`` chooses it, the report says which ran and why, and under ``--fp16`` the
lowered recurrence stays float32 (parity and the faithful fp16 evaluator pass for every rule). The
standard opset-27 op (``ai.onnx``) against the float64 recurrence of ``test_linear_attention_op``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from conftest import error_line

try:
    import tensorrt_rtx  # noqa: F401
except ImportError as _err:
    NO_RTX: str | None = f"tensorrt_rtx does not import ({_err}); pip install tensorrt-rtx-cu13"
else:
    NO_RTX = None

README = Path(__file__).resolve().parents[1] / "README.md"
# name -> factory kwargs of samples.models:linear_attention_layer
RULES = {"linear": {"rule": "linear"}, "gated-head": {"rule": "gated", "decay": "head"},
         "gated-key": {"rule": "gated", "decay": "key"}, "delta": {"rule": "delta"},
         "gated_delta": {"rule": "gated_delta", "decay": "head"}}
SHAPES = ["--input", "x:1x32x32:float32", "--shapes", "x:min=1x1x32,opt=1x32x32,max=2x130x32"]


def _build(cli, out: Path, rule: str, *extra: str):
    return cli("build", "--factory", "samples.models:linear_attention_layer", "--factory-kwargs",
               json.dumps(RULES[rule]), *SHAPES, "--out", out, "-q", *extra)


def _ops(path: Path) -> list[tuple[str, str]]:
    return [(n.domain, n.op_type) for n in onnx.load(str(path)).graph.node]


def _lowering_line(text: str) -> str:
    (line,) = [ln for ln in text.splitlines() if ln.startswith("linear-attention: ")]
    return line


def test_onnxruntime_backend_lowers_to_the_contrib_op(cli, tmp_path):
    res = _build(cli, tmp_path / "b", "gated_delta", "--backend", "onnxruntime")
    assert res.code == 0, res.err + res.out
    ops = _ops(tmp_path / "b" / "model.onnx")
    assert ("com.microsoft", "LinearAttention") in ops and not any(d == "lrexport" for d, _ in ops)
    assert _lowering_line(res.out) == (
        "linear-attention: 1 node lowered to com.microsoft.LinearAttention (onnxruntime): ONNX Runtime (CPU) is "
        "this build's only backend, and its native op is the fastest there")
    la = json.loads((tmp_path / "b" / "report.json").read_text())["passes"]["linear_attention"]
    assert la == {"lowering": "onnxruntime", "to": "com.microsoft.LinearAttention", "nodes": 1,
                  "why": "ONNX Runtime (CPU) is this build's only backend, and its native op is the fastest there"}


@pytest.mark.skipif(NO_RTX is not None, reason=NO_RTX or "")
def test_engine_build_lowers_loop_free(cli, tmp_path):
    """A TensorRT-RTX engine is built from model.onnx: standard ops only, and no loop even for the delta rule
    (doubling levels sized from the longest sequence the shapes allow, said in the pass record)."""
    res = _build(cli, tmp_path / "b", "gated_delta", "--backend", "tensorrt-rtx", "--json")
    assert res.code == 0, res.err
    report = json.loads(res.out)
    ops = _ops(tmp_path / "b" / "model.onnx")
    assert {d for d, _ in ops} == {""} and not {"Scan", "Loop"} & {op for _, op in ops}
    assert report["engine"]["backend"] == "tensorrt-rtx" and (tmp_path / "b" / "model.engine").stat().st_size > 0
    assert report["passes"]["linear_attention"]["lowering"] == "loop-free"
    assert "TensorRT cannot run com.microsoft ops" in report["passes"]["linear_attention"]["why"]
    (record,) = [d for p in report["passes"]["report"]["passes"] if p["name"] == "linear-attention"
                 for d in p["details"] if d.get("kind") == "linear-attention"]
    assert record["max_positions"] >= 2 * int(SHAPES[3].split("max=")[1].split("x")[1])


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """The gated-delta layer exported as it is: one lrexport.LinearAttention node."""
    import samples.models
    from exporter.file_stages import export_onnx_file
    from exporter.loading import LoadedModel
    from exporter.specs import build_specs

    path = tmp_path_factory.mktemp("la") / "exported.onnx"
    module = samples.models.linear_attention_layer()
    loaded = LoadedModel(module=module, kind="module", source="samples.models:linear_attention_layer")
    export_onnx_file(loaded, build_specs([SHAPES[1]], [SHAPES[3]]), path)
    assert ("lrexport", "LinearAttention") in _ops(path)
    return path


@pytest.mark.parametrize("choice, node, opset", [("onnxruntime", ("com.microsoft", "LinearAttention"), 18),
                                                  ("ai.onnx", ("", "LinearAttention"), 27),
                                                  ("auto", ("", "Scan"), 18),
                                                  ("loop-free", ("", "MatMul"), 18)])
def test_optimize_lowers_an_exported_file(cli, exported, tmp_path, choice, node, opset):
    res = cli("optimize", exported, tmp_path / "o.onnx", "--linear-attention", choice, "--json", "-q")
    assert res.code == 0, res.err
    ops = _ops(tmp_path / "o.onnx")
    assert node in ops and not any(d == "lrexport" for d, _ in ops)
    assert (("", "Scan") in ops) == (choice == "auto")
    assert onnx.load(str(tmp_path / "o.onnx")).opset_import[0].version == opset
    la = json.loads(res.out)["linear_attention"]
    assert la["lowering"] == ("portable" if choice == "auto" else choice) and la["nodes"] == 1
    if choice == "auto":
        assert "runtime is not known" in la["why"]


@pytest.mark.parametrize("args, problem", [
    (["--linear-attention", "fastest"],
     "'fastest' is not one of 'auto', 'portable', 'loop-free', 'onnxruntime', 'ai.onnx'"),
    (["--linear-attention", "onnxruntime", "--backend", "tensorrt-rtx"],
     "--linear-attention onnxruntime writes com.microsoft.LinearAttention, which TensorRT cannot run"),
])
def test_bad_lowering_is_one_error_line(cli, tmp_path, args, problem):
    res = cli("build", "--factory", "samples.models:linear_attention_layer", *SHAPES, "--out", tmp_path / "b", *args)
    assert res.code == 2 and problem in error_line(res) and not (tmp_path / "b").exists()


def test_optimize_bad_lowering_is_one_error_line(cli, exported, tmp_path):
    res = cli("optimize", exported, tmp_path / "o.onnx", "--linear-attention", "trt")
    assert res.code == 2 and "'trt' is not one of" in error_line(res) and not (tmp_path / "o.onnx").exists()


def test_ai_onnx_refused_where_onnx_lacks_the_op(cli, exported, tmp_path, monkeypatch):
    """An onnx without the opset-27 op: --linear-attention ai.onnx is one line naming why, before any work."""
    real = onnx.defs.get_schema

    def get_schema(op_type, *args, **kwargs):
        if op_type == "LinearAttention":
            raise onnx.defs.SchemaError("No schema registered for 'LinearAttention'!")
        return real(op_type, *args, **kwargs)

    monkeypatch.setattr(onnx.defs, "get_schema", get_schema)
    res = cli("optimize", exported, tmp_path / "o.onnx", "--linear-attention", "ai.onnx")
    line = error_line(res)
    assert res.code == 2 and "does not define the standard LinearAttention op (opset 27)" in line
    assert "upgrade onnx" in line and not (tmp_path / "o.onnx").exists()


# ---- the standard op against the float64 recurrence (the op tests' cases and reference) ----

@pytest.mark.parametrize("case", ["linear", "linear-gqa", "linear-normalized", "gated-key", "delta-fewer-v-heads",
                                  "gated_delta-head", "gated_delta-more-v-heads", "gated_delta-gqa"])
def test_onnx_lowering_matches_float64(case):
    from graph_passes.linear_attention_onnx import LinearAttentionOnnxPass
    from test_linear_attention_op import _onnx, make_inputs, reference, rel_err

    with_state = case not in ("linear-gqa", "gated_delta-gqa")
    model, kw = _onnx(case, with_state)
    p = LinearAttentionOnnxPass()
    p(model)
    assert p.matches == 1 and p.records[0].rewritten
    assert [(n.domain, n.op_type) for n in model.graph if n.op_type == "LinearAttention"] == [("", "LinearAttention")]
    assert model.opset_imports[""] == 27 and "lrexport" not in model.opset_imports
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    for t in (1, 63, 64, 65, 130):
        args, _ = make_inputs(case, t, seed=1, with_state=with_state)
        out, state = sess.run(None, dict(zip(names, [a.numpy() for a in args if a is not None])))
        want_out, want_state = reference(*args[:5], kw["scale"], args[5], kw["normalize"], kw["eps"])
        assert rel_err(out, want_out) < 2e-5 and rel_err(state, want_state) < 2e-5, (case, t)


# ---- fp16: the lowered recurrence stays float32; parity and the faithful evaluator pass ----

def _fp16_report(res, out: Path) -> dict:
    assert res.code == 0, res.err + res.out
    report = json.loads((out / "report.json").read_text())
    rows = report["parity"]["results"]
    faithful = [r for r in rows if r["backend"] == "fp16 faithful"]
    assert faithful and all(r["ok"] for r in rows), rows  # the faithful evaluator ran, and passed
    assert not any(s.startswith("fp16 faithful") for s in report["parity"]["skipped"])
    return report


@pytest.mark.parametrize("rule", list(RULES))
def test_fp16_onnxruntime_lowering_keeps_the_op_float32(cli, tmp_path, rule):
    res = _build(cli, tmp_path / "b", rule, "--fp16", "--backend", "onnxruntime")
    report = _fp16_report(res, tmp_path / "b")
    cast = onnx.load(str(tmp_path / "b" / "model.fp16.onnx"))
    (node,) = [n for n in cast.graph.node if n.op_type == "LinearAttention"]
    assert node.domain == "com.microsoft"
    types = {vi.name: vi.type.tensor_type.elem_type for vi in onnx.shape_inference.infer_shapes(cast).graph.value_info}
    assert {types.get(i) for i in node.input if i} == {onnx.TensorProto.FLOAT}  # Casts around it
    if rule == "linear":  # its output grows with n: its q, k, v projection and its readers stay float32 too
        assert any(w.startswith("computes an input of the growing") for w in report["precision"]["kept_fp32_why"].values())
    else:
        assert report["precision"]["low_fraction"] > 0  # the projections around it are fp16


@pytest.mark.skipif(NO_RTX is not None, reason=NO_RTX or "")
@pytest.mark.parametrize("rule", list(RULES))
def test_fp16_loop_free_lowering_keeps_the_recurrence_float32(cli, tmp_path, rule):
    """The engine path: the loop-free form (doubling levels for the delta rules and a per-key decay) kept
    float32, an fp16 TensorRT-RTX engine built from the cast model."""
    res = _build(cli, tmp_path / "b", rule, "--fp16", "--backend", "tensorrt-rtx")
    report = _fp16_report(res, tmp_path / "b")
    why = report["precision"]["kept_fp32_why"]
    cast = onnx.load(str(tmp_path / "b" / "model.fp16.onnx"))
    kept = {n.op_type for n in cast.graph.node if why.get(n.name, "").startswith("linear-attention recurrence")}
    assert "MatMul" in kept and ("Exp" in kept) == ("decay" in RULES[rule])
    assert not {"Scan", "Loop"} & {n.op_type for n in cast.graph.node}
    (record,) = [d for p in report["passes"]["report"]["passes"] if p["name"] == "linear-attention"
                 for d in p["details"] if d.get("kind") == "linear-attention"]
    assert ("doubling levels" in record["action"]) == (rule in ("gated-key", "delta", "gated_delta"))
    # the plain linear layer is all float32 (the growing recurrence, its q, k, v projection, its out projection)
    assert report["engine"]["precision"] == ("fp32" if rule == "linear" else "fp16")
    assert (tmp_path / "b" / "model.engine").stat().st_size > 0


def test_readme_example_runs(cli, tmp_path):
    """The README's linear-attention build example, as written (in an empty folder)."""
    (block,) = [b for b in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S) if "linear_attention_layer" in b]
    args = " ".join(block.replace("\\\n", " ").split()).split()
    assert args[0] == "lrexport"
    res = cli(*[a.strip("'") for a in args[1:]], "-q", cwd=tmp_path)
    assert res.code == 0, res.err
    assert "lowered to com.microsoft.LinearAttention (onnxruntime)" in _lowering_line(res.out)
    assert np.isfinite(json.loads((tmp_path / "linear_attention_layer.lrexport" / "report.json").read_text())
                       ["parity"]["results"][0]["outputs"][0]["max_abs"])
