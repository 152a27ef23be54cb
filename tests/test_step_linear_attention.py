"""Step models of models that call lrexport's linear-attention op (every rule) and of short causal convolutions:
``lrexport export-step`` carries each op's state and each convolution's window of recent inputs, and the step
model fed token by token and in chunks reproduces PyTorch's full-sequence outputs and the full model's states at
1, 63, 64, 65 and 130 tokens. A step model whose state output is a constant fails the check.

Real torch.export, real ONNX Runtime (both lowerings of the op), tiny models (hidden 16, 2 heads, head dim 8).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
import torch
from torch import nn

from exporter.export import export_onnx
from exporter.linear_attention import linear_attention
from exporter.recurrent import check_step_parity, export_step, run_stepwise
from exporter.specs import build_specs

D, H, DK = 16, 2, 8
INPUT = ["--input", f"x:2x65x{D}:float32", "--shapes", f"x:min=1x1x{D},opt=2x65x{D},max=2x160x{D}"]
FACTORY = "test_step_linear_attention:make_model"


class ShortConv(nn.Module):
    """Depthwise causal convolution over the sequence, written the two usual ways: ``padding=K-1`` then
    ``[..., :T]`` (Mamba, GatedDeltaNet, LFM2), or a left ``F.pad`` then an unpadded convolution."""

    def __init__(self, d: int, k: int, form: str):
        super().__init__()
        self.form, self.k = form, k
        self.conv = nn.Conv1d(d, d, k, groups=d, padding=k - 1 if form == "slice" else (k // 2 if form == "same"
                                                                                      else 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d)
        t = x.shape[1]
        y = x.transpose(1, 2)
        if self.form == "pad":
            y = self.conv(nn.functional.pad(y, (self.k - 1, 0)))
        else:
            y = self.conv(y)[..., :t]
        return y.transpose(1, 2)


class QuadraticCausal(nn.Module):
    """Causal linear attention written the short way: ``(phi(q) phi(k)^T).tril() @ v`` over the row sums."""

    def __init__(self):
        super().__init__()
        self.qkv, self.out = nn.Linear(D, 3 * H * DK), nn.Linear(H * DK, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, H, DK).permute(2, 0, 3, 1, 4)
        q, k = nn.functional.elu(q) + 1, nn.functional.elu(k) + 1
        a = (q @ k.transpose(-1, -2)).tril()
        y = (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)
        return self.out(y.transpose(1, 2).reshape(b, t, H * DK))


def make_quadratic() -> nn.Module:
    torch.manual_seed(0)
    return QuadraticCausal().eval()


class TinyLinearAttention(nn.Module):
    """x -> [short conv -> silu] -> q, k, v (+ g, beta) -> lrexport linear attention -> out projection."""

    def __init__(self, rule: str, normalize: bool = False, decay: str | None = None, conv: str | None = None,
                 init: str | None = None, kernel: int = 4):
        super().__init__()
        self.rule, self.normalize, self.decay, self.init = rule, normalize, decay, init
        self.s0 = nn.Parameter(torch.randn(1, H, DK, DK) * 0.1) if init == "learned" else None
        self.conv = ShortConv(D, kernel, conv) if conv else None
        n_g = {None: 0, "head": H, "key": H * DK}[decay]
        n_beta = H if rule in ("delta", "gated_delta") else 0
        self.proj = nn.Linear(D, 3 * H * DK + n_g + n_beta)
        self.out = nn.Linear(H * DK, D)
        self.sizes = [H * DK] * 3 + [n_g, n_beta]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        if self.conv is not None:
            x = nn.functional.silu(self.conv(x))
        q, k, v, g, beta = torch.split(self.proj(x), self.sizes, dim=-1)
        q, k, v = (z.reshape(b, t, H, DK) for z in (q, k, v))
        kwargs = {}
        if self.rule in ("delta", "gated_delta"):
            k = nn.functional.normalize(k, dim=-1)
            kwargs["beta"] = torch.sigmoid(beta)
        elif self.normalize:
            q, k = nn.functional.elu(q) + 1, nn.functional.elu(k) + 1
        if self.decay == "head":
            kwargs["g"] = -nn.functional.softplus(g)
        elif self.decay == "key":
            kwargs["g"] = -nn.functional.softplus(g).reshape(b, t, H, DK)
        if self.init == "zeros":
            kwargs["initial_state"] = torch.zeros(b, H, DK, DK)
        elif self.s0 is not None:
            kwargs["initial_state"] = self.s0.expand(b, -1, -1, -1)
        out, _ = linear_attention(q, k, v, rule=self.rule, scale=DK ** -0.5, normalize=self.normalize,
                                  eps=1e-6 if self.normalize else 0.0, **kwargs)
        return self.out(out.reshape(b, t, H * DK))


def make_model(rule: str = "linear", normalize: bool = False, decay: str | None = None, conv: str | None = None,
               init: str | None = None, kernel: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return TinyLinearAttention(rule, normalize, decay, conv, init, kernel).eval()


CASES = {
    "linear": {"rule": "linear"},
    "linear-normalize": {"rule": "linear", "normalize": True},
    "gated-head": {"rule": "gated", "decay": "head"},
    "gated-key": {"rule": "gated", "decay": "key"},
    "delta": {"rule": "delta"},
    "gated_delta": {"rule": "gated_delta", "decay": "head"},
    "conv-gated_delta": {"rule": "gated_delta", "decay": "head", "conv": "slice"},
    "delta-zero-initial-state": {"rule": "delta", "init": "zeros"},  # zeros in the graph: the same as none
}


def _export_step(cli, tmp_path, kwargs, *extra):
    out = tmp_path / "step.onnx"
    res = cli("export-step", "--factory", FACTORY, "--factory-kwargs", json.dumps(kwargs), *INPUT, "--out", out,
              "--length", "100", "--chunk-max", "16", "--json", "-q", *extra)
    return res, out


@pytest.mark.parametrize("case", list(CASES))
def test_export_step_every_rule(cli, tmp_path, case):
    """Each rule (and a short conv in front of gated_delta) step-exports with parity PASS at every length,
    states compared too; the op's state is the step model's state, conv windows are states of their own."""
    res, out = _export_step(cli, tmp_path, CASES[case])
    assert res.code == 0, res.err
    data = json.loads(res.out)
    assert data["parity"]["ok"] is True
    runs = {(r["length"], r["chunk"]): {o["output"]: o for o in r["outputs"]}
            for r in data["parity"]["results"] + data["parity"]["runs"]}
    assert {n for n, _ in runs} == {1, 63, 64, 65, 100, 130} and {c for _, c in runs} == {1, 7, 16}
    states = data["step"]["states"]
    la = [s for s in states if s["kind"] == "linear-attention"]
    assert len(la) == 1
    dv = DK + (1 if CASES[case].get("normalize") else 0)
    assert la[0]["shape"] == ["batch", H, DK, dv] and la[0]["dtype"] == "float32"
    assert f"{CASES[case]['rule']} rule" in la[0]["role"]
    for s in states:  # every state is checked against the full model, token by token too
        comp = runs[(130, 1)][s["output"]]
        assert comp["max_abs"] < 1e-4 and comp["total"] > 0
    convs = [s for s in states if s["kind"] == "conv-window"]
    assert [s["shape"] for s in convs] == ([["batch", D, 3]] if "conv" in CASES[case] else [])
    step = onnx.load(str(out))
    assert not [n for n in step.graph.node if n.domain == "lrexport"]  # lowered


def test_export_step_onnxruntime_lowering(cli, tmp_path):
    """The onnxruntime lowering (com.microsoft.LinearAttention with its past/present state) serves the step
    model just as well, with a conv window in front."""
    res, out = _export_step(cli, tmp_path, CASES["conv-gated_delta"], "--linear-attention", "onnxruntime")
    assert res.code == 0, res.err
    assert json.loads(res.out)["parity"]["ok"] is True
    ops = {(n.domain, n.op_type) for n in onnx.load(str(out)).graph.node}
    assert ("com.microsoft", "LinearAttention") in ops


@pytest.mark.parametrize("form", ["slice", "pad"])
def test_conv_window_continues_any_chunk(tmp_path, form):
    """Either way of writing the causal conv: prefill in chunks shorter and longer than the window (2, then 5),
    then one token at a time from the returned states, equals PyTorch on the whole sequence."""
    model = make_model("gated_delta", decay="head", conv=form)
    specs = build_specs([f"x:2x20x{D}:float32"], [f"x:min=1x1x{D},opt=2x20x{D},max=2x160x{D}"])
    exported = export_onnx(model, specs, tmp_path / "full.onnx")
    step = export_step(exported.onnx_path, tmp_path / "step.onnx", specs=exported.specs)
    assert [s.role for s in step.states] == ["conv window of 3", "linear attention, gated_delta rule"]
    assert [s.kind for s in step.states] == ["conv-window", "linear-attention"]
    x = np.random.default_rng(1).standard_normal((2, 23, D)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    a = run_stepwise(step.onnx_path, {"x": x[:, :2]}, 2)
    b = run_stepwise(step.onnx_path, {"x": x[:, 2:12]}, 5, states={s.input: a[s.output] for s in step.states})
    c = run_stepwise(step, {"x": x[:, 12:]}, 1, states={s.input: b[s.output] for s in step.states})
    got = np.concatenate([a["output"], b["output"], c["output"]], axis=1)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-4)
    assert c["new_state_0"].shape == (2, D, 3)  # the conv's last 3 inputs (after no op: x itself)
    np.testing.assert_array_equal(c["new_state_0"], x[:, -3:].transpose(0, 2, 1))


def test_pointwise_conv_carries_nothing(tmp_path):
    """A kernel-1 convolution over the sequence reads no other position: no window, only the op's state."""
    model = make_model("gated_delta", decay="head", conv="slice", kernel=1)
    specs = build_specs([f"x:2x20x{D}:float32"], [f"x:min=1x1x{D},opt=2x20x{D},max=2x160x{D}"])
    exported = export_onnx(model, specs, tmp_path / "full.onnx")
    step = export_step(exported.onnx_path, tmp_path / "step.onnx", specs=exported.specs)
    assert [s.role for s in step.states] == ["linear attention, gated_delta rule"]
    check_step_parity(model, step.onnx_path, exported.specs, chunks=(1, 7), length=20).assert_ok()


