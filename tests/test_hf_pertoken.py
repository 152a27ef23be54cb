"""transformers' per-token recurrences that are not rules of the linear-attention op (RWKV-4's WKV with its
running max, xLSTM's mLSTM whose stabilizer enters the denominator) are exported as one torch scan each (an
ONNX ``Scan`` over positions), checked here against transformers' own kernels; their builds from folders
(dynamic from 1 token, a Scan per layer, the graph not growing with the example): tests/test_hf_architectures.py."""

from __future__ import annotations

import functools
import json

import pytest
import torch

from exporter.patches.transformers.mlstm import mlstm_scan
from exporter.patches.transformers.rwkv import wkv_scan



@pytest.mark.parametrize("t", [1, 2, 17, 64, 130])
@pytest.mark.parametrize("with_state", [False, True])
def test_wkv_scan_matches_transformers_loop(t, with_state):
    """Keys up to 120 (exp overflows float32 past ~88: the running max must hold), and a carried state."""
    from transformers.models.rwkv.modeling_rwkv import rwkv_linear_attention_cpu

    g = torch.Generator().manual_seed(t)
    b, c = 2, 6
    decay, first = torch.randn(c, generator=g), torch.randn(c, generator=g)
    key = torch.randn(b, t, c, generator=g) * 3
    key[0, t // 2] += 120
    value = torch.randn(b, t, c, generator=g)
    state = None
    if with_state:
        state = [torch.randn(b, c, generator=g).abs(), torch.rand(b, c, generator=g) + 0.5,
                 torch.randn(b, c, generator=g)]
    want, want_s = rwkv_linear_attention_cpu(decay.double(), first.double(), key.double(), value.double(),
                                             state=None if state is None else [s.double() for s in state],
                                             return_state=True)
    got, got_s = wkv_scan(decay, first, key, value, state=state, return_state=True)
    assert torch.isfinite(got).all()
    assert (got.double() - want).abs().max() <= 2e-5 * want.abs().max()
    for s, w in zip(got_s, want_s):
        assert (s.double() - w).abs().max() <= 2e-5 * w.abs().max()
    assert wkv_scan(decay, first, key, value)[1] is None


@pytest.mark.parametrize("t", [1, 15, 16, 17, 63, 64, 65, 130])
@pytest.mark.parametrize("size", [16, 64])
def test_mlstm_scan_matches_transformers_kernels(t, size):
    """transformers' inference path (whole chunks, then a per-token remainder; the step kernel at T = 1), in
    float64, with input gates up to 100 (exp(i) overflows float32: the stabilizer must hold) and an initial
    state."""
    from transformers.models.xlstm import modeling_xlstm as mx

    g = torch.Generator().manual_seed(t)
    b, nh, dk, dv = 2, 2, 8, 4
    q, k = torch.randn(b, nh, t, dk, generator=g), torch.randn(b, nh, t, dk, generator=g)
    v = torch.randn(b, nh, t, dv, generator=g)
    i, f = torch.randn(b, nh, t, generator=g) * 3, torch.randn(b, nh, t, generator=g) * 3 + 2
    i[1, 0, t // 3] += 100
    c0, n0, m0 = torch.randn(b, nh, dk, dv, generator=g), torch.randn(b, nh, dk, generator=g), \
        torch.randn(b, nh, 1, generator=g)
    ref = functools.partial(
        mx.wrap_chunkwise_arbitrary_sequence_length, mlstm_chunkwise_kernel=mx.mlstm_chunkwise_native_autograd,
        mlstm_sequence_kernel=functools.partial(mx.mlstm_recurrent_sequence_native, dtype_state=torch.float64),
        mlstm_step_kernel=functools.partial(mx.mlstm_recurrent_step_native, dtype_state=torch.float64),
        chunk_size=size, eps=1e-6, return_last_states=True)
    for init in [(None, None, None), (c0, n0, m0)]:
        want, want_s = ref(query=q.double(), key=k.double(), value=v.double(), igate=i.double(),
                           fgate=f.double(), **dict(zip(("c_initial", "n_initial", "m_initial"),
                                                        [x if x is None else x.double() for x in init])))
        got, got_s = mlstm_scan(q, k, v, i, f, *init, chunk_size=size)
        assert got.shape == want.shape and torch.isfinite(got).all()
        assert (got.double() - want).abs().max() <= 2e-5 * want.abs().max()
        for s, w in zip(got_s, want_s):
            assert (s.double() - w).abs().max() <= 2e-5 * w.abs().max() + 1e-30


class _UpcastsToFloat32(torch.nn.Module):
    """What transformers' layers do for precision: ``.float()``, ``.to(torch.float32)``, ``softmax(...,
    dtype=torch.float)``, a buffer made with the default dtype, ``torch.zeros(..., dtype=torch.float32)``."""

    def forward(self, x):
        probs = torch.softmax(x.float() * 3.3, dim=-1, dtype=torch.float)
        acc = torch.zeros(x.shape[-1]) + torch.zeros(x.shape, dtype=torch.float32)
        return (probs + x.to(torch.float32) / 7 + acc).to(x.dtype)


def test_float64_reference_keeps_float64_through_the_models_float32_casts():
    """Before: the float64 copy ran those casts in float32, 1e-8 from the float64 function (a tiny
    Qwen3.5-MoE's logits: 7.8e-4, more than its float32 export's 1.4e-4)."""
    import numpy as np

    from exporter.runners import TorchRunner

    x = np.random.default_rng(0).standard_normal((3, 9))
    runner = TorchRunner(_UpcastsToFloat32(), ["y"], ["x"])
    got = runner.run({"x": x.astype(np.float32)})["y"]
    assert runner.precision == "float64" and got.dtype == np.float64
    xd = x.astype(np.float32).astype(np.float64)
    e = np.exp(3.3 * xd - (3.3 * xd).max(-1, keepdims=True))
    want = e / e.sum(-1, keepdims=True) + xd / 7
    assert np.abs(got - want).max() < 1e-14
    assert torch.get_default_dtype() == torch.float32


def test_qwen3_5_moe_build_passes_parity_against_a_float64_reference(cli, tmp_path):
    """Before: the reference fell back to float32 (transformers' grouped_mm experts refuse float64), then,
    once float64, kept transformers' float32 upcasts (RMSNorms, the gated delta kernel, the router): parity
    failed on 1 to 6 of 66560 logits at 4 x 130 (max abs 1.6e-4 to 2.5e-4) at the fp32 tolerance."""
    from hf_tiny_models import SPECS

    inputs, shapes = SPECS["qwen3_5_moe_lm"]
    r = cli("build", "--factory", "hf_tiny_models:qwen3_5_moe_lm", "--input", inputs, "--shapes", shapes,
            "--out", str(tmp_path / "out"), "--json", "--backend", "onnxruntime")
    assert r.code == 0, r.err[-3000:]
    data = json.loads(r.out)
    assert data["parity"]["ok"] and data["parity"]["reference"] == "pytorch float64"
    assert {c["case"] for c in data["parity"]["results"]} == {"min", "opt", "max", "odd"}
