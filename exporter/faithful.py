"""Run an fp16/bf16 ONNX model with real low-precision arithmetic on a CPU: the "fp16 faithful" parity row.

ONNX Runtime's CPU provider runs many float16 ops through float32 (it inserts Casts around kernels it
lacks and removes the Cast pairs between them), so whole chains of the cast model run in float32.
Measured on the gain-then-square sample (``samples.models.gain_square``) cast with no keep-list, at
2x32x64: ONNX Runtime returns finite outputs (0 of 4096 NaN/Inf; the error it shows, 2.0, comes from
the divisor 160000 clipped to 65504), with graph optimizations on or off alike; float16 arithmetic gives
NaN/Inf in all 4096 elements, as a GPU engine would. So no ORT CPU session is a faithful check.

The evaluator here is onnx's reference evaluator, which runs each node with numpy on the node's own
dtypes: elementwise ops on float16 (numpy) or bfloat16 (ml_dtypes) compute each result and round it
to the low type, so a value past 65504 becomes Inf as on the GPU, and every op's output carries the
low type's rounding. Ops that accumulate (MatMul, Gemm, Einsum, Conv, the Reduce* sums, CumSum) are
overridden to accumulate in float32 and round the result, which is what GPU tensor-core kernels do
(products of two fp16/bf16 numbers are exact in float32). Why the overrides, measured:

- numpy's float16 MatMul accumulates in float32 too, but without BLAS: 0.31 s for one
  256x512 @ 512x512 product against 0.005 s for float32 BLAS + rounding (same numbers up to the
  summation order);
- ml_dtypes bfloat16 sums accumulate in bfloat16 (4096 ones sum to 256), which no GPU reduction does.

ONNX Runtime's ``com.microsoft.LinearAttention`` (the ``linear-attention`` pass's ``onnxruntime`` lowering,
kept float32 by the cast) runs as onnx's reference of the standard ``LinearAttention``, which has the
contrib op's inputs, attributes and float32 state; a query with fewer heads than the state (which only
the contrib op takes) is repeated to the state heads first, as the contrib op reads it.

onnx's reference ``Scan`` scans axis 0 only; the override moves other scan axes to 0 and back (the
portable linear-attention lowering scans its chunk axis, 2).

Cost with the overrides: at most 0.4 s per shape case on the samples' min and odd shapes, about 2.5 s
for the causal samples at n = 4096. torch CPU half ops were not chosen: they would run the PyTorch
module, not the cast ONNX graph (its float32 keep-list, the graph passes), so they check another program.
"""

from __future__ import annotations

import hashlib
import warnings
from typing import Any, Mapping, Sequence

import ml_dtypes
import numpy as np
import onnx

from exporter.errors import LrexportError

LOW_DTYPES = (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))
# Ops whose GPU kernels accumulate in float32 whatever their input type.
ACCUMULATING_OPS = ("MatMul", "Gemm", "Einsum", "Conv", "ConvTranspose", "ReduceSum", "ReduceMean",
                    "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSumExp", "CumSum")
FAITHFUL_CASES = ("min", "odd")


def _accumulating(base: Any, name: str) -> type:
    """``base`` (a stock reference op) run on float32 copies of its low-precision inputs, rounded back."""

    def _run(self: Any, *args: Any, **kwargs: Any) -> tuple:
        low = next((a.dtype for a in args if isinstance(a, np.ndarray) and a.dtype in LOW_DTYPES), None)
        if low is None and name != "CumSum":
            return base._run(self, *args, **kwargs)
        wide = [a.astype(np.float32) if isinstance(a, np.ndarray) and a.dtype == low else a for a in args]
        if name == "CumSum" and np.size(wide[1]) == 1:
            wide[1] = np.asarray(wide[1]).reshape(())  # a one-element axis, as ONNX Runtime accepts
        result = base._run(self, *wide, **kwargs)
        if low is None:
            return result
        return tuple(r.astype(low) if isinstance(r, np.ndarray) and r.dtype == np.float32 else r for r in result)

    return type(name, (base,), {"_run": _run, "op_domain": ""})


def _gather_elements(base: Any) -> type:
    """GatherElements with numpy's take_along_axis: the stock one (np.choose) fails past 32 rows
    (BERT's token-type ids gathered by position: 'cannot reshape array of size 1 into shape (1,23)')."""

    def _run(self: Any, data: np.ndarray, indices: np.ndarray, axis: int | None = None) -> tuple:
        axis = axis or 0
        indices = np.where(indices < 0, indices + data.shape[axis], indices)
        return (np.take_along_axis(data, indices.astype(np.int64), axis=axis),)

    return type("GatherElements", (base,), {"_run": _run, "op_domain": ""})