def test_constant_state_fails(tmp_path):
    """A step model whose state output is a constant (the state writes lost, as when cache updates through
    aliasing export as zeros) fails step parity: the state is flagged and compared with the full model's."""
    model = make_model("gated_delta", decay="head")
    specs = build_specs([f"x:2x20x{D}:float32"], [f"x:min=1x1x{D},opt=2x20x{D},max=2x160x{D}"])
    exported = export_onnx(model, specs, tmp_path / "full.onnx")
    step = export_step(exported.onnx_path, tmp_path / "step.onnx", specs=exported.specs)
    good = check_step_parity(model, step.onnx_path, exported.specs, chunks=(1, 7), length=20,
                             full_model=exported.onnx_path)
    good.assert_ok()
    proto = onnx.load(str(step.onnx_path))
    (out,) = [o for o in proto.graph.output if o.name == "new_state_0"]
    shape = [2 if d.dim_param else d.dim_value for d in out.type.tensor_type.shape.dim]
    for node in proto.graph.node:  # the state output: now a constant of zeros, as an aliased cache write exports
        for i, name in enumerate(node.output):
            if name == "new_state_0":
                node.output[i] = "new_state_0_lost"
    proto.graph.node.append(onnx.helper.make_node("Constant", [], ["new_state_0"], name="lost_state",
                                                  value=onnx.numpy_helper.from_array(np.zeros(shape, np.float32))))
    bad = tmp_path / "bad.onnx"
    onnx.save(proto, str(bad))
    # one chunk for the whole sequence: the outputs alone cannot tell; the state can
    report = check_step_parity(model, bad, exported.specs, chunks=(20,), length=20, full_model=exported.onnx_path)
    assert not report.ok
    assert report.constant_states == ["new_state_0"]
    (comps,) = [c for _, c in report.results]
    by = {c.output: c for c in comps}
    assert by["output"].ok and not by["new_state_0"].ok
    text = report.format_table()
    assert "state new_state_0 is a constant of the step model" in text and "step parity: FAIL" in text
    # without the full model, the constant is still caught
    assert not check_step_parity(model, bad, exported.specs, chunks=(20,), length=20).ok


