"""fla's delta-rule layers (DeltaNet, GatedDeltaNet, KimiDeltaAttention) on lrexport's linear-attention op
(exporter/patches/fla/delta.py).

The reference is always fla's own PyTorch code, never lrexport's op: each patched Triton op against fla's
naive recurrence (``delta_rule_recurrence``, ``naive_recurrent_gated_delta_rule``, ``naive_recurrent_kda``,
with fla's ``naive_gdn_gate`` / ``naive_kda_gate`` / ``naive_kda_lowerbound_gate``) at lengths around its
chunk of 64 with an initial state; whole patched layers against the same layer running those naive functions,
``nn.Conv1d``'s own forward for its short convolutions and fla's ``rms_norm_ref`` for its norms. Then
``lrexport build`` of each layer: dynamic sequence from 1, parity PASS, no unrolling, an engine built.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from conftest import error_line

fla = pytest.importorskip("fla")

from fla.layers import DeltaNet, GatedDeltaNet, KimiDeltaAttention  # noqa: E402
from fla.modules import FusedRMSNormGated, RMSNorm, ShortConvolution  # noqa: E402
from fla.modules.norm.layernorm import rms_norm_ref  # noqa: E402
from fla.ops.delta_rule import chunk_delta_rule, fused_recurrent_delta_rule  # noqa: E402
from fla.ops.delta_rule.naive import delta_rule_recurrence  # noqa: E402
from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule  # noqa: E402
from fla.ops.gated_delta_rule.gate import naive_gdn_gate  # noqa: E402
from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule  # noqa: E402
from fla.ops.kda import chunk_kda, fused_recurrent_kda  # noqa: E402
from fla.ops.kda.gate import naive_kda_gate, naive_kda_lowerbound_gate  # noqa: E402
from fla.ops.kda.naive import naive_recurrent_kda  # noqa: E402

from exporter.patches import applied, select_patches  # noqa: E402
from exporter.patches.fla import delta  # noqa: E402

LENGTHS = (1, 15, 16, 17, 63, 64, 65, 130)  # fla's kernels chunk by 64 (16 inside); the op by 64 / 16
TOL = 2e-5  # fla's naive functions compute in float32


def _close(got: torch.Tensor, ref: torch.Tensor, what: str, tol: float = TOL) -> None:
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    err = (got.double() - ref.double()).abs().max().item()
    assert err <= tol, f"{what}: max abs {err:.3g} > {tol}"


def _kernel_l2(x: torch.Tensor) -> torch.Tensor:
    """The q/k normalization fla's kernels apply (``b_q / tl.sqrt(tl.sum(b_q * b_q) + 1e-6)``)."""
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)


# ------------------------------------------------------------------------------------ fla's naive references


def naive_delta(q, k, v, beta=None, scale=None, initial_state=None, output_final_state=False,
                use_qk_l2norm_in_kernel=False, **_):
    """fla's delta_rule_recurrence ([B, H, T, D] layout, scale K^-0.5) behind the ops' signature."""
    assert scale is None
    if use_qk_l2norm_in_kernel:
        q, k = _kernel_l2(q), _kernel_l2(k)
    beta = torch.ones_like(q[..., 0]) if beta is None else beta
    o, s = delta_rule_recurrence(*(t.transpose(1, 2) for t in (q, k, v, beta)), initial_state=initial_state,
                                 output_final_state=output_final_state)
    return o.transpose(1, 2), s


def _gate_beta(g, beta, use_gate_in_kernel, A_log, dt_bias, use_beta_sigmoid_in_kernel, allow_neg_eigval,
               gate):
    if use_gate_in_kernel:
        g = gate(g, A_log, dt_bias)
    if use_beta_sigmoid_in_kernel:
        beta = beta.sigmoid() * (2 if allow_neg_eigval else 1)
    return g, beta


