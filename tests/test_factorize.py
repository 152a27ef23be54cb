"""lrexport factorize: SVD-initialized low-rank pairs, rank rules, skips, and a model build accepts."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from exporter.errors import LrexportError
from exporter.factorize import choose_rank, factorize, output_error


def _low_rank_weight(m: int, n: int, r: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g) / r**0.5


class Convs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(16, 64, 3, padding=1)
        self.c2 = nn.Conv2d(16, 64, 3, stride=2, padding=1, dilation=1)
        self.c3 = nn.Conv3d(8, 32, 3, padding=1)
        self.grouped = nn.Conv2d(64, 64, 3, groups=4, padding=1)

    def forward(self, a, b, c):
        return self.c1(a), self.grouped(self.c2(b)), self.c3(c)


def test_exact_low_rank_layers_are_reproduced():
    lin = nn.Sequential(nn.Linear(256, 512))
    lin[0].weight.data = _low_rank_weight(512, 256, 8)
    original = copy.deepcopy(lin)
    report = factorize(lin, rank=8)
    (layer,) = report.layers
    assert layer.rank == 8 and layer.weight_rel_error < 1e-5
    assert isinstance(lin[0], nn.Sequential) and lin[0][0].bias is None and lin[0][1].bias is not None
    assert layer.params_after == 8 * (256 + 512) + 512
    x = torch.randn(3, 256)
    assert output_error(original, lin, [x]) < 1e-5


def test_convolutions_keep_kernel_stride_padding_and_skip_grouped():
    model = Convs().eval()
    for conv, r in ((model.c1, 4), (model.c2, 4), (model.c3, 4)):
        conv.weight.data = _low_rank_weight(conv.out_channels, conv.weight[0].numel(), r).reshape(conv.weight.shape)
    original = copy.deepcopy(model)
    report = factorize(model, rank=4)
    by_name = {r.name: r for r in report.layers}
    assert by_name["grouped"].skipped.startswith("skipped: grouped conv")
    first, second = model.c2
    assert (first.kernel_size, first.stride, first.padding, first.out_channels) == ((3, 3), (2, 2), (1, 1), 4)
    assert second.kernel_size == (1, 1) and second.in_channels == 4
    args = [torch.randn(2, 16, 20), torch.randn(1, 16, 12, 12), torch.randn(1, 8, 6, 6, 6)]
    assert output_error(original, model, args) < 1e-5


def test_rank_rules():
    s = torch.tensor([10.0, 1.0, 0.1, 0.01])
    assert choose_rank(s, 100, 100, rank=3, fraction=None, energy=None) == 3
    assert choose_rank(s, 100, 100, rank=None, fraction=0.5, energy=None) == 25  # 0.5 * 100*100/200
    assert choose_rank(s, 100, 100, rank=None, fraction=None, energy=0.99) == 1
    assert choose_rank(s, 100, 100, rank=None, fraction=None, energy=0.99999) == 3


def test_layers_that_would_not_save_are_left_dense_and_said_so():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 1024))
    report = factorize(model, rank=40)
    assert report.layers[0].skipped and "saves nothing" in report.layers[0].skipped
    assert isinstance(model[0], nn.Linear) and isinstance(model[1], nn.Sequential)
    assert "saves nothing" in report.format_table()


def test_include_exclude_and_bad_rules():
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256))
    report = factorize(model, rank=16, exclude=["1"])
    assert [r.name for r in report.layers] == ["0"]
    with pytest.raises(LrexportError, match="exactly one rank rule"):
        factorize(model, rank=4, energy=0.9)
    with pytest.raises(LrexportError, match="no Linear"):
        factorize(nn.Sequential(nn.ReLU()), rank=4)
    with pytest.raises(LrexportError, match="outside"):
        factorize(model, energy=1.5)


def test_hugging_face_conv1d():
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    conv = pytorch_utils.Conv1D(384, 128)  # nf=384 outputs, nx=128 inputs: weight is (128, 384)
    conv.weight.data = _low_rank_weight(384, 128, 8).t().contiguous()
    model = nn.Sequential(conv)
    original = copy.deepcopy(model)
    report = factorize(model, rank=8)
    assert report.layers[0].kind == "Conv1D" and report.layers[0].shape == (384, 128)
    assert output_error(original, model, [torch.randn(2, 5, 128)]) < 1e-5


def test_cli_factorize_then_build(cli, tmp_path):
    out = tmp_path / "low.pt2"
    res = cli("factorize", "--factory", "samples.models:causal_lm", "--factory-kwargs", '{"rank": null}',
              "--input", "ids:2x64:int64:0..255", "--shapes", "ids:min=1x1,opt=2x64,max=2x256",
              "--fraction", "0.5", "--out", out, "--json", "-q")
    assert res.code == 0, res.err
    data = json.loads(res.out)
    assert data["params_after"] < 0.6 * data["params_before"]
    assert data["output_rel_error"] is not None and data["output_rel_error"] < 1.0
    assert all(layer["rank"] for layer in data["layers"] if not layer["skipped"])
    assert (tmp_path / "low.inputs.json").is_file()
    res = cli("build", out, "--out", tmp_path / "built", "--no-passes", "--backend", "onnxruntime",
              "--cases", "min,odd", "-q")
    assert res.code == 0, res.out + res.err
    assert cli("factorize", "--factory", "samples.models:causal_lm", "--input", "ids:2x64:int64:0..255",
               "--rank", "8", "--out", out).code != 0  # no clobbering
