"""``lrexport build`` with parity on real third-party models (small configs, CPU, no downloads).

- linformer-pytorch: the Linformer as it is (sequence pinned at n, batch dynamic), its ``Padder``
  (any length 1..n) over E/F as Linear / Conv1d / fixed random with every sharing mode, and
  ``Padder(LinformerLM)`` over token ids;
- x-transformers: a decoder-only LM and an encoder-decoder with every nn.Linear replaced recursively
  by Linear(a, 64) -> Linear(64, b);
- transformers: a BertModel from a config, factorized by ``exporter.factorize`` (``lrexport factorize``);
- linear-attention-transformer and performer-pytorch: causal linear-attention LMs as their authors wrote them
  (bucketed sums with 3-operand einsums; a Python loop over chunks, exported through lrexport's patch).

Builders: tests/third_party_models.py. Each test runs the CLI in-process and reads its --json report.
"""

from __future__ import annotations

import json

import pytest

import third_party_models as tpm
from graph_passes.causal_chunked import OP_ACTION


def _build(cli, tmp_path, name: str, kwargs: dict | None = None, *extra: str) -> dict:
    inputs, shapes = tpm.SPECS[name.split(":")[0]]
    args = ["build", "--factory", f"third_party_models:{name}", "--out", tmp_path / "out", "--json", "-q"]
    if kwargs:
        args += ["--factory-kwargs", json.dumps(kwargs)]
    for i in inputs:
        args += ["--input", i]
    for s in shapes:
        args += ["--shapes", s]
    res = cli(*args, *extra)
    assert res.code == 0, res.out[-4000:] + res.err[-4000:]
    data = json.loads(res.out)
    assert data["ok"], json.dumps(data["parity"], indent=1)[:4000]
    return data


def _max_abs(data: dict) -> float:
    return max(o["max_abs"] for r in data["parity"]["results"] for o in r["outputs"])


def _cases(data: dict) -> dict[str, dict[str, list[int]]]:
    return {r["case"]: r["shapes"] for r in data["parity"]["results"]}


def _engine_built_if_backend(data: dict) -> None:
    """With a TensorRT backend installed the engine must have been built (it runs only on a GPU); without
    one the report must say that ONNX Runtime stood in for it, and why."""
    from exporter.errors import LrexportError
    from exporter.trt_backend import get_backend

    try:
        get_backend("auto")
    except LrexportError:
        assert data["engine"] is None
        assert any("ONNX Runtime (CPU) is the engine" in note for note in data["notes"]), data["notes"]
        return
    assert data["engine"] is not None and data["engine"]["engine_bytes"] > 0


# ----------------------------------------------------------------------------------------- linformer-pytorch


def test_linformer_fixed_length_pins_seq_keeps_batch(cli, tmp_path):
    pytest.importorskip("linformer_pytorch")
    data = _build(cli, tmp_path, "linformer_fixed")
    spec = data["export"]["inputs"][0]
    assert spec["dynamic_axes"] == [0] and spec["max"] == [4, 64, 64]
    assert _max_abs(data) < 1e-4
    _engine_built_if_backend(data)


@pytest.mark.parametrize("method,sharing", [
    ("learnable", "layerwise"),
    ("learnable", "none"),
    ("convolution", "kv"),
    ("no_params", "headwise"),
])
def test_linformer_padder_any_length(cli, tmp_path, method, sharing):
    """Padder pads inside the graph: seq stays dynamic 1..64 and parity holds below n (min=1, odd)."""
    pytest.importorskip("linformer_pytorch")
    data = _build(cli, tmp_path, "linformer_padder", {"method": method, "sharing": sharing})
    spec = data["export"]["inputs"][0]
    assert spec["dynamic_axes"] == [0, 1] and spec["min"][1] == 1 and not data["export"]["pinned_axes"]
    cases = _cases(data)
    assert cases["min"]["x"][1] == 1 and cases["odd"]["x"][1] < 64
    assert _max_abs(data) < 1e-4
    _engine_built_if_backend(data)


def test_linformer_lm_padder_token_ids(cli, tmp_path):
    pytest.importorskip("linformer_pytorch")
    data = _build(cli, tmp_path, "linformer_lm_padder")
    assert data["export"]["inputs"][0]["dynamic_axes"] == [0, 1]
    assert _max_abs(data) < 1e-4


# ----------------------------------------------------------------------------------------- x-transformers


def test_x_transformers_decoder_lowrank(cli, tmp_path):
    pytest.importorskip("x_transformers")
    model = tpm.x_decoder_lowrank()
    import torch.nn as nn

    assert not any(isinstance(m, nn.Linear) and m.in_features > 64 and m.out_features > 64
                   for m in model.modules())  # every Linear became a pair through width 64
    data = _build(cli, tmp_path, "x_decoder_lowrank")
    assert data["export"]["inputs"][0]["dynamic_axes"] == [0, 1]
    lowrank = next(p for p in data["passes"]["report"]["passes"] if p["name"] == "lowrank")
    assert lowrank["matches"] >= 2 * 4 + 1  # 4 pairs per layer at least, and the logits head
    assert _max_abs(data) < 1e-4
    _engine_built_if_backend(data)


def test_x_transformers_encoder_decoder_lowrank(cli, tmp_path):
    pytest.importorskip("x_transformers")
    data = _build(cli, tmp_path, "x_encdec_lowrank")
    src, tgt = data["export"]["inputs"]
    assert src["dynamic_axes"] == [0, 1] and tgt["dynamic_axes"] == [0, 1]
    cases = _cases(data)
    assert cases["odd"]["src"][1] != cases["odd"]["tgt"][1]  # independent sequence axes
    assert _max_abs(data) < 1e-4


