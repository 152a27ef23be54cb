"""linear-attention-transformer (lucidrains, 0.19.1) causal LMs through lrexport: the causal-chunk rewrite at
n=1024, the step export (token by token and in chunks) and its refusals, and the TorchScript exporter learning
the bucket multiple. Small configs, CPU, no downloads; builders in tests/third_party_models.py."""

from __future__ import annotations

import json

import onnx_ir as ir
import pytest

from exporter.export import export_onnx
from exporter.specs import build_specs
from graph_passes.causal_chunked import OP_ACTION
from graph_passes.recurrent_state import RecurrentStatePass

pytest.importorskip("linear_attention_transformer")

import third_party_models as tpm  # noqa: E402


def _error_line(res) -> str:
    lines = [ln for ln in (res.err + res.out).splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, res.err[-2000:]
    return lines[0]


def _factory_args(name: str, kwargs: dict) -> list[str]:
    inputs, shapes = tpm.SPECS[name]
    args = ["--factory", "third_party_models:lat_causal_lm", "--factory-kwargs", json.dumps(kwargs)]
    for i in inputs:
        args += ["--input", i]
    for s in shapes:
        args += ["--shapes", s]
    return args


@pytest.mark.parametrize("bucket", [1, 4, 16])
def test_largest_tensor_at_1024_drops(cli, tmp_path, bucket):
    """`lrexport export` (sequence 16..1024) then `lrexport optimize` at n=1024: the pass chunks both sums, keeps
    parity there (each pass is checked on that input), and the largest intermediate shrinks at least 4x."""
    raw = tmp_path / "raw.onnx"
    kwargs = {"blindspot_size": bucket, "max_seq_len": 1024, "depth": 1}
    res = cli("export", *_factory_args("lat_causal_lm_1024", kwargs), "--out", raw, "-q")
    assert res.code == 0, res.err[-3000:]
    res = cli("optimize", raw, tmp_path / "opt.onnx", "--input", "ids:1x1024:int64:0..255",
              "--shapes", "ids:min=1x1024,opt=1x1024,max=1x1024", "--json", "-q")
    assert res.code == 0, res.err[-3000:]
    passes = {p["name"]: p for p in json.loads(res.out)["passes"]}
    causal = passes["causal-chunk"]
    assert causal["flops_shape"] == {"ids": [1, 1024]}
    # a bucket of one position: the per-position sum, written as the linear-attention op (which its own pass
    # lowers, and whose parity and sizes that pass reports); a larger bucket: the chunked form
    action = OP_ACTION if bucket == 1 else "chunked"
    assert sorted(d["kind"] for d in causal["details"] if d["action"] == action) == [
        "causal-normalizer", "causal-numerator"]
    checked = passes["linear-attention"] if bucket == 1 else causal
    assert checked["parity"] is not None and checked["parity"] < 1e-4
    before, after = causal["largest_tensor_before"], checked["largest_tensor_after"]
    assert before >= 4 * (1024 // bucket) * 64 * 64  # the [b, h, buckets, d, e] running sums
    assert after * 4 <= before, (before, after)


@pytest.mark.parametrize("axial", [False, True])
def test_step_export_token_by_token_and_chunks(cli, tmp_path, axial):
    """Bucket 1, positions from nn.Embedding(arange(n)) (a Range: offset) or the library's default axial position
    embedding (``pos_emb[:, :n]`` of a [b, 256, d] table summed from its axial weights: read at rows offset + 0..n-1
    instead): each layer carries its two running sums (d x e and d) as states, and the step model fed
    1, 7 and 16 tokens at a time matches PyTorch on the full sequence."""
    res = cli("export-step", *_factory_args("lat_causal_lm", {"use_axial_pos_emb": axial}), "--out",
              tmp_path / "step.onnx", "--length", "40", "--chunk-max", "16", "--json", "-q")
    assert res.code == 0, res.err[-3000:]
    data = json.loads(res.out)
    states = data["step"]["states"]
    assert sorted(len(s["shape"]) for s in states) == [3, 3, 4, 4] and data["step"]["position_offset"] == "position_offset"
    assert sorted(s["role"] for s in states) == ["s", "s", "z", "z"]
    assert data["parity"]["ok"] is True and [r["chunk"] for r in data["parity"]["results"]] == [1, 7, 16]
    assert all(o["max_abs"] < 1e-4 for r in data["parity"]["results"] for o in r["outputs"])


def test_axial_step_model_reads_the_position_table_at_the_offset(tmp_path):
    """The axial table read (a Slice of the table along the sequence axis, no Range in the graph) becomes a Gather
    of rows Range(0, n) + ``position_offset``: without it every chunk after the first would read rows 0.. again."""
    inputs, shapes = tpm.SPECS["lat_causal_lm"]
    export_onnx(tpm.lat_causal_lm(depth=1), build_specs(inputs, shapes), tmp_path / "m.onnx")
    model = ir.load(tmp_path / "m.onnx")
    res = RecurrentStatePass()(model)
    kinds = [(m.kind, m.action) for m in res.matches if m.kind.startswith("position")]
    assert kinds == [("position-slice", "offset added")] and not res.ranges
    assert res.position_offset == "position_offset"
    nodes = {n.name: n for n in model.graph}
    (name,) = res.slices
    assert name not in nodes and nodes[f"{name}_offset_rows"].op_type == "Gather"


def test_step_export_refusals(cli, tmp_path):
    """Bucketed sums advance a bucket at a time (no per-token step: refused up front, naming the multiple): one
    error line, exit 2, and no file."""
    res = cli("export-step", *_factory_args("lat_bucketed_lm", {"blindspot_size": 4}), "--out",
              tmp_path / "b.onnx", "-q")
    assert res.code == 2 and "multiples of 4" in _error_line(res) and not (tmp_path / "b.onnx").exists()


def test_torchscript_exporter_learns_the_bucket_multiple(cli, tmp_path):
    """The TorchScript trace says nothing about multiples; lrexport asks torch.export's suggested fixes, so the
    parity lengths are multiples of the bucket (before: exit 3 in a Reshape at the odd length), and the causal
    rewrite reads TorchScript's computed F.pad pads and the Casts around its CumSums."""
    args = _factory_args("lat_bucketed_lm", {"blindspot_size": 4, "depth": 1})
    args[args.index("ids:min=1x4,opt=1x128,max=2x256")] = "ids:min=1x16,opt=1x128,max=2x256"
    res = cli("build", *args, "--exporter", "torchscript", "--out", tmp_path / "out", "--json", "-q")
    assert res.code == 0, res.err[-3000:]
    data = json.loads(res.out)
    assert data["export"]["exporter"] == "torchscript" and data["export"]["inputs"][0]["multiple"] == [1, 4]
    assert data["ok"] and all(r["shapes"]["ids"][1] % 4 == 0 for r in data["parity"]["results"])
    causal = next(p for p in data["passes"]["report"]["passes"] if p["name"] == "causal-chunk")
    assert sorted(d["kind"] for d in causal["details"] if d["action"] == "chunked") == [
        "causal-normalizer", "causal-numerator"]
    args[args.index("ids:min=1x16,opt=1x128,max=2x256")] = "ids:min=1x1,opt=1x128,max=2x256"
    res = cli("build", *args, "--exporter", "torchscript", "--out", tmp_path / "bad", "-q")
    assert res.code == 2 and "must be a multiple of 4" in _error_line(res)
