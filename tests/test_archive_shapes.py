"""Archives saved the ways users save them (Dim.AUTO, unbounded or min-less Dims, derived dims, token
inputs) load, export and pass parity; shapes asked for on the command line meet the model's rules."""

from __future__ import annotations

import json

import onnx
import pytest
import torch
from torch.export import Dim

from conftest import FIXTURES, error_line
from exporter.loading import load_model
from exporter.pipeline import resolve_specs
from shape_models import Blocks, Dense, DenseConv, Tokens

X = torch.randn(2, 64, 32)
BUILD = ("--backend", "onnxruntime", "-q", "--json")


def _save(tmp_path, name, model, args, dynamic_shapes):
    path = tmp_path / f"{name}.pt2"
    torch.export.save(torch.export.export(model, args, dynamic_shapes=dynamic_shapes), path)
    return path


def _build(cli, path, tmp_path, *extra):
    res = cli("build", path, "--out", tmp_path / "out", *BUILD, *extra)
    return res, (json.loads(res.out) if res.code in (0, 1) else None)


@pytest.mark.parametrize("dims", ["auto", "unbounded"])
def test_unbounded_archive_gets_a_stated_default_range_and_builds(dims, cli, tmp_path):
    shapes = {"auto": {0: Dim.AUTO, 1: Dim.AUTO}, "unbounded": {0: Dim("batch"), 1: Dim("seq")}}[dims]
    path = _save(tmp_path, dims, Dense(), (X,), {"x": shapes})
    (spec,) = load_model(path).inferred_specs
    assert spec.max == (16, 512, 32)  # 8x the example's 2 and 64
    res, report = _build(cli, path, tmp_path)
    assert res.code == 0, res.err
    assert report["parity"]["ok"]
    assert sum("no upper bound" in w for w in report["export"]["warnings"]) == 2
    assert {tuple(c["shapes"]["x"]) for c in report["parity"]["results"]} >= {(16, 512, 32)}


def test_dim_without_min_starts_at_one_and_says_so(cli, tmp_path):
    path = _save(tmp_path, "bmax", Dense(), (X,), {"x": {0: Dim("batch", max=8), 1: Dim("seq", min=4, max=512)}})
    loaded = load_model(path)
    assert loaded.inferred_specs[0].min == (1, 4, 32)
    assert loaded.notes == ["axis 0 of input 'x': torch's lower bound 0 is its default, not a size the model "
                            "serves; using 1"]
    res, report = _build(cli, path, tmp_path)
    assert res.code == 0, res.err
    mins = [c["shapes"]["x"] for c in report["parity"]["results"] if c["case"] == "min"]
    assert mins == [[1, 4, 32]]


