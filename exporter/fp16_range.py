"""Range analysis for the precision cast: which values would overflow, or lose most of their precision,
once the cast makes them fp16 (or bf16), and so must stay float32.

The float32 model runs in ONNX Runtime on the parity feeds (every shape case) with every intermediate
exposed as an output (as drift localization does, ``exporter/localize.py``). For each value the cast
would turn low precision (produced or read by a node outside the structural float32 set of
``graph_passes/precision_cast.py``), it records the largest |x| and the share of its nonzero elements
below the low type's smallest normal number. Initializers and constants are measured too: a constant
past 65504 is clipped by the cast (``x / 160000`` would silently become ``x / 65504``).

Overflow margin: a value is flagged when max |x| > 65504 / 16 = 4094 (fp16). The parity feeds are a
few thousand standard-normal draws; a real input 2x larger (an input 4 sigma out, or data simply
scaled differently) grows a value that is quadratic in the input (x*x, x^T x, a variance) 4x, and
one more 2x covers sums whose length grows past the largest parity shape and fp16's own rounding of
the inputs. Measured at the samples' shape ranges, the largest value left in fp16 is below 10 on the
MLP, softmax and Linformer samples (the scaled logits before a Softmax included: 6.5 and 7.2), 1.5e3 on
causal_block (intra-chunk scores, bounded by the chunk, not by n) and 2.6e3 on causal_lm (a row sum of
a chunk's scores), so the bound keeps nothing there. Two values are kept: causal_block's row sums of a
chunk's scores (64 terms, 5.3e3; a sum along a fixed axis, which the cast leaves to this analysis) and
the non-causal encoder's sum over n of phi(k) v^T (a MatMul, which the structural rules do not see:
5.4e3 at n = 512, growing with n, past 65504 near n = 6000). Constants are exact, so they get no margin.
bf16 has float32's exponent range: it overflows only past 3.4e38 / 16.

Precision loss: a value is flagged when more than half of its nonzero elements fall below the smallest
normal number (fp16: 6.1e-5), where fp16 keeps fewer than 10 significant bits and flushes to zero
below 6e-8: most of the value's information would be gone.
"""

from __future__ import annotations

import fnmatch
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Collection, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from exporter.errors import LrexportError
from exporter.localize import _module, exposing, typed
from exporter.parity import module_path
from graph_passes.ort_session import ort_session, session_options as ort_session_options

MARGIN = 16.0
SUBNORMAL_SHARE = 0.5
LIMITS = {  # largest finite value, smallest normal value
    "fp16": (65504.0, 2.0 ** -14),
    "bf16": (float(np.finfo(np.float32).max), float(np.finfo(np.float32).tiny)),
}
_SHAPE_ONLY = ("Shape", "Size")


@dataclass
class ValueRange:
    """One value's measured range over all the feeds, and what the cast would make of it."""

    value: str
    node: str  # producer node name, or '<initializer>' / '<input>'
    op_type: str
    module: str | None
    max_abs: float
    subnormal_share: float  # of the nonzero elements, the share below the smallest normal
    elements: int
    problem: str | None = None  # 'overflow' / 'precision' / None

    def describe(self) -> str:
        where = f" in module {self.module!r}" if self.module else ""
        what = (f"max |x| {self.max_abs:.3g}" if self.problem != "precision"
                else f"{self.subnormal_share:.0%} of nonzero values below the smallest normal")
        return f"{self.node} ({self.op_type}){where}, value {self.value!r}: {what}"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RangeReport:
    precision: str
    overflow_limit: float  # the low type's largest value / MARGIN
    cases: int
    seconds: float
    values: dict[str, ValueRange] = field(default_factory=dict)  # every value the cast would make low

    @property
    def flagged(self) -> list[ValueRange]:
        return [v for v in self.values.values() if v.problem]

    def keep_values(self) -> list[str]:
        """Values to keep in float32 (the cast keeps their producers and readers)."""
        return [v.value for v in self.flagged]

    def to_dict(self) -> dict:
        return {"precision": self.precision, "overflow_limit": self.overflow_limit, "margin": MARGIN,
                "subnormal_share": SUBNORMAL_SHARE, "cases": self.cases, "seconds": round(self.seconds, 3),
                "values_measured": len(self.values), "flagged": [v.to_dict() for v in self.flagged]}


def _low_values(graph: ir.Graph, fp32_nodes: Collection[str]) -> set[str]:
    """Values produced or read (not only for their shape) by a node the cast puts in low precision."""
    low: set[str] = set()
    for node in graph:
        if node.op_type in _SHAPE_ONLY or node.name in fp32_nodes:
            continue
        if node.op_type == "Constant":
            continue  # a constant lives in the region of its readers
        low.update(v.name for v in (*node.inputs, *node.outputs) if v is not None and v.name)
    return low