def test_anticausal_conv_refused(cli, tmp_path):
    """A 'same'-padded convolution reads later tokens: one error line, exit 2, nothing written."""
    out = tmp_path / "step.onnx"
    res = cli("export-step", "--factory", FACTORY, "--factory-kwargs",
              json.dumps({"rule": "gated_delta", "decay": "head", "conv": "same"}), *INPUT, "--out", out, "-q")
    assert res.code == 2
    lines = res.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot export a step model: node ")
    assert "(Conv) mixes positions along the sequence axis" in lines[0] and "later position" in lines[0]
    assert not out.exists()


def test_learned_initial_state_refused(cli, tmp_path):
    """An initial_state the model computes (a learned one) cannot take the earlier tokens' state: exit 2."""
    out = tmp_path / "step.onnx"
    res = cli("export-step", "--factory", FACTORY, "--factory-kwargs", json.dumps({"rule": "delta", "init": "learned"}),
              *INPUT, "--out", out, "-q")
    assert res.code == 2
    lines = res.err.strip().splitlines()
    assert len(lines) == 1 and "(LinearAttention) cannot carry the linear-attention state" in lines[0]
    assert "initial_state computed in the model" in lines[0] and not out.exists()


def test_conv_and_op_step_engine_builds_with_tensorrt_rtx(tmp_path):
    """The portable step model (conv window Concat/Slice, the op's Scan with a state input) parses and builds
    with TensorRT-RTX for chunks of 1..16 tokens."""
    pytest.importorskip("tensorrt_rtx")
    from exporter.recurrent import step_specs
    from exporter.trt_build import build_engine

    model = make_model("gated_delta", decay="head", conv="slice")
    specs = build_specs([f"x:2x20x{D}:float32"], [f"x:min=1x1x{D},opt=2x20x{D},max=2x160x{D}"])
    exported = export_onnx(model, specs, tmp_path / "full.onnx")
    step = export_step(exported.onnx_path, tmp_path / "step.onnx", specs=exported.specs, check=False)
    built = build_engine(step.onnx_path, tmp_path / "step.engine", specs=step_specs(step, (1, 2), (1, 16)),
                         precision="fp32", backend="tensorrt-rtx", force=True)
    assert {i["name"] for i in built.inputs} == {"x", "state_0", "state_1"} and built.engine_bytes > 0
    assert {o["name"] for o in built.outputs} == {"output", "new_state_0", "new_state_1"}


