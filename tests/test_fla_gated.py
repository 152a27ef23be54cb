"""fla's decaying linear-attention layers (GatedLinearAttention, HGRN2Attention, MultiScaleRetention,
SimpleGatedLinearAttention) and its LinearAttention on lrexport's linear-attention op
(exporter/patches/fla/gated.py, linear_attn.py, modules.py).

References are fla's own PyTorch code, never the op: each swapped op function against fla's ``naive``
recurrence at lengths on and off the chunk sizes (the op chunks by 16 with a per-key decay, fla by 64), with an
initial state, its final state, and a sequence run in two calls with the state carried; each whole patched
layer against the same layer running fla's naive functions (and ``rms_norm_ref`` / ``rotary_embedding_ref``).
Then ``lrexport build`` of each tiny layer with a dynamic sequence from 1: exit 0, parity at min/opt/max/odd,
one op node whatever the example length, no Loop, and the TensorRT-RTX engine built.
"""

from __future__ import annotations

import importlib.util
import json

import onnx
import pytest
import torch
from torch.nn import functional as F

import fla_gated_models as fgm
from conftest import error_line
from exporter.patches import applied, select_patches

pytest.importorskip("fla")

LENGTHS = (1, 15, 16, 17, 64, 65, 130)
B, H, K, V = 2, 2, 8, 12  # V != K: a state transposed by mistake cannot pass


def _close(got: torch.Tensor, ref: torch.Tensor, tol: float = 2e-5) -> None:
    err = (got.double() - ref.double()).abs().max().item()
    scale = max(1.0, ref.double().abs().max().item())
    assert err <= tol * scale, (err, scale)


def _qkv(t: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed + t)
    q, k = (torch.randn(B, t, H, K, generator=g) for _ in range(2))
    v = torch.randn(B, t, H, V, generator=g)
    return q, k, v, g


def _split(fn, t: int, q, k, v, g, h0, **kw):
    """``fn`` over the sequence in two calls, the first call's final state the second's initial state."""
    c = t // 2
    o1, h1 = fn(q[:, :c], k[:, :c], v[:, :c], *( [g[:, :c]] if g is not None else []), initial_state=h0,
                output_final_state=True, **kw)
    o2, h2 = fn(q[:, c:], k[:, c:], v[:, c:], *( [g[:, c:]] if g is not None else []), initial_state=h1,
                output_final_state=True, **kw)
    return torch.cat([o1, o2], dim=1), h2


# ------------------------------------------------------------------------------------------ op functions


@pytest.mark.parametrize("name", ["chunk_gla", "fused_recurrent_gla"])
@pytest.mark.parametrize("state_v_first", [False, True])
def test_gla_ops_equal_fla_naive(name, state_v_first):
    from fla.ops.gla.naive import naive_recurrent_gla

    from exporter.patches.fla import gated

    fn = getattr(gated, name)
    for t in LENGTHS:
        q, k, v, gen = _qkv(t)
        gk = F.logsigmoid(torch.randn(B, t, H, K, generator=gen)) / 4
        h0 = torch.randn(B, H, K, V, generator=gen)
        ref, ref_h = naive_recurrent_gla(q, k, v, gk, initial_state=h0, output_final_state=True)
        lay = (lambda h: h.transpose(-1, -2)) if state_v_first else (lambda h: h)
        got, got_h = fn(q, k, v, gk, initial_state=lay(h0), output_final_state=True, state_v_first=state_v_first)
        _close(got, ref)
        _close(lay(got_h), ref_h)
        assert fn(q, k, v, gk)[1] is None
        if t > 1:
            got, got_h = _split(fn, t, q, k, v, gk, lay(h0), state_v_first=state_v_first)
            _close(got, ref)
            _close(lay(got_h), ref_h)


