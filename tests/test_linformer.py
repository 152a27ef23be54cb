"""Linformer (fixed sequence length n): export with the length fixed and the batch dynamic, or wrapped in
``exporter.linformer.PadToLength`` so that every length 1..n works (padding inside the graph).

Parity of a padded model is the wrapped ONNX model against the wrapped PyTorch model at lengths < n
(see exporter/linformer.py for why that is the meaningful comparison).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch.export import Dim

from exporter.errors import LrexportError
from exporter.linformer import PadToLength, apply_padding, padded_specs
from exporter.loading import LoadedModel, load_model
from exporter.pipeline import BuildOptions, build
from exporter.specs import build_specs
from samples.models import linformer_encoder

N = 64


def _encoder() -> torch.nn.Module:
    return linformer_encoder(d_model=64, heads=2, layers=1, seq_len=N, k=16, ff_hidden=128)


def _seq_dim(path: Path, input_index: int = 0) -> onnx.TensorShapeProto.Dimension:
    return onnx.load(str(path)).graph.input[input_index].type.tensor_type.shape.dim[1]


def test_unwrapped_linformer_pins_seq_and_keeps_batch(tmp_path):
    specs = build_specs(shapes=[f"x:min=1x16x64,opt=2x{N}x64,max=4x{N}x64"])
    rep = build(LoadedModel(_encoder(), "module", "linformer"), specs,
                BuildOptions(out=tmp_path / "o", passes=(), backend="onnxruntime", cases=("min", "max")))
    assert rep.ok
    assert [(p.input, p.axis, p.size) for p in rep.export.pinned] == [("x", 1, N)]
    assert "became static" in rep.export.warnings[0]
    dims = onnx.load(str(tmp_path / "o" / "model.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and dims[1].dim_value == N


def test_torch_export_keeps_seq_dynamic():
    wrapped = PadToLength(_encoder(), N)
    ep = torch.export.export(wrapped, (torch.randn(2, 40, 64),), strict=False,
                             dynamic_shapes=({0: Dim("batch", min=1, max=4), 1: Dim("seq", min=1, max=N)},))
    x = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name in ep.graph_signature.user_inputs)
    seq = x.meta["val"].shape[1]
    assert not isinstance(seq, int)
    rng = ep.range_constraints[seq.node.expr]
    assert (int(rng.lower), int(rng.upper)) == (1, N)
    for n in (1, 37, N):  # the exported program runs at every length, including n itself
        inp = torch.randn(3, n, 64)
        torch.testing.assert_close(ep.module()(inp), wrapped(inp))


def test_padded_build_parity_below_n(tmp_path):
    specs = build_specs(shapes=[f"x:min=1x1x64,opt=2x48x64,max=4x{N}x64"])
    rep = build(LoadedModel(PadToLength(_encoder(), N), "module", "padded"), specs,
                BuildOptions(out=tmp_path / "o", backend="onnxruntime"))
    assert rep.ok, rep.parity.format_table()
    assert not rep.export.pinned and not rep.export.warnings
    lengths = {r.case: r.shapes["x"][1] for r in rep.parity.results}
    assert lengths["min"] == 1 and 1 < lengths["odd"] < N and lengths["odd"] % 2 == 1
    assert _seq_dim(tmp_path / "o" / "model.onnx").dim_param == "seq"
    ops = {n.op_type for n in onnx.load(str(tmp_path / "o" / "model.onnx")).graph.node}
    assert "Pad" in ops


def test_padding_changes_results_unless_masked():
    """Unmasked, the padded rows enter E.K; with linformer-pytorch's input_mask they do not."""
    lp = pytest.importorskip("linformer_pytorch")
    torch.manual_seed(0)
    lin = lp.Linformer(input_size=N, channels=64, dim_k=16, dim_ff=128, nhead=2, depth=2, dropout=0.0,
                       dropout_ff=0.0).eval()
    x = torch.randn(2, 40, 64)
    junk = torch.cat([x, 5 * torch.randn(2, N - 40, 64)], dim=1)
    mask = (torch.arange(N) < 40).expand(2, N)
    with torch.no_grad():
        plain = PadToLength(lin, N)(x)
        masked = PadToLength(lin, N, mask_arg="input_mask")(x)
        assert plain.shape == masked.shape == (2, 40, 64)
        torch.testing.assert_close(plain, lp.Padder(lin)(x))  # same semantics as linformer-pytorch's Padder
        torch.testing.assert_close(masked, lin(junk, input_mask=mask)[:, :40])  # pad contents do not matter
        assert (lin(junk)[:, :40] - plain).abs().max() > 1e-3  # ... unless the model masks nothing


