"""Softmax attention in a step model: carry its keys and values as a growing cache (a KV cache).

Softmax attention over the sequence has no running sum, but its step form is the familiar KV cache. The site is
recognized from the graph's structure, never from names: a ``Softmax`` over the last axis whose input comes,
through elementwise ops (a scale ``Mul``/``Div``, a mask ``Add``, ``Where(mask, x, -inf)``, a softcap ``Tanh``
...), from ``scores = MatMul(A, B)``, and whose output reaches, through elementwise ops (``Where(IsNaN(p), 0,
p)``, a ``Cast``), ``MatMul(probs, V)``; the keys axis (the last of ``B``, the one before last of ``V``) has the
sequence length. Fed a chunk of ``c`` new tokens after ``P`` earlier ones, the step model computes

    present_key_j   = Concat(past_key_j, B, axis=-1)       present_value_j = Concat(past_value_j, V, axis=-2)
    past scores     = MatMul(A, past_key_j), then the chain's ops whose other operand has no keys axis (scale,
                      softcap); the mask ops (an operand with a keys axis) are skipped: every earlier token is
                      visible to a causal chunk
    Softmax(Concat(past scores, new scores, axis=-1)) -> the same elementwise ops -> MatMul(probs, present_value_j)

The mask of the chunk's own keys stays the full model's (computed from the chunk's absolute positions, query and
key positions shifted together): the graph that builds the masks (:func:`mask_cone`) runs on the chunk alone,
so it is exempt from the step pass's refusal of ops that mix positions. A mask that hides earlier keys (a
sliding window, a non-causal or padding mask) makes the step model differ from the full one, which the numeric
check of ``exporter.recurrent`` refuses, naming the Softmax. So a model's ``attention_mask`` input covers the
chunk's tokens only, and earlier tokens are always attended: decoding with left padding is not supported.

The cache is taken where the MatMuls read it, after any repeat of grouped-query heads (GQA) and after the
scale applied to the keys: simple and independent of how the model builds its keys, but a cache of
``heads / kv_heads`` times the size of the model's own ``past_key_values``.

Which axis has the sequence length is read from the value shapes when shape inference kept the symbolic
sequence dimension; torch's export of ``scaled_dot_product_attention`` loses it in computed Reshapes, so the
step exporter passes a ``probe`` that runs the full model at two lengths and reports the shapes of the values
named.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import onnx_ir as ir

from graph_passes._util import const_array, shape_dims
from graph_passes.recurrent_carry import export_meta

# ops applied elementwise (with broadcasting) on the scores or the probabilities
ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Where", "Tanh", "Cast", "Identity", "Neg", "Max", "Min",
                         "Clip", "Sigmoid", "Exp", "Relu", "Abs", "Dropout", "IsNaN", "IsInf", "Not", "And", "Or",
                         "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "CastLike"})
PAST_DIM = "past"  # the symbolic length of the cache inputs

# name -> shapes of that value at the probe's sequence lengths
Probe = Callable[[Sequence[str]], dict[str, list[tuple[int, ...]]]]


@dataclass
class AttentionSite:
    """``scores = MatMul(A, B)`` -> ``chain`` -> ``softmax`` -> ... -> ``pv = MatMul(probs, V)``."""

    softmax: ir.Node
    scores: ir.Node
    chain: list[tuple[ir.Node, int]]  # (node, the input slot the scores come in), from scores to the Softmax
    pv: ir.Node
    post: list[ir.Node] = field(default_factory=list)  # elementwise ops between the Softmax and ``pv``
    masks: list[tuple[ir.Node, int]] = field(default_factory=list)  # chain operands with a keys axis
    key_rank: int = 0
    value_rank: int = 0
    key_dims: list[Any] = field(default_factory=list)  # dims of B and V, the sequence axis named as in the graph
    value_dims: list[Any] = field(default_factory=list)

    @property
    def nodes(self) -> list[ir.Node]:
        return [self.scores, *(n for n, _ in self.chain), self.softmax, *self.post, self.pv]

    @property
    def keys(self) -> ir.Value:
        v = self.scores.inputs[1]
        assert v is not None
        return v

    @property
    def values(self) -> ir.Value:
        v = self.pv.inputs[1]
        assert v is not None
        return v


def _std(node: ir.Node) -> bool:
    return node.domain in ("", "ai.onnx")


def _reaches_matmul(value: ir.Value | None, depth: int = 8) -> ir.Node | None:
    """The MatMul that ``value`` comes from through elementwise ops, or None."""
    node = value.producer() if value is not None else None
    if node is None or not _std(node) or depth < 0:
        return None
    if node.op_type == "MatMul":
        return node
    if node.op_type not in ELEMENTWISE:
        return None
    found = [m for m in (_reaches_matmul(v, depth - 1) for v in node.inputs if v is not None) if m is not None]
    return found[0] if len(found) == 1 else None


def _softmax_axis_is_last(node: ir.Node) -> bool:
    attr = node.attributes.get("axis")
    axis = -1 if attr is None else int(attr.value)
    rank = len(shape_dims(node.inputs[0]) or [])
    return axis == -1 or (rank > 0 and axis == rank - 1)


def candidate_site(softmax: ir.Node) -> AttentionSite | None:
    """The attention site around ``softmax`` by structure alone (the keys axis is checked later), or None."""
    if softmax.op_type != "Softmax" or not _std(softmax) or not _softmax_axis_is_last(softmax):
        return None
    chain: list[tuple[ir.Node, int]] = []
    value = softmax.inputs[0]
    for _ in range(12):
        node = value.producer() if value is not None else None
        if node is None or not _std(node):
            return None
        if node.op_type == "MatMul":
            break
        if node.op_type not in ELEMENTWISE:
            return None
        slots = [k for k, v in enumerate(node.inputs) if v is not None and _reaches_matmul(v) is not None]
        if len(slots) != 1 or len(list(node.outputs[0].uses())) != 1:
            return None
        chain.append((node, slots[0]))
        value = node.inputs[slots[0]]
    else:
        return None
    scores = node
    if len(list(scores.outputs[0].uses())) != 1:
        return None
    chain.reverse()
    # forward: elementwise ops on the probabilities, ending in exactly one MatMul(probs, V)
    reached = {softmax.outputs[0]}
    post: list[ir.Node] = []
    pv: ir.Node | None = None
    todo = [softmax.outputs[0]]
    while todo:
        v = todo.pop()
        for user, slot in v.uses():
            if user in post or user is pv:
                continue
            if _std(user) and user.op_type == "MatMul" and slot == 0 and pv is None:
                pv = user
            elif _std(user) and user.op_type in ELEMENTWISE and len(user.outputs) == 1:
                post.append(user)
                reached.add(user.outputs[0])
                todo.append(user.outputs[0])
            else:
                return None
    if pv is None or pv.inputs[0] not in reached:
        return None
    graph = softmax.graph
    if graph is not None and any(o in reached for o in graph.outputs):
        return None
    order = {id(n): k for k, n in enumerate(graph)} if graph is not None else {}
    post.sort(key=lambda n: order.get(id(n), 0))
    return AttentionSite(softmax, scores, chain, pv, post)


def _key_axis_dims(value: ir.Value, seq: str, shapes: dict[str, list[tuple[int, ...]]],
                   runs: Sequence[tuple[int, int]], batch: str | None) -> list[Any] | None:
    """The dims of ``value``, an axis with the sequence length as ``seq`` and one with the batch size as
    ``batch`` (by the probe's ``runs``, (batch, length) each, when it has the value), or None if unknown."""
    arr = const_array(value)
    if arr is not None:
        return list(arr.shape)
    got = shapes.get(value.name or "")
    if got is not None and len(got) == len(runs) and len({len(s) for s in got}) == 1:
        dims: list[Any] = []
        for axis in range(len(got[0])):
            sizes = [s[axis] for s in got]
            if sizes == [n for _, n in runs]:
                dims.append(seq)
            elif sizes == [b for b, _ in runs] and len(set(sizes)) > 1 and batch is not None:
                dims.append(batch)
            elif len(set(sizes)) == 1:
                dims.append(sizes[0])
            else:
                dims.append("?")
        return dims
    return shape_dims(value)


def find_sites(graph: ir.Graph, seq: str, probe: Probe | None = None, runs: Sequence[tuple[int, int]] = (),
               batch: str | None = None) -> list[AttentionSite]:
    """The softmax-attention sites over the sequence (keys axis = the sequence, as the shapes or the probe say)."""
    sites = [s for s in (candidate_site(n) for n in graph) if s is not None]
    if not sites:
        return []
    names: list[str] = []
    for s in sites:
        names += [v.name or "" for v in (s.scores.inputs[0], s.keys, s.values, s.softmax.inputs[0])]
        for node, slot in s.chain:
            names += [v.name or "" for k, v in enumerate(node.inputs) if k != slot and v is not None
                      and const_array(v) is None]
    shapes = probe(sorted(set(names))) if probe is not None else {}
    found = []
    for s in sites:
        a, b, v, x = (_key_axis_dims(val, seq, shapes, runs, batch) for val in
                      (s.scores.inputs[0], s.keys, s.values, s.softmax.inputs[0]))
        if not a or not b or not v or not x or len(a) < 2 or len(b) < 2 or len(v) < 2:
            continue
        if a[-2] != seq or b[-1] != seq or v[-2] != seq or x[-1] != seq or x[-2] != seq:
            continue  # not self-attention over the sequence (e.g. attention over a fixed memory)
        if b.count(seq) != 1 or v.count(seq) != 1:
            continue
        if "?" in b or "?" in v:
            continue
        s.key_rank, s.value_rank = len(b), len(v)
        s.key_dims, s.value_dims = b, v
        for node, slot in s.chain:
            for k, operand in enumerate(node.inputs):
                if k == slot or operand is None:
                    continue
                dims = _key_axis_dims(operand, seq, shapes, runs, batch)
                if dims is None or (len(dims) > 0 and dims[-1] != 1):  # it has a keys axis: a mask
                    s.masks.append((node, k))
        found.append(s)
    return found


def mask_cone(graph: ir.Graph, sites: Sequence[AttentionSite]) -> set[ir.Node]:
    """The nodes that compute only the sites' masks (every use of their outputs is in the cone or is a mask
    operand of a site): the step model runs them on the chunk alone."""
    mask_uses = {(id(node), k) for s in sites for node, k in s.masks}
    outputs = set(graph.outputs)
    cone: set[ir.Node] = set()
    for node in reversed(list(graph)):
        outs = list(node.outputs)
        if not outs or any(o in outputs for o in outs):
            continue
        uses = [u for o in outs for u in o.uses()]
        if uses and all(user in cone or (id(user), slot) in mask_uses for user, slot in uses):
            cone.add(node)
    return cone


def carry_kv(graph: ir.Graph, site: AttentionSite, seq: str, names: tuple[str, str, str, str]
             ) -> tuple[list[ir.Value], list[ir.Value]]:
    """Rewrite ``site`` to attend to the cache inputs too; ``names`` = (past_key, past_value, present_key,
    present_value). Returns ([past_key, past_value], [present_key, present_value])."""
    label = site.softmax.name or "softmax"
    meta = export_meta(site.softmax)
    b, v = site.keys, site.values
    key_dims, value_dims = site.key_dims, site.value_dims

    def cache(name: str, dims: list[Any], like: ir.Value) -> ir.Value:
        shape = ir.Shape([PAST_DIM if d == seq else d for d in dims])
        val = ir.Value(name=name, shape=shape, type=ir.TensorType(like.dtype or ir.DataType.FLOAT))
        graph.inputs.append(val)
        return val

    past_k, past_v = cache(names[0], key_dims, b), cache(names[1], value_dims, v)
    new: list[ir.Node] = []
    cat_k = ir.node("Concat", [past_k, b], {"axis": site.key_rank - 1}, name=f"{label}_present_key",
                    metadata_props=dict(meta))
    cat_v = ir.node("Concat", [past_v, v], {"axis": site.value_rank - 2}, name=f"{label}_present_value",
                    metadata_props=dict(meta))
    new += [cat_k, cat_v]
    scores = ir.node("MatMul", [site.scores.inputs[0], past_k], name=f"{label}_past_scores",
                     metadata_props=dict(meta))
    new.append(scores)
    x = scores.outputs[0]
    masks = {(id(n), k) for n, k in site.masks}
    for node, slot in site.chain:
        if any((id(node), k) in masks for k in range(len(node.inputs))):
            continue  # every earlier key is visible
        ins = list(node.inputs)
        ins[slot] = x
        clone = ir.node(node.op_type, ins, dict(node.attributes), domain=node.domain,
                        name=f"{node.name or node.op_type}_past", metadata_props=dict(meta))
        new.append(clone)
        x = clone.outputs[0]
    scores_in = site.softmax.inputs[0]
    assert scores_in is not None
    rank = len(shape_dims(scores_in) or []) or site.key_rank
    joined = ir.node("Concat", [x, scores_in], {"axis": rank - 1}, name=f"{label}_all_scores",
                     metadata_props=dict(meta))
    new.append(joined)
    graph.insert_before(site.softmax, new)
    site.softmax.replace_input_with(0, joined.outputs[0])
    for node in (site.softmax, *site.post):  # their keys axis is now past + chunk long
        for out in node.outputs:
            out.shape = None
    site.pv.replace_input_with(1, cat_v.outputs[0])
    outs = []
    for node, name, dims, like in ((cat_k, names[2], key_dims, b), (cat_v, names[3], value_dims, v)):
        out = node.outputs[0]
        out.name = name
        out.shape = ir.Shape([PAST_DIM if d == seq else d for d in dims])
        out.type = ir.TensorType(like.dtype or ir.DataType.FLOAT)
        outs.append(out)
        graph.outputs.append(out)
    # the present outputs grow by the chunk: their cache axis is past + chunk, not the past length
    for out, rank_, off in ((outs[0], site.key_rank, 1), (outs[1], site.value_rank, 2)):
        dims = list(out.shape)
        dims[rank_ - off] = ir.SymbolicDim(None)
        out.shape = ir.Shape(dims)
    return [past_k, past_v], outs


def np_dtype(value: ir.Value) -> str:
    return np.dtype((value.dtype or ir.DataType.FLOAT).numpy()).name