def test_two_layers_each_carry_their_states(tmp_path):
    """Two GatedDeltaNet-like layers: each layer's conv window and op state, in graph order, named by module."""
    torch.manual_seed(0)
    model = nn.Sequential(*(TinyLinearAttention("gated_delta", decay="key", conv="pad") for _ in range(2))).eval()
    specs = build_specs([f"x:2x20x{D}:float32"], [f"x:min=1x1x{D},opt=2x20x{D},max=2x160x{D}"])
    exported = export_onnx(model, specs, tmp_path / "full.onnx")
    step = export_step(exported.onnx_path, tmp_path / "step.onnx", specs=exported.specs)
    assert [s.role for s in step.states] == ["conv window of 3", "linear attention, gated_delta rule"] * 2
    assert step.layers == {"0.conv.conv": ["state_0"], "0": ["state_1"], "1.conv.conv": ["state_2"], "1": ["state_3"]}
    check_step_parity(model, step.onnx_path, exported.specs, chunks=(1, 7), length=40,
                      full_model=exported.onnx_path).assert_ok()


def test_engine_with_the_onnxruntime_lowering_refused(cli, tmp_path):
    """TensorRT cannot run com.microsoft.LinearAttention: the flag pair is refused up front, exit 2."""
    out = tmp_path / "step.onnx"
    res = cli("export-step", "--factory", FACTORY, *INPUT, "--out", out, "--engine", "--linear-attention",
              "onnxruntime", "-q")
    assert res.code == 2
    (line,) = res.err.strip().splitlines()
    assert line.startswith("error: --engine builds a TensorRT engine") and "--linear-attention portable" in line
    assert not out.exists()


def test_quadratic_causal_form_gets_a_step_model(cli, tmp_path):
    """The masked quadratic form (a seq x seq matrix, refused as it is) is the linear-attention op it equals
    (the quadratic-causal pass), whose state the step model carries: normalizer column included."""
    out = tmp_path / "step.onnx"
    res = cli("export-step", "--factory", "test_step_linear_attention:make_quadratic", *INPUT, "--out", out,
              "--length", "100", "--chunk-max", "16", "--json", "-q")
    assert res.code == 0, res.err
    data = json.loads(res.out)
    assert data["parity"]["ok"] is True
    (state,) = data["step"]["states"]
    assert state["kind"] == "linear-attention" and state["shape"] == ["batch", H, DK, DK + 1]
