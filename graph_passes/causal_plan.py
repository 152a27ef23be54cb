"""Letter-level check of the canonical causal state contraction, and the layout plan of its rewrite.

Canonical form (what graph_passes.causal_canon brings every surface form to):

    numerator   Einsum(q, S),  S = CumSum_u(Einsum(k, v))   the increment may also sum a within-bucket axis w
    normalizer  Einsum(q, Z),  Z = CumSum_u(k) or CumSum_u(ReduceSum_w(k))

u is the prefix axis (the sequence, or the buckets of a bucketed sequence), w the within-bucket axis (absent:
one position per step). With w, q and the output carry w and position p = u * W + w: query p sees every
key of the buckets up to its own (inclusive prefix) or before it (exclusive prefix).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir


@dataclass
class CausalPlan:
    """How to bring q, k, v into [batch..., u, (w), d|e] layout and the result back."""

    perm_q: list[int]
    perm_k: list[int]
    perm_v: list[int]
    perm_out: list[int]
    k_index: int  # which increment operand is K (carries the contracted axis)
    bucketed: bool = False  # q, k, v carry a within-bucket axis after u
    k_bucket_axis: int | None = None  # that axis in k as the graph holds it (its size is the bucket)


def _rename_contraction(s_letters: str, target: str, q_letters: str, c_out: str, w: str | None
                        ) -> tuple[list[str], list[str]] | str:
    """The contraction's q and output letters renamed into the increment's letters (w for the query's extra axis)."""
    if len(s_letters) != len(target):
        return "contraction rank differs from the state rank"
    ren = dict(zip(s_letters, target))
    extra = [c for c in dict.fromkeys(q_letters + c_out) if c not in ren]
    if w is None and extra:
        return "query or output has axes that the state lacks"
    if w is not None:
        if len(extra) != 1:
            return "bucketed sums: the query must carry exactly one within-bucket axis the state lacks"
        ren[extra[0]] = w
    return [ren[c] for c in q_letters], [ren[c] for c in c_out]


def plan_causal(outer_ins: list[str], outer_out: str, axis: int, c_ins: list[str], c_out: str,
                state_index: int) -> CausalPlan | str:
    """Check the letters of increment + prefix sum + contraction; a plan, or why it is refused.

    The increment is an outer product k (x) v, optionally summed over one shared within-bucket axis."""
    if len(outer_ins) != 2 or len(c_ins) != 2:
        return "not a two-operand outer product / contraction"
    a, b = outer_ins
    letters = set(a) | set(b)
    if not set(outer_out) <= letters or len(outer_out) != len(set(outer_out)):
        return "increment einsum output not understood"
    shared = set(a) & set(b)
    summed = letters - set(outer_out)
    if len(summed) > 1 or not summed <= shared:
        return "outer product sums over an axis other than one shared within-bucket axis"
    a_only, b_only = set(a) - shared, set(b) - shared
    if len(a_only) != 1 or len(b_only) != 1:
        return "each factor must have exactly one private axis"
    if not -len(outer_out) <= axis < len(outer_out):
        return "cumsum axis out of range"
    seq = outer_out[axis]
    if seq not in shared:
        return "cumsum runs over a feature axis, not the shared sequence axis"
    w = next(iter(summed)) if summed else None
    renamed = _rename_contraction(c_ins[state_index], outer_out, c_ins[1 - state_index], c_out, w)
    if isinstance(renamed, str):
        return renamed
    qo, ro = renamed
    contracted = set(qo) - set(ro)
    if len(contracted) != 1:
        return "contraction does not sum over exactly one feature axis"
    (d,) = contracted
    if d in a_only:
        k_index, k_letters, v_letters, (e,) = 0, a, b, b_only
    elif d in b_only:
        k_index, k_letters, v_letters, (e,) = 1, b, a, a_only
    else:
        return "contraction sums over a shared axis (non-causal or not attention)"
    if set(qo) != shared | {d} or set(ro) != shared | {e} or len(ro) != len(set(ro)):
        return "query/output axes do not line up with the state"
    batch = [c for c in outer_out if c in shared and c != seq]
    tail = [seq] + ([w] if w else [])
    canon_qk, canon_v = batch + tail + [d], batch + tail + [e]
    return CausalPlan(
        perm_q=[qo.index(c) for c in canon_qk],
        perm_k=[k_letters.index(c) for c in canon_qk],
        perm_v=[v_letters.index(c) for c in canon_v],
        perm_out=[canon_v.index(c) for c in ro],
        k_index=k_index, bucketed=w is not None,
        k_bucket_axis=k_letters.index(w) if w else None,
    )


def plan_normalizer(k_letters: str, axis: int, c_ins: list[str], c_out: str, state_index: int,
                    bucket_axis: int | None = None) -> CausalPlan | str:
    """Z = CumSum(k, u) (or CumSum of k summed over its within-bucket axis ``bucket_axis``) contracted with q
    over the feature axis: letters check and layout plan."""
    w = k_letters[bucket_axis] if bucket_axis is not None else None
    z_letters = "".join(c for c in k_letters if c != w)
    if not -len(z_letters) <= axis < len(z_letters):
        return "cumsum axis out of range"
    seq = z_letters[axis]
    renamed = _rename_contraction(c_ins[state_index], z_letters, c_ins[1 - state_index], c_out, w)
    if isinstance(renamed, str):
        return renamed.replace("state", "prefix sum")
    qo, ro = renamed
    if sorted(qo) != sorted(k_letters):
        return "query and keys do not share their axes"
    summed = set(k_letters) - set(ro)
    if len(summed) != 1 or seq in summed or w in summed or len(ro) != len(set(ro)):
        return "not a contraction over exactly one feature axis"
    (d,) = summed
    tail = [seq] + ([w] if w else [])
    batch = [ch for ch in k_letters if ch not in (*tail, d)]
    canon = batch + tail + [d]
    return CausalPlan(perm_q=[qo.index(ch) for ch in canon], perm_k=[k_letters.index(ch) for ch in canon],
                      perm_v=[], perm_out=[(batch + tail).index(ch) for ch in ro], k_index=0,
                      bucketed=w is not None, k_bucket_axis=bucket_axis)


def broadcast_reason(values_perms: list[tuple[ir.Value, list[int]]]) -> str | None:
    """Batch and sequence axes (all but the last canonical one) must agree where sizes are known."""
    dims = []
    for v, perm in values_perms:
        if v.shape is None:
            continue
        dims.append([v.shape[p] for p in perm][:-1])
    for pos in range(min((len(d) for d in dims), default=0)):
        sizes = {d[pos] for d in dims if isinstance(d[pos], int)}
        if len(sizes) > 1:
            return "q, k, v broadcast against each other on a batch axis (e.g. keys shared across heads)"
    return None


def bucket_size(plan: CausalPlan, k: ir.Value, q: ir.Value) -> int | str:
    """The within-bucket size W (1 without buckets): a static size, the same in q and k."""
    if not plan.bucketed:
        return 1
    assert plan.k_bucket_axis is not None
    sizes = []
    for value, axis in ((k, plan.k_bucket_axis), (q, plan.perm_q[-2])):
        dim = value.shape[axis] if value.shape is not None else None
        if not isinstance(dim, int):
            return "the within-bucket axis has no static size (the bucket size must be known)"
        sizes.append(dim)
    if sizes[0] != sizes[1]:
        return "query and keys are bucketed differently"
    return sizes[0]
