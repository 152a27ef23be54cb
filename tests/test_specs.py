"""Input specs and shape ranges: parsing, validation and the parity shape cases they generate."""

from __future__ import annotations

import numpy as np
import pytest

from exporter.errors import LrexportError
from exporter.specs import (build_specs, odd_size, parity_cases, random_feeds, read_sidecar, sidecar_path,
                            write_sidecar)


def test_input_and_shapes_combine():
    (spec,) = build_specs(["ids:1x128:int64:0..255"], ["ids:min=1x1,opt=2x128,max=4x512"])
    assert (spec.name, spec.dtype, spec.min, spec.opt, spec.max) == ("ids", "int64", (1, 1), (2, 128), (4, 512))
    assert (spec.low, spec.high) == (0, 255)
    assert spec.dynamic_axes == (0, 1)


def test_static_input_has_no_dynamic_axes_and_one_case():
    specs = build_specs(["x:2x8x16:fp16"])
    assert specs[0].dtype == "float16" and specs[0].dynamic_axes == ()
    assert parity_cases(specs) == ["opt"]


def test_cases_cover_min_opt_max_and_an_odd_size():
    specs = build_specs(shapes=["x:min=1x16x512,opt=1x128x512,max=8x4096x512"])
    assert parity_cases(specs) == ["min", "opt", "max", "odd"]
    odd = specs[0].shape("odd")
    assert odd[1] % 64 != 0 and 16 <= odd[1] <= 4096 and odd[2] == 512


@pytest.mark.parametrize("lo,hi,opt", [(1, 4096, 128), (2, 3, 2), (1, 2, 1), (64, 128, 64), (5, 5, 5)])
def test_odd_size_stays_in_range(lo, hi, opt):
    assert lo <= odd_size(lo, hi, opt) <= hi


def test_export_shape_avoids_size_one_on_dynamic_axes():
    (spec,) = build_specs(shapes=["x:min=1x1x8,opt=1x1x8,max=4x64x8"])
    assert spec.export_shape() == (2, 2, 8)


@pytest.mark.parametrize("shapes,match", [
    (["x:min=8x16,max=1x16"], "min > max on axis 0"),
    (["x:min=1x16,opt=1x999,max=1x64"], "opt outside"),
    (["x:min=1x16,max=1x16x4"], "mixes ranks"),
    (["x:min=1xabc,max=2x4"], "bad dimensions"),
    (["x:low=1,max=2"], "not min=, opt= or max="),
    (["x:min=1x2"], "lacks min= or max="),
    (["1x2x3"], "bad shape range"),
])
def test_bad_shape_ranges_are_one_line_errors(shapes, match):
    with pytest.raises(LrexportError, match=match) as info:
        build_specs(shapes=shapes)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("text,match", [
    ("x", "bad input spec"), ("x:1x2:complex", "unknown dtype"), ("ids:1x2:int64:9..1", "low > high"),
    ("ids:1x2:int64:a..b", "bad value range"),
])
def test_bad_input_specs(text, match):
    with pytest.raises(LrexportError, match=match):
        build_specs([text])


def test_random_feeds_are_reproducible_and_respect_ranges():
    specs = build_specs(["ids:2x50:int64:3..7", "x:2x50x4:float32"])
    a, b = random_feeds(specs, "opt", seed=1), random_feeds(specs, "opt", seed=1)
    assert np.array_equal(a["ids"], b["ids"]) and np.array_equal(a["x"], b["x"])
    assert a["ids"].min() >= 3 and a["ids"].max() <= 7 and a["x"].dtype == np.float32


def test_sidecar_round_trip(tmp_path):
    model = tmp_path / "model.pt2"
    write_sidecar(model, ["x:1x8:float32"], ["x:min=1x1,opt=1x8,max=2x16"])
    assert sidecar_path(model).name == "model.inputs.json"
    assert read_sidecar(model) == (["x:1x8:float32"], ["x:min=1x1,opt=1x8,max=2x16"])
    sidecar_path(model).write_text("{not json")
    with pytest.raises(LrexportError, match="not valid JSON"):
        read_sidecar(model)
