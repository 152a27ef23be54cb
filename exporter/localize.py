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

from exporter.parity import module_path
from exporter.runners import ort_session_options
from graph_passes._util import ort_session

_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}


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


def _module(node: onnx.NodeProto) -> str | None:
    path = module_path(node)
    return None if path == "<unknown>" else path


def _float_values(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    inferred = onnx.shape_inference.infer_shapes(model)
    infos = list(inferred.graph.value_info) + list(inferred.graph.output)
    return {vi.name: vi for vi in infos if vi.type.tensor_type.elem_type in _FLOAT_TYPES}


def _with_outputs(model: onnx.ModelProto, names: list[str],
                  infos: Mapping[str, onnx.ValueInfoProto]) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    existing = {o.name for o in m.graph.output}
    m.graph.output.extend(infos[n] for n in names if n not in existing)
    return m


def localize_drift(reference: onnx.ModelProto, candidate: onnx.ModelProto, feeds: Mapping[str, np.ndarray], *,
                   rel_l2: float = 1e-2,
                   run_candidate: Callable[[Mapping[str, np.ndarray]], Mapping[str, Any]] | None = None
                   ) -> DriftLocation | None:
    """The first node (in the reference's order) whose output in ``candidate`` is non-finite where the
    reference is finite, or departs from it by more than ``rel_l2`` (relative L2); None if none does.

    ``run_candidate(feeds)`` returns the candidate's intermediate values by name when it should not run
    in ONNX Runtime (the faithful fp16 evaluator)."""
    ref_infos, cand_infos = _float_values(reference), _float_values(candidate)
    order = [(out, node) for node in reference.graph.node for out in node.output
             if out in ref_infos and out in cand_infos]
    if not order:
        return None
    names = [out for out, _ in order]
    runs = []
    for model, infos in ((reference, ref_infos), (candidate, cand_infos)):
        if run_candidate is not None and model is candidate:
            runs.append(dict(run_candidate(feeds)))
            continue
        sess = ort_session(_with_outputs(model, names, infos), ort_session_options())
        wanted = [o.name for o in sess.get_outputs() if o.name in set(names)]
        runs.append(dict(zip(wanted, sess.run(wanted, dict(feeds)))))
    ref_vals, cand_vals = runs
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
    infos = _float_values(model)
    producers = {out: node for node in model.graph.node for out in node.output}
    order = [n.name for n in module.graph.nodes if n.name in recorded and n.name in infos and n.name in producers]
    if not order:
        return None
    sess = ort_session(_with_outputs(model, order, infos), ort_session_options())
    wanted = [o.name for o in sess.get_outputs() if o.name in set(order)]
    values = dict(zip(wanted, sess.run(wanted, dict(feeds))))
    for name in order:
        if name not in values:
            continue
        found = _compare(name, producers[name], recorded[name], values[name], rel_l2)
        if found:
            return found
    return None


def _compare(name: str, node: onnx.NodeProto, reference: np.ndarray, candidate: Any,
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
