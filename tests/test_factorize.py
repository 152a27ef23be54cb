"""lrexport factorize: SVD-initialized low-rank pairs, rank rules, skips, and a model build accepts."""

from __future__ import annotations

import copy
import json
import re

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


class _Bottlenecks(nn.Module):
    """fc1 is an existing low-rank pair (Linear(128, 32) -> Linear(32, 512), called from a custom module);
    fc2 is a bottleneck with a ReLU between its layers (two dense layers, not a pair); head is dense."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.ModuleDict({"down": nn.Linear(128, 32), "up": nn.Linear(32, 512)})
        self.fc2 = nn.Sequential(nn.Linear(512, 32), nn.ReLU(), nn.Linear(32, 128))
        self.head = nn.Linear(128, 128)
        self.head.weight.data = _low_rank_weight(128, 128, 8)

    def forward(self, x):
        return self.head(self.fc2(self.fc1["up"](self.fc1["down"](x))))


@pytest.mark.parametrize("with_inputs", [True, False])  # forward hooks / fx trace
def test_existing_pairs_are_skipped(with_inputs):
    model, x = _Bottlenecks(), torch.randn(2, 5, 128)
    report = factorize(model, fraction=0.5, example_args=(x,) if with_inputs else None)
    by_name = {r.name: r for r in report.layers}
    assert by_name["fc1.down"].skipped == "skipped: already a low-rank pair with fc1.up (rank 32)"
    assert by_name["fc1.up"].skipped == "skipped: already a low-rank pair with fc1.down (rank 32)"
    assert isinstance(model.fc1["down"], nn.Linear) and isinstance(model.fc1["up"], nn.Linear)
    assert [n for n, r in by_name.items() if not r.skipped] == ["fc2.0", "fc2.2", "head"]
    assert by_name["head"].output_error_measured is with_inputs and by_name["head"].output_rel_error < 1e-5


def test_include_pairs_factorizes_them_and_warns():
    """The old behaviour on request: rank 12 of a rank-32 factor loses most of the output, and says so."""
    model, x = _Bottlenecks(), torch.randn(2, 5, 128)
    original = copy.deepcopy(model)
    report = factorize(model, fraction=0.5, example_args=(x,), include_pairs=True)
    by_name = {r.name: r for r in report.layers}
    assert by_name["fc1.down"].rank == 12 and by_name["fc1.down"].pair_with == "fc1.up"
    assert by_name["fc1.down"].output_rel_error > 0.3 and by_name["fc1.down"].output_error_measured
    report.set_output_error(output_error(original, model, [x]))
    assert report.output_rel_error > 0.1
    text = report.format_table()
    warnings = [ln for ln in text.splitlines() if ln.startswith("warning: ")]
    assert len(warnings) == 2, text
    # fc1.down/up, fc2.0/2 are random at about a third of their rank; head is exactly rank 8
    assert warnings[0].startswith("warning: 4 layer(s) with output error above 10% (measured on the example inputs): ")
    assert warnings[0].endswith(" and 1 more; raise the rank (--rank/--fraction/--energy) or --exclude them")
    assert warnings[1].startswith(f"warning: model output error {report.output_rel_error:.1%} on random inputs "
                                  "is above 10%")
    assert report.to_dict()["warnings"] == [w.removeprefix("warning: ") for w in warnings]


def test_no_warning_below_the_threshold():
    lin = nn.Sequential(nn.Linear(256, 512))
    lin[0].weight.data = _low_rank_weight(512, 256, 8)
    report = factorize(lin, rank=8, example_args=(torch.randn(3, 256),))
    assert report.warnings == [] and report.layers[0].output_rel_error < 1e-5
    report = factorize(nn.Sequential(nn.Linear(256, 512)), rank=8, warn_error=0.5)  # random weight: ~95% error
    assert len(report.warnings) == 1 and "(estimated from the weights)" in report.warnings[0]


def test_gpt2_conv1d_pairs_are_skipped():
    pytest.importorskip("transformers")
    from third_party_models import gpt2_conv1d_pairs

    model = gpt2_conv1d_pairs()
    report = factorize(model, fraction=0.5, example_args=(torch.randint(0, 100, (2, 16)),))
    assert len(report.layers) == 16 and all(r.kind == "Conv1D" for r in report.layers)
    assert all(r.skipped and r.skipped.startswith("skipped: already a low-rank pair") for r in report.layers)


def test_cli_factorize_skips_the_pairs_of_a_low_rank_model(cli, tmp_path):
    """causal_lm as built (every projection a rank-32 pair): only lm_head is dense, and the random lm_head
    at half the break-even rank is far off, which two warning lines say."""
    res = cli("factorize", "--factory", "samples.models:causal_lm", "--input", "ids:2x64:int64:0..255",
              "--shapes", "ids:min=1x1,opt=2x64,max=2x256", "--fraction", "0.5", "--out", tmp_path / "low.pt2", "-q")
    assert res.code == 0, res.err
    rows = [ln for ln in res.out.splitlines() if ln.startswith("blocks.")]
    assert len(rows) == 24 and all("skipped: already a low-rank pair" in ln for ln in rows)
    assert re.search(r"^lm_head .* factorized$", res.out, re.M)
    warnings = [ln for ln in res.out.splitlines() if ln.startswith("warning: ")]
    assert len(warnings) == 2 and "lm_head" in warnings[0] and "model output error" in warnings[1], res.out
