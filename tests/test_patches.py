"""Export patches (exporter/patches*.py): each patched module equals the library's own eager code on random
inputs at several lengths (including lengths that are not a multiple of the library's chunk), patches are
chosen by what the model's modules are and undone after the export, and every range torch.export narrows
is refused with one ``error:`` line (a pinned axis is said, with the reason).

The fla equivalence runs against fla's own PyTorch reference (``naive_recurrent_linear_attn``,
``rms_norm_ref``): its Triton kernels have no CPU path, so the unpatched layer cannot run here.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import third_party_models as tpm
from conftest import error_line
from exporter.patches import applied, reference_patches, select_patches

LENGTHS = (1, 5, 64, 127, 129, 300)  # performer splits into chunk(128); fla chunks by 64


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> None:
    err = (a - b).abs().max().item()
    assert err < tol, f"max abs {err:.3g} >= {tol}"


# ------------------------------------------------------------------------------------------- performer-pytorch


def test_performer_patch_equals_loop_at_lengths():
    performer = pytest.importorskip("performer_pytorch.performer_pytorch")
    torch.manual_seed(0)
    fa = performer.FastAttention(dim_heads=16, nb_features=24, causal=True).double()
    assert fa.causal_linear_fn is performer.causal_linear_attention_noncuda
    (patch,) = select_patches(fa)
    assert patch.label == "performer-pytorch causal_linear_attention_noncuda -> cumsum form"
    for n in LENGTHS:
        q, k, v = (torch.randn(2, 3, n, 16, dtype=torch.float64) for _ in range(3))
        ref = fa(q, k, v)
        with applied(fa, [patch]):
            assert fa.causal_linear_fn is not performer.causal_linear_attention_noncuda
            got = fa(q, k, v)
        _close(got, ref, 1e-12)
    assert fa.causal_linear_fn is performer.causal_linear_attention_noncuda  # restored
    assert "causal_linear_fn" in fa.__dict__  # bound per instance, as performer does


def test_performer_patch_sets_every_instance_and_keeps_non_causal():
    pytest.importorskip("performer_pytorch")
    from performer_pytorch import FastAttention, PerformerLM

    torch.manual_seed(0)
    lm = PerformerLM(num_tokens=64, max_seq_len=300, dim=32, depth=3, heads=2, causal=True, nb_features=8).eval()
    layers = [m for m in lm.modules() if isinstance(m, FastAttention)]
    assert len(layers) == 3
    ids = torch.randint(0, 64, (2, 300))
    with torch.no_grad():
        ref = lm(ids)
        with applied(lm, select_patches(lm)):
            assert all(m.causal_linear_fn.func.__name__ == "causal_linear_attention_cumsum" for m in layers)
            got = lm(ids)
    _close(got, ref, 1e-4)
    assert select_patches(FastAttention(dim_heads=16, causal=False)) == []


def test_performer_patch_of_the_kernel_variant_equals_causal_dot_product():
    """With fast-transformers' kernel, performer binds partial(causal_linear_attention) (CausalDotProduct;
    its CPU build runs here): patched to the same cumsum form."""
    performer = pytest.importorskip("performer_pytorch.performer_pytorch")
    pytest.importorskip("fast_transformers.causal_product", reason="pytorch-fast-transformers not installed")
    torch.manual_seed(0)
    fa = performer.FastAttention(dim_heads=16, nb_features=24, causal=True)
    fa.causal_linear_fn = functools.partial(performer.causal_linear_attention)
    (patch,) = select_patches(fa)
    assert patch.target.startswith("causal_linear_attention (CausalDotProduct")
    for n in (1, 37, 129):
        q, k, v = (torch.randn(2, 3, n, 16) for _ in range(3))
        ref = fa(q, k, v)
        with applied(fa, [patch]):
            got = fa(q, k, v)
        _close(got, ref, 1e-4)


# ------------------------------------------------------------------------------------------- fast-transformers


def test_fast_transformers_patch_equals_causal_dot_product():
    pytest.importorskip("fast_transformers.causal_product", reason="pytorch-fast-transformers not installed")
    model = tpm.fast_transformers_causal()
    (patch,) = select_patches(model)
    assert patch.label == "pytorch-fast-transformers causal_linear (CausalDotProduct kernel) -> cumsum form"
    for n in LENGTHS:
        x = torch.randn(2, n, 64)
        with torch.no_grad():
            ref = model(x)
            with applied(model, [patch]):
                got = model(x)
        _close(got, ref, 1e-4)


# ------------------------------------------------------------------------------------------------------ fla


def test_fla_ops_patch_equals_fla_reference():
    pytest.importorskip("fla")
    from fla.ops.linear_attn.naive import naive_recurrent_linear_attn

    from exporter.patches.fla.linear_attn import fla_linear_attn

    torch.manual_seed(0)
    for n in (1, 37, 64, 100, 129):
        q, k, v = (torch.randn(2, n, 3, 8) for _ in range(3))
        q, k = torch.sigmoid(q), torch.sigmoid(k)  # positive features: the normalizer stays away from 0
        for normalize in (False, True):
            ref, _ = naive_recurrent_linear_attn(q, k, v, normalize=normalize)
            got, _ = fla_linear_attn(q, k, v, normalize=normalize)
            _close(got, ref, 1e-5)


def test_fla_layer_patch_equals_layer_on_fla_reference_ops(monkeypatch):
    """The whole LinearAttention layer, patched, against the same layer running fla's own PyTorch reference
    op (every mode: it switches to fused_recurrent at T <= 64) and RMSNorm reference."""
    pytest.importorskip("fla")
    import fla.layers.linear_attn as la
    from fla.modules.norm.layernorm import rms_norm_ref
    from fla.ops.linear_attn.naive import naive_recurrent_linear_attn

    model = tpm.fla_linear_attention()
    patches = select_patches(model)
    assert [p.library for p in patches] == ["fla-core", "fla-core"]
    xs = [torch.randn(2, n, 64) for n in (1, 37, 64, 100, 130)]
    with torch.no_grad(), applied(model, patches):
        got = [model(x) for x in xs]
    assert la.chunk_linear_attn.__module__.startswith("fla.")  # restored
    for name in ("chunk_linear_attn", "fused_chunk_linear_attn", "fused_recurrent_linear_attn"):
        monkeypatch.setattr(la, name, lambda q, k, v, normalize, **_: naive_recurrent_linear_attn(
            q, k, v, normalize=normalize))
    norm = model.attn.norm
    monkeypatch.setattr(norm, "forward", lambda x: rms_norm_ref(x, norm.weight, norm.bias, eps=norm.eps))
    with torch.no_grad():
        for x, y in zip(xs, got):
            _close(y, model(x), 1e-5)


def test_fla_unpatched_fails_on_cpu_and_reference_patch_runs_it():
    pytest.importorskip("fla")
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: fla's Triton kernels run unpatched")
    model = tpm.fla_linear_attention()
    with pytest.raises(Exception):
        model(torch.randn(1, 8, 64))
    with reference_patches(model) as chosen:
        assert len(chosen) == 2
        assert model(torch.randn(1, 8, 64)).shape == (1, 8, 64)
    with reference_patches(model, enabled=False) as chosen:
        assert chosen == []


# ------------------------------------------------------------------------------------ selection, restoring


def test_no_patch_for_plain_models():
    from samples.models import causal_lm

    assert select_patches(causal_lm()) == []


def test_patch_undone_when_export_fails():
    performer = pytest.importorskip("performer_pytorch.performer_pytorch")
    fa = performer.FastAttention(dim_heads=8, nb_features=8, causal=True)
    with pytest.raises(RuntimeError, match="boom"):
        with applied(fa, select_patches(fa)):
            raise RuntimeError("boom")
    assert fa.causal_linear_fn is performer.causal_linear_attention_noncuda


# ------------------------------------------------------------------------------------- pinning / narrowing


class _BranchOn64(nn.Module):
    """Takes another path above 64 tokens (as fla's GatedLinearAttention does): torch narrows the range."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(x) * 2 if x.shape[1] > 64 else self.lin(x)


def test_narrowed_range_refused(tmp_path):
    from exporter.errors import LrexportError
    from exporter.export import export_onnx
    from exporter.specs import build_specs

    specs = build_specs(["x:1x100x8:float32"], ["x:min=1x16x8,opt=1x100x8,max=2x512x8"])
    with pytest.raises(LrexportError) as err:
        export_onnx(_BranchOn64(), specs, tmp_path / "m.onnx")
    text = str(err.value.problem)
    assert "axis 1 of input 'x' was requested as 16..512, but the exported model serves only 65..512" in text
    # inside the range it serves, the same model exports with a dynamic sequence
    ok = build_specs(["x:1x100x8:float32"], ["x:min=1x65x8,opt=1x100x8,max=2x512x8"])
    result = export_onnx(_BranchOn64(), ok, tmp_path / "m.onnx")
    assert result.pinned == [] and 1 in result.specs[0].dynamic_axes


def test_performer_no_patches_pins_and_says_so(cli, tmp_path):
    """Without the patch torch pins the sequence at the example length: said in the export's warnings."""
    pytest.importorskip("performer_pytorch")
    inputs, shapes = tpm.SPECS["performer_causal_lm"]
    res = cli("export", "--factory", "third_party_models:performer_causal_lm", "--input", inputs[0], "--shapes",
              shapes[0], "--out", tmp_path / "m.onnx", "--no-patches", "-q")
    assert res.code == 0, res.err
    assert "patches:" not in res.out
    assert "warning: axis 1 of input 'ids' became static (32; requested 16..32)" in res.out
    res = cli("export", "--factory", "third_party_models:performer_causal_lm", "--input", inputs[0], "--shapes",
              shapes[0], "--out", tmp_path / "p.onnx", "-q")
    assert res.code == 0, res.err
    assert "patches: performer-pytorch causal_linear_attention_noncuda -> cumsum form" in res.out
    assert "became static" not in res.out


def test_narrowed_range_cli_exit_2(cli, tmp_path):
    res = cli("export", "--factory", "test_patches:_BranchOn64", "--input", "x:1x100x8:float32", "--shapes",
              "x:min=1x16x8,opt=1x100x8,max=2x512x8", "--out", tmp_path / "m.onnx", "-q")
    assert res.code == 2
    assert "serves only 65..512" in error_line(res)
