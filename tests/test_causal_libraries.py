"""Causal linear attention from the libraries people use, built through lrexport's export patches:
performer-pytorch's causal LM (a Python loop over chunks), fast-transformers' causal-linear encoder (the
CausalDotProduct kernel) and fla's LinearAttention layer (Triton).

For each, ``lrexport build`` keeps the sequence dynamic (nothing pinned), lists its patches, passes parity at
min/opt/max/odd, the causal-chunk pass writes its running sums as the linear-attention op (fla's patch calls
that op itself), which its own pass lowers, and at n = 1024 the largest intermediate
tensor of the optimized model is at least 4x smaller than that of the exported one (what ``--no-passes``
ships). ``lrexport export-step`` on fla and fast-transformers reproduces the full-sequence PyTorch output token by
token and in chunks; performer's is refused by name (its key features see the whole sequence). Builders:
tests/third_party_models.py.
"""

from __future__ import annotations

import json

import onnx
import pytest

import third_party_models as tpm
from conftest import error_line
from graph_passes.causal_chunked import OP_ACTION
from graph_passes.cost import measure

LIBRARIES = {
    "performer_causal_lm_long": ("performer_pytorch", "performer-pytorch"),
    "fast_transformers_causal": ("fast_transformers.causal_product", "pytorch-fast-transformers"),
    "fla_linear_attention": ("fla.layers", "fla-core"),
}
ON_THE_OP = {"fla_linear_attention"}  # patched onto lrexport's linear-attention op, not the cumsum form


def _args(name: str) -> list[str]:
    inputs, shapes = tpm.SPECS[name]
    args = ["--factory", f"third_party_models:{name}"]
    for i in inputs:
        args += ["--input", i]
    for s in shapes:
        args += ["--shapes", s]
    return args


def _at(model: onnx.ModelProto, n: int) -> dict[str, tuple[int, ...]]:
    """Input shapes with batch 1 and sequence n (feature axes from the graph)."""
    shapes = {}
    for vi in model.graph.input:
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        shapes[vi.name] = (1, n, *dims[2:])
    return shapes


@pytest.mark.parametrize("name", list(LIBRARIES))
def test_build_dynamic_chunked_parity(cli, tmp_path, name):
    module, library = LIBRARIES[name]
    pytest.importorskip(module, reason=f"{library} is not installed")
    out = tmp_path / "out"
    res = cli("build", *_args(name), "--out", out, "--json", "-q")
    assert res.code == 0, res.out[-3000:] + res.err[-3000:]
    data = json.loads(res.out)
    assert data["ok"], json.dumps(data["parity"], indent=1)[:3000]
    export = data["export"]
    assert export["pinned_axes"] == [] and export["patches"]
    assert all(p.startswith(library) for p in export["patches"])
    cases = {r["case"]: next(iter(r["shapes"].values())) for r in data["parity"]["results"]}
    assert set(cases) == {"min", "opt", "max", "odd"} and cases["max"][1] == 1024 and cases["odd"][1] % 64
    passes = {p["name"]: p for p in data["passes"]["report"]["passes"]}
    if name in ON_THE_OP:  # the patch calls the linear-attention op, which its own pass lowers (chunked)
        assert passes["linear-attention"]["changed"] and not passes["causal-chunk"]["changed"]
    else:
        causal = passes["causal-chunk"]
        numerators = [d for d in causal["details"] if d["kind"] == "causal-numerator" and d["action"] == OP_ACTION]
        assert causal["changed"] and numerators and passes["linear-attention"]["changed"]
        assert not [d for d in causal["details"] if d["kind"] == "large-cumsum-left"]
    exported, optimized = onnx.load(str(out / "exported.onnx")), onnx.load(str(out / "model.onnx"))
    if name in ON_THE_OP:  # exported.onnx holds the op node (no shapes to measure): the state it would materialize
        attn = tpm.fla_linear_attention().attn
        before = 1024 * attn.num_heads * attn.head_k_dim * attn.head_v_dim
    else:
        _, before = measure(exported, _at(exported, 1024))
    _, after = measure(optimized, _at(optimized, 1024))
    assert before is not None and after is not None
    assert before >= 4 * after, (before, after)


@pytest.mark.parametrize("name", ["fla_linear_attention", "fast_transformers_causal"])
def test_export_step_token_and_chunk_parity(cli, tmp_path, name):
    """fast-transformers multiplies keys by its LengthMask ``arange(L) < L`` (L from the input's shape): the
    step model compares the offset positions with ``position_offset + chunk`` (the tokens seen so far)."""
    module, library = LIBRARIES[name]
    pytest.importorskip(module, reason=f"{library} is not installed")
    res = cli("export-step", *_args(name), "--out", tmp_path / "step.onnx", "--chunk-max", "16", "--length", "50",
              "--json", "-q")
    assert res.code == 0, res.out[-3000:] + res.err[-3000:]
    data = json.loads(res.out)
    assert data["patches"] and data["parity"]["ok"]
    chunks = {r["chunk"] for r in data["parity"]["results"]}
    assert {1, 7, 16} <= chunks
    assert data["step"]["layers"]
    if name == "fast_transformers_causal":
        assert data["step"]["position_offset"] == "position_offset"


def test_export_step_performer_refused_keys_see_the_whole_sequence(cli, tmp_path):
    """performer's FAVOR+ key features subtract the max over *all* keys (its stabilizer) before exp, and add
    eps after it: position i depends on later tokens, so there is no step form. Shown in PyTorch, then refused
    by export-step with the node and the reason."""
    pytest.importorskip("performer_pytorch")
    import torch

    model = tpm.performer_causal_lm_long()
    ids = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(0))
    later = ids.clone()
    later[0, 32:] = (later[0, 32:] + 1) % 256
    with torch.no_grad():
        shift = (model(ids)[0, :32] - model(later)[0, :32]).abs().max().item()
    assert shift > 1e-6  # the first 32 outputs move when only tokens 32.. change
    res = cli("export-step", *_args("performer_causal_lm_long"), "--out", tmp_path / "step.onnx", "-q")
    assert res.code == 2
    line = error_line(res)
    assert "(ReduceMax) mixes positions along the sequence axis" in line and "not causal" in line
