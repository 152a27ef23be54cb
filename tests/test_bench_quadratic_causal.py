"""benchmarks/bench_quadratic_causal.py: the quadratic model as written and its two rewritten lowerings agree
with the module in float64 on the benchmark's seeded inputs, and only the rewritten ones lost the T x T matrix."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_quadratic_causal as bench  # noqa: E402
from _bench_case import make_feeds  # noqa: E402


def test_benchmark_models_match_float64(tmp_path):
    models = bench.export(tmp_path)
    assert set(models) == {"quadratic", "ort-native", "portable"}
    feeds = make_feeds(bench.shapes(37))
    with torch.no_grad():
        want = bench.build()(*[torch.from_numpy(a).double() for a in feeds.values()]).numpy()
    for variant, path in models.items():
        ops = {n.op_type for n in onnx.load(str(path)).graph.node}
        assert ("Trilu" in ops) == (variant == "quadratic"), (variant, ops)
        out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        assert np.abs(out - want).max() < 1e-5 * max(1.0, float(np.abs(want).max())), variant