@pytest.mark.parametrize("name", ["chunk_simple_gla", "fused_recurrent_simple_gla", "fused_chunk_simple_gla"])
def test_simple_gla_ops_equal_fla_naive(name):
    from fla.ops.simple_gla.naive import naive_recurrent_simple_gla

    from exporter.patches.fla import gated

    fn = getattr(gated, name)
    for t in LENGTHS:
        q, k, v, gen = _qkv(t, seed=1)
        g = F.logsigmoid(torch.randn(B, t, H, generator=gen))
        h0 = torch.randn(B, H, K, V, generator=gen)
        ref, ref_h = naive_recurrent_simple_gla(q, k, v, g, initial_state=h0, output_final_state=True)
        got, got_h = fn(q, k, v, g=g, initial_state=h0, output_final_state=True)
        _close(got, ref)
        _close(got_h, ref_h)
        gamma = -torch.rand(H, generator=gen)  # a fixed decay per head: the same as g constant in time
        ref, _ = naive_recurrent_simple_gla(q, k, v, gamma.expand(B, t, H), initial_state=h0)
        _close(fn(q, k, v, g_gamma=gamma, initial_state=h0)[0], ref)
        if t > 1:
            got, got_h = _split(lambda *a, **kw: fn(*a[:3], g=a[3], **kw), t, q, k, v, g, h0)
            ref, ref_h = naive_recurrent_simple_gla(q, k, v, g, initial_state=h0, output_final_state=True)
            _close(got, ref)
            _close(got_h, ref_h)


def test_retention_ops_equal_fla_naive():
    """fla's retention is simple GLA with decay log(1 - 2^(-5-h)) per head: against ``naive_retention`` (no
    state), and with an initial state against ``naive_recurrent_simple_gla`` at that decay."""
    from fla.ops.retention.naive import naive_retention
    from fla.ops.simple_gla.naive import naive_recurrent_simple_gla
    from fla.ops.simple_gla.naive import naive_parallel_simple_gla, naive_recurrent_simple_gla

    from exporter.patches.fla import gated

    recurrent = (gated.chunk_retention, gated.fused_chunk_retention, gated.fused_recurrent_retention)
    for t in LENGTHS:
        q, k, v, gen = _qkv(t, seed=2)
        ref = naive_retention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        for fn in recurrent:
            _close(fn(q, k, v)[0], ref)
        o, attn = gated.parallel_retention(q, k, v)
        _close(o, ref)
        assert attn is None
        gamma = (1 - 2.0 ** (-5.0 - torch.arange(H, dtype=torch.float))).log()
        _, ref_a = naive_parallel_simple_gla(q, k, v, gamma.expand(B, t, H))
        _close(gated.parallel_retention(q, k, v, output_attentions=True)[1], ref_a)
        h0 = torch.randn(B, H, K, V, generator=gen)
        ref, ref_h = naive_recurrent_simple_gla(q, k, v, gamma.expand(B, t, H), initial_state=h0,
                                                output_final_state=True)
        for fn in recurrent:
            got, got_h = fn(q, k, v, initial_state=h0, output_final_state=True)
            _close(got, ref)
            _close(got_h, ref_h)


@pytest.mark.parametrize("normalize", [False, True])
def test_linear_attn_ops_equal_fla_naive(normalize):
    """LinearAttention's ops on the op's ``linear`` rule (``normalize``: the Katharopoulos normalizer, its state
    fla's ``(kv, z)`` pair)."""
    from fla.ops.linear_attn.naive import naive_recurrent_linear_attn

    from exporter.patches.fla.linear_attn import fla_linear_attn

    for t in LENGTHS:
        q, k, v, gen = _qkv(t, seed=3)
        q, k = torch.sigmoid(q), torch.sigmoid(k)  # positive features: the normalizer stays away from 0
        kv0 = torch.randn(B, H, K, V, generator=gen)
        h0 = (kv0, torch.rand(B, 1, H, K, generator=gen)) if normalize else kv0
        ref, ref_h = naive_recurrent_linear_attn(q, k, v, initial_state=h0, output_final_state=True,
                                                 normalize=normalize)
        got, got_h = fla_linear_attn(q, k, v, initial_state=h0, output_final_state=True, normalize=normalize)
        _close(got, ref)
        for a, b in zip(got_h if normalize else [got_h], ref_h if normalize else [ref_h]):
            _close(a, b)
        ref, _ = naive_recurrent_linear_attn(q, k, v, normalize=normalize)
        _close(fla_linear_attn(q, k, v, normalize=normalize)[0], ref)


# ------------------------------------------------------------------------------------------ whole layers