def naive_gdn(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
              use_qk_l2norm_in_kernel=False, use_beta_sigmoid_in_kernel=False, allow_neg_eigval=False,
              state_v_first=False, use_gate_in_kernel=False, A_log=None, dt_bias=None, **_):
    """fla's naive_recurrent_gated_delta_rule (no GVA of its own: q/k heads repeated to the value heads)."""
    if use_qk_l2norm_in_kernel:
        q, k = _kernel_l2(q), _kernel_l2(k)
    g, beta = _gate_beta(g, beta, use_gate_in_kernel, A_log, dt_bias, use_beta_sigmoid_in_kernel,
                         allow_neg_eigval, naive_gdn_gate)
    rep = v.shape[2] // q.shape[2]
    q, k = q.repeat_interleave(rep, 2), k.repeat_interleave(rep, 2)
    h0 = initial_state.transpose(-1, -2) if initial_state is not None and state_v_first else initial_state
    o, s = naive_recurrent_gated_delta_rule(q, k, v, beta, g, scale, h0, output_final_state)
    return o, (s.transpose(-1, -2) if s is not None and state_v_first else s)


def naive_kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
              use_qk_l2norm_in_kernel=False, use_gate_in_kernel=False, use_beta_sigmoid_in_kernel=False,
              allow_neg_eigval=False, lower_bound=None, state_v_first=False, A_log=None, dt_bias=None, **_):
    if use_qk_l2norm_in_kernel:
        q, k = _kernel_l2(q), _kernel_l2(k)

    def gate(g, A_log, dt_bias):
        if lower_bound is None:
            return naive_kda_gate(g, A_log, dt_bias)
        return naive_kda_lowerbound_gate(g, A_log, dt_bias, lower_bound)

    g, beta = _gate_beta(g, beta, use_gate_in_kernel, A_log, dt_bias, use_beta_sigmoid_in_kernel,
                         allow_neg_eigval, gate)
    h0 = initial_state.transpose(-1, -2) if initial_state is not None and state_v_first else initial_state
    o, s = naive_recurrent_kda(q, k, v, g, beta, scale, h0, output_final_state)
    return o, (s.transpose(-1, -2) if s is not None and state_v_first else s)


# ------------------------------------------------------------------------------------------ the ops, alone


def _qkv(t, h=2, hv=2, dk=16, dv=16, seed=0):
    gen = torch.Generator().manual_seed(seed + t)
    q, k = (torch.randn(2, t, h, dk, generator=gen) for _ in range(2))
    v = torch.randn(2, t, hv, dv, generator=gen)
    h0 = torch.randn(2, hv, dk, dv, generator=gen) * 0.5
    return q, k, v, h0, gen


@pytest.mark.parametrize("op", [chunk_delta_rule, fused_recurrent_delta_rule], ids=lambda f: f.__name__)
def test_delta_rule_op_equals_fla_naive(op):
    form = delta.delta_rule_form(op)
    for t in LENGTHS:
        q, k, v, h0, gen = _qkv(t)
        k = F.normalize(k, dim=-1)
        beta = torch.rand(2, t, 2, generator=gen)
        for l2 in (False, True):
            ref_o, ref_s = naive_delta(q, k, v, beta, initial_state=h0, output_final_state=True,
                                       use_qk_l2norm_in_kernel=l2)
            o, s = form(q, k, v, beta, initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=l2)
            _close(o, ref_o, f"{op.__name__} T={t} l2={l2} out")
            _close(s, ref_s, f"{op.__name__} T={t} l2={l2} state")
            o2, none = form(q, k, v, beta, None, h0, False, l2)  # positional, in the signature's order
            assert none is None
            _close(o2, ref_o, f"{op.__name__} T={t} positional")


