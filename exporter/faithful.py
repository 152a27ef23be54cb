"""Run an fp16/bf16 ONNX model with real low-precision arithmetic on a CPU: the "fp16 faithful" parity row.

ONNX Runtime's CPU provider runs many float16 ops through float32 (it inserts Casts around kernels it
lacks and then removes the Cast pairs between them), so whole chains of the cast model run in float32:
on the gain-then-square sample (``samples.models.gain_square``), with no float32 keep-list, ORT returns
finite outputs while float16 arithmetic gives Inf in every element. A GPU engine would give the Inf.

The evaluator here is onnx's reference evaluator, which runs each node with numpy on the node's own
dtypes: elementwise ops on float16 (numpy) or bfloat16 (ml_dtypes) compute each result and round it
to the low type, so a value past 65504 becomes Inf as on the GPU, and every op's output carries the
low type's rounding. Ops that accumulate (MatMul, Gemm, Einsum, Conv, the Reduce* sums, CumSum) are
overridden to accumulate in float32 and round the result, which is what GPU tensor-core kernels do
(products of two fp16/bf16 numbers are exact in float32). Measured on the samples (min and odd cases):

- stock numpy float16 MatMul also accumulates in float32, but without BLAS: 0.31 s for one
  256x512 @ 512x512 product vs 0.005 s for float32 BLAS + rounding, the same numbers up to summation
  order; ml_dtypes bfloat16 sums accumulate in bfloat16 (4096 ones sum to 256), which no GPU reduction
  does. Hence the overrides.
- torch CPU half ops would run the PyTorch module, not the cast ONNX graph (its float32 keep-list, the
  graph passes), so they check a different program.

Numbers (all samples, min + odd): see ``benchmarks/`` and the README's precision section.
"""

from __future__ import annotations

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


def _overrides(opset: int) -> list[type]:
    from onnx.reference.ops import load_op

    ops = []
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
        return self._evaluate(feeds, intermediate=False)

    def intermediates(self, feeds: Mapping[str, np.ndarray], widen: bool = True) -> dict[str, Any]:
        """Every value of the graph by name, for drift localization (low-precision ones as float32 unless
        ``widen=False``)."""
        return self._evaluate(feeds, intermediate=True, widen=widen)


def _wide(value: Any) -> Any:
    array = np.asarray(value)
    return array.astype(np.float32) if array.dtype in LOW_DTYPES else value


def faithful_runner(model: onnx.ModelProto, precision: str, cases: Sequence[str],
                    probe: dict[str, np.ndarray] | None = None) -> tuple[FaithfulRunner | None, str | None]:
    """The faithful runner for the cases among ``cases`` it should run on (min and odd; else the first
    case checked), tried once on ``probe`` so that a model it cannot run is skipped with the reason
    instead of stopping the parity check. Returns (runner, None) or (None, reason)."""
    chosen = [c for c in cases if c in FAITHFUL_CASES] or list(cases[:1])
    try:
        runner = FaithfulRunner(model, precision, chosen)
        if probe is not None:
            runner.run(probe)
    except LrexportError as err:
        return None, err.problem
    return runner, None