# ----------------------------------------------------------------------------------------- transformers BERT


def test_bert_factorized(cli, tmp_path):
    pytest.importorskip("transformers")
    dense = tpm.bert_dense()
    model = tpm.bert_factorized()
    rep = model.factorize_report
    assert len([r for r in rep.layers if r.skipped is None]) == 13  # 6 per layer x 2 + pooler
    # fraction 0.5 of break-even m*n/(m+n): 64x64 -> 16, 256x64 / 64x256 -> 25
    assert {r.shape: r.rank for r in rep.layers} == {(64, 64): 16, (256, 64): 25, (64, 256): 25}
    n_dense = sum(p.numel() for p in dense.parameters())
    n_fact = sum(p.numel() for p in model.parameters())
    assert n_dense - n_fact == rep.params_before - rep.params_after > 0
    data = _build(cli, tmp_path, "bert_factorized")
    assert data["model"]["parameters"] == n_fact
    lowrank = next(p for p in data["passes"]["report"]["passes"] if p["name"] == "lowrank")
    assert lowrank["matches"] == 13  # every factorized pair recognized (and kept: all below break-even)
    assert _max_abs(data) < 1e-4
    _engine_built_if_backend(data)


# ------------------------------------------------------------------------ third-party causal linear attention


def _pass(data: dict, name: str) -> dict:
    return next(p for p in data["passes"]["report"]["passes"] if p["name"] == name)


@pytest.mark.parametrize("name, bucket", [("lat_causal_lm", 1), ("lat_bucketed_lm", 4)], ids=["plain", "bucketed-4"])
def test_linear_attention_transformer_causal_lm_chunked(cli, tmp_path, name, bucket):
    """linear-attention-transformer's causal LM as its author wrote it (per-bucket sums 'bhund,bhune->bhude',
    CumSum over buckets, 3-operand einsum with the normalizer's reciprocal; with B > 1 the sums shifted by one
    bucket with F.pad + slice): the causal-chunk pass rewrites the numerator and the normalizer of both layers
    (B = 1: the linear-attention op; B > 1: chunks a multiple of B), the sequence stays dynamic (a multiple of B) and parity holds at min/opt/max/odd."""
    pytest.importorskip("linear_attention_transformer")
    data = _build(cli, tmp_path, name)
    spec = data["export"]["inputs"][0]
    assert spec["dynamic_axes"] == [0, 1] and spec["multiple"] == [1, bucket] and not data["export"]["pinned_axes"]
    causal = _pass(data, "causal-chunk")
    if bucket == 1:  # a bucket of one position, inclusive: the per-position sum, as the linear-attention op
        ops = [d for d in causal["details"] if d["action"] == OP_ACTION]
        assert sorted(d["kind"] for d in ops) == ["causal-normalizer"] * 2 + ["causal-numerator"] * 2
        after = _pass(data, "linear-attention")["largest_tensor_after"]  # sizes once the op is lowered
    else:
        chunked = [d for d in causal["details"] if d["action"] == "chunked"]
        assert sorted(d["kind"] for d in chunked) == ["causal-normalizer"] * 2 + ["causal-numerator"] * 2
        assert all(d["bucket"] == bucket and d["chunk"] % bucket == 0 for d in chunked)
        assert all(d.get("prefix") == "exclusive" for d in chunked)
        after = causal["largest_tensor_after"]
    assert not any(d["kind"] == "large-cumsum-left" for d in causal["details"])
    assert after < causal["largest_tensor_before"]
    odd = _cases(data)["odd"]["ids"][1]
    assert odd % bucket == 0 and odd % 64 != 0 and _cases(data)["min"]["ids"][1] == bucket
    assert _max_abs(data) < 1e-4


def test_performer_causal_lm_chunk_loop(cli, tmp_path):
    """performer-pytorch loops over chunks in Python; lrexport's export patch writes that loop as one running
    sum, so the sequence stays dynamic and the causal-chunk pass writes it as the linear-attention op (numerator and
    normalizer)."""
    pytest.importorskip("performer_pytorch")
    data = _build(cli, tmp_path, "performer_causal_lm")
    assert data["export"]["pinned_axes"] == []
    assert data["export"]["patches"] == ["performer-pytorch causal_linear_attention_noncuda -> cumsum form"]
    kinds = [d["kind"] for d in _pass(data, "causal-chunk")["details"] if d.get("action") == OP_ACTION]
    assert sorted(kinds) == ["causal-normalizer", "causal-numerator"]
    assert _max_abs(data) < 1e-4


def test_performer_causal_lm_chunk_loop_no_patches(cli, tmp_path):
    """With --no-patches torch.export unrolls the loop and pins the sequence: the build says so, with the
    reason, and the unrolled per-chunk sums with '...' einsums are lowered and stay in parity."""
    pytest.importorskip("performer_pytorch")
    data = _build(cli, tmp_path, "performer_causal_lm", None, "--no-patches")
    assert data["export"]["patches"] == []
    (pin,) = data["export"]["pinned_axes"]
    assert (pin["input"], pin["axis"], pin["size"]) == ("ids", 1, 32)
    assert any(w.startswith("axis 1 of input 'ids' became static (32; requested 16..32)")
               for w in data["export"]["warnings"])
    equations = {d.get("equation") for d in _pass(data, "einsum")["details"]}
    assert "...nde,...nd,...n->...ne" in equations
    assert _max_abs(data) < 1e-4
