"""Options checked against the model they apply to: --shapes over an ONNX file's integer inputs, the memory
budget that lets nothing run, ONNX Runtime's opset refusal, and --json on a failed command."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graph_passes.ort_session import ort_session


def _embedding_onnx(path, rows: int = 2) -> None:
    """ids[batch, seq] (int64) -> Gather from a ``rows`` x 8 table -> MatMul: a token-id model whose ids
    must stay below ``rows`` (ONNX Runtime refuses an index out of range)."""
    rng = np.random.default_rng(0)
    table = numpy_helper.from_array(rng.standard_normal((rows, 8)).astype(np.float32), "table")
    w = numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["e"]), helper.make_node("MatMul", ["e", "w"], ["y"])],
        "emb", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 8])], [table, w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))


def test_optimize_shapes_alone_keeps_the_files_integer_inputs(cli, tmp_path):
    """--shapes gives shapes only: the ids stay int64 with the file's safe value range (0..1 < 2 rows)."""
    src, dst = tmp_path / "emb.onnx", tmp_path / "opt.onnx"
    _embedding_onnx(src)
    res = cli("optimize", src, dst, "--shapes", "ids:min=1x1,opt=2x8,max=4x16", "-q")
    assert res.code == 0, res.err
    assert dst.is_file() and "wrote" in res.out


@pytest.fixture(scope="module")
def exported(sample_file, tmp_path_factory):
    from exporter.export import export_onnx
    from exporter.loading import load_model
    from exporter.specs import build_specs, read_sidecar

    model = sample_file("lowrank_mlp")
    path = tmp_path_factory.mktemp("opts") / "m.onnx"
    export_onnx(load_model(model), build_specs(*read_sidecar(model)), path)
    return model, path


def test_check_with_a_budget_too_small_for_any_case_is_not_checked(cli, exported, tmp_path):
    model, onnx_file = exported
    res = cli("check", model, onnx_file, "--memory-budget", "1KB", "--report", tmp_path / "r.json", "-q")
    assert res.code == 2, res.out + res.err
    (line,) = [ln for ln in res.err.splitlines() if ln.startswith("error: ")]
    assert "(1 kB, --memory-budget) is too small" in line and "nothing was checked" in line
    needed = line.split("give --memory-budget ")[1].split()[0]  # what the line says the cheapest case needs
    assert "parity: FAIL" not in res.out and not (tmp_path / "r.json").exists()
    res = cli("check", model, onnx_file, "--memory-budget", needed, "--json", "-q")
    report = json.loads(res.out)
    assert report["results"], res.err  # that much lets a case run
    ran = {r["case"] for r in report["results"]}
    left = {p["case"] for p in report["memory"] if p["skipped"]}
    if left:  # the cases still over the budget are named as not checked, never PASS
        assert not ran & left
        res = cli("check", model, onnx_file, "--memory-budget", needed, "-q")
        assert res.code == 0 and res.out.strip().splitlines()[-1].endswith(
            "not checked: over the memory budget (checked rows pass)"), res.out


def test_ort_opset_refusal_keeps_the_opsets(tmp_path, monkeypatch):
    """Past the opsets onnx knows, check_opset refuses first; ONNX Runtime's own refusal (its opset list
    may end earlier than onnx's) is one line naming both opsets, not a cut C++ signature."""
    import onnx.defs

    import graph_passes.ort_session as ort_session_module
    from exporter.errors import LrexportError

    newest = onnx.defs.onnx_opset_version()
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", newest + 2)])
    model.ir_version = 10
    with pytest.raises(LrexportError, match=f"has opset {newest + 2}, newer than .*up to opset {newest}\\)"):
        ort_session_module.check_opset(model)
    with pytest.raises(LrexportError) as err:
        ort_session(model)
    assert f"opset {newest + 2}" in str(err.value) and "up to opset" in str(err.value)
    assert "ValidateOpsetForDomain" not in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("argv", [
    ("inspect", "nope.onnx"),
    ("build", "model.pt2", "--out", "o", "--seed", "-1"),
    ("export", "model.pt2", "--out", "m.onnx", "--opset", "99"),
    ("check", "model.pt2", "tiny.onnx", "--cases", ""),
    ("optimize", "opset30.onnx", "o.onnx"),
    ("factorize", "model.pt2", "--out", "low.pt2"),
], ids=lambda a: a[0])
def test_json_error_is_one_json_object_on_stdout(argv, cli, template, tmp_path):
    user = tmp_path / "user"
    shutil.copytree(template, user)
    res = cli(*argv, "--json", cwd=user)
    assert res.code == 2
    data = json.loads(res.out)
    (line,) = [ln for ln in res.err.splitlines() if ln.startswith("error: ")]  # stderr keeps its line
    assert data == {"ok": False, "error": line[len("error: "):], "exit_code": 2}


def test_json_error_of_a_bug_and_ok_true_on_success(cli, template, monkeypatch):
    import exporter.inspect_model

    res = cli("inspect", template / "tiny.onnx", "--json")
    assert res.code == 0 and json.loads(res.out)["ok"] is True

    def bug(*_args, **_kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(exporter.inspect_model, "inspect_path", bug)
    res = cli("inspect", template / "tiny.onnx", "--json")
    data = json.loads(res.out)
    assert res.code == 3 and data["ok"] is False and data["exit_code"] == 3
    assert data["error"].startswith("internal error ZeroDivisionError")


@pytest.fixture(scope="module")
def template(sample_file, tmp_path_factory):
    """A user folder: a model with its input spec, a small ONNX file, one of an opset from the future."""
    from test_bad_input import _tiny_onnx

    base = tmp_path_factory.mktemp("user")
    src = sample_file("lowrank_mlp")
    shutil.copy(src, base / "model.pt2")
    shutil.copy(src.with_name("lowrank_mlp.inputs.json"), base / "model.inputs.json")
    _tiny_onnx(base / "tiny.onnx")
    _tiny_onnx(base / "opset30.onnx", opset=30)
    return base