@pytest.mark.parametrize("op", [chunk_gated_delta_rule, fused_recurrent_gated_delta_rule], ids=lambda f: f.__name__)
def test_gated_delta_rule_op_equals_fla_naive(op):
    """GatedDeltaNet's call: raw gate and beta logits, l2 in the kernel, [V, K] state; also more value heads."""
    form = delta.gated_delta_rule_form(op)
    for t in LENGTHS:
        for hv in (2, 4):
            q, k, v, h0, gen = _qkv(t, hv=hv)
            a, b = torch.randn(2, t, hv, generator=gen), torch.randn(2, t, hv, generator=gen)
            A_log, dt_bias = torch.rand(hv).log(), torch.randn(hv) * 0.5
            kw = dict(use_qk_l2norm_in_kernel=True, use_beta_sigmoid_in_kernel=True, allow_neg_eigval=hv == 4,
                      state_v_first=True, use_gate_in_kernel=True, A_log=A_log, dt_bias=dt_bias)
            h0v = h0.transpose(-1, -2).contiguous()
            ref_o, ref_s = naive_gdn(q, k, v, a, b, initial_state=h0v, output_final_state=True, **kw)
            o, s = form(q=q, k=k, v=v, g=a, beta=b, initial_state=h0v, output_final_state=True, **kw)
            _close(o, ref_o, f"{op.__name__} T={t} HV={hv} out")
            _close(s, ref_s, f"{op.__name__} T={t} HV={hv} state")
        # the plain call: log decay and beta given, [K, V] state, scale given
        g = F.logsigmoid(torch.randn(2, t, 2, generator=gen))
        beta = torch.rand(2, t, 2, generator=gen)
        q, k, v, h0, gen = _qkv(t)
        k = F.normalize(k, dim=-1)
        ref_o, ref_s = naive_gdn(q, k, v, g, beta, scale=0.3, initial_state=h0, output_final_state=True)
        o, s = form(q, k, v, g=g, beta=beta, scale=0.3, initial_state=h0, output_final_state=True)
        _close(o, ref_o, f"{op.__name__} T={t} plain out")
        _close(s, ref_s, f"{op.__name__} T={t} plain state")


@pytest.mark.parametrize("op", [chunk_kda, fused_recurrent_kda], ids=lambda f: f.__name__)
@pytest.mark.parametrize("lower_bound", [None, -5.0])
def test_kda_op_equals_fla_naive(op, lower_bound):
    """KimiDeltaAttention's call: per-key raw gate (+ dt_bias [HV*K]), beta logits, l2, [V, K] state, GVA."""
    form = delta.kda_form(op)
    for t in LENGTHS:
        hv = 4 if t % 2 else 2
        q, k, v, h0, gen = _qkv(t, hv=hv)
        g = torch.randn(2, t, hv, 16, generator=gen)
        b = torch.randn(2, t, hv, generator=gen)
        A_log, dt_bias = torch.rand(hv).log(), torch.randn(hv * 16) * 0.5
        kw = dict(use_qk_l2norm_in_kernel=True, use_beta_sigmoid_in_kernel=True, state_v_first=True,
                  use_gate_in_kernel=True, A_log=A_log, dt_bias=dt_bias, lower_bound=lower_bound)
        h0v = h0.transpose(-1, -2).contiguous()
        ref_o, ref_s = naive_kda(q, k, v, g, b, initial_state=h0v, output_final_state=True, **kw)
        o, s = form(q=q, k=k, v=v, g=g, beta=b, initial_state=h0v, output_final_state=True, **kw)
        _close(o, ref_o, f"{op.__name__} T={t} HV={hv} out")
        _close(s, ref_s, f"{op.__name__} T={t} HV={hv} state")


def test_ops_refuse_what_the_op_cannot_run():
    q, k, v, _, gen = _qkv(8)
    beta = torch.rand(2, 8, 2)
    with pytest.raises(NotImplementedError, match="variable-length packing"):
        delta.delta_rule_form(chunk_delta_rule)(q, k, v, beta, cu_seqlens=torch.tensor([0, 3, 8]))
    with pytest.raises(NotImplementedError, match="per-value-dim decay gv"):
        delta.gated_delta_rule_form(fused_recurrent_gated_delta_rule)(q, k, v, gv=torch.zeros(2, 8, 2, 16),
                                                                       beta=beta)
    with pytest.raises(NotImplementedError, match="one beta per value dim"):
        delta.delta_rule_form(fused_recurrent_delta_rule)(q, k, v, torch.rand(2, 8, 2, 16))


