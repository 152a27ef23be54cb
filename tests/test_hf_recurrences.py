"""transformers' per-token loops that are linear recurrences (Mamba-1's selective scan in Mamba, FalconMamba,
Jamba, Zamba; RecurrentGemma's RG-LRU) are exported as the linear-attention op, which matches transformers' own
loop. The models built whole from save_pretrained folders (sequence dynamic from 1, node count independent of
the example's length): tests/test_hf_architectures.py."""

from __future__ import annotations

import pytest
import torch

from exporter.patches.transformers.rg_lru import rnn_scan_op
from exporter.patches.transformers.selective_scan import selective_scan_op

SHAPES = ["--input", "ids:2x64:int64:0..127", "--shapes", "ids:min=1x1,opt=2x64,max=4x130"]


@pytest.mark.parametrize("t", [1, 15, 16, 17, 64, 65, 130])
def test_selective_scan_matches_transformers_loop(t):
    from transformers.models.mamba import modeling_mamba

    g = torch.Generator().manual_seed(t)
    b, di, n = 2, 6, 4
    u, dt, z = (torch.randn(b, di, t, generator=g) for _ in range(3))
    a = -2 * torch.rand(di, n, generator=g)
    bm, cm = torch.randn(b, n, t, generator=g), torch.randn(b, n, t, generator=g)
    d, bias = torch.randn(di, generator=g), torch.randn(di, generator=g)
    want_y, want_s = modeling_mamba.mamba_selective_scan(  # transformers' loop, in float64
        u.double(), dt.double(), a.double(), bm.double(), cm.double(), D=d.double(), z=z.double(),
        delta_bias=bias.double(), delta_softplus=True, return_last_state=True)
    y, s = selective_scan_op(u, dt, a, bm, cm, D=d, z=z, delta_bias=bias, delta_softplus=True,
                             return_last_state=True)
    assert y.shape == want_y.shape and s.shape == want_s.shape
    assert (y.double() - want_y).abs().max() <= 2e-5 * want_y.abs().max()
    assert (s.double() - want_s).abs().max() <= 2e-5 * want_s.abs().max()
    assert torch.equal(selective_scan_op(u, dt, a, bm, cm, D=d, z=z, delta_bias=bias, delta_softplus=True), y)


@pytest.mark.parametrize("t", [1, 2, 17, 64, 65, 130])
def test_rg_lru_scan_matches_transformers_loop(t):
    """Document starts (position id 0) inside the sequence too, and a carried initial state."""
    from transformers.models.recurrent_gemma.modeling_recurrent_gemma import RecurrentGemmaRglru

    g = torch.Generator().manual_seed(t)
    b, w = 2, 6
    x = torch.randn(b, t, w, generator=g)
    a = torch.exp(-8 * torch.rand(b, t, w, generator=g) * 0.7)
    pos = torch.arange(t).repeat(b, 1)
    pos[1, t // 2:] -= t // 2  # the second row starts a new document half-way
    reset = pos[:, :, None] == 0
    s0 = torch.randn(b, w, generator=g)
    want, want_s = RecurrentGemmaRglru._rnn_scan(None, x.double(), a.double(), reset, s0.double(),
                                                 acc_dtype=torch.float64)
    got, got_s = rnn_scan_op(None, x, a, reset, s0)
    assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()
    assert (got_s.double() - want_s).abs().max() <= 1e-5 * want_s.abs().max()


