"""The masked quadratic form of causal linear attention (``(phi(Q) phi(K)^T).tril() @ V``, with or without
the row-sum normalizer) is rewritten to one recurrence node and lowered: the T x T matrix is gone, and the
ONNX model agrees with the PyTorch module (float64) at lengths 1..300 with either lowering."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch.export import Dim
from torch.nn import functional as F

from graph_passes import run_passes
from graph_passes._base import PassOptions


def phi(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1


class Tril(torch.nn.Module):
    """(B, H, T, d): ``torch.tril`` of the scores."""

    def forward(self, q, k, v):
        return (phi(q) @ phi(k).transpose(-2, -1)).tril() @ v


class MaskedFill(torch.nn.Module):
    """einsum scores, ``masked_fill`` with a boolean tril mask built at the input's length."""

    def forward(self, q, k, v):
        t = q.shape[-2]
        mask = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
        s = torch.einsum("bhid,bhjd->bhij", phi(q), phi(k)).masked_fill(~mask, 0.0)
        return torch.einsum("bhij,bhjd->bhid", s, v)


class NormalizedBuffer(torch.nn.Module):
    """A registered max x max float mask sliced to T x T, multiplied in; divided by the masked row sums."""

    def __init__(self, max_len: int = 512):
        super().__init__()
        self.register_buffer("mask", torch.tril(torch.ones(max_len, max_len)))

    def forward(self, q, k, v):
        t = q.shape[-2]
        a = (phi(q) @ phi(k).transpose(-2, -1)) * self.mask[:t, :t]
        return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)


class Batched3d(torch.nn.Module):
    """(B*H, T, d) with ``torch.bmm``, as code that folds heads into the batch writes it."""

    def forward(self, q, k, v):
        a = torch.bmm(phi(q), phi(k).transpose(1, 2)).tril()
        return torch.bmm(a, v) / (a.sum(-1, keepdim=True) + 1e-6)


class StrictlyLower(torch.nn.Module):
    """``tril(-1)``: each position sees only earlier ones, which is not the inclusive running sum."""

    def forward(self, q, k, v):
        return (phi(q) @ phi(k).transpose(-2, -1)).tril(-1) @ v


class ScoresReturned(torch.nn.Module):
    """The masked matrix is an output too: it must stay materialized, so nothing is gained."""

    def forward(self, q, k, v):
        a = (phi(q) @ phi(k).transpose(-2, -1)).tril()
        return a @ v, a


FORMS = {"tril": Tril, "masked_fill": MaskedFill, "normalized_buffer": NormalizedBuffer, "bmm_3d": Batched3d}


def _inputs(model: torch.nn.Module, b: int, t: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    lead = (b * 2,) if isinstance(model, Batched3d) else (b, 2)
    return (torch.randn(*lead, t, 8, generator=g), torch.randn(*lead, t, 8, generator=g),
            torch.randn(*lead, t, 4, generator=g))


def _export(model: torch.nn.Module):
    seq = 1 if isinstance(model, Batched3d) else 2
    dims = {0: Dim("B", min=1, max=8), seq: Dim("T", min=1, max=512)}
    prog = torch.onnx.export(model.eval(), _inputs(model, 1, 10), dynamic_shapes=[dims] * 3, dynamo=True,
                             optimize=True, verbose=False)
    return prog.model_proto


def _run(proto, args):
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args)})


@pytest.fixture(scope="module", params=sorted(FORMS))
def exported(request):
    model = FORMS[request.param]().eval()
    return model, _export(model)


@pytest.mark.parametrize("lowering", ["portable", "onnxruntime"])
def test_quadratic_form_is_rewritten_and_matches_pytorch(exported, lowering):
    model, proto = exported
    out, report = run_passes(proto, options=PassOptions(linear_attention=lowering))
    quad = next(p for p in report.passes if p.name == "quadratic-causal")
    assert quad.changed and quad.matches == 1, quad.details
    ops = {(n.domain, n.op_type) for n in out.graph.node}
    assert ("", "Trilu") not in ops and not any(d == "lrexport" for d, _ in ops)
    assert (("com.microsoft", "LinearAttention") in ops) == (lowering == "onnxruntime")
    # the T x T matrix is gone: the largest intermediate shrinks (measured at the report's FLOPs shape)
    first, last = report.passes[0], report.passes[-1]
    assert last.largest_tensor_after < first.largest_tensor_before, (first.largest_tensor_before,
                                                                     last.largest_tensor_after)
    for b, t in [(1, 1), (2, 7), (1, 64), (3, 300)]:
        args = _inputs(model, b, t, seed=t)
        want = model.double()(*[a.double() for a in args]).detach().numpy()
        model.float()
        got = _run(out, args)[0]
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 2e-5 * max(1.0, np.abs(want).max()), (b, t)


@pytest.mark.parametrize("form, reason", [
    (StrictlyLower, "the mask keeps j <= i-1, not j <= i"),
    (ScoresReturned, "also read elsewhere"),
])
def test_other_masks_are_left_with_the_reason(form, reason):
    model = form().eval()
    out, report = run_passes(_export(model))
    quad = next(p for p in report.passes if p.name == "quadratic-causal")
    assert not quad.changed and quad.matches == 0
    assert any(reason in (d["reason"] or "") for d in quad.details), quad.details
    args = _inputs(model, 2, 33)
    want = model(*args)
    want = want[0] if isinstance(want, tuple) else want
    np.testing.assert_allclose(_run(out, args)[0], want.detach().numpy(), rtol=1e-4, atol=1e-4)


def test_build_of_the_quadratic_form(cli, tmp_path, monkeypatch):
    """``lrexport build`` on a model written in the quadratic form: rewritten, parity at min..max."""
    (tmp_path / "quadmodel.py").write_text(
        "import torch\n"
        "from torch.nn import functional as F\n"
        "class M(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__(); self.qkv = torch.nn.Linear(16, 48)\n"
        "    def forward(self, x):\n"
        "        b, t, _ = x.shape\n"
        "        q, k, v = self.qkv(x).view(b, t, 3, 2, 8).permute(2, 0, 3, 1, 4)\n"
        "        q, k = F.elu(q) + 1, F.elu(k) + 1\n"
        "        a = (q @ k.transpose(-2, -1)).tril()\n"
        "        o = (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)\n"
        "        return o.transpose(1, 2).reshape(b, t, 16)\n"
        "def make():\n"
        "    return M().eval()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    r = cli("build", "--factory", "quadmodel:make", "--input", "x:2x64x16:float32",
            "--shapes", "x:min=1x1x16,opt=2x64x16,max=4x300x16", "--out", str(tmp_path / "out"),
            "--backend", "onnxruntime", "--json")
    assert r.code == 0, r.err
    data = json.loads(r.out)
    quad = next(p for p in data["passes"]["report"]["passes"] if p["name"] == "quadratic-causal")
    assert quad["changed"] and quad["matches"] == 1
    assert data["parity"]["ok"] and {c["case"] for c in data["parity"]["results"]} >= {"min", "opt", "max", "odd"}