# ------------------------------------------------------------------------------------ ShortConvolution


def _plain_conv(conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """ShortConvolution as the nn.Conv1d it is (padding W-1 both sides, the first T outputs) + its silu."""
    y = nn.Conv1d.forward(conv, x.transpose(1, 2))[..., : x.shape[1]].transpose(1, 2)
    return F.silu(y) if conv.activation in ("silu", "swish") else y


@pytest.mark.parametrize("bias,activation", [(False, "silu"), (True, None)])
def test_short_conv_equals_conv1d_whole_split_and_token_by_token(bias, activation):
    """The torch forward on the whole sequence equals nn.Conv1d; carried cache (output_final_state) in two
    pieces and one token at a time gives the same outputs, and the cache is the last W inputs."""
    torch.manual_seed(0)
    conv = ShortConvolution(hidden_size=24, kernel_size=4, bias=bias, activation=activation)
    if bias:
        nn.init.normal_(conv.bias)
    x = torch.randn(2, 37, 24)
    ref = _plain_conv(conv, x)
    with torch.no_grad(), applied(conv, select_patches(conv)):
        y, state = conv(x)
        assert state is None
        _close(y, ref, "whole", 1e-6)
        for cut in (1, 2, 3, 20):
            y1, c1 = conv(x[:, :cut], output_final_state=True)
            assert c1.shape == (2, 24, 4)
            _close(c1[..., -min(cut, 4):], x[:, max(0, cut - 4):cut].transpose(1, 2), f"cache after {cut}", 0)
            y2, _ = conv(x[:, cut:], cache=c1, output_final_state=True)
            _close(torch.cat([y1, y2], 1), ref, f"split at {cut}", 1e-6)
        cache, steps = None, []
        for t in range(x.shape[1]):
            yt, cache = conv(x[:, t:t + 1], cache=cache, output_final_state=True)
            steps.append(yt)
        _close(torch.cat(steps, 1), ref, "token by token", 1e-6)
        _close(cache, x[:, -4:].transpose(1, 2), "final cache", 0)
    assert "forward" not in conv.__dict__  # restored


# ------------------------------------------------------------------------------------------ whole layers


class Wrap(nn.Module):
    """A model holding one fla layer, returning a tensor (what lrexport builds)."""

    def __init__(self, layer: nn.Module, masked: bool = False):
        super().__init__()
        self.layer, self.masked = layer, masked

    def forward(self, x):
        if self.masked:
            return self.layer(x, attention_mask=torch.ones(x.shape[:2], dtype=torch.long))[0]
        return self.layer(x)[0]


def delta_net():
    torch.manual_seed(0)
    return Wrap(DeltaNet(hidden_size=32, num_heads=2, layer_idx=0)).eval()


def gated_delta_net():
    torch.manual_seed(0)
    return Wrap(GatedDeltaNet(hidden_size=32, head_dim=16, num_heads=2, num_v_heads=4, layer_idx=0)).eval()


def kimi_delta_attention():
    torch.manual_seed(0)
    return Wrap(KimiDeltaAttention(hidden_size=32, head_dim=16, num_heads=2, layer_idx=0)).eval()


def gated_delta_net_masked():
    torch.manual_seed(0)
    return Wrap(GatedDeltaNet(hidden_size=32, head_dim=16, num_heads=2), masked=True).eval()


LAYERS = {"DeltaNet": delta_net, "GatedDeltaNet": gated_delta_net, "KimiDeltaAttention": kimi_delta_attention}


def _variant(cls, **kw):
    def make():
        torch.manual_seed(1)
        return Wrap(cls(hidden_size=32, num_heads=2, layer_idx=0, **kw)).eval()
    return make


# the layers' other options (eager equality only): activations, norms, beta, gates, conv bias
VARIANTS = {
    "DeltaNet-elu-sum-gate-nobeta": _variant(DeltaNet, qk_activation="elu", qk_norm="sum", use_gate=True,
                                             use_beta=False, conv_bias=True),
    "DeltaNet-relu-negeig": _variant(DeltaNet, qk_activation="relu", allow_neg_eigval=True),
    "GatedDeltaNet-nogate-negeig-bias": _variant(GatedDeltaNet, head_dim=16, use_gate=False,
                                                   allow_neg_eigval=True, conv_bias=True),
    "GatedDeltaNet-sigmoid-gate": _variant(GatedDeltaNet, head_dim=16, output_gate_activation="sigmoid"),
    "KimiDeltaAttention-safe-gate": _variant(KimiDeltaAttention, head_dim=16, num_v_heads=4, safe_gate=True,
                                             lower_bound=-5.0, allow_neg_eigval=True),
}


def _randomize(model: nn.Module) -> None:
    """Norm weights away from their init value 1, so a wrong use of them shows."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (RMSNorm, FusedRMSNormGated)) and m.weight is not None:
                m.weight.uniform_(0.5, 1.5)


def _on_fla_naive(model: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    """The layer's Triton ops -> fla's naive functions; short convs -> nn.Conv1d; norms -> rms_norm_ref."""
    import fla.layers.delta_net as dn
    import fla.layers.gated_deltanet as gdn
    import fla.layers.kda as kda

    for mod, names, ref in ((dn, ("chunk_delta_rule", "fused_recurrent_delta_rule"), naive_delta),
                            (gdn, ("chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule"), naive_gdn),
                            (kda, ("chunk_kda", "fused_recurrent_kda"), naive_kda)):
        for name in names:
            monkeypatch.setattr(mod, name, ref)

    def conv_fn(x, weight, bias=None, activation=None, **_):
        y = F.conv1d(x.transpose(1, 2), weight.unsqueeze(1), bias, padding=weight.shape[1] - 1,
                     groups=weight.shape[0])[..., : x.shape[1]].transpose(1, 2)
        return (F.silu(y) if activation in ("silu", "swish") else y), None

    monkeypatch.setattr(gdn, "causal_conv1d", conv_fn)
    for m in model.modules():
        if isinstance(m, ShortConvolution):
            monkeypatch.setattr(m, "forward", lambda x, m=m, **_: (_plain_conv(m, x), None))
        elif isinstance(m, FusedRMSNormGated):
            act = torch.sigmoid if m.activation == "sigmoid" else F.silu
            monkeypatch.setattr(m, "forward", lambda x, g, m=m, act=act: (
                rms_norm_ref(x, m.weight, None, eps=m.eps, upcast=True) * act(g.float())).to(x.dtype))
        elif isinstance(m, RMSNorm):
            monkeypatch.setattr(m, "forward", lambda x, m=m: rms_norm_ref(x, m.weight, m.bias, eps=m.eps,
                                                                           upcast=True))


@pytest.mark.parametrize("name", list(LAYERS) + list(VARIANTS))
def test_patched_layer_equals_layer_on_fla_naive(name, monkeypatch):
    """Whole layer (projections, short convs, gates, norms) patched vs run on fla's naive functions, at
    every length (the layers switch to fused_recurrent at T <= 64); then decoding: the patched layer fed in
    two pieces through fla's Cache (recurrent and conv state carried) equals the whole sequence."""
    from fla.models.utils import Cache

    model = {**LAYERS, **VARIANTS}[name]()
    _randomize(model)
    lengths = LENGTHS if name in LAYERS else (1, 17, 65, 130)
    xs = {t: torch.randn(2, t, 32, generator=torch.Generator().manual_seed(t)) for t in lengths}
    patches = select_patches(model)
    assert {p.target for p in patches} >= {p.target for p in delta.PATCHES}
    with torch.no_grad(), applied(model, patches):
        got = {t: model(x) for t, x in xs.items()}
        layer = model.layer
        x = xs[130]
        for cut in (1, 64, 100):
            cache = Cache()
            first = layer(x[:, :cut], past_key_values=cache, use_cache=True)[0]
            second = layer(x[:, cut:], past_key_values=cache, use_cache=True)[0]
            _close(torch.cat([first, second], 1), got[130], f"{name} decoded from {cut}", 1e-5)
    assert "forward" not in model.layer.__dict__  # restored
    _on_fla_naive(model, monkeypatch)
    with torch.no_grad():
        for t, x in xs.items():
            _close(got[t], model(x), f"{name} T={t}")


def test_attention_mask_refused_by_name(cli, tmp_path):
    """fla unpads a masked batch into variable-length sequences: one error line naming the layer."""
    res = cli("build", "--factory", "test_fla_delta:gated_delta_net_masked", "--input", "x:2x8x32",
              "--out", tmp_path / "o")
    line = error_line(res)
    assert res.code == 2, res.err
    assert ("fla GatedDeltaNet in module 'layer' is called with attention_mask: fla then unpacks the batch into "
            "variable-length sequences (cu_seqlens), which lrexport's linear-attention op cannot run") in line, line
    assert "--input" not in line and not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------ lrexport build

SHAPES = "x:min=1x1x32,opt=2x64x32,max=4x300x32"


@pytest.mark.parametrize("name", list(LAYERS))
def test_build_delta_layer(name, cli, tmp_path):
    """``lrexport build`` with the sequence dynamic from 1: exit 0, parity PASS at min/opt/max/odd against
    the patched layer in float64, one linear-attention op per layer (node count the same at another example
    length: nothing unrolled), and a TensorRT-RTX engine built."""
    import onnx

    factory = {"DeltaNet": "delta_net", "GatedDeltaNet": "gated_delta_net",
               "KimiDeltaAttention": "kimi_delta_attention"}[name]
    res = cli("build", "--factory", f"test_fla_delta:{factory}", "--input", "x:2x64x32:float32", "--shapes", SHAPES,
              "--out", tmp_path / "o", "--json")
    assert res.code == 0, res.err
    report = json.loads(res.out)
    parity = report["parity"]
    assert parity["ok"] and parity["reference"] == "pytorch float64", parity
    assert sorted(r["case"] for r in parity["results"] if r["backend"] == "onnxruntime") == \
        ["max", "min", "odd", "opt"]
    assert any("delta-rule ops" in p for p in report["export"]["patches"]), report["export"]["patches"]
    exported = onnx.load(str(tmp_path / "o" / "exported.onnx"))
    ops = [n.op_type for n in exported.graph.node]
    assert ops.count("LinearAttention") == 1 and "Loop" not in ops and "Scan" not in ops
    seq = exported.graph.input[0].type.tensor_type.shape.dim[1]
    assert seq.dim_param and not seq.dim_value
    if _has_trt_rtx():
        assert report["engine"]["backend"].startswith("tensorrt-rtx"), report["engine"]
        assert (tmp_path / "o" / "model.engine").stat().st_size > 0
        # the engine's form: standard ops with no loop over chunks (the delta rule's maps by doubling)
        assert report["passes"]["linear_attention"]["lowering"] == "loop-free"
        assert not {"Scan", "Loop"} & {n.op_type for n in onnx.load(str(tmp_path / "o" / "model.onnx")).graph.node}
    model = globals()[factory]()
    nodes = []
    with applied(model, select_patches(model)):
        for t in (17, 130):  # below and above the layers' switch at 64 and fla's chunk
            t_dim = torch.export.Dim("T", min=1, max=300)
            ep = torch.export.export(model, (torch.randn(2, t, 32),), dynamic_shapes=({1: t_dim},))
            nodes.append(len(ep.graph.nodes))
    assert nodes[0] == nodes[1], nodes


def _has_trt_rtx() -> bool:
    try:
        import tensorrt_rtx  # noqa: F401
    except ImportError:
        return False
    return True
