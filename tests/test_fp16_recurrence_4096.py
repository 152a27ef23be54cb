"""fp16 at n = 4096, every linear-attention rule and both lowerings: the cast model run by the faithful fp16
evaluator (real fp16 arithmetic, exporter/faithful.py) stays within the fp16 tolerance of the float64
PyTorch module. The recurrences themselves are float32 (the lowerings' tag); the plain linear rule also
needs its q, k, v and its readers in float32, since its output grows with n (precision_cast.mark_growing).
One small layer (2 heads of 16) per rule, exported once; a case takes seconds."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

import samples.models as sm
from exporter.compare import DEFAULT_TOLERANCES
from exporter.export import export_onnx
from exporter.faithful import FaithfulRunner
from exporter.specs import build_specs
from graph_passes import PassOptions, run_passes
from graph_passes.precision_cast import cast_precision
from graph_passes.tolerance import errors, failing

N = 4096
RULES = {"linear": {"rule": "linear"}, "linear-normalized": {"rule": "linear", "normalize": True},
         "gated-head": {"rule": "gated", "decay": "head"}, "gated-key": {"rule": "gated", "decay": "key"},
         "delta": {"rule": "delta"}, "gated_delta": {"rule": "gated_delta", "decay": "head"}}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder, cache = tmp_path_factory.mktemp("fp16_4096"), {}

    def get(name: str):
        if name not in cache:
            module = sm.linear_attention_layer(**RULES[name])
            specs = build_specs(["x:1x64x32:float32"], ["x:min=1x1x32,opt=1x64x32,max=1x4096x32"])
            export_onnx(module, specs, folder / f"{name}.onnx")
            x = np.random.default_rng(0).standard_normal((1, N, 32)).astype(np.float32)
            with torch.no_grad():
                ref = module.double()(torch.from_numpy(x).double()).numpy()
            cache[name] = (onnx.load(str(folder / f"{name}.onnx")), x, ref)
        return cache[name]

    return get


@pytest.mark.parametrize("lowering", ["onnxruntime", "portable"])
@pytest.mark.parametrize("name", list(RULES))
def test_faithful_fp16_at_4096(exported, name, lowering):
    model, x, ref = exported(name)
    lowered, _ = run_passes(model, ["cleanup", "linear-attention", "cleanup"],
                            options=PassOptions(linear_attention=lowering))
    cast, report = cast_precision(lowered, "fp16")
    got = FaithfulRunner(cast, "fp16", ["max"]).run({"x": x})["output"]
    diff, rel, _ = errors(got, ref)
    bad = failing(diff, rel, DEFAULT_TOLERANCES["fp16"])
    assert not bad.any(), f"{bad.sum()} of {bad.size} past the fp16 tolerance, max abs {diff.max():.3g}"
    why = json.dumps(report["kept_fp32_why"])
    assert ("computes an input of the growing" in why) == (name == "linear")  # only where nothing bounds it
    if name != "linear":
        assert report["low_fraction"] > 0  # the projections around the recurrence are fp16
