"""Pass registry and runner: each pass runs on onnx-ir, then ONNX Runtime checks parity against the model
before it, so a pass that changes the numbers fails loudly with its name."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from graph_passes._base import GraphPass, PassOptions
from graph_passes._util import quiet_libraries
from graph_passes.cost import count_params, default_shapes, measure
from graph_passes.ort_session import ort_session, same_model
from graph_passes.causal_chunked import CausalChunkPass
from graph_passes.cleanup import CleanupPass
from graph_passes.einsum_lowering import EinsumLoweringPass
from graph_passes.formatting import fmt_shape, fmt_shapes
from graph_passes.linear_attention import LinearAttentionPass
from graph_passes.lowrank_pairs import LowRankPairsPass
from graph_passes.quadratic_causal import QuadraticCausalPass
from graph_passes.sibling_factors import SiblingFactorsPass
from graph_passes.tolerance import Tolerance, within

_REGISTRY: dict[str, type[GraphPass]] = {
    p.name: p for p in (LowRankPairsPass, SiblingFactorsPass, CausalChunkPass, EinsumLoweringPass, QuadraticCausalPass,
                        LinearAttentionPass, CleanupPass)
}
PASS_NAMES: tuple[str, ...] = tuple(_REGISTRY)
# sibling is measured in benchmarks/bench_passes.py and left out by default (see its module docstring)
DEFAULT_PASSES: tuple[str, ...] = ("cleanup", "lowrank", "causal-chunk", "einsum", "quadratic-causal", "linear-attention",
                                   "cleanup")


class PassParityError(RuntimeError):
    """A pass changed the model's outputs beyond tolerance."""

    def __init__(self, pass_name: str, output: str, max_abs_err: float, shape: tuple[int, ...],
                 feed_shapes: dict[str, tuple[int, ...]]):
        self.pass_name, self.output, self.max_abs_err, self.shape = pass_name, output, max_abs_err, shape
        super().__init__(
            f"pass '{pass_name}' broke parity on output '{output}': max abs err {max_abs_err:.3g} "
            f"at output shape {fmt_shape(shape)} (inputs {fmt_shapes(feed_shapes)})")


class InputModelError(RuntimeError):
    """The model handed to the passes fails on the check inputs before any pass ran: ONNX Runtime cannot
    run it (``error`` is its message), or an output is NaN/Inf (``output`` names it). Not a pass's fault."""

    def __init__(self, feed: dict[str, np.ndarray], error: str = "", output: str = ""):
        feed_shapes = {k: tuple(v.shape) for k, v in feed.items()}
        self.feed, self.feed_shapes, self.error, self.output = feed, feed_shapes, error, output
        what = (f"fails in ONNX Runtime ({error})" if error else f"gives NaN/Inf in output {output!r}")
        super().__init__(f"the model {what} at inputs {fmt_shapes(feed_shapes)}, before any pass ran")


@dataclass
class PassReport:
    name: str
    changed: bool
    matches: int  # records the pass's rules accepted (see graph_passes._base for the definition)
    details: list[dict[str, Any]] = field(default_factory=list)  # Match.to_dict() of every record
    params_before: int = 0
    params_after: int = 0
    flops_before: int | None = None
    flops_after: int | None = None
    flops_shape: dict[str, tuple[int, ...]] = field(default_factory=dict)
    largest_tensor_before: int | None = None  # elements of the largest intermediate at flops_shape
    largest_tensor_after: int | None = None
    parity: float | None = None
    seconds: float = 0.0


@dataclass
class PipelineReport:
    passes: list[PassReport] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = {"passes": [asdict(p) for p in self.passes],
             "flops_note": "FLOPs = 2*MACs of MatMul/Gemm/Conv/Einsum + 1 per output element of "
                           "elementwise/scan ops, at the input shapes in flops_shape"}
        return json.loads(json.dumps(d, default=_jsonable))

    def format_table(self) -> str:
        w = max([14] + [len(p.name) + 2 for p in self.passes])
        head = (f"{'pass':<{w}}{'changed':<9}{'matches':>8}  {'params':>21}  {'MFLOPs':>21}  "
                f"{'largest tensor (M)':>19}  {'parity':>9}  {'s':>6}")
        lines = [head, "-" * len(head)]
        for p in self.passes:
            fb = "?" if p.flops_before is None else f"{p.flops_before / 1e6:.1f}"
            fa = "?" if p.flops_after is None else f"{p.flops_after / 1e6:.1f}"
            par = "-" if p.parity is None else f"{p.parity:.1e}"
            lb = "?" if p.largest_tensor_before is None else f"{p.largest_tensor_before / 1e6:.2f}"
            la = "?" if p.largest_tensor_after is None else f"{p.largest_tensor_after / 1e6:.2f}"
            lines.append(f"{p.name:<{w}}{'yes' if p.changed else 'no':<9}{p.matches:>8}  "
                         f"{p.params_before:>9} -> {p.params_after:<9}  {fb:>9} -> {fa:<9}  "
                         f"{lb:>8} -> {la:<8}  {par:>9}  {p.seconds:>6.2f}")
            for d in p.details:
                if d.get("kind") == "cleanup":
                    continue
                lines.append("    " + _detail_line(d))
        if self.passes and self.passes[0].flops_shape:
            lines.append(f"(FLOPs and largest intermediate tensor, in elements, at input shapes "
                         f"{fmt_shapes(self.passes[0].flops_shape)})")
        return "\n".join(lines)