def test_derived_dim_keeps_every_size_a_multiple(cli, tmp_path):
    blocks = Dim("blocks", min=1, max=32)
    path = _save(tmp_path, "blocks", Blocks(), (X,), {"x": {0: Dim("batch", max=4), 1: 16 * blocks}})
    (spec,) = load_model(path).inferred_specs
    assert spec.multiple == (1, 16, 1)
    assert (spec.min[1], spec.max[1]) == (32, 512)  # torch keeps at least 2 blocks
    res, report = _build(cli, path, tmp_path)
    assert res.code == 0, res.err
    seqs = {c["case"]: c["shapes"]["x"][1] for c in report["parity"]["results"]}
    assert set(seqs) == {"min", "opt", "max", "odd"}
    assert all(n % 16 == 0 for n in seqs.values()) and seqs["odd"] % 64
    dims = onnx.load(str(tmp_path / "out" / "model.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert dims[1].dim_param == "16*seq_blocks"


def test_shapes_that_break_a_multiple_are_one_line(cli, tmp_path):
    blocks = Dim("blocks", min=1, max=32)
    path = _save(tmp_path, "blocks", Blocks(), (X,), {"x": {0: Dim("batch", max=4), 1: 16 * blocks}})
    res = cli("build", path, "--out", tmp_path / "out", "--shapes", "x:min=1x32x32,opt=1x64x32,max=2x500x32", *BUILD)
    assert res.code == 2
    assert error_line(res) == ("error: axis 1 of input 'x' must be a multiple of 16 (the model splits it into blocks "
                               "of 16); the max size 500 is not: use 496 or 512 in --shapes")
    assert not (tmp_path / "out").exists()


def test_a_module_that_needs_multiples_is_exported_with_them(cli, tmp_path):
    res = cli("build", "--factory", "shape_models:Blocks", "--shapes", "x:min=1x32x32,opt=1x64x32,max=4x512x32",
              "--out", tmp_path / "out", *BUILD, cwd=FIXTURES)
    assert res.code == 0, res.err
    report = json.loads(res.out)
    assert report["export"]["inputs"][0]["multiple"] == [1, 16, 1]
    assert all(c["shapes"]["x"][1] % 16 == 0 for c in report["parity"]["results"])


def test_shapes_on_an_archive_keep_its_dtype_and_stay_in_its_range(cli, sample_file, tmp_path):
    path = sample_file("causal_lm")  # ids: int64, 1..4 x 1..512
    res, report = _build(cli, path, tmp_path, "--shapes", "ids:min=1x8,opt=1x16,max=2x64", "--no-passes")
    assert res.code == 0, res.err
    assert report["export"]["inputs"][0]["dtype"] == "int64"
    res = cli("build", path, "--out", tmp_path / "out2", "--shapes", "ids:min=1x8,opt=1x16,max=2x600", *BUILD)
    assert res.code == 2
    assert "axis 1 of input 'ids' is 1..512 in the model archive" in error_line(res)


def test_token_ids_span_the_embedding(cli, tmp_path):
    ids = torch.randint(0, 10, (2, 64))  # the example covers 0..9 of 256 ids
    path = _save(tmp_path, "tokens", Tokens(), (ids,), {"ids": {0: Dim("batch", max=4), 1: Dim("seq", min=2, max=256)}})
    (spec,) = load_model(path).inferred_specs
    assert (spec.low, spec.high) == (0, 255)
    module = load_model(None, factory="shape_models:Tokens", factory_kwargs='{"vocab": 50}').module
    (spec,) = resolve_specs(load_model(None, factory="shape_models:Tokens", factory_kwargs='{"vocab": 50}'),
                            ["ids:2x16:int64"])
    assert (spec.low, spec.high) == (0, 49)
    res = cli("build", "--factory", "shape_models:Tokens", "--factory-kwargs", '{"vocab": 50}',
              "--input", "ids:2x16:int64", "--out", tmp_path / "out", *BUILD, cwd=FIXTURES)
    assert res.code == 0, res.err  # the old default range 0..100 indexed past 50 rows
    assert module.embed.num_embeddings == 50


def test_input_without_shapes_warns_static_and_checks_passes_at_opt(cli, tmp_path):
    res = cli("build", "--factory", "shape_models:Dense", "--input", "x:2x64x32", "--out", tmp_path / "out", *BUILD,
              cwd=FIXTURES)
    assert res.code == 0, res.err
    report = json.loads(res.out)
    static = [w for w in report["export"]["warnings"] if "ONNX model is static" in w]
    assert static == ["the inputs have fixed shapes (--input without --shapes), so the ONNX model is static; for "
                      "dynamic batch and sequence add --shapes x:min=1x1x32,opt=2x64x32,max=8x256x32"]
    assert all(p["parity"] is not None for p in report["passes"]["report"]["passes"])


@pytest.mark.parametrize("command", ["build", "export-step"])
def test_an_onnx_file_is_named_as_one(command, cli, tmp_path):
    path = tmp_path / "model.onnx"
    torch.onnx.export(Dense(), (X,), str(path), dynamo=False)
    res = cli(command, path, "--out", tmp_path / ("out" if command == "build" else "step.onnx"))
    assert res.code == 2
    line = error_line(res)
    assert "is an ONNX model; this command takes the PyTorch model it came from" in line
    assert f"lrexport check MODEL {path}" in line and f"lrexport optimize {path}" in line


def test_check_keeps_the_detail_of_a_shape_error(cli, tmp_path):
    onnx_path = tmp_path / "static.onnx"
    torch.onnx.export(Dense(), (X,), str(onnx_path), dynamo=False, input_names=["x"])  # fixed 2x64x32
    res = cli("check", "--factory", "shape_models:Dense", "-", onnx_path, "--input", "x:2x48x32", cwd=FIXTURES)
    assert res.code == 2
    assert "index: 1 Got: 48 Expected: 64" in error_line(res)


def test_factorize_takes_an_archive_and_keeps_its_dynamic_axes(cli, tmp_path):
    dense = _save(tmp_path, "dense", DenseConv(), (torch.randn(2, 16, 64),),
                  {"x": {0: Dim("batch", min=1, max=4), 1: Dim("seq", min=2, max=64)}})
    res = cli("factorize", dense, "--fraction", "0.5", "--out", tmp_path / "low.pt2", "--json", "-q")
    assert res.code == 0, res.err
    layers = {layer["name"]: layer for layer in json.loads(res.out)["layers"]}
    assert set(layers) == {"inp", "mlp.0", "mlp.2", "conv"}
    assert all(layer["rank"] and not layer["skipped"] for layer in layers.values())
    low = load_model(tmp_path / "low.pt2")
    assert (low.inferred_specs[0].min, low.inferred_specs[0].max) == ((1, 2, 64), (4, 64, 64))
    res, report = _build(cli, tmp_path / "low.pt2", tmp_path)
    assert res.code == 0, res.err
    lowrank = next(p for p in report["passes"]["report"]["passes"] if p["name"] == "lowrank")
    # inp's pair feeds mlp.0's with nothing between: inp.up . mlp.0.down merge, then inp.down with that; the
    # first pair, which lost its factor, is superseded (not a match); mlp.0 (bias folded), mlp.2 and conv stay pairs
    assert lowrank["matches"] == 5
    assert [d["action"] for d in lowrank["details"] if d["kind"] == "lowrank-pair"][:4] == [
        "superseded", "merged", "merged", "bias-folded"]