def test_masked_linformer_build_parity(tmp_path):
    lp = pytest.importorskip("linformer_pytorch")
    torch.manual_seed(0)
    lin = lp.Linformer(input_size=N, channels=64, dim_k=16, dim_ff=128, nhead=2, depth=1, dropout=0.0,
                       dropout_ff=0.0, parameter_sharing="kv").eval()
    specs = build_specs(shapes=[f"x:min=1x1x64,opt=2x48x64,max=2x{N}x64"])
    rep = build(LoadedModel(PadToLength(lin, N, mask_arg="input_mask"), "module", "masked"), specs,
                BuildOptions(out=tmp_path / "o", backend="onnxruntime"))
    assert rep.ok, rep.parity.format_table()
    assert _seq_dim(tmp_path / "o" / "model.onnx").dim_param == "seq"


def test_masking_model_padded_equals_unpadded():
    """A model that masks (BERT, attention_mask padded with 0) gives the unpadded result at real positions;
    several inputs are padded together, dict outputs keep their type, pooled outputs pass through."""
    pytest.importorskip("transformers")
    import third_party_models as tpm

    bert = tpm.bert_dense()
    wrapped = PadToLength(bert, 128, pad_value=(0, 0))
    ids = torch.randint(0, 128, (2, 23))
    mask = torch.ones(2, 23, dtype=torch.int64)
    with torch.no_grad():
        ref, got = bert(ids, mask), wrapped(ids, mask)
    assert type(got) is type(ref) and got.last_hidden_state.shape == (2, 23, 64)
    torch.testing.assert_close(got.last_hidden_state, ref.last_hidden_state, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.pooler_output, ref.pooler_output, atol=1e-5, rtol=1e-4)


def test_apply_padding_on_a_pt2_archive(tmp_path):
    enc = _encoder()
    ep = torch.export.export(enc, (torch.randn(2, N, 64),), dynamic_shapes=({0: Dim("batch", min=1, max=4)},),
                             strict=False)
    torch.export.save(ep, str(tmp_path / "enc.pt2"))
    loaded = load_model(tmp_path / "enc.pt2")
    assert loaded.inferred_specs[0].dynamic_axes == (0,)
    padded = apply_padding(loaded, N)
    assert padded.kind == "exported-program" and padded.parameter_count == loaded.parameter_count
    spec = padded.inferred_specs[0]
    assert spec.min == (1, 1, 64) and spec.max == (4, N, 64)
    rep = build(padded, padded.inferred_specs, BuildOptions(out=tmp_path / "o", passes=(), backend="onnxruntime"))
    assert rep.ok, rep.parity.format_table()
    assert {r.shapes["x"][1] for r in rep.parity.results} >= {1, N}


def test_token_ids_are_padded_as_integers(tmp_path):
    from samples.models import LanguageModel

    class FixedLM(torch.nn.Module):  # a model that only runs at length 32
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.lm = LanguageModel(64, 32, 2, 1, 64)
            self.mix = torch.nn.Linear(32, 32)  # mixes along the sequence: length fixed

        def forward(self, ids):
            return self.mix(self.lm(ids).transpose(1, 2)).transpose(1, 2)

    specs = build_specs(inputs=["ids:1x20:int64:0..63"], shapes=["ids:min=1x1,opt=2x20,max=2x32"])
    rep = build(LoadedModel(PadToLength(FixedLM().eval(), 32), "module", "lm"), specs,
                BuildOptions(out=tmp_path / "o", passes=(), backend="onnxruntime"))
    assert rep.ok, rep.parity.format_table()


def test_errors():
    with pytest.raises(LrexportError, match="sequence length up to 128"):
        padded_specs(build_specs(shapes=["x:min=1x1x64,opt=1x64x64,max=1x128x64"]), N)
    ts = torch.jit.trace(_encoder(), torch.randn(1, N, 64))
    with pytest.raises(LrexportError, match="TorchScript"):
        apply_padding(LoadedModel(ts, "torchscript", "m.pt"), N)
    with pytest.raises(RuntimeError, match="exceeds the padded length"):
        PadToLength(_encoder(), N)(torch.randn(1, N + 1, 64))
    with pytest.raises(LrexportError):
        PadToLength(_encoder(), 0)
    assert np.isfinite(PadToLength(_encoder(), N)(torch.randn(1, 1, 64)).detach().numpy()).all()
