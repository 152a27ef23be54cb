"""causal-chunk: the n x d x e CumSum of causal linear attention becomes one lrexport.LinearAttention node per
layer (numerator and normalizer; lowered by the linear-attention pass, which these tests run after it), or the
chunked form where the sum is per bucket or exclusive."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxscript.rewriter import rewrite

from graph_passes import PassOptions, collecting, run_passes
from graph_passes.causal_canon import CANONICAL_RULES
from graph_passes.causal_chunked import CAUSAL_RULES, OP_ACTION, plan_causal
from passes_helpers import cumsum_input_ranks, export_sample, feeds_for, make_model, max_err, op_count, run

SEQS = (1, 37, 64, 100, 200)


def _causal_reference(q, k, v):
    s = np.cumsum(np.einsum("bhnd,bhne->bhnde", k.astype(np.float64), v.astype(np.float64)), axis=2)
    return np.einsum("bhnd,bhnde->bhne", q.astype(np.float64), s)


def _causal_graph(outer: str = "einsum", cast: bool = False, state_first: bool = False,
                  eq_outer: str = "bhnd,bhne->bhnde", eq_out: str = "bhnd,bhnde->bhne", axis: int = 2,
                  exclusive: int = 0, state_output: bool = False, dtype=TensorProto.FLOAT,
                  contraction: str = "einsum", keepdims: int = 0, cast_before: bool = False) -> onnx.ModelProto:
    """q, k, v [b, h, n, d] -> causal linear-attention numerator, written in one of the exported forms."""
    dims = ["b", 4, "n", 8]
    inputs = [helper.make_tensor_value_info(nm, dtype, dims) for nm in ("q", "k", "v")]
    nodes = [helper.make_node("Constant", [], ["axis"], value=helper.make_tensor("a", TensorProto.INT64, [], [axis]))]
    if outer == "einsum":
        nodes.append(helper.make_node("Einsum", ["k", "v"], ["outer"], equation=eq_outer))
    else:
        nodes += [
            helper.make_node("Constant", [], ["ax_k"], value=helper.make_tensor("x", TensorProto.INT64, [1], [-1])),
            helper.make_node("Constant", [], ["ax_v"], value=helper.make_tensor("y", TensorProto.INT64, [1], [-2])),
            helper.make_node("Unsqueeze", ["k", "ax_k"], ["k5"]),
            helper.make_node("Unsqueeze", ["v", "ax_v"], ["v5"]),
        ]
        if outer == "mul":
            nodes.append(helper.make_node("Mul", ["v5", "k5"], ["outer"]))  # operands swapped on purpose
        else:
            nodes.append(helper.make_node("MatMul", ["k5", "v5"], ["outer"]))
    if cast_before:  # fp16 dynamo export: Einsum -> Cast(float32) -> CumSum -> Cast(float16)
        nodes.append(helper.make_node("Cast", ["outer"], ["outer32"], to=TensorProto.FLOAT))
    nodes.append(helper.make_node("CumSum", ["outer32" if cast_before else "outer", "axis"], ["state"],
                                  exclusive=exclusive))
    state = "state"
    if cast:
        nodes.append(helper.make_node("Cast", ["state"], ["state_c"], to=dtype))
        state = "state_c"
    if contraction == "einsum":
        ins = [state, "q"] if state_first else ["q", state]
        nodes.append(helper.make_node("Einsum", ins, ["y"], equation=eq_out))
    else:  # (q.unsqueeze(-2) @ S).squeeze(-2)  or  (q.unsqueeze(-1) * S).sum(-2)
        mm = contraction == "matmul"
        nodes += [
            helper.make_node("Constant", [], ["ax_q"], value=helper.make_tensor("q_", TensorProto.INT64, [1], [-2 if mm else -1])),
            helper.make_node("Constant", [], ["ax_r"], value=helper.make_tensor("r_", TensorProto.INT64, [1], [-2])),
            helper.make_node("Unsqueeze", ["q", "ax_q"], ["qu"]),
        ]
        if mm:
            nodes += [helper.make_node("MatMul", ["qu", state], ["p"]), helper.make_node("Squeeze", ["p", "ax_r"], ["y"])]
        else:
            nodes += [helper.make_node("Mul", [state, "qu"] if state_first else ["qu", state], ["p"]),
                      helper.make_node("ReduceSum", ["p", "ax_r"], ["y"], keepdims=keepdims)]
    outputs = [helper.make_tensor_value_info("y", dtype, None)]
    if state_output:
        outputs.append(helper.make_tensor_value_info("state", dtype, None))
    return make_model(nodes, inputs, outputs)


def test_refuses_keys_shared_across_heads():
    """Multi-query form: k/v with one head broadcast against 4 query heads (einsum broadcasting)."""
    model = _causal_graph()
    for inp in model.graph.input:
        if inp.name in ("k", "v"):
            inp.type.tensor_type.shape.dim[1].dim_value = 1
    out, report = run_passes(model, ["causal-chunk"])
    assert report.passes[0].matches == 0 and op_count(out, "CumSum") == 1


def _qkv(n: int, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {nm: (rng.random((2, 4, n, 8)) + 0.1).astype(dtype) for nm in ("q", "k", "v")}


def _exclusive_reference(q, k, v):
    return _causal_reference(q, k, v) - np.einsum("bhnd,bhnd,bhne->bhne", *(x.astype(np.float64) for x in (q, k, v)))


def _check_chunked(model: onnx.ModelProto, chunk: int = 16, seqs=(1, 5, 16, 37, 100),
                   exclusive: bool = False) -> onnx.ModelProto:
    feeds = [_qkv(n, seed=n) for n in seqs]
    out, report = run_passes(model, ["causal-chunk", "linear-attention", "cleanup"],
                             options=PassOptions(chunk_size=chunk), feeds=feeds)
    assert report.passes[0].matches == 1, report.format_table()
    (rec,) = [d for d in report.passes[0].details if d["matched"]]
    assert rec["action"] == ("chunked" if exclusive else OP_ACTION)
    assert all(r is not None and r < 5 for r in cumsum_input_ranks(out)), "n x d x e CumSum left"
    ref = _exclusive_reference if exclusive else _causal_reference
    for f, got in zip(feeds, run(out, feeds)):
        np.testing.assert_allclose(got[0], ref(f["q"], f["k"], f["v"]), rtol=1e-4, atol=1e-4)
    return out


@pytest.mark.parametrize("name", ["causal_block", "causal_lm"])
def test_samples_chunked_and_in_parity(name):
    model = export_sample(name)
    feeds = feeds_for(name, SEQS)
    assert 5 in cumsum_input_ranks(model)
    out, report = run_passes(model, ["cleanup", "causal-chunk", "linear-attention", "cleanup"], feeds=feeds)
    causal, lowered = report.passes[1], report.passes[2]
    layers = 1 if name == "causal_block" else 2
    assert causal.changed and causal.matches == 2 * layers  # numerator and normalizer per layer
    kinds = [(d["kind"], d["action"]) for d in causal.details]
    assert kinds.count(("causal-numerator", OP_ACTION)) == layers
    assert kinds.count(("causal-normalizer", OP_ACTION)) == layers
    # numerator and normalizer read the same q and k: one node per layer, on [v, 1]
    assert [(d["action"], d["count"]) for d in causal.details if d["action"] == "merged"] == [("merged", layers)]
    assert [d["action"] for d in lowered.details] == ["lowered (standard ops, chunked)"] * layers
    assert 5 not in cumsum_input_ranks(out)
    assert max_err(run(model, feeds), run(out, feeds)) < 1e-4
    assert causal.parity is None  # its lrexport op runs once lowered: the lowering's parity covers both
    assert all(p.parity is not None and p.parity < 1e-4 for p in report.passes if p is not causal)


@pytest.mark.parametrize("chunk", [1, 7, 64, 256])
def test_chunk_sizes_any_length(chunk):
    """The chunked form (an exclusive prefix): n not divisible by C, n < C (one padded chunk) and C = 1 all
    agree with the naive form."""
    _check_chunked(_causal_graph(exclusive=1), chunk=chunk, seqs=(1, 3, 37, 64, 100), exclusive=True)


@pytest.mark.parametrize("kw", [
    dict(outer="mul"),
    dict(outer="matmul"),
    dict(cast=True),
    dict(state_first=True, eq_out="bhnde,bhnd->bhne"),
    dict(eq_outer="b h n d, b h n e -> b h n d e", eq_out="b h n d, b h n d e -> b h n e"),
    dict(eq_outer="bhnd,bhne->bhnde", eq_out="bhnd,bhnde->bhen"),  # output transposed
    dict(eq_outer="...nd,...ne->...nde", eq_out="...nd,...nde->...ne", axis=-3),
    dict(contraction="matmul"),
    dict(contraction="mul", outer="mul"),
    dict(contraction="mul", state_first=True, outer="matmul", cast=True),
], ids=["mul-unsqueeze", "matmul-unsqueeze", "cast-after-cumsum", "state-first", "spaced", "out-perm",
        "ellipsis", "matmul-squeeze-contraction", "mul-reducesum-contraction", "all-alternatives"])
def test_exported_forms_match(kw):
    model = _causal_graph(**kw)
    if kw.get("eq_out", "").endswith("bhen"):
        feeds = [_qkv(n, seed=n) for n in (1, 37)]
        out, report = run_passes(model, ["causal-chunk", "linear-attention"], options=PassOptions(chunk_size=16),
                                 feeds=feeds)
        assert report.passes[0].matches == 1
        for f, got in zip(feeds, run(out, feeds)):
            ref = _causal_reference(f["q"], f["k"], f["v"]).transpose(0, 1, 3, 2)
            np.testing.assert_allclose(got[0], ref, rtol=1e-4, atol=1e-4)
    else:
        _check_chunked(model)


@pytest.mark.parametrize("exported_casts", [False, True])
def test_float16_model_sums_in_float32(exported_casts):
    model = _causal_graph(dtype=TensorProto.FLOAT16, cast=exported_casts, cast_before=exported_casts)
    feeds = [_qkv(n, seed=n, dtype=np.float16) for n in (5, 300)]
    out, report = run_passes(model, ["causal-chunk", "linear-attention"],
                             options=PassOptions(chunk_size=64, check_atol=0.5, check_rtol=2e-2), feeds=feeds)
    assert report.passes[0].matches == 1
    cumsums = [n for n in out.graph.node if n.op_type == "CumSum"]
    inferred = onnx.shape_inference.infer_shapes(out)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in inferred.graph.value_info}
    assert all(types.get(n.input[0]) == TensorProto.FLOAT for n in cumsums)
    for f, got in zip(feeds, run(out, feeds)):
        assert got[0].dtype == np.float16
        ref = _causal_reference(f["q"], f["k"], f["v"])
        np.testing.assert_allclose(got[0].astype(np.float64), ref, rtol=5e-3)


def test_float16_export_of_causal_block():
    """Real fp16 export: both CumSums become chunked float32 sums; output stays float16 and accurate."""
    import torch

    from passes_helpers import export_half_causal_block
    from samples import SAMPLES

    model = onnx.ModelProto()
    model.ParseFromString(export_half_causal_block())
    rng = np.random.default_rng(0)
    feeds = [{"x": (rng.standard_normal((2, n, 512)) * 0.5).astype(np.float16)} for n in (1, 37, 100)]
    out, report = run_passes(model, feeds=feeds, options=PassOptions(check_atol=2e-2, check_rtol=2e-2))
    causal = next(p for p in report.passes if p.name == "causal-chunk")
    assert sorted(d["kind"] for d in causal.details if d["action"] == OP_ACTION) == ["causal-normalizer",
                                                                                    "causal-numerator"]
    assert all(r is not None and r < 5 for r in cumsum_input_ranks(out))
    ref_model = SAMPLES["causal_block"].factory()
    for f, got in zip(feeds, run(out, feeds)):
        assert got[0].dtype == np.float16
        with torch.no_grad():
            ref = ref_model(torch.from_numpy(f["x"].astype(np.float32))).numpy()
        np.testing.assert_allclose(got[0].astype(np.float32), ref, atol=3e-3, rtol=1e-2)


def test_exclusive_cumsum_chunked():
    """CumSum(exclusive=1): query i sees keys before it only (a strictly lower-triangular chunk mask)."""
    model = _causal_graph(exclusive=1)
    feeds = [_qkv(n, seed=n) for n in (1, 5, 16, 37)]
    out, report = run_passes(model, ["causal-chunk"], options=PassOptions(chunk_size=16), feeds=feeds)
    (rec,) = [d for d in report.passes[0].details if d["action"] == "chunked"]
    assert rec["prefix"] == "exclusive" and all(r is not None and r < 5 for r in cumsum_input_ranks(out))
    assert "exclusive prefix" in rec["why"]  # why not the op: its sum includes the current position
    for f, got in zip(feeds, run(out, feeds)):
        ref = _exclusive_reference(f["q"], f["k"], f["v"])  # minus the diagonal term
        np.testing.assert_allclose(got[0], ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kw, reason", [
    (dict(axis=3, eq_outer="bhnd,bhne->bhnde"), "feature axis"),
    (dict(state_output=True), "used elsewhere"),  # state is a graph output: must stay materialized
    (dict(eq_out="bhnd,bhnde->bhnd"), "contraction"),
    (dict(contraction="mul", keepdims=1), "ReduceSum keeps the contracted axis"),
], ids=["cumsum-over-feature", "state-used-elsewhere", "not-a-query-contraction", "reducesum-keepdims"])
def test_refuses_unsafe(kw, reason):
    model = _causal_graph(**kw)
    out, report = run_passes(model, ["causal-chunk"])
    assert report.passes[0].matches == 0
    assert op_count(out, "CumSum") == 1 and cumsum_input_ranks(out) == [5]
    assert reason in _refusal_reasons(model)


def test_rule_sets_under_stock_rewrite():
    """The module-level rule sets need no pass: stock onnxscript rewrites (canonical forms, then the state
    contraction; nothing recorded) turn the Unsqueeze/Mul/ReduceSum form into one linear-attention node,
    exact on random inputs once lowered; under a collector the same rule set records its match."""
    model = onnx.shape_inference.infer_shapes(_causal_graph(outer="mul", contraction="mul"))
    canon = model
    for rules in CANONICAL_RULES:
        canon = onnx.shape_inference.infer_shapes(rewrite(canon, pattern_rewrite_rules=rules))
    out = rewrite(canon, pattern_rewrite_rules=CAUSAL_RULES)
    assert cumsum_input_ranks(out) == [] and op_count(out, "LinearAttention") == 1
    lowered, _ = run_passes(out, ["linear-attention"])
    assert op_count(out, "Unsqueeze") == 0
    feeds = [_qkv(n, seed=n) for n in (1, 37, 100)]
    for f, got in zip(feeds, run(lowered, feeds)):
        np.testing.assert_allclose(got[0], _causal_reference(f["q"], f["k"], f["v"]), rtol=1e-4, atol=1e-4)
    with collecting(PassOptions(chunk_size=16)) as found:
        rewrite(canon, pattern_rewrite_rules=CAUSAL_RULES)
    assert [(m.kind, m.action, m.matched, m.rewritten, m.info["heads"]) for m in found] == [
        ("causal-numerator", OP_ACTION, True, True, 4)]


def test_refused_cumsum_is_left_with_the_rule_reason():
    """A large CumSum the rule refused is recorded as left (not a match) with the reason the rule gave."""
    model = _causal_graph(state_output=True)
    _, report = run_passes(model, ["causal-chunk"])
    p = report.passes[0]
    (left,) = [d for d in p.details if d["kind"] == "large-cumsum-left"]
    assert (left["action"], left["matched"], left["rank"], p.matches) == ("left", False, 5, 0)
    assert left["reason"] in _refusal_reasons(model).split(" | ") and "used elsewhere" in left["reason"]


def _refusal_reasons(model: onnx.ModelProto) -> str:
    """Why the pass's rules refused: their own reasons, read with onnxscript's MatchingTracer."""
    import onnx_ir as ir
    from onnxscript.rewriter import pattern as orp

    from graph_passes._util import prepare
    from graph_passes.causal_canon import CANONICAL_RULES
    from graph_passes.causal_chunked import CAUSAL_RULES

    m = ir.serde.deserialize_model(model)
    prepare(m)
    reasons = []
    for rules in (*CANONICAL_RULES, CAUSAL_RULES):
        tracer = orp.MatchingTracer()
        rules.apply_to_model(m, tracer=tracer)
        prepare(m)
        reasons += [info.match_result.reason for infos in tracer.best_matches_map.values() for info in infos
                    if info.status == orp.MatchStatus.CONDITION_FAILED]
    return " | ".join(reasons)


def _normalizer_graph(cast=False, z_first=False, eq="bhnd,bhnd->bhn", axis=2):
    dims = ["b", 4, "n", 8]
    inputs = [helper.make_tensor_value_info(nm, TensorProto.FLOAT, dims) for nm in ("q", "k")]
    nodes = [helper.make_node("Constant", [], ["axis"], value=helper.make_tensor("a", TensorProto.INT64, [], [axis])),
             helper.make_node("CumSum", ["k", "axis"], ["z"])]
    z = "z"
    if cast:
        nodes.append(helper.make_node("Cast", ["z"], ["zc"], to=TensorProto.FLOAT))
        z = "zc"
    nodes.append(helper.make_node("Einsum", [z, "q"] if z_first else ["q", z], ["y"], equation=eq))
    return make_model(nodes, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])


@pytest.mark.parametrize("kw", [dict(), dict(cast=True), dict(z_first=True), dict(eq="b h n d, b h n d -> b n h")],
                         ids=["plain", "cast", "z-first", "spaced-transposed"])
@pytest.mark.parametrize("chunk", [4, 64])
def test_normalizer_chunked(kw, chunk):
    model = _normalizer_graph(**kw)
    rng = np.random.default_rng(3)
    feeds = [{nm: rng.random((2, 4, n, 8)).astype(np.float32) for nm in ("q", "k")} for n in (1, 7, 37)]
    out, report = run_passes(model, ["causal-chunk", "linear-attention"], options=PassOptions(chunk_size=chunk),
                             feeds=feeds)
    assert [d["action"] for d in report.passes[0].details if d["kind"] == "causal-normalizer"] == [OP_ACTION]
    eq = kw.get("eq", "bhnd,bhnd->bhn").replace(" ", "")
    for f, got in zip(feeds, run(out, feeds)):
        ref = np.einsum(eq, f["q"].astype(np.float64), np.cumsum(f["k"].astype(np.float64), axis=2))
        np.testing.assert_allclose(got[0], ref, rtol=1e-4, atol=1e-4)


def test_normalizer_over_feature_axis_refused():
    model = _normalizer_graph(axis=3)
    out, report = run_passes(model, ["causal-chunk"])
    assert report.passes[0].matches == 0 and op_count(out, "CumSum") == 1


def test_plan_reasons():
    assert "other than one shared" in plan_causal(["bhnd", "bhne"], "bhe", 2, ["bhnd", "bhde"], "bhne", 1)
    assert "feature axis" in plan_causal(["bhnd", "bhne"], "bhnde", 3, ["bhnd", "bhnde"], "bhne", 1)
    assert "within-bucket" in plan_causal(["bhund", "bhune"], "bhude", 2, ["bhud", "bhude"], "bhue", 1)
    plan = plan_causal(["bnhd", "bnhe"], "bnhde", 1, ["bnhd", "bnhde"], "bnhe", 1)
    assert not isinstance(plan, str) and plan.perm_q == [0, 2, 1, 3] and not plan.bucketed
    plan = plan_causal(["bhund", "bhune"], "bhude", 2, ["bhund", "bhude"], "bhune", 1)
    assert not isinstance(plan, str) and plan.bucketed and plan.perm_q == [0, 1, 2, 3, 4] and plan.k_bucket_axis == 3


def test_noncausal_encoder_left_alone_and_reported():
    model = export_sample("noncausal_encoder")
    out, report = run_passes(model, ["causal-chunk"])
    p = report.passes[0]
    assert not p.changed and p.matches == 0
    assert sum(d["kind"] == "noncausal-linear-attention" for d in p.details) == 2
    assert op_count(out, "Einsum") == op_count(model, "Einsum")


# ------------------------------------------------------------------ bucketed sums (linear-attention-transformer's form)


def _const(name: str, values, dtype=TensorProto.INT64, dims=None):
    vals = list(np.asarray(values).reshape(-1))
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(
        name + "_t", dtype, [len(vals)] if dims is None else dims, vals))


def _shifted(nodes: list, x: str, rank: int, shift: str) -> str:
    """CumSum(x) over axis 2, inclusive or made exclusive by Pad + Slice / the exclusive attribute."""
    nodes.append(helper.make_node("CumSum", [x, "ax2"], [f"{x}_cum"], exclusive=int(shift in ("attr", "both"))))
    if shift not in ("pad", "both"):
        return f"{x}_cum"
    pads = [0] * (2 * rank)
    pads[2] = 1
    nodes += [_const(f"{x}_pads", pads), helper.make_node("Pad", [f"{x}_cum", f"{x}_pads", "zero"], [f"{x}_pad"]),
              helper.make_node("Slice", [f"{x}_pad", "s0", "sm1", "s2", "s1"], [f"{x}_sh"])]
    return f"{x}_sh"


def _bucketed_graph(bucket: int, shift: str = "none", target_input: bool = False, d: int = 8) -> onnx.ModelProto:
    """causal_linear_attn of linear-attention-transformer 0.19.1, op for op as torch.export writes it: q, k, v
    [b, 4, n, d] in buckets of ``bucket``, per-bucket k v^T summed in the bucket, CumSum over buckets (shifted
    by one bucket with Pad + Slice when ``shift='pad'``), the normalizer through Clip + Reciprocal, and the
    3-operand einsum 'bhund,bhude,bhun->bhune'."""
    inputs = [helper.make_tensor_value_info(nm, TensorProto.FLOAT, ["b", 4, "n", d]) for nm in ("q", "k", "v")]
    nodes = [_const("ax2", [2], dims=[]), _const("ax3", [3]), _const("s0", [0]), _const("sm1", [-1]),
             _const("s2", [2]), _const("s1", [1]), _const("zero", [0.0], TensorProto.FLOAT, dims=[]),
             _const("eps", [1e-3], TensorProto.FLOAT, dims=[]), _const("back", [0, 4, -1, d])]
    if target_input:
        inputs.append(helper.make_tensor_value_info("target", TensorProto.INT64, [5]))
    else:
        nodes.append(_const("target", [0, 4, -1, bucket, d]))
    nodes += [helper.make_node("Reshape", [x, "target"], [f"{x}b"]) for x in ("q", "k", "v")]
    nodes += [helper.make_node("ReduceSum", ["kb", "ax3"], ["ksum"], keepdims=0),
              helper.make_node("Einsum", ["kb", "vb"], ["ctx"], equation="bhund,bhune->bhude")]
    kcum, ctx = _shifted(nodes, "ksum", 4, shift), _shifted(nodes, "ctx", 5, shift)
    nodes += [helper.make_node("Einsum", [kcum, "qb"], ["den"], equation="bhud,bhund->bhun"),
              helper.make_node("Clip", ["den", "eps"], ["den_c"]),
              helper.make_node("Reciprocal", ["den_c"], ["dinv"]),
              helper.make_node("Einsum", ["qb", ctx, "dinv"], ["attn"], equation="bhund,bhude,bhun->bhune"),
              helper.make_node("Reshape", ["attn", "back"], ["y"])]
    return make_model(nodes, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])


def _bucketed_reference(q, k, v, bucket: int, exclusive: bool) -> np.ndarray:
    b, h, n, d = q.shape
    qb, kb, vb = (x.astype(np.float64).reshape(b, h, n // bucket, bucket, d) for x in (q, k, v))
    ctx = np.cumsum(np.einsum("bhund,bhune->bhude", kb, vb), axis=2)
    kcum = np.cumsum(kb.sum(axis=3), axis=2)
    if exclusive:
        ctx = np.concatenate([np.zeros_like(ctx[:, :, :1]), ctx[:, :, :-1]], axis=2)
        kcum = np.concatenate([np.zeros_like(kcum[:, :, :1]), kcum[:, :, :-1]], axis=2)
    dinv = 1.0 / np.clip(np.einsum("bhud,bhund->bhun", kcum, qb), 1e-3, None)
    return np.einsum("bhund,bhude,bhun->bhune", qb, ctx, dinv).reshape(b, h, n, d)


@pytest.mark.parametrize("bucket, shift, chunk", [
    (1, "none", 16), (1, "pad", 16), (4, "none", 16), (4, "pad", 16), (4, "attr", 6), (16, "pad", 64), (3, "pad", 8),
], ids=["b1", "b1-pad-slice", "b4", "b4-pad-slice", "b4-exclusive-attr-chunk6", "b16-pad-slice", "b3-chunk8"])
def test_bucketed_sums_chunked(bucket, shift, chunk):
    """Numerator and normalizer of the bucketed form are both chunked (chunks a multiple of the bucket); the
    3-operand einsum is split into the contraction and the per-position reciprocal; parity at lengths that are
    one bucket, several chunks and not a multiple of the chunk."""
    model = _bucketed_graph(bucket, shift)
    exclusive = shift != "none"
    seqs = [bucket, bucket * 9, bucket * 25]
    feeds = [_qkv(n, seed=n) for n in seqs]
    out, report = run_passes(model, ["causal-chunk", "linear-attention", "cleanup"],
                             options=PassOptions(chunk_size=chunk), feeds=feeds)
    if bucket == 1 and not exclusive:  # a bucket of one position, inclusive: the per-position sum of the op
        recs = [d for d in report.passes[0].details if d["action"] == OP_ACTION]
        assert sorted(d["kind"] for d in recs) == ["causal-normalizer", "causal-numerator"]
        assert 5 not in cumsum_input_ranks(out) and report.passes[1].matches == 1  # one node (merged)
        for f, got in zip(feeds, run(out, feeds)):
            np.testing.assert_allclose(got[0], _bucketed_reference(f["q"], f["k"], f["v"], 1, False),
                                       rtol=1e-4, atol=1e-4)
        return
    recs = [d for d in report.passes[0].details if d["action"] == "chunked"]
    assert sorted(d["kind"] for d in recs) == ["causal-normalizer", "causal-numerator"]
    want_chunk = -(-chunk // bucket) * bucket
    assert all(d["bucket"] == bucket and d["chunk"] == want_chunk for d in recs)
    assert all((d.get("prefix") == "exclusive") == exclusive for d in recs)
    assert op_count(out, "Pad") == 3  # the shifts are gone; the chunk padding of q, k, v is left
    assert all(r is not None and r == 4 for r in cumsum_input_ranks(out)), "bucket-state CumSum left"
    assert op_count(out, "MatMul") - op_count(model, "MatMul") == 5  # scores shared by numerator and normalizer
    for f, got in zip(feeds, run(out, feeds)):
        ref = _bucketed_reference(f["q"], f["k"], f["v"], bucket, exclusive)
        np.testing.assert_allclose(got[0], ref, rtol=1e-4, atol=1e-4)


def test_bucketed_sums_shrink_largest_tensor():
    """At n=1024 (bucket 4) the per-bucket d x e states are gone: the largest intermediate drops >= 4x."""
    model = _bucketed_graph(4, "pad", d=64)
    out, report = run_passes(model, ["causal-chunk", "cleanup"], options=PassOptions(
        chunk_size=64, flops_shapes={x: (1, 4, 1024, 64) for x in "qkv"}))
    p = report.passes[0]
    assert p.largest_tensor_before is not None and p.largest_tensor_after is not None
    assert p.largest_tensor_before >= 4 * 256 * 64 * 64  # [b, h, u(+1 padded), d, e]
    assert p.largest_tensor_after * 4 <= p.largest_tensor_before


@pytest.mark.parametrize("kw, reason", [
    (dict(bucket=4, shift="both"), "shift by two"),
    (dict(bucket=4, target_input=True), "static size"),
], ids=["exclusive-and-shifted", "bucket-size-unknown"])
def test_bucketed_refusals(kw, reason):
    model = _bucketed_graph(**kw)
    out, report = run_passes(model, ["causal-chunk"])
    assert report.passes[0].matches == 0 and 5 in cumsum_input_ranks(out)
    assert reason in _refusal_reasons(model)
    if reason == "static size":  # the rule's own reason is also in the pass details, on the CumSum it leaves
        (left,) = [d for d in report.passes[0].details if d["kind"] == "large-cumsum-left"]
        assert (left["action"], left["matched"], left["rewritten"]) == ("left", False, False)
        assert reason in left["reason"] and left["reason"] in _refusal_reasons(model).split(" | ")


@pytest.mark.parametrize("eq, factor_shape, to_out", [
    ("bhnd,bhnde,bhn->bhne", ("b", 4, "n"), lambda s: s[..., None]),
    ("bnh,bhnd,bhnde->bhne", ("b", "n", 4), lambda s: s.transpose(0, 2, 1)[..., None]),
], ids=["factor-last", "factor-first-transposed"])
def test_per_position_scale_split(eq, factor_shape, to_out):
    """A 3-operand einsum with a per-position factor: the contraction is chunked and the factor multiplies it."""
    dims = ["b", 4, "n", 8]
    inputs = [helper.make_tensor_value_info(nm, TensorProto.FLOAT, dims) for nm in ("q", "k", "v")]
    inputs.append(helper.make_tensor_value_info("s", TensorProto.FLOAT, list(factor_shape)))
    ins = eq.split("->")[0].split(",")
    names = {"bhnd": "q", "bhnde": "state"}
    nodes = [_const("ax2", [2], dims=[]), helper.make_node("Einsum", ["k", "v"], ["outer"], equation="bhnd,bhne->bhnde"),
             helper.make_node("CumSum", ["outer", "ax2"], ["state"]),
             helper.make_node("Einsum", [names.get(t, "s") for t in ins], ["y"], equation=eq)]
    model = make_model(nodes, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    rng = np.random.default_rng(5)
    feeds = []
    for n in (3, 37):
        f = _qkv(n, seed=n)
        shape = [2 if d == "b" else n if d == "n" else d for d in factor_shape]
        f["s"] = rng.random(shape).astype(np.float32)
        feeds.append(f)
    out, report = run_passes(model, ["causal-chunk", "linear-attention"], options=PassOptions(chunk_size=16),
                             feeds=feeds)
    assert report.passes[0].matches == 1 and 5 not in cumsum_input_ranks(out)
    for f, got in zip(feeds, run(out, feeds)):
        ref = _causal_reference(f["q"], f["k"], f["v"]) * to_out(f["s"].astype(np.float64))
        np.testing.assert_allclose(got[0], ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("build", [
    lambda: _bucketed_graph(4, "pad"),
    lambda: _causal_graph(outer="mul", contraction="mul"),
    lambda: _causal_graph(outer="matmul", contraction="matmul", cast=True),
], ids=["bucketed-pad-slice", "mul-reducesum", "matmul-squeeze-cast"])
def test_canonical_form_alone_is_exact(build):
    """The canonicalization rules on their own: every surface form becomes Einsums around an (exclusive) CumSum,
    and the outputs agree with the graph before on random inputs."""
    import onnx_ir as ir

    from graph_passes._util import cleanup_unused, prepare
    from graph_passes.causal_canon import CANONICAL_RULES

    model = build()
    m = ir.serde.deserialize_model(model)
    prepare(m)
    count = 0
    for rules in CANONICAL_RULES:
        count += rules.apply_to_model(m)
        cleanup_unused(m)
        prepare(m)
    canon = ir.serde.serialize_model(m)
    assert count >= 2
    assert op_count(canon, "Pad") == op_count(canon, "Squeeze") == op_count(canon, "MatMul") == 0
    assert all(len(n.input) == 2 for n in canon.graph.node if n.op_type == "Einsum")  # the factor is a Mul now
    readers = {i: n.op_type for n in canon.graph.node for i in n.input}
    for n in canon.graph.node:
        if n.op_type == "CumSum":
            out = n.output[0]
            if readers.get(out) == "Cast":
                out = next(c.output[0] for c in canon.graph.node if c.op_type == "Cast" and c.input[0] == out)
            assert readers.get(out) == "Einsum"
    feeds = [_qkv(n, seed=n) for n in (4, 36)]
    assert max_err(run(model, feeds), run(canon, feeds)) < 1e-5
