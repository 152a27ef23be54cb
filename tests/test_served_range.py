"""The sizes a model really serves (issue 15): torch.export's guards narrower than its range_constraints,
independent dynamic axes of two inputs, torch's 0/1 specialization, and a chunk larger than the sequence.

The chunk-loop model is transformers' gated-DeltaNet layer (Qwen3-Next / Qwen3.5) on its PyTorch fallback,
saved as users save it: ``torch.export`` with ``Dim.AUTO``. The archive's range reads ``[2, inf)``, but the
loop over chunks is unrolled to the example's three chunks: torch's guards allow T in 9..11 only.
"""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

import third_party_models as tpm
from conftest import error_line

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def deltanet(tmp_path_factory):
    """(eager model, .pt2 archive saved with Dim.AUTO at T=10, chunks of 4)."""
    model = tpm.gated_deltanet(chunk_size=4)
    path = tmp_path_factory.mktemp("deltanet") / "deltanet.pt2"
    auto = torch.export.Dim.AUTO
    with torch.no_grad():  # the layer's no_grad regions would otherwise not load back
        ep = torch.export.export(model, (torch.randn(2, 10, 64),), dynamic_shapes=({0: auto, 1: auto},),
                                 strict=False)
    torch.export.save(ep, str(path))
    return model, path


def _runs(module, size: int) -> bool:
    try:
        with torch.no_grad():
            module(torch.randn(2, size, 64))
    except AssertionError:  # torch's guard
        return False
    return True


def test_chunk_loop_archive_refused_naming_the_range_it_serves(cli, deltanet, tmp_path):
    model, path = deltanet
    program = torch.export.load(str(path))
    lo, hi = (int(program.range_constraints[s].lower) for s in program.range_constraints), None
    assert all(v <= 2 for v in lo)  # the archive claims every length from 2 on
    res = cli("build", path, "--out", tmp_path / "out", "-q")
    assert res.code == 2, res.err
    line = error_line(res)
    assert "axis 1 of input 'x' was requested as 2..80, but the exported model serves only 9..11" in line, line
    assert not (tmp_path / "out").exists()
    # asked on the command line (batch 1 included: the program runs there), opt outside what it serves
    res = cli("build", path, "--out", tmp_path / "out", "--shapes", "x:min=1x2x64,opt=2x30x64,max=4x40x64", "-q")
    assert res.code == 2, res.err
    assert "axis 1 of input 'x' was requested as 2..40, but the exported model serves only 9..11" in error_line(res)
    # what torch itself says: the archive's program runs at 9 and 11, and not at 8 or 12 (chunk boundary)
    module = program.module()
    assert [_runs(module, t) for t in (8, 9, 11, 12)] == [False, True, True, False]


def test_chunk_loop_archive_inside_its_range_is_right_at_every_length(cli, deltanet, tmp_path):
    model, path = deltanet
    res = cli("build", path, "--out", tmp_path / "out", "--shapes", "x:min=1x9x64,opt=2x10x64,max=4x11x64",
              "--backend", "onnxruntime", "--no-passes", "--cases", "min", "--json", "-q")
    assert res.code == 0, res.err[-3000:]
    session = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for batch, t in ((1, 9), (2, 10), (3, 11), (4, 11), (1, 11)):  # every length the build states
        x = rng.standard_normal((batch, t, 64)).astype(np.float32)
        with torch.no_grad():
            want = model(torch.from_numpy(x)).numpy()  # the library's eager code, not the exported program
        got = session.run(None, {"x": x})[0]
        assert np.abs(got - want).max() < 1e-4, (batch, t, np.abs(got - want).max())


def test_guard_failing_in_parity_is_a_narrowed_range_not_a_crash(cli, deltanet, tmp_path):
    """``lrexport check`` runs the archive at the parity sizes without exporting it: its reference run hitting a
    guard (a length the program does not serve) is exit 2 naming the input and axis, not an internal error."""
    import onnx
    from onnx import TensorProto, helper

    _, path = deltanet
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["output"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "t", 64])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["b", "t", 64])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(tmp_path / "id.onnx"))
    res = cli("check", path, tmp_path / "id.onnx", "--shapes", "x:min=2x9x64,opt=2x10x64,max=2x40x64",
              "--cases", "max")
    assert res.code == 2, res.err
    line = error_line(res)
    assert "shape case max (x 2x40x64): axis 1 of input 'x' is outside what its torch.export guards allow" in line


def test_encoder_decoder_axes_with_the_same_range_stay_independent(cli, tmp_path):
    """src and tgt both 16..48 but different lengths: one torch Dim for both made the export fail."""
    pytest.importorskip("x_transformers")
    res = cli("export", "--factory", "third_party_models:x_encdec_lowrank", "--out", tmp_path / "m.onnx",
              "--input", "src:2x32:int64:0..255", "--input", "tgt:2x24:int64:0..255",
              "--shapes", "src:min=1x16,opt=2x32,max=2x48", "--shapes", "tgt:min=1x16,opt=2x24,max=2x48",
              "--json", "-q")
    assert res.code == 0, res.err[-2000:]
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    model = tpm.x_encdec_lowrank()
    rng = np.random.default_rng(1)
    for s, t in ((16, 48), (48, 17), (31, 31)):  # each length on its own, batch shared
        src = rng.integers(0, 256, (2, s)).astype(np.int64)
        tgt = rng.integers(0, 256, (2, t)).astype(np.int64)
        with torch.no_grad():
            want = model(torch.from_numpy(src), torch.from_numpy(tgt)).numpy()
        got = session.run(None, {"src": src, "tgt": tgt})[0]
        assert got.shape == want.shape and np.abs(got - want).max() < 1e-4