class _Stats:
    """Running max |x| and subnormal counts per value name, over every feed."""

    def __init__(self, smallest_normal: float):
        self.smallest_normal = smallest_normal
        self.by_name: dict[str, list[float]] = {}  # name -> [max_abs, nonzero, subnormal, elements]

    def record(self, name: str, array: Any) -> None:
        a = np.abs(np.asarray(array, dtype=np.float32))
        finite = a[np.isfinite(a)]
        nonzero = finite[finite > 0]
        s = self.by_name.setdefault(name, [0.0, 0, 0, 0])
        s[0] = max(s[0], float(finite.max()) if finite.size else 0.0)
        s[1] += int(nonzero.size)
        s[2] += int((nonzero < self.smallest_normal).sum())
        s[3] += int(a.size)


def _constant_values(graph: ir.Graph, low: set[str]) -> dict[str, np.ndarray]:
    """The float32 initializers and Constant nodes the cast would make low, by name (exact: no run needed)."""
    found = {name: v.const_value.numpy() for name, v in graph.initializers.items()
             if name in low and v.const_value is not None and v.const_value.dtype == ir.DataType.FLOAT}
    for node in graph:
        if node.op_type != "Constant" or node.outputs[0].name not in low:
            continue
        attr = node.attributes.get("value")
        tensor = attr.as_tensor() if attr is not None and attr.type == ir.AttributeType.TENSOR else None
        if tensor is not None and tensor.dtype == ir.DataType.FLOAT:
            found[node.outputs[0].name or ""] = tensor.numpy()
    return found


def _measure_in_ort(model: ir.Model, names: list[str], feeds: Sequence[Mapping[str, np.ndarray]],
                    stats: _Stats) -> None:
    """Run ``model`` (changed: it returns the named values too) on every feed and record the named values;
    a model input among them is recorded from the feed itself."""
    inputs = {v.name for v in model.graph.inputs}
    session = ort_session(exposing(model, names), ort_session_options())
    wanted = [o.name for o in session.get_outputs() if o.name in set(names)]
    for feed in feeds:
        for name, array in zip(wanted, session.run(wanted, dict(feed))):
            stats.record(name, array)
        for name in names:
            if name in inputs and name in feed:
                stats.record(name, feed[name])


def analyze_ranges(model: onnx.ModelProto, feeds: Sequence[Mapping[str, np.ndarray]], precision: str = "fp16",
                   fp32_nodes: Collection[str] | None = None) -> RangeReport:
    """Measure every value the cast would make ``precision`` on ``feeds`` (the float32 ``model`` in ONNX
    Runtime) and flag those that overflow or lose most of their precision (see the module doc).

    ``fp32_nodes``: the nodes the cast keeps in float32 anyway (default: its structural rules).
    """
    from graph_passes.precision_cast import fp32_node_names, normalize_precision

    start = time.perf_counter()
    precision = normalize_precision(precision)
    largest, smallest_normal = LIMITS[precision]
    limit = largest / MARGIN
    typed_model = typed(model)  # every intermediate's dtype, inferred
    graph = typed_model.graph
    low = _low_values(graph, fp32_node_names(model) if fp32_nodes is None else fp32_nodes)
    stats = _Stats(smallest_normal)
    constants = _constant_values(graph, low)
    for name, array in constants.items():
        stats.record(name, array)
    measured = [v for node in graph for v in node.outputs] + list(graph.inputs)
    names = [v.name for v in measured if v.name in low and v.name not in constants and v.dtype == ir.DataType.FLOAT]
    where = _locations(graph, set(constants))
    if names and feeds:
        _measure_in_ort(typed_model, names, feeds, stats)
    report = RangeReport(precision, limit, len(feeds), 0.0)
    for name, (max_abs, nonzero, subnormal, elements) in stats.by_name.items():
        share = subnormal / nonzero if nonzero else 0.0
        bound = largest if name in constants else limit
        problem = "overflow" if max_abs > bound else ("precision" if share > SUBNORMAL_SHARE else None)
        report.values[name] = ValueRange(name, *where(name), max_abs, share, int(elements), problem)
    report.seconds = time.perf_counter() - start
    return report


def _locations(graph: ir.Graph, constants: Collection[str]) -> Callable[[str], tuple[str, str, str | None]]:
    """``where(name)``: (node, op type, module) of the value's producer; an initializer or model input is
    named after its first reader's module."""
    producers = {v.name: node for node in graph for v in node.outputs if v.name}
    readers: dict[str, ir.Node] = {}
    for node in graph:
        for v in node.inputs:
            if v is not None and v.name:
                readers.setdefault(v.name, node)

    def where(name: str) -> tuple[str, str, str | None]:
        node = producers.get(name)
        if node is not None:
            return node.name or node.op_type, node.op_type, _module(node)
        reader = readers.get(name)
        constant = name in constants or name in graph.initializers
        return ("<initializer>" if constant else "<input>", "Constant" if constant else "Input",
                _module(reader) if reader is not None else None)

    return where