def _contrib_linear_attention(base: Any) -> type:
    """``com.microsoft.LinearAttention`` as the standard op's reference (module doc)."""

    def _run(self: Any, query: np.ndarray, *args: Any, q_num_heads: int = 0, kv_num_heads: int = 0,
             **kwargs: Any) -> tuple:
        if 0 < q_num_heads < kv_num_heads:
            b, t, _ = query.shape
            query = np.repeat(query.reshape(b, t, q_num_heads, -1), kv_num_heads // q_num_heads, axis=2)
            query, q_num_heads = query.reshape(b, t, -1), kv_num_heads
        return base._run(self, query, *args, q_num_heads=q_num_heads, kv_num_heads=kv_num_heads, **kwargs)

    return type("LinearAttention", (base,), {"_run": _run, "op_domain": "com.microsoft"})


def _scan_any_axes(base: Any) -> type:
    """Scan over any axis: the stock one (axis 0 only) on inputs and outputs moved to axis 0 and back."""

    def __init__(self: Any, onnx_node: onnx.NodeProto, run_params: Any) -> None:
        axes = {a.name: list(a.ints) for a in onnx_node.attribute if a.name in ("scan_input_axes", "scan_output_axes")}
        node = onnx.NodeProto()
        node.CopyFrom(onnx_node)
        kept = [a for a in node.attribute if a.name not in axes]
        del node.attribute[:]
        node.attribute.extend(kept)
        base.__init__(self, node, run_params)
        self._in_axes, self._out_axes = axes.get("scan_input_axes", []), axes.get("scan_output_axes", [])

    def _run(self: Any, *args: Any, **kwargs: Any) -> tuple:
        states = len(args) - self.num_scan_inputs
        moved = [np.moveaxis(a, self._in_axes[i - states] % a.ndim, 0)
                 if i >= states and i - states < len(self._in_axes) else a for i, a in enumerate(args)]
        outs = list(base._run(self, *moved, **kwargs))
        for i, axis in enumerate(self._out_axes):
            outs[states + i] = np.moveaxis(outs[states + i], 0, axis)
        return tuple(outs)

    return type("Scan", (base,), {"__init__": __init__, "_run": _run, "op_domain": ""})


def _overrides(opset: int) -> list[type]:
    from onnx.reference.ops import load_op

    ops = [_gather_elements(load_op("", "GatherElements", opset)), _scan_any_axes(load_op("", "Scan", opset))]
    try:
        ops.append(_contrib_linear_attention(load_op("", "LinearAttention")))
    except Exception:  # an onnx without the standard op: a model with the contrib op is not evaluated
        pass
    for name in ACCUMULATING_OPS:
        try:
            ops.append(_accumulating(load_op("", name, opset), name))
        except Exception:  # an op this onnx version does not implement at this opset: stock behaviour
            continue
    return ops


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 18)


class FaithfulRunner:
    """Parity backend: the fp16/bf16 ONNX model evaluated with low-precision arithmetic (see module doc).

    ``cases`` restricts the shape cases it runs on (pure numpy: the largest shapes cost minutes).
    """

    def __init__(self, model: onnx.ModelProto, precision: str, cases: Sequence[str] = FAITHFUL_CASES):
        from onnx.reference import ReferenceEvaluator

        self.name = f"{precision} faithful"
        self.precision = precision
        self.cases = tuple(cases)
        try:
            self._session = ReferenceEvaluator(model, new_ops=_overrides(_opset(model)))
        except Exception as err:
            raise LrexportError(f"the faithful {precision} evaluator cannot load the model "
                                f"({str(err).strip().splitlines()[0][:300]})",
                                "its parity row is left out; ONNX Runtime's row still runs") from None
        self.input_names = list(self._session.input_names)
        self.output_names = list(self._session.output_names)
        self._cache: dict[str, dict[str, np.ndarray]] = {}  # feeds digest -> outputs (see faithful_runner)

    def _evaluate(self, feeds: Mapping[str, np.ndarray], intermediate: bool, widen: bool = True) -> dict[str, Any]:
        with warnings.catch_warnings(), np.errstate(over="ignore", invalid="ignore", divide="ignore",
                                                    under="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)  # overflow to Inf is the point
            try:
                outs = self._session.run(None, {n: feeds[n] for n in self.input_names}, intermediate=intermediate)
            except Exception as err:
                raise LrexportError(f"the faithful {self.precision} evaluator failed "
                                    f"({type(err).__name__}: {str(err).strip().splitlines()[0][:300]})",
                                    "rerun without --fp16/--bf16 or report the op it names") from None
        values = outs if isinstance(outs, dict) else dict(zip(self.output_names, outs))
        return {n: _wide(v) if widen else v for n, v in values.items() if v is not None}

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        key = _digest(feeds)
        if key not in self._cache:
            return self._evaluate(feeds, intermediate=False)
        return self._cache.pop(key)

    def prepare(self, feeds: Mapping[str, np.ndarray]) -> None:
        """Run now and keep the outputs for the ``run`` on the same feeds (errors surface here)."""
        self._cache[_digest(feeds)] = self._evaluate(feeds, intermediate=False)

    def intermediates(self, feeds: Mapping[str, np.ndarray], widen: bool = True) -> dict[str, Any]:
        """Every value of the graph by name, for drift localization (low-precision ones as float32 unless
        ``widen=False``)."""
        return self._evaluate(feeds, intermediate=True, widen=widen)


def _digest(feeds: Mapping[str, np.ndarray]) -> str:
    h = hashlib.sha1()
    for name in sorted(feeds):
        array = np.ascontiguousarray(feeds[name])
        h.update(f"{name}{array.dtype}{array.shape}".encode())
        h.update(array.tobytes())
    return h.hexdigest()


def _wide(value: Any) -> Any:
    array = np.asarray(value)
    return array.astype(np.float32) if array.dtype in LOW_DTYPES else value


def faithful_runner(model: onnx.ModelProto, precision: str,
                    feeds: Mapping[str, Mapping[str, np.ndarray]]) -> tuple[FaithfulRunner | None, str | None]:
    """The faithful runner for the cases among ``feeds`` (case -> inputs, as parity will run them) it
    should run on (min and odd; else the first case), already run on them, so that a model it cannot
    evaluate is skipped with the reason instead of stopping the parity check (the outputs are kept
    for parity). Returns (runner, None) or (None, reason)."""
    cases = list(feeds)
    chosen = [c for c in cases if c in FAITHFUL_CASES] or cases[:1]
    try:
        runner = FaithfulRunner(model, precision, chosen)
        for case in chosen:
            runner.prepare(feeds[case])
    except LrexportError as err:
        return None, err.problem
    return runner, None