def _on_fla_naive(monkeypatch, model: torch.nn.Module) -> None:
    """Run ``model``'s fla layers on fla's own PyTorch references instead of Triton."""
    import fla.layers.gla as gla_mod
    import fla.layers.hgrn2 as hgrn2_mod
    import fla.layers.linear_attn as la_mod
    import fla.layers.multiscale_retention as msr_mod
    import fla.layers.simple_gla as sgla_mod
    import fla.modules.rotary.ops as rotary_ops
    from fla.modules import FusedRMSNormGated, RMSNorm
    from fla.modules.activations import swish
    from fla.modules.norm.layernorm import rms_norm_ref
    from fla.modules.rotary.ops import rotary_embedding_ref
    from fla.ops.gla.naive import naive_recurrent_gla
    from fla.ops.linear_attn.naive import naive_recurrent_linear_attn
    from fla.ops.retention.naive import naive_retention
    from fla.ops.simple_gla.naive import naive_recurrent_simple_gla

    def gla(q, k, v, g=None, gk=None, initial_state=None, output_final_state=False, **_):
        return naive_recurrent_gla(q, k, v, g if g is not None else gk, initial_state, output_final_state)

    def retention(q, k, v, **_):
        return naive_retention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2), None

    def rotary(x, cos, sin, interleaved=False, inplace=False, seqlen_offsets=0, **_):
        t = x.shape[1]
        return rotary_embedding_ref(x, cos[seqlen_offsets:seqlen_offsets + t], sin[seqlen_offsets:seqlen_offsets + t],
                                    interleaved)

    for mod in (gla_mod, hgrn2_mod):
        for name in ("chunk_gla", "fused_chunk_gla", "fused_recurrent_gla"):
            monkeypatch.setattr(mod, name, gla)
    for name in ("chunk_simple_gla", "fused_recurrent_simple_gla"):
        monkeypatch.setattr(sgla_mod, name, lambda q, k, v, g, initial_state=None, output_final_state=False, **_:
                            naive_recurrent_simple_gla(q, k, v, g, initial_state=initial_state,
                                                       output_final_state=output_final_state))
    for name in ("chunk_retention", "fused_chunk_retention", "fused_recurrent_retention", "parallel_retention"):
        monkeypatch.setattr(msr_mod, name, retention)
    for name in ("chunk_linear_attn", "fused_chunk_linear_attn", "fused_recurrent_linear_attn"):
        monkeypatch.setattr(la_mod, name, lambda q, k, v, normalize=True, **_: naive_recurrent_linear_attn(
            q, k, v, normalize=normalize))
    monkeypatch.setattr(rotary_ops, "rotary_embedding", rotary)
    monkeypatch.setattr(hgrn2_mod, "swish", F.silu)
    monkeypatch.setattr(hgrn2_mod, "rms_norm_linear", lambda x, nw, nb, lw, lb, eps=1e-5, **_: F.linear(
        rms_norm_ref(x, nw, nb, eps=eps), lw, lb))
    for m in model.modules():
        if isinstance(m, FusedRMSNormGated):
            assert m.activation in ("swish", "silu")
            monkeypatch.setattr(m, "forward", lambda x, g, m=m, **_: rms_norm_ref(x, m.weight, m.bias, eps=m.eps)
                                * F.silu(g))
        elif isinstance(m, RMSNorm):
            monkeypatch.setattr(m, "forward", lambda x, m=m, **_: rms_norm_ref(x, m.weight, m.bias, eps=m.eps))
        for attr in ("feature_map_fn", "gate_fn"):
            if getattr(m, attr, None) is swish:
                monkeypatch.setattr(m, attr, F.silu)


@pytest.mark.parametrize("name", ["gla", "gla_gqa", "retention", "simple_gla", "hgrn2", "linear_attention"])
def test_patched_layer_equals_layer_on_fla_naive(monkeypatch, name):
    """Lengths on both sides of 64, where fla's layers switch from ``fused_recurrent`` to their ``mode``."""
    model = getattr(fgm, name)()
    xs = [torch.randn(2, t, fgm.HIDDEN, generator=torch.Generator().manual_seed(t)) for t in (1, 17, 64, 65, 130)]
    patches = select_patches(model)
    with torch.no_grad(), applied(model, patches):
        got = [model(x) for x in xs]
    assert "forward" not in vars(model.layer)  # every swap undone
    _on_fla_naive(monkeypatch, model)
    with torch.no_grad():
        for x, y in zip(xs, got):
            _close(y, model(x), 1e-5)


