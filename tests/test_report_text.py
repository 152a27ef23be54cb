"""What the reports say: files where they end up, one reason per skipped backend, no Python reprs, a
relative-error column that does not alarm on passing rows, progress without repeats, printable API reports."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

# Python reprs that must not reach a user: dicts ({'x': ...}) and tuples of ints ((1, 95, 512))
REPR = re.compile(r"\{'|\{\"|\(\d+, \d+")


@pytest.fixture(scope="module")
def fp16_build(sample_file, tmp_path_factory):
    """`lrexport build --fp16` with the default backend (TensorRT-RTX builds on a CPU), as a user runs it."""
    pytest.importorskip("tensorrt_rtx")
    out = tmp_path_factory.mktemp("build") / "o"
    proc = subprocess.run([sys.executable, "-m", "exporter.cli", "build", str(sample_file("lowrank_mlp")),
                           "--out", str(out), "--fp16", "--cases", "min,odd"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc.stdout, proc.stderr, json.loads((out / "report.json").read_text())


def test_paths_in_the_report_name_the_files_where_they_end_up(fp16_build):
    out, text, _err, report = fp16_build
    engine = report["engine"]
    for key in ("engine_path", "meta_path", "network_onnx"):
        assert Path(engine[key]).is_file(), (key, engine[key])
        assert Path(engine[key]).parent == out
    assert ".tmp-" not in json.dumps(report)
    assert sorted(Path(f).name for f in report["files"]) == sorted(p.name for p in out.iterdir())
    assert all(Path(f).is_file() for f in report["files"])


def test_build_text_ends_with_the_files_written(fp16_build):
    out, text, _err, report = fp16_build
    lines = text.strip().splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("wrote "))
    assert lines[start] == f"wrote {len(report['files'])} files to {out}:"
    listed = [ln.split()[0] for ln in lines[start + 1:]]
    assert listed == report["files"] and "model.engine" in {Path(p).name for p in listed}
    assert all(re.search(r"\d kB$|\d MB$", ln) for ln in lines[start + 1:])


def test_the_engine_not_run_reason_appears_once_and_names_the_cause(fp16_build):
    from exporter.trt_engine import gpu_available

    if gpu_available()[0]:  # pragma: no cover - GPU machines run the engine instead
        pytest.skip("a GPU runs the engine here")
    _out, text, _err, report = fp16_build
    mentions = [ln for ln in text.splitlines() if "tensorrt" in ln and "not run" in ln]
    assert len(mentions) == 1 and mentions[0].strip().startswith("skipped: tensorrt:"), text
    assert "no CUDA GPU on this machine" in mentions[0]
    assert not [n for n in report["notes"] if "engine" in n]
    assert [s for s in report["parity"]["skipped"] if s.startswith("tensorrt")] == [mentions[0].split(": ", 1)[1]]


def test_progress_announces_the_fp16_cast_once(fp16_build):
    """The build casts once; the engine builder parses the cast model as given and says what it holds."""
    out, _text, err, report = fp16_build
    assert err.count("casting to fp16") == 1 and "already holds" not in err, err
    assert "[engine] parsing model.fp16.onnx (fp16) with tensorrt-rtx" in err
    meta = json.loads((out / "model.engine.json").read_text())
    assert meta["precision"] == report["engine"]["precision"] == "fp16" and meta["float_types"]["fp16"] > 0
    assert not any("parsed as is" in w for w in meta["warnings"])
    assert Path(report["engine"]["network_onnx"]).name == "model.fp16.onnx"


def test_min_rtol_instead_of_max_rel_on_passing_rows(fp16_build):
    """The fp16 rows pass but have elements with a near-zero reference: max rel there is far past rtol."""
    _out, text, _err, report = fp16_build
    rows = [o for r in report["parity"]["results"] for o in r["outputs"]]
    assert any(o["ok"] and o["max_rel"] > 10 * o["rtol"] for o in rows)  # the alarming number exists...
    table = text[text.index("parity vs"):text.index("parity: PASS")].splitlines()
    assert "max rel" not in table[1] and table[1].split()[-4:] == ["min", "rtol", "atol/rtol", "status"]
    body = [ln.split() for ln in table[3:] if ln.startswith("onnxruntime")]
    assert len(body) == 4 and any(cells[0] == "onnxruntime-fp16" for cells in body)
    for cells in body:  # ..., min atol, min rtol, atol/rtol, status
        rtol = float(cells[-2].split("/")[1])
        assert cells[-1] == "ok" and float(cells[-3]) <= rtol, cells
    assert all(o["min_rtol"] <= o["rtol"] for o in rows)


def test_no_python_reprs_in_text_output(fp16_build, cli, sample_file, tmp_path):
    _out, text, err, _report = fp16_build
    assert not REPR.search(text), REPR.search(text)
    assert not REPR.search(err)
    onnx_path = tmp_path / "m.onnx"
    assert cli("export", sample_file("causal_block"), "--out", onnx_path, "-q").code == 0
    res = cli("inspect", onnx_path)
    assert res.code == 0 and "opset ai.onnx 18" in res.out and not REPR.search(res.out), res.out
    res = cli("optimize", onnx_path, tmp_path / "o.onnx", "-q")
    assert res.code == 0 and "at input shapes x 1x47x512" in res.out and not REPR.search(res.out), res.out
    res = cli("inspect", sample_file("causal_block"))
    assert res.code == 0 and not REPR.search(res.out), res.out


def test_printing_api_reports_shows_the_tables(sample_file, tmp_path, capsys):
    from exporter import BuildOptions, build, load_model, resolve_specs

    loaded = load_model(sample_file("lowrank_mlp"))
    report = build(loaded, resolve_specs(loaded), BuildOptions(out=tmp_path / "o", passes=(), backend="onnxruntime",
                                                               cases=["min"]))
    print(report.parity)
    printed = capsys.readouterr().out
    assert printed.startswith("parity vs pytorch") and printed.rstrip().endswith("parity: PASS")
    assert printed.rstrip() == report.parity.format_table() and "ParityReport(" not in printed
    assert str(report) == report.format_text() and "BuildReport(" not in str(report)


def test_export_step_json_names_the_engine_files_where_they_end_up(cli, sample_file, tmp_path):
    pytest.importorskip("tensorrt_rtx")
    res = cli("export-step", sample_file("causal_lm"), "--out", tmp_path / "step.onnx", "--engine", "--length", "20",
              "--chunk-max", "8", "--json", "-q")
    assert res.code == 0, res.err
    engine = json.loads(res.out)["engine"]
    assert {Path(engine[k]) for k in ("engine_path", "meta_path", "network_onnx")} == {
        tmp_path / "step.engine", tmp_path / "step.engine.json", tmp_path / "step.onnx"}
    assert all(Path(engine[k]).is_file() for k in ("engine_path", "meta_path", "network_onnx"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step.engine", "step.engine.json", "step.onnx"]