def _jsonable(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, tuple):
        return list(o)
    return str(o)


def _detail_line(d: dict[str, Any]) -> str:
    if d.get("kind") == "lowrank-pair":
        nodes = " -> ".join(d.get("nodes", []))
        if {"m", "r", "n"} <= d.keys():
            line = (f"pair {d['m']}x{d['r']}x{d['n']} ({d.get('form', '')}): {d.get('action', '')}, params "
                    f"{d.get('params_before', '?')} -> {d.get('params_after', '?')} [{nodes}]")
        else:
            line = f"pair ({d.get('form', '')}): {d.get('action', '')} [{nodes}]"
        return line + (f": {d['reason']}" if d.get("reason") and not d.get("matched", True) else "")
    keys = [k for k in d if k not in ("kind", "action", "nodes", "matched", "rewritten") and d[k] is not None]
    extra = " ".join(f"{k}={d[k]}" for k in keys)
    nodes = ",".join(d.get("nodes", [])[:4])
    return f"{d.get('kind', '?')}: {d.get('action', '')} [{nodes}] {extra}".rstrip()


def run_model(model: onnx.ModelProto, feeds: Sequence[dict[str, np.ndarray]],
              base_dir: str | Path | None = None) -> list[dict[str, np.ndarray]]:
    sess = ort_session(model, base_dir=base_dir)
    names = [o.name for o in sess.get_outputs()]
    return [dict(zip(names, sess.run(None, f))) for f in feeds]


# Domains that exist only between export and the passes (exporter/linear_attention): no runtime has them.
_UNRUNNABLE_DOMAINS = frozenset({"lrexport"})


def _runnable(model: ir.Model) -> bool:
    """False while a node of lrexport's own domain is left (a pass still has to lower it)."""
    return not any(n.domain in _UNRUNNABLE_DOMAINS for n in model.graph.all_nodes())


def _run_input_model(model: onnx.ModelProto, feeds: Sequence[dict[str, np.ndarray]],
                     base_dir: str | Path | None) -> list[dict[str, np.ndarray]]:
    """The reference outputs of the model as given, one feed at a time so that a failure names its shapes."""
    sess = ort_session(model, base_dir=base_dir)
    names = [o.name for o in sess.get_outputs()]
    outs = []
    for feed in feeds:
        try:
            got = dict(zip(names, sess.run(None, feed)))
        except Exception as err:  # onnxruntime's Fail / InvalidArgument / RuntimeException
            text = " ".join(str(err).split())
            raise InputModelError(feed, error=text[:300]) from None
        for name, value in got.items():
            if value.dtype.kind in "fc" and not np.isfinite(value).all():
                raise InputModelError(feed, output=name)
        outs.append(got)
    return outs


def _compare(pass_name: str, ref: list[dict[str, np.ndarray]], got: list[dict[str, np.ndarray]],
             feeds: Sequence[dict[str, np.ndarray]], atol: float, rtol: float) -> float:
    worst = 0.0
    for r, g, f in zip(ref, got, feeds):
        for name, rv in r.items():
            gv = g.get(name)
            shapes = {k: tuple(v.shape) for k, v in f.items()}
            if gv is None or gv.shape != rv.shape:
                raise PassParityError(pass_name, name, float("inf"), rv.shape, shapes)
            if rv.dtype.kind != "f":
                if not np.array_equal(rv, gv):
                    raise PassParityError(pass_name, name, float("inf"), rv.shape, shapes)
                continue
            err = float(np.max(np.abs(rv.astype(np.float64) - gv.astype(np.float64)))) if rv.size else 0.0
            if not within(gv, rv, Tolerance(atol, rtol)) or not np.isfinite(err):
                raise PassParityError(pass_name, name, err, rv.shape, shapes)
            worst = max(worst, err)
    return worst


def make_pass(name: str, options: PassOptions | None = None) -> GraphPass:
    if name not in _REGISTRY:
        raise ValueError(f"unknown pass {name!r}; choose from: {', '.join(PASS_NAMES)}")
    return _REGISTRY[name](options)


