"""A model past protobuf's 2 GB limit, built for real: ``lrexport build`` in a child process (so its peak
memory can be read), every stage on the real >2 GB path (no limit lowered)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest

from conftest import FIXTURES, ROOT

WIDTH, LAYERS = 8256, 8  # tests/fixtures/large_models.py:wide_stack, 2.18 GB of float32 weights
WEIGHT_BYTES = 4 * LAYERS * (WIDTH * WIDTH + WIDTH)


@pytest.mark.large
def test_build_of_a_model_past_2gb(tmp_path: Path) -> None:
    assert WEIGHT_BYTES > 2**31  # past what one protobuf message can hold
    out = tmp_path / "big"
    cmd = [sys.executable, "-m", "exporter.cli", "build", "--factory", "large_models:wide_stack",
           "--factory-kwargs", json.dumps({"width": WIDTH, "layers": LAYERS}),
           "--input", f"x:1x4x{WIDTH}:float32", "--shapes", f"x:min=1x1x{WIDTH},opt=1x4x{WIDTH},max=2x8x{WIDTH}",
           "--backend", "onnxruntime", "--cases", "min,max", "--out", str(out), "--json", "-q"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(FIXTURES)]), "OMP_NUM_THREADS": "2"}
    start = time.perf_counter()
    with open(tmp_path / "stdout", "wb") as stdout, open(tmp_path / "stderr", "wb") as stderr:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=stdout, stderr=stderr)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS, not the test session's
    seconds = time.perf_counter() - start
    err = (tmp_path / "stderr").read_text()
    assert os.waitstatus_to_exitcode(status) == 0, err[-3000:]
    report = json.loads((tmp_path / "stdout").read_text())
    peak = usage.ru_maxrss * 1024  # kB on Linux
    print(f"build of {WEIGHT_BYTES / 1e9:.2f} GB: {seconds:.0f} s, peak RSS {peak / 1e9:.2f} GB "
          f"({peak / WEIGHT_BYTES:.2f}x the weights)")

    assert report["ok"] and {r["case"] for r in report["parity"]["results"]} == {"min", "max"}
    assert report["parity"]["reference"] == "pytorch float32"  # no float64 copy of 2 GB of weights
    assert all(r["ok"] for r in report["parity"]["results"])
    from graph_passes import DEFAULT_PASSES

    assert [p["name"] for p in report["passes"]["report"]["passes"]] == list(DEFAULT_PASSES)
    assert (out / "model.onnx").stat().st_size < 1_000_000  # the graph; the weights are in model.onnx.data
    assert (out / "model.onnx.data").stat().st_size >= WEIGHT_BYTES
    assert str(out / "model.onnx.data") in report["files"]
    lazy = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert {e.value for t in lazy.graph.initializer for e in t.external_data if e.key == "location"} == {
        "model.onnx.data"}
    assert not list(tmp_path.glob(".big.*"))  # no temporary folder left beside --out
    # the torch model and one ONNX copy of the weights at a time (ONNX Runtime's), plus the runtime
    assert peak < 3 * WEIGHT_BYTES


def test_float64_reference_only_below_the_copy_limit(monkeypatch) -> None:
    """The float64 reference copies the weights at twice their size: past FLOAT64_COPY_LIMIT it is float32."""
    import torch

    import exporter.runners as runners

    model = torch.nn.Sequential(torch.nn.Linear(64, 64))  # 4160 parameters: 33,280 bytes in float64
    assert runners.TorchRunner(model, ["y"], ["x"]).uses_float64
    monkeypatch.setattr(runners, "FLOAT64_COPY_LIMIT", 33_279)
    runner = runners.TorchRunner(model, ["y"], ["x"])
    assert not runner.uses_float64
    assert runner.run({"x": torch.randn(2, 64).numpy()})["y"].dtype == "float32" and runner.precision == "float32"
