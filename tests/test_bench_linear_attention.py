"""benchmarks/bench_linear_attention.py: its ONNX Runtime models (native op, portable and loop-free
lowerings, the standard opset-27 op, the per-token Scan baseline written by the benchmark, the op alone
lowered for ORT and the bare native node) agree with its float64 recurrence on the seeded inputs."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_linear_attention as bench  # noqa: E402
from _bench_case import make_feeds  # noqa: E402


@pytest.mark.parametrize("rule", ["gated-key", "gated_delta-head"])
def test_benchmark_models_match_float64(rule, tmp_path):
    models = bench.export(rule, tmp_path)
    shapes = bench.input_shapes(rule, 19)
    feeds = make_feeds(shapes)
    want, want_s = bench.reference64(rule, [torch.from_numpy(a) for a in feeds.values()])
    prepared = bench.prepared_feeds(rule, 19)
    assert set(models) == set(bench.VARIANTS) - {"pytorch"}
    for variant, path in models.items():
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        run = feeds
        if variant in bench.PREPARED:  # the op alone / the bare node (packed inputs) on the prepared values
            run = {i.name: prepared[i.name].reshape(1, 19, -1) if len(i.shape) == 3 else prepared[i.name]
                   for i in sess.get_inputs()}
        out, state = sess.run(None, run)
        out = out.reshape(want.shape)
        assert np.abs(out - want.numpy()).max() < 1e-5 * max(1.0, float(want.abs().max())), variant
        assert np.abs(state - want_s.numpy()).max() < 1e-5 * max(1.0, float(want_s.abs().max())), variant
