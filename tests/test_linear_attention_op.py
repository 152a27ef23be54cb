"""``lrexport::linear_attention``: the eager chunked form against a float64 per-token recurrence (written
here, independently of the op) and against fla's / transformers' own torch references; torch.export
keeps it one node over ``Dim(T, 1..16384)``; torch.onnx writes one ``lrexport.LinearAttention`` node; the
ORT pass lowers it to ``com.microsoft.LinearAttention`` with the same outputs and states."""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from torch.export import Dim

from exporter.linear_attention import linear_attention
from exporter.linear_attention.chunked import DEFAULT_CHUNK
from exporter.linear_attention.onnx_export import TRANSLATION_TABLE
from exporter.linear_attention.op import KEY_DECAY_CHUNK
from graph_passes.linear_attention_ort import LinearAttentionOrtPass
from graph_passes.linear_attention_portable import LinearAttentionPortablePass

DK, DV = 4, 3


def reference(q, k, v, g, beta, scale, s0, normalize=False, eps=0.0):
    """The recurrence token by token in float64 (the spec, not the chunked math).

    Heads: state heads Hs = max(Hk, Hv); head i of a tensor with h heads serves heads [i*n/h, (i+1)*n/h).
    """
    q, k, v = q.double(), k.double(), v.double()
    b, t, hq = q.shape[:3]
    hs = max(k.shape[2], v.shape[2])
    h = max(hq, hs)
    if normalize:
        v = torch.cat([v, torch.ones_like(v[..., :1])], -1)
    k = k[:, :, [i * k.shape[2] // hs for i in range(hs)]]
    v = v[:, :, [i * v.shape[2] // hs for i in range(hs)]]
    q = q[:, :, [i * hq // h for i in range(h)]]
    state_of = [i * hs // h for i in range(h)]
    S = torch.zeros(b, hs, q.shape[3], v.shape[-1], dtype=torch.float64) if s0 is None else s0.double().clone()
    out = torch.zeros(b, t, h, v.shape[-1], dtype=torch.float64)
    for i in range(t):
        if g is not None:
            decay = g[:, i].double().exp()
            S = S * (decay[..., None] if g.dim() == 4 else decay[..., None, None])
        ki, vi = k[:, i], v[:, i]
        if beta is not None:
            vi = beta[:, i].double()[..., None] * (vi - torch.einsum("bhkv,bhk->bhv", S, ki))
        S = S + ki[..., :, None] * vi[..., None, :]
        out[:, i] = scale * torch.einsum("bhkv,bhk->bhv", S[:, state_of], q[:, i])
    if normalize:
        out = out[..., :-1] / (out[..., -1:] + eps)
    return out, S


# name: (rule, decay kind, (q heads, k heads, v heads), normalize)
CASES = {
    "linear": ("linear", None, (2, 2, 2), False),
    "linear-gqa": ("linear", None, (4, 2, 2), False),
    "linear-normalized": ("linear", None, (2, 2, 2), True),
    "gated-head": ("gated", "head", (2, 2, 2), False),
    "gated-key": ("gated", "key", (2, 2, 2), False),
    "gated-head-gqa": ("gated", "head", (4, 2, 2), False),
    "gated-head-more-v-heads": ("gated", "head", (2, 2, 4), False),
    "delta": ("delta", None, (2, 2, 2), False),
    "delta-fewer-v-heads": ("delta", None, (4, 4, 2), False),
    "gated_delta-head": ("gated_delta", "head", (2, 2, 2), False),
    "gated_delta-key": ("gated_delta", "key", (2, 2, 2), False),
    "gated_delta-more-v-heads": ("gated_delta", "head", (2, 2, 4), False),  # Qwen3-Next: Hv > Hq = Hk
    "gated_delta-gqa": ("gated_delta", "head", (4, 2, 2), False),
}


def make_inputs(case: str, t: int, seed: int = 0, with_state: bool = True, batch: int = 2):
    rule, decay, (hq, hk, hv), normalize = CASES[case]
    gen = torch.Generator().manual_seed(seed * 1000 + t)
    hs = max(hk, hv)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen)

    q, k, v = rnd(batch, t, hq, DK), rnd(batch, t, hk, DK), rnd(batch, t, hv, DV)
    if normalize:  # a positive feature map, as the normalizer assumes
        q, k = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
    if rule in ("delta", "gated_delta"):
        k = torch.nn.functional.normalize(k, dim=-1)
    g = None
    if decay is not None:
        g = torch.nn.functional.logsigmoid(rnd(batch, t, hs, DK) if decay == "key" else rnd(batch, t, hs) + 2)
    beta = torch.rand(batch, t, hs, generator=gen) if rule in ("delta", "gated_delta") else None
    s0 = rnd(batch, hs, DK, DV + normalize).abs() if with_state else None
    kwargs = {"rule": rule, "scale": 0.5, "normalize": normalize, "eps": 1e-6 if normalize else 0.0}
    return (q, k, v, g, beta, s0), kwargs


def call(args, kwargs):
    q, k, v, g, beta, s0 = args
    return linear_attention(q, k, v, g=g, beta=beta, initial_state=s0, **kwargs)


def rel_err(got: torch.Tensor | np.ndarray, want: torch.Tensor) -> float:
    got = torch.as_tensor(got).double()
    return float((got - want).abs().max() / max(1.0, float(want.abs().max())))


def lengths(case: str) -> list[int]:
    c = KEY_DECAY_CHUNK if CASES[case][1] == "key" else DEFAULT_CHUNK
    return [1, c - 1, c, c + 1, 2 * c + 2, 37]


@pytest.mark.parametrize("case", list(CASES))
def test_eager_matches_float64_recurrence(case):
    """Every rule and head layout, at lengths around the chunk: outputs and final state, from a state."""
    for t in lengths(case):
        args, kw = make_inputs(case, t, batch=1)
        out, state = call(args, kw)
        want_out, want_state = reference(*args[:5], kw["scale"], args[5], kw["normalize"], kw["eps"])
        assert out.shape == want_out.shape and out.dtype == torch.float32
        assert rel_err(out, want_out) < 2e-5, (case, t)
        assert rel_err(state, want_state) < 2e-5, (case, t)


def test_strong_decay_stays_finite():
    """Exponents are masked before exp: decays of e^-60 per token give no inf/NaN in any chunk."""
    args, kw = make_inputs("gated_delta-key", 2 * KEY_DECAY_CHUNK + 3, batch=1)
    q, k, v, g, beta, s0 = args
    g = torch.full_like(g, -60.0)
    g[..., ::2] = -1e-3
    out, state = call((q, k, v, g, beta, s0), kw)
    want_out, want_state = reference(q, k, v, g, beta, 0.5, s0)
    assert torch.isfinite(out).all() and torch.isfinite(state).all()
    assert rel_err(out, want_out) < 2e-5 and rel_err(state, want_state) < 2e-5


def test_bad_layout_is_refused():
    args, kw = make_inputs("delta", 5)
    q, k, v, g, beta, s0 = args
    with pytest.raises(ValueError, match="needs beta"):
        linear_attention(q, k, v, rule="delta", scale=0.5)
    with pytest.raises(ValueError, match="heads"):
        linear_attention(q[:, :, :1].expand(-1, -1, 3, -1), k, v, beta=beta, rule="delta", scale=0.5)


# ---- the libraries' own torch references (their conventions: layout, scale, where g enters) ----

def test_matches_fla_naive_references():
    from fla.ops.delta_rule.naive import delta_rule_recurrence
    from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule
    from fla.ops.gla.naive import naive_recurrent_gla
    from fla.ops.linear_attn.naive import naive_recurrent_linear_attn
    from fla.ops.simple_gla.naive import naive_recurrent_simple_gla

    scale = DK ** -0.5
    t = DEFAULT_CHUNK + 5
    for case, fla_fn in (("gated_delta-head", "gdn"), ("gated-key", "gla"), ("gated-head", "simple_gla"),
                         ("delta", "delta"), ("linear-normalized", "linear")):
        (q, k, v, g, beta, s0), kw = make_inputs(case, t, seed=3)
        kw = dict(kw, scale=scale, eps=1e-10 if kw["normalize"] else 0.0)
        out, state = call((q, k, v, g, beta, s0), kw)
        if fla_fn == "gdn":
            want, want_s = naive_recurrent_gated_delta_rule(q, k, v, beta, g, scale, s0, output_final_state=True)
        elif fla_fn == "gla":
            want, want_s = naive_recurrent_gla(q, k, v, g, initial_state=s0, output_final_state=True)
        elif fla_fn == "simple_gla":
            want, want_s = naive_recurrent_simple_gla(q, k, v, g, scale, initial_state=s0)
        elif fla_fn == "delta":  # (B, H, T, D) layout
            tr = lambda x: x.transpose(1, 2)  # noqa: E731
            want, want_s = delta_rule_recurrence(tr(q), tr(k), tr(v), tr(beta), initial_state=s0.clone())
            want = tr(want)
        else:  # normalized: fla keeps (S, z) apart; the op keeps z as the state's last column
            z0 = s0[..., -1].unsqueeze(1)  # (B, 1, H, K)
            want, (want_s, want_z) = naive_recurrent_linear_attn(
                q, k, v, scale, initial_state=(s0[..., :-1].clone(), z0), output_final_state=True, normalize=True)
            want_s = torch.cat([want_s, want_z[:, 0].unsqueeze(-1)], -1)
        assert rel_err(out, want.double()) < 2e-5, case
        assert rel_err(state, want_s.double()) < 2e-5, case


def test_matches_transformers_qwen3_next_recurrence():
    """transformers' torch fallback with its conventions: q/k l2-normalized in the kernel, scale dk^-0.5,
    more value heads than key heads (each q/k head serves consecutive value heads)."""
    from transformers.models.qwen3_next.modeling_qwen3_next import l2norm, torch_recurrent_gated_delta_rule

    # with fla installed, transformers dispatches this name to fla's Triton kernel: take its torch body
    torch_recurrent_gated_delta_rule = getattr(torch_recurrent_gated_delta_rule, "__wrapped__",
                                               torch_recurrent_gated_delta_rule)

    t = DEFAULT_CHUNK + 7
    torch.manual_seed(5)
    q2, k2, v2 = torch.randn(2, t, 2, DK), torch.randn(2, t, 2, DK), torch.randn(2, t, 4, DV)
    g2, beta2 = -torch.rand(2, t, 4) * 2, torch.rand(2, t, 4)
    s02 = torch.randn(2, 4, DK, DV)
    want, want_s = torch_recurrent_gated_delta_rule(q2, k2, v2, g2, beta2, initial_state=s02,
                                                    output_final_state=True, use_qk_l2norm_in_kernel=True)
    out, state = linear_attention(l2norm(q2), l2norm(k2), v2, g=g2, beta=beta2, initial_state=s02,
                                  rule="gated_delta", scale=DK ** -0.5)
    assert out.shape == want.shape == (2, t, 4, DV)
    assert rel_err(out, want.double()) < 2e-5
    assert rel_err(state, want_s.double()) < 2e-5


# ---- export and ONNX ----

class _Model(torch.nn.Module):
    def __init__(self, kwargs):
        super().__init__()
        self.kwargs = kwargs

    def forward(self, q, k, v, g, beta, s0):
        return linear_attention(q, k, v, g=g, beta=beta, initial_state=s0, **self.kwargs)


def _dynamic(args):
    t = Dim("T", min=1, max=16384)
    return tuple(None if a is None or i == 5 else {1: t} for i, a in enumerate(args))


def test_torch_export_keeps_one_node_without_guards():
    args, kw = make_inputs("gated_delta-key", 9)
    ep = torch.export.export(_Model(kw), args, dynamic_shapes=_dynamic(args))
    calls = [n for n in ep.graph.nodes if n.op == "call_function" and "getitem" not in str(n.target)]
    assert [str(n.target) for n in calls] == ["lrexport.linear_attention.default"]
    (sym_range,) = ep.range_constraints.values()
    assert (sym_range.lower, sym_range.upper) == (1, 16384)
    for t in (1, 16, 17, 100):  # the exported program serves every length in the range
        a, _ = make_inputs("gated_delta-key", t)
        got, want = ep.module()(*a), call(a, kw)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@functools.lru_cache(maxsize=None)
def _onnx_bytes(case: str, with_state: bool) -> bytes:
    args, kw = make_inputs(case, 9, with_state=with_state)
    prog = torch.onnx.export(_Model(kw).eval(), args, dynamic_shapes=_dynamic(args), dynamo=True,
                             custom_translation_table=TRANSLATION_TABLE, verbose=False)
    return prog.model_proto.SerializeToString()


def _onnx(case: str, with_state: bool = True):
    """A fresh copy of the case's exported model (each export is made once per session)."""
    return ir.from_proto(onnx.load_from_string(_onnx_bytes(case, with_state))), make_inputs(case, 1)[1]


def test_onnx_export_writes_one_custom_node():
    model, _ = _onnx("gated_delta-more-v-heads")
    nodes = list(model.graph)
    assert [(n.domain, n.op_type) for n in nodes] == [("lrexport", "LinearAttention")]
    attrs = {k: a.value for k, a in nodes[0].attributes.items()}
    assert attrs == {"rule": "gated_delta", "scale": 0.5, "decay": "head", "normalize": 0, "eps": 0.0,
                     "q_heads": 2, "k_heads": 2, "v_heads": 4}
    assert model.graph.inputs[0].shape[1] == model.graph.outputs[0].shape[1]  # T stays symbolic
    assert not isinstance(model.graph.inputs[0].shape[1], int)


ORT_CASES = ["linear", "linear-gqa", "linear-normalized", "gated-head", "gated-key", "gated-head-gqa", "delta",
             "delta-fewer-v-heads", "gated_delta-head", "gated_delta-key", "gated_delta-more-v-heads",
             "gated_delta-gqa"]


@pytest.mark.parametrize("case", ORT_CASES)
def test_ort_lowering_matches_eager_and_float64(case):
    with_state = case not in ("linear-gqa", "gated_delta-gqa")  # without initial_state: an input left out
    model, kw = _onnx(case, with_state)
    p = LinearAttentionOrtPass()
    p(model)
    assert p.matches == 1 and p.records[0].rewritten
    assert [n.op_type for n in model.graph if n.domain] == ["LinearAttention"]
    assert {n.domain for n in model.graph} <= {"", "com.microsoft"}
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    for t in (1, 63, 64, 65, 130):
        args, _ = make_inputs(case, t, seed=1, with_state=with_state)
        out, state = sess.run(None, dict(zip(names, [a.numpy() for a in args if a is not None])))
        eager_out, eager_state = call(args, kw)
        want_out, want_state = reference(*args[:5], kw["scale"], args[5], kw["normalize"], kw["eps"])
        assert rel_err(out, want_out) < 2e-5 and rel_err(state, want_state) < 2e-5, (case, t)
        assert rel_err(out, eager_out.double()) < 2e-5 and rel_err(state, eager_state.double()) < 2e-5


def test_ort_lowering_runs_half_inputs_in_float32():
    """ORT's CPU kernel is float32 only: half inputs are cast around it, the state stays float32."""
    args, kw = make_inputs("gated_delta-head", 9)
    half = tuple(a.half() if a is not None and i < 5 else a for i, a in enumerate(args))
    prog = torch.onnx.export(_Model(kw).eval(), half, dynamic_shapes=_dynamic(half), dynamo=True,
                             custom_translation_table=TRANSLATION_TABLE, verbose=False)
    model = ir.from_proto(prog.model_proto)
    LinearAttentionOrtPass()(model)
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    out, state = sess.run(None, {i.name: a.numpy() for i, a in zip(sess.get_inputs(), half)})
    assert out.dtype == np.float16 and state.dtype == np.float32
    want_out, want_state = reference(*half[:5], 0.5, half[5])
    assert rel_err(out, want_out) < 2e-3 and rel_err(state, want_state) < 1e-5


def test_readme_example_runs(tmp_path, monkeypatch):
    """The README's "Linear-attention rules" example, as written: the saved model runs on ORT."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "LinearAttentionOrtPass" in b]
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(block, scope)
    sess = ort.InferenceSession(str(tmp_path / "gated_delta.onnx"), providers=["CPUExecutionProvider"])
    args = [a[:, :1].numpy() if a.dim() > 2 else a for a in scope["args"]]  # T = 1: the range reaches 1
    (out,) = sess.run(None, {i.name: a for i, a in zip(sess.get_inputs(), args)})
    want, _ = reference(*[torch.from_numpy(a) for a in args], 0.25, None)
    assert rel_err(out, want) < 2e-5


PORTABLE_CASES = ["linear", "linear-gqa", "linear-normalized", "gated-head", "gated-head-gqa",
                  "gated-head-more-v-heads"]


def _assert_lowered_matches_float64(model, case: str, kw: dict, with_state: bool) -> None:
    """The lowered model in ONNX Runtime against the float64 recurrence at T = 1, 63, 64, 65, 130."""
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    for t in (1, 63, 64, 65, 130):
        args, _ = make_inputs(case, t, seed=2, with_state=with_state)
        out, state = sess.run(None, dict(zip(names, [a.numpy() for a in args if a is not None])))
        want_out, want_state = reference(*args[:5], kw["scale"], args[5], kw["normalize"], kw["eps"])
        assert rel_err(out, want_out) < 2e-5 and rel_err(state, want_state) < 2e-5, (case, t)


@pytest.mark.parametrize("case", PORTABLE_CASES)
def test_portable_lowering_matches_float64(case):
    """Standard ops only, loop-free, one CumSum axis, opset <= 25; any length from 1."""
    with_state = case != "linear-gqa"
    model, kw = _onnx(case, with_state)
    p = LinearAttentionPortablePass()
    p(model)
    assert p.matches == 1 and p.records[0].rewritten
    ops = [n.op_type for n in model.graph]
    assert all(n.domain == "" for n in model.graph) and model.opset_imports[""] <= 25
    assert not {"Loop", "Scan"} & set(ops) and ops.count("CumSum") <= 1
    _assert_lowered_matches_float64(model, case, kw, with_state)


@pytest.mark.parametrize("case", ["linear", "gated-head"])
def test_portable_lowering_sums_states_over_chunk_groups(case):
    """Chunks of 2: T = 130 is 65 chunks, 5 groups of the two-level inter-chunk sum (the last one padded),
    with an initial state carried across the groups."""
    from graph_passes._base import PassOptions

    model, kw = _onnx(case, True)
    LinearAttentionPortablePass(PassOptions(chunk_size=2))(model)
    assert not {"Loop", "Scan"} & {n.op_type for n in model.graph}
    _assert_lowered_matches_float64(model, case, kw, True)


def test_portable_lowering_leaves_a_chunk_that_is_not_a_power_of_two():
    """The delta rules' inverse is a product of log2(C) factors: a chunk of 12 is refused, with the reason."""
    from graph_passes._base import PassOptions

    model, _ = _onnx("gated_delta-head")
    p = LinearAttentionPortablePass(PassOptions(chunk_size=12))
    p(model)
    assert p.matches == 0 and "not a power of 2" in p.records[0].reason
    assert [n.op_type for n in model.graph] == ["LinearAttention"]


SCAN_CASES = ["gated-key", "delta", "delta-fewer-v-heads", "gated_delta-head", "gated_delta-key",
              "gated_delta-more-v-heads", "gated_delta-gqa"]


@pytest.mark.parametrize("case", SCAN_CASES)
def test_portable_scan_lowering_matches_float64(case):
    """Delta rules and per-key decay: standard ops, a Scan over chunks (no loop over positions), one
    CumSum axis, opset <= 25; any length from 1, with and without an initial state."""
    with_state = case != "gated_delta-gqa"
    model, kw = _onnx(case, with_state)
    p = LinearAttentionPortablePass()
    p(model)
    assert p.matches == 1 and p.records[0].rewritten
    ops = [n.op_type for n in model.graph]
    assert all(n.domain == "" for n in model.graph.all_nodes()) and model.opset_imports[""] <= 25
    assert ops.count("Scan") == 1 and "Loop" not in ops and ops.count("CumSum") <= 1
    _assert_lowered_matches_float64(model, case, kw, with_state)


def assert_strong_decay_stays_finite(model, kw: dict, t: int) -> None:
    """The lowered ``gated_delta-key`` model at ``t`` tokens with per-key decays of e^-60 per token beside
    slow ones (e^-1e-3): finite, and within 2e-5 of the float64 recurrence."""
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    (q, k, v, g, beta, s0), _ = make_inputs("gated_delta-key", t, seed=4)
    g = torch.full_like(g, -60.0)
    g[..., ::2] = -1e-3
    args = (q, k, v, g, beta, s0)
    out, state = sess.run(None, {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args)})
    want_out, want_state = reference(q, k, v, g, beta, kw["scale"], s0)
    assert np.isfinite(out).all() and np.isfinite(state).all()
    assert rel_err(out, want_out) < 2e-5 and rel_err(state, want_state) < 2e-5


def test_portable_scan_lowering_strong_decay_stays_finite():
    """Per-key decays of e^-60 per token: every exponent is masked or <= 0, so no inf/NaN reaches Exp."""
    model, kw = _onnx("gated_delta-key")
    LinearAttentionPortablePass()(model)
    assert_strong_decay_stays_finite(model, kw, 67)


@pytest.mark.parametrize("chunk", [1, 2, 8])
def test_portable_scan_lowering_smaller_chunks(chunk):
    """A chunk below the default (1: no pair inside a chunk but the diagonal; 2: one sub-chunk; 8: two)."""
    from graph_passes._base import PassOptions

    model, kw = _onnx("gated_delta-key")
    LinearAttentionPortablePass(PassOptions(chunk_size=chunk))(model)
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    for t in (1, 9, 20):
        args, _ = make_inputs("gated_delta-key", t, seed=5)
        out, state = sess.run(None, {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args)})
        want_out, want_state = reference(*args[:5], kw["scale"], args[5])
        assert rel_err(out, want_out) < 2e-5 and rel_err(state, want_state) < 2e-5, (chunk, t)
