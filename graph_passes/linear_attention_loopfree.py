"""Lower ``lrexport.LinearAttention`` to standard ops with no ``Scan`` or ``Loop`` at all: the form for
runtimes that take a loop badly or not at all. TensorRT builds a Scan as an ``ILoop`` whose concatenated
outputs have a dynamic length, a case its loops are documented to restrict; and on a GPU a loop of
``ceil(T/16)`` small steps is that many rounds of kernel launches.

The portable lowering (graph_passes/linear_attention_portable.py) is already loop-free for the linear rule
and a per-head decay; this one takes over where it carries the state in a Scan (the delta rules and a
per-key decay). Each chunk n is an affine map of the state, ``S_{n+1} = A_n S_n + B_n``
(:func:`chunk_maps`), and the state at the start of every chunk is a prefix of these maps, computed by a
fixed number of doubling levels (:func:`_chunk_starts`, a work-efficient up-sweep / down-sweep): level l
composes neighbours pairwise, ``(A_{2i+1} A_{2i}, A_{2i+1} B_{2i} + B_{2i+1})``, so ``L`` levels serve
``2^L`` chunks, and the way down hands each pair's start state to both halves. ``L`` is sized from the
node's sequence length where it is static, else from the longest sequence the model serves
(``PassOptions.max_positions``, from the build's shapes, which are the engine profile's); past ``2^L``
chunks every output is NaN, never a silently wrong value.

Maps are kept as ``A - I``: zero-padding a level to an even length then pads with identity maps, and
``(I + X)(I + Y) = I + X + Y + XY`` composes them. A per-key decay without a delta rule makes every map
diagonal, kept as a (dk, 1) column and composed elementwise; the delta rules' maps
``diag(D) - KdT Wk`` are full dk x dk, and composing them costs ``dk^3`` per chunk and level, which is the
price of having no loop (measured in benchmarks/bench_linear_attention.py, variant ``loop-free``).
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from graph_passes.linear_attention_ort import Lowered, _attr
from graph_passes.linear_attention_portable import (
    ChunkTerms, LinearAttentionPortablePass, _needs_scan, _Prep, _refusal, chunk_for, chunk_terms, initial_state)

# where the longest sequence is not known: levels for this many positions (2^16 chunks of 16)
DEFAULT_MAX_POSITIONS = 1 << 20


def levels_for(max_positions: int | None, chunk: int) -> int:
    """Doubling levels that serve ``max_positions`` positions in chunks of ``chunk`` (at least 1)."""
    chunks = math.ceil((max_positions or DEFAULT_MAX_POSITIONS) / chunk)
    return max(1, math.ceil(math.log2(chunks)))


class LinearAttentionLoopFreePass(LinearAttentionPortablePass):
    """The portable lowering with the chunk-to-chunk state of the delta rules and a per-key decay by
    doubling levels instead of a Scan (module docstring)."""

    name = "linear-attention-loop-free"

    def lower(self, node: ir.Node, label: str) -> Lowered | str:
        if not _needs_scan(node) or _refusal(node) is not None:
            return super().lower(node, label)
        chunk = chunk_for(node, self.options.chunk_size)
        if chunk & (chunk - 1):
            return f"chunk size {chunk} is not a power of 2 (the UT inverse and sub-chunks need one)"
        seq = node.inputs[0].shape[1] if node.inputs[0] is not None and node.inputs[0].shape is not None else None
        levels = levels_for(seq if isinstance(seq, int) else self.options.max_positions, chunk)
        new_nodes, outs = _lower_loop_free(_Prep(node, label, chunk), levels)
        served = chunk << levels
        return new_nodes, outs, f"lowered (standard ops, chunked, no loop: {levels} doubling levels)", {
            "rule": _attr(node, "rule"), "chunk": chunk, "levels": levels, "max_positions": served}


def _lower_loop_free(p: _Prep, levels: int) -> tuple[list[ir.Node], list[ir.Value]]:
    b, c = p.b, p.b.const
    t = chunk_terms(p)
    A, B, diagonal = chunk_maps(p, t)
    S0 = initial_state(p)
    starts, top_A, top_B, top_n = _chunk_starts(p, A, B, diagonal, S0, levels)
    # o = Qd S + QK U, with U = X - Wk S for the delta rules (V otherwise)
    U = b.op("Sub", [t.U, b.op("MatMul", [t.Wk, starts])]) if p.delta else t.U
    o = b.op("Add", [b.op("MatMul", [t.Qd, starts]), b.op("MatMul", [t.QK, U])])
    final = b.op("Add", [b.op("Add", [S0, _apply(b, top_A, S0, diagonal)]), top_B])
    # more chunks than the levels serve: NaN everywhere rather than a wrong value
    over = b.op("Greater", [top_n, c([1])])
    guard = b.op("Where", [over, c(np.float32(np.nan), np.float32), c(np.float32(0), np.float32)])
    o = b.op("Add", [o, guard])
    final = b.op("Add", [final, guard])
    return p.finish(o, final)


def chunk_maps(p: _Prep, t: ChunkTerms) -> tuple[ir.Value, ir.Value, bool]:
    """Each chunk's state map ``S' = (I + A) S + B`` as ``A`` (B,h,nc,dk,dk), or (B,h,nc,dk,1) where
    it is diagonal (a per-key decay, no delta rule), and ``B`` (B,h,nc,dk,dv)."""
    b, c = p.b, p.b.const
    B = b.op("MatMul", [t.KdT, t.U])  # KdT V, or KdT X for the delta rules
    D1 = None if t.D is None else b.op("Sub", [t.D, c(np.float32(1), np.float32)])  # D - I, on the diagonal
    if not p.delta:  # S' = D S + KdT V: diagonal (the Scan forms without a delta rule have a per-key D)
        assert D1 is not None
        return D1, B, True
    # S' = D S + KdT (X - Wk S) = (D - KdT Wk) S + KdT X
    A = b.op("Neg", [b.op("MatMul", [t.KdT, t.Wk])])
    if D1 is not None:
        eye = p.const(np.eye(p.dk, dtype=np.float32)) if p.dk else _eye_like(p, A)
        A = b.op("Add", [A, b.op("Mul", [D1, eye])])
    return A, B, False


def _eye_like(p: _Prep, A: ir.Value) -> ir.Value:
    """I (dk, dk) for a dk known only at run time."""
    b, c = p.b, p.b.const
    dk = b.op("Shape", [A], {"start": -1})
    r = b.op("Range", [c(0), b.op("Squeeze", [dk, c([0])]), c(1)])
    same = b.op("Equal", [b.op("Unsqueeze", [r, c([1])]), b.op("Unsqueeze", [r, c([0])])])
    return b.op("Cast", [same], {"to": ir.DataType.FLOAT})


def _apply(b, A: ir.Value, S: ir.Value, diagonal: bool) -> ir.Value:
    """``A S`` for a map kept as ``A`` (its part beyond the identity)."""
    return b.op("Mul" if diagonal else "MatMul", [A, S])


def _chunk_starts(p: _Prep, A: ir.Value, B: ir.Value, diagonal: bool, S0: ir.Value,
                  levels: int) -> tuple[ir.Value, ir.Value, ir.Value, ir.Value]:
    """The state at the start of every chunk (B,h,nc,dk,dv), by ``levels`` doubling levels over the maps
    ``(A, B)`` of the chunk axis (axis 2), from ``S0`` (B,h,dk,dv); also the composed map of all chunks
    (top ``A``, ``B``: (B,h,dk,dk|1), (B,h,dk,dv)) and the top level's length (1 when the levels served
    every chunk)."""
    b, c = p.b, p.b.const
    n = b.op("Shape", [A], {"start": 2, "end": 3})
    pairs_A, pairs_B = (b.op("Concat", [c([0, 0, -1, 2]), b.op("Shape", [x], {"start": 3})], {"axis": 0})
                        for x in (A, B))  # (B,h,n/2,2,dk,dk|dv)
    merged = b.op("Concat", [c([0, 0, -1]), b.op("Shape", [S0], {"start": 2})], {"axis": 0})  # (B,h,n,dk,dv)
    kept = []  # per level: the even elements' maps and the level's length (the way down needs them)
    for _ in range(levels):
        odd_len = b.op("Mod", [n, c([2])])
        pad = b.op("Concat", [c([0] * 7), odd_len, c([0, 0])], {"axis": 0})
        A2, B2 = (b.op("Pad", [x, pad]) for x in (A, B))  # zeros: identity maps at the end
        Ae, Ao = (b.op("Squeeze", [x, c([3])]) for x in
                  b.op("Split", [b.op("Reshape", [A2, pairs_A])], {"axis": 3, "num_outputs": 2}, outputs=2))
        Be, Bo = (b.op("Squeeze", [x, c([3])]) for x in
                  b.op("Split", [b.op("Reshape", [B2, pairs_B])], {"axis": 3, "num_outputs": 2}, outputs=2))
        kept.append((Ae, Be, n))
        # (I + Ao)(I + Ae) = I + Ao + Ae + Ao Ae;  (I + Ao) Be + Bo
        A = b.op("Add", [b.op("Add", [Ao, Ae]), _apply(b, Ao, Ae, diagonal)])
        B = b.op("Add", [b.op("Add", [Be, _apply(b, Ao, Be, diagonal)]), Bo])
        n = b.op("Div", [b.op("Add", [n, odd_len]), c([2])])
    top_A = b.op("Squeeze", [b.op("Slice", [A, c([0]), c([1]), c([2])]), c([2])])
    top_B = b.op("Squeeze", [b.op("Slice", [B, c([0]), c([1]), c([2])]), c([2])])
    # (B,h,1,dk,dv): the top element starts at S0 (expanded to the top level's length where the levels
    # were too few: shapes stay consistent, and the guard makes every output NaN)
    start = b.op("Expand", [b.op("Unsqueeze", [S0, c([2])]), b.op("Shape", [B])])
    for Ae, Be, n_l in reversed(kept):
        odd_start = b.op("Add", [b.op("Add", [start, _apply(b, Ae, start, diagonal)]), Be])
        both = b.op("Concat", [b.op("Unsqueeze", [start, c([3])]), b.op("Unsqueeze", [odd_start, c([3])])],
                    {"axis": 3})  # (B,h,m,2,dk,dv)
        start = b.op("Slice", [b.op("Reshape", [both, merged]), c([0]), n_l, c([2])])
    return start, top_A, top_B, n