def test_chunk_size_larger_than_the_longest_sequence_is_clamped_and_said(cli, sample_file, tmp_path):
    res = cli("build", sample_file("causal_lm"), "--out", tmp_path / "b", "--shapes", "ids:min=1x1,opt=1x32,max=2x64",
              "--chunk-size", "4096", "--backend", "onnxruntime", "--cases", "odd", "--json", "-q")
    assert res.code == 0, res.err[-2000:]
    data = json.loads(res.out)
    warnings = data["passes"]["warnings"]
    assert warnings == ["--chunk-size 4096 is larger than the longest sequence the inputs allow (64): chunks of 64 "
                        "instead (a larger chunk only pads every sequence up to it)"]
    # causal_lm's running sums become the linear-attention op (its lowering chunks on its own); a chunked form
    # written by causal-chunk would use the clamped size, never 4096
    chunks = {m["chunk"] for p in data["passes"]["report"]["passes"] for m in p["details"] if "chunk" in m}
    assert chunks <= {64}, data["passes"]["report"]


def test_dim_auto_archive_serves_batch_one_and_one_token(cli, tmp_path):
    """torch writes [2, inf) for Dim.AUTO (its 0/1 specialization); the program runs at 1, so 1 is served."""
    from samples.models import causal_lm

    from exporter.loading import load_model

    model = causal_lm(d_model=64, layers=1).eval()
    path = tmp_path / "auto.pt2"
    auto = torch.export.Dim.AUTO
    ep = torch.export.export(model, (torch.randint(0, 256, (2, 32)),), dynamic_shapes=({0: auto, 1: auto},),
                             strict=False)
    assert {(int(v.lower)) for v in ep.range_constraints.values()} == {2}
    torch.export.save(ep, str(path))
    (spec,) = load_model(path).inferred_specs
    assert spec.min == (1, 1)
    res = cli("build", path, "--out", tmp_path / "out", "--shapes", "ids:min=1x1,opt=2x32,max=2x64", "--no-passes",
              "--backend", "onnxruntime", "--cases", "min,odd", "--json", "-q")
    assert res.code == 0, res.err[-2000:]
    data = json.loads(res.out)
    assert [c["shapes"]["ids"] for c in data["parity"]["results"] if c["case"] == "min"] == [[1, 1]]
    assert data["parity"]["ok"]


@pytest.mark.parametrize("name, requested, serves, fits", [
    ("minimax_lm", "16..160", "50..63", "ids:min=1x50,opt=1x56,max=2x63"),
    ("xlstm_lm", "16..160", "72", "ids:min=1x72,opt=1x72,max=2x72"),
])
def test_block_loop_models_refused_with_the_lengths_their_guards_allow(cli, tmp_path, name, requested, serves, fits):
    """transformers' MiniMax (lightning attention, a loop over blocks of 16) exported at 56 tokens, and xLSTM
    (mLSTM chunkwise over chunks of 16) at 72. Calling the exported program itself (torch's own guard check)
    runs MiniMax at 50..63 only (4 blocks, the last neither 1 nor 16 long) and xLSTM at 72 only (4 chunks and a
    remainder of 8). Their range_constraints say 48..inf and 64..128, which lrexport used to report."""
    inputs, shapes = tpm.SPECS[name]
    res = cli("export", "--factory", f"third_party_models:{name}", "--input", inputs[0], "--shapes", shapes[0],
              "--out", tmp_path / "m.onnx", "--no-patches", "-q")  # lrexport patches MiniMax's loop
    assert res.code == 2, res.err
    line = error_line(res)
    assert f"axis 1 of input 'ids' was requested as {requested}, but the exported model serves only {serves} (" in line
    assert f"--shapes {fits}" in line
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("factory, same", [("same_at_full", True), ("differs_at_full", False),
                                           ("recurrence_same_at_full", True)])
def test_sizes_the_guards_exclude_are_checked_against_the_eager_model(cli, tmp_path, factory, same):
    """A branch on the length (``if T == 64``) leaves the guard ``T != 64``: where the eager model is at hand,
    the ONNX is run against it there. Agreeing, the requested 1..64 stands (a warning says why); disagreeing,
    the build is refused naming the lengths the program serves, and nothing is written."""
    res = cli("build", "--factory", f"guard_models:{factory}", "--input", "x:2x16x8:float32",
              "--shapes", "x:min=1x1x8,opt=2x16x8,max=2x64x8", "--out", tmp_path / "out",
              "--backend", "onnxruntime", "--json", "-q")
    if same:
        assert res.code == 0, res.err[-3000:]
        data = json.loads(res.out)
        assert data["ok"] and data["export"]["inputs"][0]["max"][1] == 64
        assert any("serves only 1..63" in w and "matches PyTorch at the sizes outside (64)" in w
                   for w in data["export"]["warnings"]), data["export"]["warnings"]
    else:
        assert res.code == 2
        assert "was requested as 1..64, but the exported model serves only 1..63" in error_line(res)
        assert not (tmp_path / "out").exists()