def nodes_in_modules(graph: ir.Graph, globs: Sequence[str]) -> list[str]:
    """Names of the nodes whose module, or one of its parent modules, matches one of the globs
    (``--fp16-keep 'blocks.1.*'``, ``--fp16-keep ff``). A glob that matches no module is an error."""
    by_module: dict[str, list[str]] = {}
    for node in graph:
        path = module_path(node)
        if path in ("<unknown>",) or not node.name:
            continue
        parts = path.split(".")
        for i in range(1, len(parts) + 1):
            by_module.setdefault(".".join(parts[:i]), []).append(node.name)
    chosen: dict[str, None] = {}  # ordered set
    for glob in globs:
        matched = [m for m in by_module if fnmatch.fnmatchcase(m, glob)]
        if not matched:
            known = sorted(m for m in by_module if m != "<root>")
            raise LrexportError(f"--fp16-keep {glob!r} matches no module of the model",
                                f"modules: {', '.join(known[:12])}{' ...' if len(known) > 12 else ''}")
        for m in matched:
            chosen.update(dict.fromkeys(by_module[m]))
    return list(chosen)


def kept_nodes_table(graph: ir.Graph, report: RangeReport | None, kept: Collection[str],
                     by_module: Collection[str] = ()) -> list[dict]:
    """One row per node kept on request: its module, why (the out-of-range value it produces or reads,
    or the ``--fp16-keep`` module) and the measured max |x| behind that."""
    flagged = {v.value: v for v in report.flagged} if report else {}
    measured = report.values if report else {}
    kept, by_module = set(kept), set(by_module)
    rows = []
    for node in graph:
        if node.name not in kept:
            continue
        row: dict[str, Any] = {"node": node.name, "op_type": node.op_type, "module": _module(node)}
        out = next((o.name for o in node.outputs if o.name in flagged), None)
        read = next((i.name for i in node.inputs if i is not None and i.name in flagged), None)
        if node.name in by_module:
            row["reason"] = "--fp16-keep"
            value = measured.get(node.outputs[0].name or "") if node.outputs else None
        elif out is not None:
            value = flagged[out]
            row["reason"] = f"produces {out!r}"
        elif read is not None:
            value = flagged[read]
            row["reason"] = f"reads {read!r}"
        else:
            value = None
            row["reason"] = "requested"
        row["value"] = value.value if value else None
        row["max_abs"] = value.max_abs if value else None
        row["problem"] = value.problem if value else None
        if value is not None and value.problem == "precision":
            row["reason"] += f" ({value.subnormal_share:.0%} below the smallest normal)"
        rows.append(row)
    return rows


def cast_with_range_analysis(model: onnx.ModelProto, precision: str, feeds: Sequence[Mapping[str, np.ndarray]], *,
                             keep_modules: Sequence[str] = (), force: bool = False
                             ) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """The precision cast with its automatic keep-list: measure ranges on ``feeds``, keep what would
    overflow or underflow (unless ``force``), plus the nodes of ``keep_modules`` (globs).

    Returns the cast model and the cast report extended with ``range`` (the analysis), ``kept_for_range``
    (one row per node kept on request, with its module and measured range), ``unsafe`` (flagged values
    left in low precision under ``force``) and a readable ``summary``.
    """
    from graph_passes.precision_cast import cast_precision

    graph = ir.from_proto(model).graph
    by_module = nodes_in_modules(graph, keep_modules) if keep_modules else []
    ranges = analyze_ranges(model, feeds, precision)
    keep_values = [] if force else ranges.keep_values()
    cast, info = cast_precision(model, precision, keep_nodes=by_module, keep_values=keep_values)
    info["range"] = ranges.to_dict()
    info["kept_for_range"] = kept_nodes_table(graph, ranges, info["kept_on_request"], by_module)
    info["unsafe"] = [v.to_dict() for v in ranges.flagged] if force else []
    kept = ", ".join(f"{op} {n}" for op, n in info.get("kept_fp32_by_op", {}).items())
    lines = [f"{precision}: {info['tensors_cast']} tensors cast, {info['casts_inserted']} Casts inserted; "
             f"kept in float32: {kept or 'nothing'}; {info['low_fraction']:.0%} of compute nodes in {precision}"]
    bound = f"{ranges.overflow_limit:.4g} (= {LIMITS[ranges.precision][0]:.4g} / {MARGIN:g})"
    for row in info["kept_for_range"]:
        where = f" in module {row['module']!r}" if row["module"] else ""
        size = f", max |x| {row['max_abs']:.3g}" if row["max_abs"] is not None else ""
        lines.append(f"  kept in float32: {row['node']} ({row['op_type']}){where}: {row['reason']}{size}")
    for v in ranges.flagged if force else []:
        lines.append(f"  warning: left in {precision} (--fp16-force): {v.describe()}")
    lines.append(f"  range analysis: {len(ranges.values)} values on {ranges.cases} shape cases in "
                 f"{ranges.seconds:.2f} s; overflow bound {bound}"
                 + ("; keep-list off (--fp16-force)" if force else ""))
    info["summary"] = "\n".join(lines)
    return cast, info