def test_rwkv7_refused_by_name_with_reason(cli, tmp_path):
    res = cli("build", "--factory", "fla_gated_models:rwkv7", "--input", "x:1x16x32:float32", "--out",
              tmp_path / "out", "-q")
    assert res.code == 2
    line = error_line(res)
    assert line.startswith("error: fla RWKV7Attention in module 'layer' has no export patch: its generalized delta "
                           "rule"), line
    assert "none of the linear-attention op's rules" in line
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ builds

SHAPES = "x:min=1x1x32,opt=2x64x32,max=4x300x32"


def _op_nodes(model: onnx.ModelProto) -> int:
    return sum(n.op_type == "LinearAttention" and n.domain == "lrexport" for n in model.graph.node)


@pytest.mark.parametrize("name", ["gla", "retention", "simple_gla", "hgrn2", "linear_attention"])
def test_build_dynamic_on_the_op(cli, tmp_path, name):
    out = tmp_path / "out"
    res = cli("build", "--factory", f"fla_gated_models:{name}", "--input", "x:2x64x32:float32", "--shapes", SHAPES,
              "--out", out, "--json", "-q")
    assert res.code == 0, res.out[-3000:] + res.err[-3000:]
    data = json.loads(res.out)
    assert data["ok"] and data["export"]["pinned_axes"] == []
    assert any(p.endswith("-> lrexport linear_attention op") for p in data["export"]["patches"])
    results = data["parity"]["results"]
    assert {r["case"] for r in results} == {"min", "opt", "max", "odd"} and all(r["ok"] for r in results)
    assert {r["case"]: next(iter(r["shapes"].values()))[1] for r in results}["max"] == 300
    exported, optimized = onnx.load(str(out / "exported.onnx")), onnx.load(str(out / "model.onnx"))
    assert _op_nodes(exported) == 1 and _op_nodes(optimized) == 0  # one op node, lowered by the default passes
    assert not [n for n in optimized.graph.node if n.op_type == "Loop"]
    # the graph does not grow with the example's length (no unrolled positions or chunks)
    res = cli("export", "--factory", f"fla_gated_models:{name}", "--input", "x:2x130x32:float32", "--shapes",
              SHAPES, "--out", tmp_path / "long.onnx", "-q")
    assert res.code == 0, res.err[-3000:]
    assert len(onnx.load(str(tmp_path / "long.onnx")).graph.node) == len(exported.graph.node)
    if importlib.util.find_spec("tensorrt_rtx") is not None:
        assert (out / "model.engine").stat().st_size > 0 and data["engine"]["backend"] == "tensorrt-rtx"
        # the engine's form: standard ops with no loop over chunks (a per-key decay's maps by doubling)
        assert data["passes"]["linear_attention"]["lowering"] == "loop-free"
        assert not {"Scan", "Loop"} & {n.op_type for n in optimized.graph.node}


def test_attention_mask_refused_by_name(cli, tmp_path):
    """A padding mask makes fla unpad the batch into varlen sequences, which the op cannot run: one line."""
    res = cli("build", "--factory", "fla_gated_models:gla_masked", "--input", "x:1x16x32:float32", "--out",
              tmp_path / "out", "-q")
    assert res.code == 2
    assert error_line(res).startswith("error: fla GatedLinearAttention is called with attention_mask: fla then "
                                      "unpads the batch"), res.err


@pytest.mark.parametrize("factory", ["fla_gated_models:gla", "test_fla_delta:gated_delta_net"])
def test_export_step_of_fla_layers(cli, tmp_path, factory):
    """fla's GLA (per-key decay) and GatedDeltaNet (short convs in front of the gated delta rule): the step
    model carries each recurrence's state and each conv's window; token by token and in chunks it matches the
    whole sequence in PyTorch, states included, at 1, 63, 64, 65 and 130 tokens."""
    res = cli("export-step", "--factory", factory, "--input", "x:1x16x32:float32", "--shapes",
              "x:min=1x1x32,opt=1x16x32,max=2x130x32", "--out", tmp_path / "step.onnx", "--json", "-q")
    assert res.code == 0, res.err[-3000:]
    data = json.loads(res.out)
    assert data["ok"] and data["parity"]["ok"], data["parity"]
    kinds = {s["kind"] for s in data["step"]["states"]}
    assert "linear-attention" in kinds, kinds
    if "delta" in factory:
        assert "conv-window" in kinds, kinds
    lengths = {r["length"] for r in data["parity"]["runs"]}
    assert {1, 63, 64, 65, 130} <= lengths, lengths