def run_passes(model: onnx.ModelProto, passes: Sequence[str] | None = None, *,
               options: PassOptions | None = None,
               feeds: Sequence[dict[str, np.ndarray]] = (),
               progress: Callable[[str], None] | None = None,
               base_dir: str | Path | None = None,
               ) -> tuple[onnx.ModelProto, PipelineReport]:
    """Run the named passes in order (DEFAULT_PASSES if None); ORT-check parity after each when feeds given.

    ``model`` may be loaded without its external data (``base_dir``: the folder it lies in): the passes
    then read the weights lazily from there, and the result refers to the same files for every weight no
    pass changed, so a model past 2 GB is never held, nor serialized, as one message."""
    with quiet_libraries():
        return _run_passes(model, passes, options=options, feeds=feeds, progress=progress, base_dir=base_dir)


def _run_passes(model: onnx.ModelProto, passes: Sequence[str] | None, *, options: PassOptions | None,
                feeds: Sequence[dict[str, np.ndarray]], progress: Callable[[str], None] | None,
                base_dir: str | Path | None,
                ) -> tuple[onnx.ModelProto, PipelineReport]:
    names = list(DEFAULT_PASSES if passes is None else passes)
    for n in names:
        if n not in _REGISTRY:
            raise ValueError(f"unknown pass {n!r}; choose from: {', '.join(PASS_NAMES)}")
    options = options or PassOptions()
    feeds = list(feeds)
    report = PipelineReport()
    ir_model = ir.serde.deserialize_model(model)
    if base_dir is not None:
        ir.external_data.set_base_dir(ir_model.graph, base_dir)
        _load_small(ir_model)
    proto = model
    flops_shapes = options.flops_shapes or default_shapes(model, feeds or None)
    # A model with lrexport's own ops runs only once they are lowered: the reference is then taken after the
    # pass that lowered them (what export wrote is checked by the build's parity against PyTorch). A pass that
    # writes such an op has no parity of its own; the pass that lowers it is compared with the model before.
    ref = _run_input_model(proto, feeds, base_dir) if feeds and _runnable(ir_model) else None
    params = count_params(proto)
    flops, largest = measure(proto, flops_shapes, base_dir)
    for name in names:
        if progress:
            progress(f"pass {name} ...")
        p = make_pass(name, options)
        t0 = time.perf_counter()
        result = p(ir_model)
        ir_model = result.model
        new_proto = ir.serde.serialize_model(ir_model)
        _release_external(ir_model)
        seconds = time.perf_counter() - t0
        parity = None
        runnable = _runnable(ir_model)  # a pass that writes an lrexport op is checked with the one lowering it
        if feeds and ref is None and runnable:
            ref = _run_input_model(new_proto, feeds, base_dir)
        elif feeds and ref is not None and same_model(new_proto, proto):
            parity = 0.0  # the same model as before the pass: the same outputs
        elif feeds and ref is not None and runnable:
            got = run_model(new_proto, feeds, base_dir)
            parity = _compare(name, ref, got, feeds, options.check_atol, options.check_rtol)
            ref = got
        new_params = count_params(new_proto)
        new_flops, new_largest = measure(new_proto, flops_shapes, base_dir) if result.modified else (flops, largest)
        rep = PassReport(name=name, changed=bool(result.modified), matches=p.matches,
                         details=[m.to_dict() for m in p.records],
                         params_before=params, params_after=new_params, flops_before=flops,
                         flops_after=new_flops, flops_shape=dict(flops_shapes), parity=parity,
                         largest_tensor_before=largest, largest_tensor_after=new_largest,
                         seconds=round(seconds, 3))
        report.passes.append(rep)
        if progress:
            progress(f"pass {name}: changed={rep.changed} matches={rep.matches} parity={parity}")
        params, flops, largest, proto = new_params, new_flops, new_largest, new_proto
    return proto, report


# External tensors up to this size are read into memory: the library passes (cleanup's checker) take
# small initializers as they are into a message checked without a model folder, where no file is found.
_SMALL_EXTERNAL = 64 * 1024


def _load_small(model: ir.Model) -> None:
    for graph in model.graphs():
        for value in graph.initializers.values():
            t = value.const_value
            if isinstance(t, ir.ExternalTensor) and t.nbytes <= _SMALL_EXTERNAL:
                value.const_value = ir.Tensor(t.numpy().copy(), dtype=t.dtype, name=t.name)


def _release_external(model: ir.Model) -> None:
    """Unmap the external weights a pass read (they are mapped again when read again): the mappings
    otherwise stay resident next to ONNX Runtime's copy during the parity check."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                try:
                    value.const_value.release()
                except BufferError:  # a view of it is still in use somewhere: it stays mapped
                    pass
