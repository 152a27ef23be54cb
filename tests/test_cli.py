"""The lrexport command line: the main job end to end, --json, safe outputs, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import FIXTURES, ROOT, error_line


def test_build_writes_model_report_and_prints_a_table(cli, sample_file, tmp_path):
    out = tmp_path / "out"
    res = cli("build", sample_file("causal_lm"), "--out", out, "--no-passes", "--backend", "onnxruntime")
    assert res.code == 0, res.err
    assert "parity: PASS" in res.out and "onnxruntime" in res.out and "odd" in res.out
    assert {p.name for p in out.iterdir()} == {"model.onnx", "report.json"}
    report = json.loads((out / "report.json").read_text())
    assert report["ok"] is True and report["model"]["kind"] == "exported-program"
    assert {r["case"] for r in report["parity"]["results"]} == {"min", "opt", "max", "odd"}
    assert "[export]" in res.err and "[parity]" in res.err  # progress on stderr


def test_build_json_is_the_same_data(cli, sample_file, tmp_path):
    res = cli("build", sample_file("lowrank_mlp"), "--out", tmp_path / "o", "--no-passes", "--backend",
              "onnxruntime", "--json", "--cases", "min,odd", "-q")
    assert res.code == 0, res.err
    data = json.loads(res.out)
    assert data == json.loads((tmp_path / "o" / "report.json").read_text())
    assert [r["case"] for r in data["parity"]["results"]] == ["min", "odd"]
    assert res.err == ""  # --quiet: no progress


def test_fp16_is_accepted_without_tensorrt(cli, sample_file, tmp_path):
    res = cli("build", sample_file("lowrank_mlp"), "--out", tmp_path / "o", "--no-passes", "--backend",
              "onnxruntime", "--fp16", "--cases", "opt")
    assert res.code == 0, res.out + res.err
    assert "onnxruntime-fp16" in res.out
    assert (tmp_path / "o" / "model.fp16.onnx").is_file()


def test_refuses_to_clobber_without_force(cli, sample_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    args = ("build", sample_file("lowrank_mlp"), "--out", out, "--no-passes", "--backend", "onnxruntime",
            "--cases", "opt")
    res = cli(*args)
    assert res.code != 0 and "--force" in error_line(res)
    assert (out / "precious.txt").read_text() == "keep me"
    res = cli(*args, "--force")  # --force replaces only what lrexport wrote
    assert res.code == 2 and "not written by lrexport" in error_line(res)
    assert (out / "precious.txt").read_text() == "keep me"
    (out / "precious.txt").unlink()
    assert cli(*args).code == 0  # an empty folder is taken
    res = cli(*args, "--force")  # an earlier build is replaced
    assert res.code == 0 and (out / "model.onnx").exists()


def test_failed_build_leaves_nothing_behind(cli, tmp_path):
    out = tmp_path / "out"
    res = cli("build", "--factory", "badmodels:custom_op_model", "--out", out, "--input", "x:2x4x16",
              "--no-passes", cwd=FIXTURES)
    assert res.code != 0
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_parity_failure_exits_nonzero(cli, sample_file, tmp_path):
    res = cli("build", sample_file("lowrank_mlp"), "--out", tmp_path / "o", "--no-passes", "--backend",
              "onnxruntime", "--cases", "opt", "--atol", "0", "--rtol", "0")
    assert res.code == 1 and "parity: FAIL" in res.out and "drifts" in res.out
    assert json.loads((tmp_path / "o" / "report.json").read_text())["ok"] is False


def test_export_check_inspect_and_optimize_stages(cli, sample_file, tmp_path):
    model = sample_file("noncausal_encoder")
    onnx_path = tmp_path / "enc.onnx"
    res = cli("export", model, "--out", onnx_path, "-q")
    assert res.code == 0, res.err
    assert onnx_path.is_file()
    assert cli("export", model, "--out", onnx_path, "-q").code != 0  # no clobbering
    res = cli("check", model, onnx_path, "--json", "-q", "--report", tmp_path / "r.json")
    assert res.code == 0 and json.loads(res.out)["ok"] is True and (tmp_path / "r.json").is_file()
    res = cli("inspect", onnx_path, "--json")
    info = json.loads(res.out)
    assert info["dynamic_axes"] == {"x": [0, 1]} and info["parameters"] > 300_000
    assert info["op_histogram"]["MatMul"] >= 8
    res = cli("inspect", model, "--json")
    info = json.loads(res.out)
    assert res.code == 0 and info["kind"] == "exported-program" and info["inputs"][0]["name"] == "x"
    assert info["module_histogram"]["LinearAttention"] == 2 and info["module_histogram"]["LayerNorm"] == 5


def test_state_dict_with_factory_on_the_command_line(cli, sample_file, tmp_path):
    res = cli("build", sample_file("lowrank_mlp", "state-dict"), "--factory", "samples.models:lowrank_mlp",
              "--out", tmp_path / "o", "--no-passes", "--backend", "onnxruntime", "--cases", "opt", cwd=ROOT)
    assert res.code == 0, res.err


@pytest.mark.parametrize("case", ["missing", "empty", "corrupt", "pickle", "factory", "spec", "archive-range", "op",
                                  "nan", "range"])
def test_bad_input_gets_one_line_and_nonzero_exit(case, cli, sample_file, tmp_path):
    out = tmp_path / "out"
    common = ("--out", out, "--no-passes", "--backend", "onnxruntime")
    if case == "missing":
        res, want = cli("build", tmp_path / "nope.pt2", *common), "does not exist"
    elif case == "empty":
        (tmp_path / "e.pt").write_bytes(b"")
        res, want = cli("build", tmp_path / "e.pt", "--input", "x:1x2", *common), "is empty"
    elif case == "corrupt":
        data = sample_file("lowrank_mlp").read_bytes()
        (tmp_path / "c.pt2").write_bytes(data[: len(data) // 3])
        res, want = cli("build", tmp_path / "c.pt2", "--input", "x:1x2", *common), "re-save"
    elif case == "pickle":
        res, want = cli("build", sample_file("lowrank_mlp", "pickle"), *common), "--trust-pickle"
    elif case == "factory":
        torch.save({"w": torch.zeros(1)}, tmp_path / "sd.pt")
        res, want = cli("build", tmp_path / "sd.pt", "--factory", "broken_import:build", "--input", "x:1x2",
                        *common, cwd=FIXTURES), "does not import"
    elif case == "spec":
        res, want = cli("build", sample_file("lowrank_mlp", "torchscript"), "--input", "x:1x8x100", *common), \
            "does not run on the given inputs"
    elif case == "archive-range":  # a .pt2 knows its sizes: refused before anything runs
        res, want = cli("build", sample_file("lowrank_mlp"), "--input", "x:1x8x100", *common), \
            "axis 2 of input 'x' is 512 in the model archive"
    elif case == "op":
        res, want = cli("build", "--factory", "badmodels:custom_op_model", "--input", "x:2x4x16", *common,
                        cwd=FIXTURES), "cannot handle op lrexport_tests.mystery in module 'odd'"
    elif case == "nan":
        res, want = cli("build", "--factory", "badmodels:nan_model", "--input", "x:2x4x16", *common,
                        cwd=FIXTURES), "produces NaN"
    else:
        res, want = cli("build", sample_file("lowrank_mlp"), "--shapes", "x:min=4x8x512,max=1x8x512", *common), \
            "min > max"
    assert res.code != 0
    assert want in error_line(res)
    assert not out.exists()


def test_console_script_end_to_end(sample_file, tmp_path):
    """The installed entry point, as a user runs it (exit code and stderr of a real process)."""
    res = subprocess.run([sys.executable, "-m", "exporter.cli", "build", str(tmp_path / "missing.pt2")],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("error: model file")
    assert "Traceback" not in res.stderr


def test_run_engine_checks_the_engine_then_needs_a_gpu(cli, sample_file, tmp_path):
    pytest.importorskip("tensorrt_rtx")
    out = tmp_path / "o"
    assert cli("build", sample_file("lowrank_mlp"), "--out", out, "--cases", "opt", "-q").code == 0
    engine = out / "model.engine"
    res = cli("run", engine, "--repeats", "3", "--json")
    if torch.cuda.is_available():  # pragma: no cover - GPU machines only
        assert res.code == 0 and json.loads(res.out)["median_ms"] > 0
    else:
        assert res.code == 2 and "CUDA" in error_line(res)
    with open(engine, "ab") as fh:
        fh.write(b"junk")
    res = cli("run", engine)
    assert res.code == 2 and "is corrupted" in error_line(res)


def test_export_step_and_its_refusal(cli, sample_file, tmp_path):
    res = cli("export-step", sample_file("causal_lm"), "--out", tmp_path / "step.onnx", "--length", "40",
              "--chunk-max", "16", "--json", "-q")
    assert res.code == 0, res.err
    data = json.loads(res.out)
    assert len(data["step"]["states"]) == 4 and data["parity"]["ok"] is True
    assert (tmp_path / "step.onnx").is_file() and not (tmp_path / "step.engine").exists()
    res = cli("export-step", sample_file("noncausal_encoder"), "--out", tmp_path / "bad.onnx", "-q")
    assert res.code == 2 and "mixes positions" in error_line(res)
    assert not (tmp_path / "bad.onnx").exists()


def test_optimize_and_pass_selection(cli, sample_file, tmp_path):
    raw = tmp_path / "raw.onnx"
    assert cli("export", sample_file("causal_block"), "--out", raw, "-q").code == 0
    opt = tmp_path / "opt.onnx"
    res = cli("optimize", raw, opt, "--json", "-q")
    assert res.code == 0, res.err
    data = json.loads(res.out)
    chunk = next(p for p in data["passes"] if p["name"] == "causal-chunk")
    assert chunk["changed"] and chunk["matches"] == 2
    info = json.loads(cli("inspect", opt, "--json").out)
    assert "Einsum" not in info["op_histogram"]
    assert cli("optimize", raw, opt, "-q").code != 0  # no clobbering
    res = cli("optimize", raw, tmp_path / "x.onnx", "--passes", "lowrank,nope")
    assert res.code == 2 and "unknown pass 'nope'" in error_line(res)
    res = cli("build", sample_file("causal_block"), "--out", tmp_path / "b", "--passes", "chunk", "-q")
    assert res.code == 2 and "unknown pass 'chunk'" in error_line(res) and "[export]" not in res.err
    res = cli("build", sample_file("causal_block"), "--out", tmp_path / "b", "--passes", "causal-chunk",
              "--backend", "onnxruntime", "--cases", "odd", "--json", "-q")
    report = json.loads(res.out)
    assert res.code == 0, res.err  # the op causal-chunk writes is lowered: the pass is added where left out
    assert [p["name"] for p in report["passes"]["report"]["passes"]] == ["causal-chunk", "linear-attention"]
    assert (tmp_path / "b" / "exported.onnx").is_file()


def test_json_stdout_stays_json_when_model_code_prints(cli, tmp_path):
    res = cli("build", "--factory", "badmodels:noisy_mlp", "--input", "x:2x4x16", "--out", tmp_path / "o",
              "--backend", "onnxruntime", "--cases", "opt", "--json", "-q", cwd=FIXTURES)
    assert res.code == 0 and json.loads(res.out)["ok"] is True
    assert "hello from the model" in res.err


def test_fp16_drift_is_located_at_the_overflowing_node(cli, tmp_path):
    """With the keep-list off (--fp16-force), both low-precision rows fail and name the overflowing node."""
    res = cli("build", "--factory", "badmodels:overflow_mlp", "--input", "x:2x8x16", "--out", tmp_path / "o",
              "--fp16", "--fp16-force", "--backend", "onnxruntime", "--no-passes", "-q", cwd=FIXTURES)
    assert res.code == 1, res.out + res.err
    assert "onnxruntime-fp16" in res.out and "parity: FAIL" in res.out
    assert "warning: left in fp16 (--fp16-force): node_pow_1 (Pow) in module 'act'" in res.out
    lines = [ln for ln in res.out.splitlines() if "first drift at node" in ln]
    assert [ln.split()[0] for ln in lines] == ["onnxruntime-fp16", "fp16"]  # ORT, then the faithful row
    for line in lines:
        assert "module 'act'" in line and "NaN/Inf" in line and ("Pow" in line or "Mul" in line)
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    drifts = report["parity"]["drift"]
    assert [d["backend"] for d in drifts] == ["onnxruntime-fp16", "fp16 faithful"]
    assert all(d["location"]["module"] == "act" for d in drifts)
    # the float32 ONNX model itself is fine
    assert all(r["ok"] for r in report["parity"]["results"] if r["backend"] == "onnxruntime")


def test_without_tensorrt_says_so_in_one_line_and_exits_on_parity(cli, sample_file, tmp_path, monkeypatch):
    import exporter.trt_backend as trt_backend

    monkeypatch.setattr(trt_backend, "_import", lambda name: None)  # as on a machine without TensorRT
    res = cli("build", sample_file("lowrank_mlp"), "--out", tmp_path / "o", "--cases", "opt", "--fp16")
    assert res.code == 0, res.err
    (note,) = [ln for ln in res.out.splitlines() if ln.startswith("note:")]
    assert "no TensorRT backend is installed" in note and "ONNX Runtime (CPU) is the engine" in note
    assert not (tmp_path / "o" / "model.engine").exists()
    res = cli("build", sample_file("lowrank_mlp"), "--out", tmp_path / "o2", "--backend", "tensorrt-rtx")
    assert res.code == 2 and "pip install tensorrt-rtx-cu13" in error_line(res)


def test_build_of_a_model_past_2gb(cli, sample_file, tmp_path, monkeypatch):
    """The whole build with weights in external-data files (the 2 GB limits lowered to exercise that path)."""
    import exporter.export as export_module
    import graph_passes.ort_session as util

    monkeypatch.setattr(export_module, "PROTO_LIMIT", 1024)
    monkeypatch.setattr(util, "PROTO_LIMIT", 1024)
    out = tmp_path / "o"
    res = cli("build", sample_file("causal_lm"), "--out", out, "--fp16", "--cases", "min,odd", "-q")
    assert res.code == 0, res.out + res.err
    assert (out / "model.onnx.data").stat().st_size > 500_000 and (out / "model.onnx").stat().st_size < 500_000
    assert (out / "model.fp16.onnx.data").is_file()
    assert "onnxruntime-fp16" in res.out


def test_several_outputs_with_none_in_between(cli, tmp_path):
    res = cli("build", "--factory", "badmodels:two_heads", "--input", "x:2x4x16", "--shapes",
              "x:min=1x1x16,opt=2x4x16,max=4x32x16", "--out", tmp_path / "o", "--backend", "onnxruntime",
              "--json", "-q", cwd=FIXTURES)
    assert res.code == 0, res.err
    outputs = {o["output"]: o["shape"] for r in json.loads(res.out)["parity"]["results"] if r["case"] == "opt"
               for o in r["outputs"]}
    assert outputs == {"output_0": [2, 4, 8], "output_1": [2, 4, 4]}


def test_fp32_failure_says_whether_an_operation_departs_from_pytorch(cli, sample_file, tmp_path):
    res = cli("build", sample_file("lowrank_mlp"), "--out", tmp_path / "o", "--backend", "onnxruntime",
              "--cases", "opt", "--atol", "0", "--rtol", "0", "--json", "-q")
    assert res.code == 1
    (drift,) = json.loads(res.out)["parity"]["drift"]
    assert drift["backend"] == "onnxruntime" and drift["location"] is None
    assert "no intermediate of the exported model departs from PyTorch" in drift["text"]
