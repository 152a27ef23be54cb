"""Where a model starts to drift: compare intermediate values, not only outputs, and name the first
node, and its module, whose result overflows or departs from the reference.

- fp16/bf16 ONNX vs the float32 ONNX model (the precision cast keeps value names);
- the float32 ONNX model vs PyTorch (each node of the exported program names its ONNX value).

This turns "output 'logits' fails in fp16" into "node node_pow (Pow) in module 'blocks.1.act' overflows".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir
from graph_passes.shape_inference import TypedShapeInferencePass

from graph_passes.name_scopes import module_path
from graph_passes.ort_session import ort_session

_FLOAT_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}


@dataclass
class DriftLocation:
    value: str
    node: str
    op_type: str
    module: str | None
    rel_l2: float
    max_abs: float
    nonfinite: int
    total: int

    def describe(self) -> str:
        where = f" in module {self.module!r}" if self.module else ""
        what = (f"{self.nonfinite}/{self.total} values are NaN/Inf (overflow?)" if self.nonfinite
                else f"rel L2 {self.rel_l2:.2e}, max abs {self.max_abs:.3g}")
        return f"first drift at node {self.node} ({self.op_type}){where}, value {self.value!r}: {what}"

    def to_dict(self) -> dict:
        return asdict(self)


def _module(node: Any) -> str | None:
    path = module_path(node)
    return None if path == "<unknown>" else path


def typed(model: onnx.ModelProto) -> ir.Model:
    """An onnx-ir copy of ``model`` with every value's type and shape inferred where ONNX can."""
    m = ir.from_proto(model)
    TypedShapeInferencePass(check_type=False, strict_mode=False, data_prop=False)(m)
    return m


def float_values(model: ir.Model) -> dict[str, ir.Value]:
    """Every named floating-point value that a node computes, by name, in graph order."""
    return {v.name: v for node in model.graph for v in node.outputs if v.name and v.dtype in _FLOAT_TYPES}


def exposing(model: ir.Model, names: Sequence[str]) -> onnx.ModelProto:
    """``model`` as a proto that also returns the named values (``model`` itself is changed: pass a copy)."""
    values = float_values(model)
    present = set(model.graph.outputs)
    for name in names:
        if name in values and values[name] not in present:
            model.graph.outputs.append(values[name])
            present.add(values[name])
    return ir.to_proto(model)


def run_exposing(model: ir.Model, names: Sequence[str], feeds: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The named intermediate values of one run of ``model`` (changed: pass a copy), by name."""
    sess = ort_session(exposing(model, names))
    wanted = [o.name for o in sess.get_outputs() if o.name in set(names)]
    return dict(zip(wanted, sess.run(wanted, dict(feeds))))


def localize_drift(reference: onnx.ModelProto, candidate: onnx.ModelProto, feeds: Mapping[str, np.ndarray], *,
                   rel_l2: float = 1e-2,
                   run_candidate: Callable[[Mapping[str, np.ndarray]], Mapping[str, Any]] | None = None
                   ) -> DriftLocation | None:
    """The first node (in the reference's order) whose output in ``candidate`` is non-finite where the
    reference is finite, or departs from it by more than ``rel_l2`` (relative L2); None if none does.

    ``run_candidate(feeds)`` returns the candidate's intermediate values by name when it should not run
    in ONNX Runtime (the faithful fp16 evaluator)."""
    ref_model, cand_model = typed(reference), typed(candidate)
    cand_names = float_values(cand_model)
    order = [(name, v.producer()) for name, v in float_values(ref_model).items() if name in cand_names]
    if not order:
        return None
    names = [out for out, _ in order]
    ref_vals = run_exposing(ref_model, names, feeds)
    cand_vals = dict(run_candidate(feeds)) if run_candidate is not None else run_exposing(cand_model, names, feeds)
    for out, node in order:
        if out in ref_vals and out in cand_vals:
            found = _compare(out, node, ref_vals[out], cand_vals[out], rel_l2)
            if found:
                return found
    return None


def localize_against_torch(program: Any, model: onnx.ModelProto, feeds: Mapping[str, np.ndarray],
                           input_names: Sequence[str], *, rel_l2: float = 1e-3) -> DriftLocation | None:
    """The first operation of the exported program whose ONNX Runtime result departs from PyTorch.

    ``program`` is the (decomposed) torch.export program the dynamo exporter translated; each of its
    nodes' outputs carries the same name in the ONNX graph, so both can be compared value by value.
    Returns None when every shared intermediate agrees within ``rel_l2`` (float32 vs float32).
    """
    import torch

    module = program.module()
    recorded: dict[str, np.ndarray] = {}

    class _Recorder(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> Any:
            result = super().run_node(n)
            if isinstance(result, torch.Tensor) and result.is_floating_point():
                recorded[n.name] = result.detach().double().cpu().numpy()
            return result

    with torch.no_grad():
        _Recorder(module).run(*[torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in input_names])
    onnx_model = typed(model)
    values_by_name = float_values(onnx_model)
    order = [n.name for n in module.graph.nodes if n.name in recorded and n.name in values_by_name]
    if not order:
        return None
    producers = {name: values_by_name[name].producer() for name in order}
    values = run_exposing(onnx_model, order, feeds)
    for name in order:
        if name not in values:
            continue
        found = _compare(name, producers[name], recorded[name], values[name], rel_l2)
        if found:
            return found
    return None


def _compare(name: str, node: Any, reference: np.ndarray, candidate: Any,
             rel_l2: float) -> DriftLocation | None:
    r = np.asarray(reference, dtype=np.float64)
    c = np.asarray(candidate, dtype=np.float64)
    if r.shape != c.shape or not np.isfinite(r).all():
        return None
    bad = int((~np.isfinite(c)).sum())
    diff = np.abs(np.where(np.isfinite(c), c, 0.0) - r)
    norm = float(np.linalg.norm(r))
    rel = float(np.linalg.norm(diff) / norm) if norm > 0 else float(np.linalg.norm(diff))
    if bad or rel > rel_l2:
        return DriftLocation(name, node.name or node.op_type, node.op_type, _module(node), rel,
                             float(diff.max()) if diff.size else 0.0, bad, int(c.size))
    return None
