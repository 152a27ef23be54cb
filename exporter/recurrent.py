"""Recurrent (step) export of causal running-sum models ("Transformers are RNNs").

A causal linear-attention model computes its running sums ``S_t = sum_{j<=t} phi(k_j) v_j^T`` and
``z_t = sum_{j<=t} phi(k_j)`` with CumSums over the sequence. :func:`export_step` derives, from the
exported full-sequence ONNX graph, a *step model* that takes one token (or a chunk of tokens) plus the
running sums of everything before it, and returns the chunk's outputs plus the new sums:

    inputs:  the model's inputs for tokens t0..t0+c-1, state_0..state_{k-1} [, position_offset = t0]
    outputs: the model's outputs for those tokens,     new_state_0..new_state_{k-1}

Models that call lrexport's linear-attention op carry each op's state (its initial_state in, final_state out),
and short causal convolutions carry their last inputs (``graph_passes/recurrent_carry.py``). Softmax attention
carries its keys and values as a KV cache that grows by each chunk (``graph_passes/kv_cache.py``: ``past_key_<j>``
/ ``past_value_<j>`` in, starting empty, ``present_key_<j>`` / ``present_value_<j>`` out); its past length is the
``position_offset`` of the next chunk, which :func:`run_stepwise` checks.
Decoding costs O(1) per token instead of O(n). The rewrite itself is
:class:`graph_passes.recurrent_state.RecurrentStatePass`; this module loads/saves, checks the step
model numerically against the full model (full sequence with zero states, chunk by chunk, token by
token) and refuses, naming node, op and reason, any model whose structure has no step form.

    result = export_step("model.onnx", "step.onnx", specs=specs)
    outs = run_stepwise("step.onnx", {"ids": ids}, chunk=1)          # token by token
    check_step_parity(module, "step.onnx", specs, chunks=(1, 7, 64)).assert_ok()
    build_engine("step.onnx", "step.engine", specs=step_specs(result, (1, 4), (1, 64)))
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from exporter.compare import OutputComparison, Tolerance, Tolerances, compare_arrays
from exporter.errors import LrexportError
from exporter.specs import InputSpec, specs_from_onnx
from exporter.table import fmt_num, format_table
from graph_passes._util import shape_dims
from graph_passes.ort_session import PROTO_LIMIT, held_bytes, ort_session
from graph_passes.kv_cache import PAST_DIM
from graph_passes.recurrent_carry import StateTap
from graph_passes.recurrent_state import CarriedState, RecurrentRefusal, RecurrentStatePass, find_seq_dim

META_KEY = "lrexport.recurrent"
SEQ_AXIS = 1  # lrexport names axis 1 of the inputs "seq"
# lengths the self-check runs: 1 token, and both sides of the linear-attention lowerings' chunk of 64 (the
# per-key and delta forms chunk by 16, which these cross too) and of two chunks
CHECK_LENGTHS = (1, 63, 64, 65, 130)
RULE_TAG = "pkg.onnxscript.rewriter.rule_name"  # set by the graph passes on the nodes they write
KV = "kv-cache"  # CarriedState.kind of a softmax attention's keys/values (graph_passes/kv_cache.py)


# ------------------------------------------------------------------------------------------- results

@dataclass
class StepExportResult:
    """What :func:`export_step` wrote: the step model's token inputs/outputs and its carried states."""

    onnx_path: Path
    seq_dim: str
    batch_dim: str | None
    inputs: list[str]  # token inputs (sliced along their sequence axis)
    input_seq_axes: dict[str, int]
    outputs: list[str]  # token outputs (concatenated along their sequence axis)
    output_seq_axes: dict[str, int]
    states: list[CarriedState]
    position_offset: str | None = None
    input_specs: list[InputSpec] = field(default_factory=list)  # the full model's token input specs
    check: dict[str, Any] = field(default_factory=dict)  # the numeric self-check (max abs errors)
    seconds: float = 0.0

    @property
    def state_names(self) -> list[str]:
        return [s.input for s in self.states]

    @property
    def state_shapes(self) -> dict[str, list[int | str]]:
        return {s.input: list(s.shape) for s in self.states}

    @property
    def state_dtypes(self) -> dict[str, str]:
        return {s.input: s.dtype for s in self.states}

    @property
    def layers(self) -> dict[str, list[str]]:
        """Module path (from the exporter's name scopes) -> the state inputs it owns."""
        out: dict[str, list[str]] = {}
        for s in self.states:
            out.setdefault("<unknown>" if s.module is None else s.module or "<root>", []).append(s.input)
        return out

    @property
    def kv_states(self) -> list[CarriedState]:
        """The states that grow by the chunk (softmax attention's keys and values), ``past`` long."""
        return [s for s in self.states if s.kind == KV]

    def state_bytes(self, batch: int = 1, past: int = 0) -> int:
        """Bytes of the states of ``batch`` sequences with ``past`` earlier tokens in the KV caches."""
        total = 0
        for s in self.states:
            n = 1
            for d in s.shape:
                n *= d if isinstance(d, int) else (past if d == PAST_DIM and s.kind == KV else batch)
            total += n * np.dtype(s.dtype).itemsize
        return total

    def to_dict(self) -> dict[str, Any]:
        return {"onnx": str(self.onnx_path), "seq_dim": self.seq_dim, "batch_dim": self.batch_dim,
                "inputs": self.inputs, "input_seq_axes": self.input_seq_axes, "outputs": self.outputs,
                "output_seq_axes": self.output_seq_axes, "position_offset": self.position_offset,
                "states": [s.to_dict() for s in self.states], "layers": self.layers,
                "state_bytes_per_sequence": self.state_bytes(1),
                "kv_bytes_per_token": self.state_bytes(1, 1) - self.state_bytes(1, 0),
                "input_specs": [s.to_dict() for s in self.input_specs], "check": self.check,
                "seconds": round(self.seconds, 3)}

    def format_text(self) -> str:
        kv = self.state_bytes(1, 1) - self.state_bytes(1, 0)
        grows = f", KV caches {kv / 1024:.2f} KiB per token" if self.kv_states else ""
        lines = [f"wrote {self.onnx_path}: step model with {len(self.states)} carried states "
                 f"({self.state_bytes(1) / 1024:.1f} KiB per sequence{grows})"]
        for s in self.states:
            lines.append(f"  {s.input} -> {s.output}: {' x '.join(map(str, s.shape))} {s.dtype} "
                         f"({s.role}, {_where(s)})")
        if self.position_offset:
            lines.append(f"  {self.position_offset}: int64 scalar, the position of the chunk's first token"
                         + (f" (= the KV caches' {PAST_DIM} length)" if self.kv_states else ""))
        if self.check:
            lines.append("  self-check vs the full model: " + ", ".join(
                f"{k} max abs {fmt_num(v)}" for k, v in self.check.get("max_abs", {}).items()))
        return "\n".join(lines)


def _where(s: CarriedState) -> str:
    op = s.source or s.node
    if s.module is None:
        return f"node {s.node}"
    return f"{s.module}.{op}" if s.module else f"{op} in the root module"


def _meta_from_result(r: StepExportResult) -> dict[str, Any]:
    return {"format": 1, "seq_dim": r.seq_dim, "batch_dim": r.batch_dim, "inputs": r.inputs,
            "input_seq_axes": r.input_seq_axes, "outputs": r.outputs, "output_seq_axes": r.output_seq_axes,
            "position_offset": r.position_offset, "states": [s.to_dict() for s in r.states],
            "input_specs": [s.to_dict() for s in r.input_specs]}


def _state_from_meta(d: Mapping[str, Any]) -> CarriedState:
    d = dict(d)
    tap = d.pop("tap", None)
    return CarriedState(**d, tap=StateTap(**tap) if tap else None)


def _result_from_meta(meta: Mapping[str, Any], path: Path) -> StepExportResult:
    states = [_state_from_meta(s) for s in meta["states"]]
    specs = [InputSpec(d["name"], d["dtype"], tuple(d["min"]), tuple(d["opt"]), tuple(d["max"]), d.get("low"),
                       d.get("high")) for d in meta.get("input_specs", [])]
    return StepExportResult(path, meta["seq_dim"], meta.get("batch_dim"), list(meta["inputs"]),
                            dict(meta["input_seq_axes"]), list(meta["outputs"]), dict(meta["output_seq_axes"]),
                            states, meta.get("position_offset"), specs)


def read_step_info(step_model: "str | Path | onnx.ModelProto | StepExportResult") -> StepExportResult:
    """The step model's description (from the ``lrexport.recurrent`` metadata that export_step writes)."""
    if isinstance(step_model, StepExportResult):
        return step_model
    path = Path("<model>")
    if isinstance(step_model, (str, Path)):
        path = Path(step_model)
        if not path.is_file():
            raise LrexportError(f"step model {path} does not exist", "write it with export_step / lrexport export-step")
        model = ir.load(str(path))  # weights stay on disk
    else:
        model = ir.from_proto(step_model)
    meta = model.metadata_props.get(META_KEY)
    if not meta:
        raise LrexportError(f"{path} is not an lrexport step model (no {META_KEY!r} metadata)",
                            "export it with export_step / lrexport export-step")
    return _result_from_meta(json.loads(meta), path)


# ---------------------------------------------------------------------------------------------- export

def _load_ir(source: Any) -> ir.Model:
    if isinstance(source, ir.Model):
        return ir.from_proto(ir.to_proto(source))  # never rewrite the caller's model in place
    if isinstance(source, onnx.ModelProto):
        return ir.from_proto(source)
    path = Path(source)
    if not path.is_file():
        raise LrexportError(f"ONNX file {path} does not exist", "export the model first (lrexport export)")
    try:
        return ir.from_proto(onnx.load(str(path)))
    except Exception as err:
        raise LrexportError(f"{path} is not a readable ONNX file ({type(err).__name__})", "re-export it") from None


def _recurrences(model: ir.Model) -> None:
    """Write the masked quadratic form of causal linear attention (``(q k^T).tril() @ v``, a seq x seq matrix
    that has no step form as it is) as the linear-attention node it equals (``graph_passes/quadratic_causal.py``),
    which carries its state like any other."""
    from graph_passes.quadratic_causal import QuadraticCausalPass

    try:
        seq = find_seq_dim(model.graph, SEQ_AXIS)
    except RecurrentRefusal:
        return  # the pass says why, naming the input
    if any((shape_dims(v) or []).count(seq) > 1 for n in model.graph for v in n.outputs):
        QuadraticCausalPass()(model)  # only where a seq x seq tensor would be refused anyway


def _seq_axes(values: Sequence[ir.Value], seq: str) -> dict[str, int]:
    out = {}
    for v in values:
        dims = [d.value if isinstance(d, ir.SymbolicDim) else d for d in (v.shape or [])]
        if seq in dims:
            out[v.name or ""] = dims.index(seq)
    return out


def _seq_name(model: ir.Model) -> str:
    try:
        return find_seq_dim(model.graph, SEQ_AXIS)
    except RecurrentRefusal:
        return "seq"


def _probe_runs(specs: Sequence[InputSpec], axes: Mapping[str, int]) -> tuple[tuple[int, int], ...]:
    """Two (batch, length) pairs inside the specs, as unlike each other and the model's other sizes as they can
    be, at which the shape probe runs the model."""
    lo_n, hi_n, lo_b, hi_b = 1, 1 << 30, 1, 1 << 30
    for s in specs:
        if s.rank:
            lo_b, hi_b = max(lo_b, s.min[0]), min(hi_b, s.max[0])
        if s.name in axes:
            a = axes[s.name]
            lo_n, hi_n = max(lo_n, s.min[a]), min(hi_n, s.max[a])
    lengths = [n for n in (11, 13, 7, 5, 3, 2) if lo_n <= n <= hi_n] or [lo_n]
    batches = [b for b in (2, 3, 1) if lo_b <= b <= hi_b] or [lo_b]
    n1, n2 = lengths[0], (lengths[1:] or lengths)[0]
    b1, b2 = batches[0], (batches[1:] or batches)[0]
    return (b1, n1), (b2, n2)


def _shape_probe(model: ir.Model, specs: Sequence[InputSpec], runs: Sequence[tuple[int, int]], linear_attention: str
                 ) -> Callable[[Sequence[str]], dict[str, list[tuple[int, ...]]]]:
    """A probe for the KV-cache sites (graph_passes/kv_cache.py): the shapes the named values of ``model`` (as
    it is when called) take when the model runs at each of ``runs``, for the axes shape inference lost."""

    def probe(names: Sequence[str]) -> dict[str, list[tuple[int, ...]]]:
        copy = ir.from_proto(ir.to_proto(model))
        values = {v.name: v for n in copy.graph for v in n.outputs}
        wanted = [values[n] for n in names if n in values and values[n] not in copy.graph.outputs]
        if not wanted:
            return {}
        copy.graph.outputs.extend(wanted)
        lower_linear_attention(copy, linear_attention)
        sess = ort_session(ir.to_proto(copy))
        seq_axes = _seq_axes(list(model.graph.inputs), _seq_name(model))
        out_names = [o.name for o in sess.get_outputs()]
        shapes: dict[str, list[tuple[int, ...]]] = {v.name or "": [] for v in wanted}
        for k, (b, n) in enumerate(runs):
            feeds = _sequence_feeds(specs, seq_axes, n, b, k)
            got = dict(zip(out_names, sess.run(None, feeds)))
            for v in wanted:
                shapes[v.name or ""].append(tuple(got[v.name or ""].shape))
        return shapes

    return probe


def _from_causal_chunk(model: ir.Model, node_name: str | None) -> bool:
    """Whether the refused node came from lrexport's chunked-causal rewrite (its rule tag says so)."""
    if not node_name:
        return False
    for node in model.graph:
        if node.name == node_name:
            return node.metadata_props.get(RULE_TAG, "").startswith("Causal")
    return False


def _refuse_blocked_sequence(specs: Sequence[InputSpec]) -> None:
    """A sequence taken in multiples of B (the model sums per block of B tokens) has no token-by-token form."""
    for s in specs:
        if s.rank > SEQ_AXIS and s.step(SEQ_AXIS) > 1:
            b = s.step(SEQ_AXIS)
            raise LrexportError(f"cannot export a step model: input {s.name!r} takes the sequence in multiples of {b} "
                                f"(the model splits it into blocks of {b} and its running sums advance a block at a "
                                "time), so it cannot be fed one token at a time",
                                "export the full-sequence model (lrexport build); a step model needs running sums "
                                "that advance one token at a time")


def export_step(onnx_path_or_model: Any, out_path: str | Path, *, specs: Sequence[InputSpec] | None = None,
                check: bool = True, check_lengths: Sequence[int] = CHECK_LENGTHS, check_chunk: int = 5,
                seed: int = 0, linear_attention: str = "portable",
                progress: Callable[[str], None] | None = None) -> StepExportResult:
    """Derive the step model of a causal running-sum model and write it to ``out_path``.

    ``onnx_path_or_model``: the full-sequence model as lrexport exported it (path, ModelProto or
    ir.Model). ``specs``: its input specs (value ranges for the check and for :func:`step_specs`;
    read from the ONNX file when None). ``linear_attention`` names the lowering of the model's
    ``lrexport.LinearAttention`` nodes (``graph_passes/linear_attention.py``: "portable" or "onnxruntime").
    With ``check`` the step model is run on random sequences of each of ``check_lengths`` tokens (inside
    the specs' range) in one go (zero states), token by token and ``check_chunk`` tokens at a time, against
    the full model, outputs and states (each state against the full model's value it stands for); any
    difference refuses the export (it means the graph mixes positions in a way the structural check did
    not see).
    """
    say = progress or (lambda _m: None)
    start = time.perf_counter()
    out_path = Path(out_path)
    model = _load_ir(onnx_path_or_model)
    _recurrences(model)
    original = ir.to_proto(model)  # the full model, for the self-check (the pass rewrites ``model``)
    token_inputs = [v.name or "" for v in model.graph.inputs]
    token_outputs = [v.name or "" for v in model.graph.outputs]
    specs = list(specs) if specs is not None else specs_from_onnx(model)
    _refuse_blocked_sequence(specs)
    say("carrying the running sums, linear-attention states, conv windows and KV caches as states")
    runs = _probe_runs(specs, _seq_axes(list(model.graph.inputs), _seq_name(model)))
    try:
        res = RecurrentStatePass(seq_axis=SEQ_AXIS, probe=_shape_probe(model, specs, runs, linear_attention),
                                 probe_runs=runs)(model)
    except RecurrentRefusal as err:
        hint = err.hint
        if _from_causal_chunk(model, err.node):
            hint = ("this graph went through the causal-chunk pass, which has no step form: export the step model "
                    "from the model as exported (lrexport export / exported.onnx), then run the other passes on it")
        raise LrexportError(f"cannot export a step model: {err}", hint) from None
    seq = res.seq_dim or "seq"
    graph = model.graph
    in_axes = _seq_axes([v for v in graph.inputs if v.name in token_inputs], seq)
    out_axes = _seq_axes([v for v in graph.outputs if v.name in token_outputs], seq)
    no_seq = [n for n in token_outputs if n not in out_axes]
    if no_seq:
        raise LrexportError(f"cannot export a step model: output {no_seq[0]!r} has no sequence axis",
                            "a step model returns per-token outputs; return the per-position tensor")
    batch_dim = None
    for v in graph.inputs:
        if v.name in token_inputs and v.shape is not None and len(v.shape) > 0 \
                and isinstance(v.shape[0], ir.SymbolicDim):
            batch_dim = v.shape[0].value
            break
    for s in res.states:
        odd = [d for d in s.shape if not isinstance(d, int) and d != batch_dim and not (s.kind == KV and d == PAST_DIM)]
        if odd:
            raise LrexportError(f"cannot export a step model: state {s.input} of node {s.node} has a dimension "
                                f"{odd[0]!r} that is neither the batch nor a fixed size",
                                "the running sums must have fixed feature sizes")
    by_name = {s.name: s for s in specs}
    missing = [n for n in token_inputs if n not in by_name]
    if missing:
        raise LrexportError(f"no input spec for the model input {missing[0]!r}",
                            f"name every model input ({', '.join(token_inputs)}) in the specs")
    result = StepExportResult(out_path, seq, batch_dim, token_inputs, in_axes, token_outputs, out_axes,
                              res.states, res.position_offset, [by_name[n] for n in token_inputs])
    model.metadata_props[META_KEY] = json.dumps(_meta_from_result(result))
    lower_linear_attention(model, linear_attention)
    proto = ir.to_proto(model)
    try:
        if held_bytes(proto) < PROTO_LIMIT:  # the in-memory checker cannot take more than 2 GB
            onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as err:
        raise LrexportError(f"the step model fails onnx.checker ({str(err).splitlines()[0][:200]})",
                            "report this as an lrexport bug with the model") from None
    if check:
        say("checking the step model against the full model")
        reference = state_reference_model(original, result.states, linear_attention)
        result.check = _self_check(reference, proto, result, check_lengths, check_chunk, seed)
    from exporter.export import save_onnx

    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_onnx(proto, out_path)
    result.seconds = time.perf_counter() - start
    return result


def _sequence_feeds(specs: Sequence[InputSpec], axes: Mapping[str, int], n: int, batch: int | None,
                    seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for s in specs:
        shape = list(s.opt)
        if s.name in axes:
            shape[axes[s.name]] = n
        if batch is not None and s.rank and s.min[0] != s.max[0]:
            shape[0] = batch
        # a step model attends to every earlier token: its padding masks mark every token real
        feeds[s.name] = np.ones(shape, s.np_dtype) if s.mask_for else s.random(shape, rng)
    return feeds


def _seq_length(spec_list: Sequence[InputSpec], axes: Mapping[str, int], want: int) -> int:
    lo, hi = 1, want
    for s in spec_list:
        if s.name in axes:
            a = axes[s.name]
            lo, hi = max(lo, s.min[a]), min(hi, s.max[a])
    return max(lo, min(want, hi))


def lower_linear_attention(model: ir.Model, form: str) -> None:
    """Lower the model's ``lrexport.LinearAttention`` nodes in place (no runtime has lrexport's domain)."""
    from graph_passes import PassOptions
    from graph_passes.linear_attention import LOWERINGS, LinearAttentionPass

    if form not in LOWERINGS:
        raise LrexportError(f"unknown linear-attention lowering {form!r}", f"choose from: {', '.join(LOWERINGS)}")
    LinearAttentionPass(PassOptions(linear_attention=form))(model)


def state_reference_model(full: Any, states: Sequence[CarriedState], linear_attention: str = "portable"
                          ) -> onnx.ModelProto:
    """The full-sequence model with, for each carried state, an output named like the state's output (its
    ``new_state_<i>``) holding what that state must be after the whole sequence (the value its tap reads,
    in the state's dtype), linear attention lowered: the reference a step model's states are checked
    against. A state without a tap gets no output."""
    model = _load_ir(full)
    graph = model.graph
    values = {v.name: v for n in graph for v in n.outputs}
    values.update({v.name: v for v in graph.inputs})
    for s in states:
        tap = s.tap
        if tap is None or tap.value not in values:
            continue
        value = values[tap.value]
        label = f"{s.output}_reference"

        def const(name: str, arr: list[int]) -> ir.Value:
            v = ir.Value(name=f"{label}_{name}", const_value=ir.tensor(np.array(arr, dtype=np.int64)),
                         shape=ir.Shape([len(arr)]), type=ir.TensorType(ir.DataType.INT64))
            graph.register_initializer(v)
            return v

        nodes: list[ir.Node] = []
        if tap.kind == "last":
            nodes.append(ir.node("Gather", [value, const("last", [-1])], {"axis": tap.axis}))
            nodes.append(ir.node("Squeeze", [nodes[-1].outputs[0], const("axis", [tap.axis])]))
        elif tap.kind == "window":
            rank = len(value.shape or [])
            pads = [0] * (2 * rank)
            pads[tap.axis] = tap.size
            nodes.append(ir.node("Pad", [value, const("pads", pads)]))
            nodes.append(ir.node("Slice", [nodes[-1].outputs[0], const("start", [-tap.size]),
                                           const("end", [np.iinfo(np.int64).max]), const("axis", [tap.axis])]))
        else:
            nodes.append(ir.node("Identity", [value]))
        nodes.append(ir.node("Cast", [nodes[-1].outputs[0]], {"to": ir.DataType.from_numpy(np.dtype(s.dtype))}))
        out = nodes[-1].outputs[0]
        out.name = s.output
        graph.extend(nodes)
        graph.outputs.append(out)
    lower_linear_attention(model, linear_attention)
    return ir.to_proto(model)


def _self_check(reference: onnx.ModelProto, step: onnx.ModelProto, info: StepExportResult, lengths: Sequence[int],
                chunk: int, seed: int) -> dict[str, Any]:
    full = ort_session(reference)
    full_names = [o.name for o in full.get_outputs()]
    sess = ort_session(step)
    tol = Tolerance(atol=1e-4, rtol=1e-3)
    sizes = sorted({_seq_length(info.input_specs, info.input_seq_axes, n) for n in lengths})
    report: dict[str, Any] = {"lengths": sizes, "max_abs": {}}
    for n in sizes:
        feeds = _sequence_feeds(info.input_specs, info.input_seq_axes, n, None, seed + n)
        expected = dict(zip(full_names, full.run(None, feeds)))
        names = list(info.outputs) + [s.output for s in info.states if s.output in expected]
        for label, c in (("full", n), ("token", 1), (f"chunk{chunk}", chunk)):
            try:
                got = run_stepwise(info, feeds, c, session=sess)
            except LrexportError:
                raise
            except Exception as err:  # onnxruntime: e.g. a mask op that cannot take the cache's longer axis
                raise LrexportError(f"cannot export a step model: the step model fails to run {c} token(s) at a "
                                    f"time ({str(err).splitlines()[0][-300:]}){_kv_note(info)}",
                                    "only causal recurrent models and causal softmax attention have a step form; "
                                    "export the full-sequence model instead") from None
            worst = report["max_abs"].get(label, 0.0)
            for name in names:
                comp = compare_arrays(name, got[name], expected[name], tol)
                worst = max(worst, comp.max_abs)
                if not comp.ok:
                    how = "in one go with zero states" if label == "full" else f"{c} token(s) at a time"
                    what = "output" if name in info.outputs else "state"
                    raise LrexportError(
                        f"cannot export a step model: run on {n} tokens {how}, the step model's {what} {name!r} "
                        f"differs from the full model (max abs error {fmt_num(comp.max_abs)} at "
                        f"{list(comp.worst_index)}): the graph mixes positions along the sequence in a way that is "
                        "not a causal running sum or recurrence (e.g. an op that reads the sequence length, a "
                        f"position-dependent mask, or a shift along the sequence){_kv_note(info)}",
                        "only causal recurrent models and causal softmax attention have a step form; export the "
                        "full-sequence model instead")
            report["max_abs"][label] = worst
    return report


def _kv_note(info: StepExportResult) -> str:
    nodes = list(dict.fromkeys(s.node for s in info.kv_states))
    if not nodes:
        return ""
    return (f"; the softmax attention at node {', '.join(nodes)} (Softmax) gets a KV cache that shows every earlier "
            "token, which a mask hiding earlier keys (a sliding window, a non-causal or padding mask) contradicts")


# ------------------------------------------------------------------------------------------- running

def initial_states(step_model: Any, batch: int = 1) -> dict[str, np.ndarray]:
    """Zero states for ``batch`` sequences: {state input name: array} (the running sums before token 0)."""
    info = read_step_info(step_model)
    if batch < 1:
        raise LrexportError(f"batch {batch} must be >= 1", "pass the number of sequences")
    out = {}
    for s in info.states:  # a KV cache starts empty (no earlier token)
        shape = [d if isinstance(d, int) else (0 if s.kind == KV and d == PAST_DIM else batch) for d in s.shape]
        out[s.input] = np.zeros(shape, dtype=np.dtype(s.dtype))
    return out


def past_length(step_model: Any, states: Mapping[str, np.ndarray]) -> int | None:
    """The number of earlier tokens in the KV caches of ``states`` (None when the model has none); refuse caches
    of different lengths."""
    info = read_step_info(step_model)
    lengths = {np.shape(states[s.input])[s.axis] for s in info.kv_states if s.input in states}
    if len(lengths) > 1:
        raise LrexportError(f"the KV caches hold different numbers of tokens {sorted(lengths)}",
                            "feed back the present_* outputs of the same step")
    return lengths.pop() if lengths else None


def run_stepwise(step_onnx: Any, feeds: Mapping[str, np.ndarray], chunk: int, *,
                 states: Mapping[str, np.ndarray] | None = None, position: int = 0,
                 session: Any = None) -> dict[str, np.ndarray]:
    """Feed a whole sequence through the step model ``chunk`` tokens at a time (1: token by token).

    ``feeds`` holds the model's token inputs for the full sequence. States start at zero (or
    ``states``) and are carried from chunk to chunk; ``position`` is the first token's position.
    Returns the token outputs concatenated along the sequence, plus the final states under their
    ``new_state_<i>`` / ``present_*`` names (feed them back as ``state_<i>`` / ``past_*`` to continue the
    sequence). KV caches start empty; ``position`` must equal the number of tokens they hold.
    """
    info = read_step_info(step_onnx)
    if chunk < 1:
        raise LrexportError(f"chunk {chunk} must be >= 1", "use 1 for token by token")
    missing = [n for n in info.inputs if n not in feeds]
    if missing:
        raise LrexportError(f"run_stepwise needs input {missing[0]!r}", f"feed {', '.join(info.inputs)}")
    lengths = {feeds[n].shape[info.input_seq_axes[n]] for n in info.inputs if n in info.input_seq_axes}
    if len(lengths) != 1:
        raise LrexportError(f"the token inputs have different sequence lengths {sorted(lengths)}",
                            "give every token input the same length")
    (n,) = lengths
    batch = next(iter(feeds.values())).shape[0] if feeds else 1
    if session is None:
        if isinstance(step_onnx, StepExportResult):
            step_onnx = step_onnx.onnx_path
        session = ort_session(step_onnx)
    carry = dict(states) if states is not None else initial_states(info, batch)
    past = past_length(info, carry)
    if past is not None and past != position:
        raise LrexportError(f"position {position} is not the {past} tokens the KV caches hold",
                            "pass position = the number of tokens before the chunk (the caches' length)")
    pieces: dict[str, list[np.ndarray]] = {o: [] for o in info.outputs}
    out_names = [o.name for o in session.get_outputs()]
    for t0 in range(0, n, chunk):
        t1 = min(n, t0 + chunk)
        step_feeds: dict[str, np.ndarray] = {}
        for name in info.inputs:
            arr = feeds[name]
            if name in info.input_seq_axes:
                idx = [slice(None)] * arr.ndim
                idx[info.input_seq_axes[name]] = slice(t0, t1)
                arr = np.ascontiguousarray(arr[tuple(idx)])
            step_feeds[name] = arr
        for s in info.states:
            step_feeds[s.input] = carry[s.input]
        if info.position_offset:
            step_feeds[info.position_offset] = np.array(position + t0, dtype=np.int64)
        outs = dict(zip(out_names, session.run(None, step_feeds)))
        for o in info.outputs:
            pieces[o].append(outs[o])
        carry = {s.input: outs[s.output] for s in info.states}
    result = {o: np.concatenate(p, axis=info.output_seq_axes[o]) for o, p in pieces.items()}
    result.update({s.output: carry[s.input] for s in info.states})
    return result


# -------------------------------------------------------------------------------------------- parity

@dataclass
class StepParityReport:
    """Step model run token by token / chunk by chunk vs the PyTorch model on the full sequence (outputs), and,
    where the full-sequence ONNX model is given, vs its values of the states after that sequence."""

    reference: str
    length: int
    batch: int
    results: list[tuple[int, list[OutputComparison]]] = field(default_factory=list)  # (chunk, per output)
    runs: list[tuple[int, int, list[OutputComparison]]] = field(default_factory=list)  # other lengths: (n, chunk, ..)
    constant_states: list[str] = field(default_factory=list)  # state outputs that depend on no input

    def _all(self) -> list[tuple[int, int, list[OutputComparison]]]:
        return [(self.length, chunk, comps) for chunk, comps in self.results] + list(self.runs)

    @property
    def ok(self) -> bool:
        return bool(self.results) and not self.constant_states and all(
            c.ok for _, _, comps in self._all() for c in comps)

    def max_abs(self) -> dict[int, float]:
        return {chunk: max(c.max_abs for c in comps) for chunk, comps in self.results}

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "reference": self.reference, "length": self.length, "batch": self.batch,
                "results": [{"length": self.length, "chunk": chunk, "outputs": [c.to_dict() for c in comps]}
                            for chunk, comps in self.results],
                "runs": [{"length": n, "chunk": chunk, "outputs": [c.to_dict() for c in comps]}
                         for n, chunk, comps in self.runs],
                "constant_states": self.constant_states}

    def __str__(self) -> str:
        return self.format_table()

    def format_table(self) -> str:
        headers = ["length", "chunk", "steps", "output", "max abs", "min rtol", "rel L2", "cosine", "fail/total",
                   "status"]
        rows = []
        for n, chunk, comps in self._all():
            steps = -(-n // chunk)
            for c in comps:  # min rtol, not max rel: see ParityReport.format_table
                rows.append([n, chunk, steps, c.output, c.max_abs, c.min_rtol, c.rel_l2, f"{c.cosine:.6f}",
                             f"{c.mismatches + c.nonfinite}/{c.total}", "ok" if c.ok else "FAIL"])
        title = f"step parity vs {self.reference} (sequence of {self.length}, batch {self.batch})"
        lines = [format_table(headers, rows, title=title)]
        lines += [f"state {name} is a constant of the step model (it depends on no input): the step model drops "
                  "what the tokens write into it" for name in self.constant_states]
        return "\n".join(lines) + f"\nstep parity: {'PASS' if self.ok else 'FAIL'}"

    def assert_ok(self) -> None:
        if not self.ok:
            raise AssertionError("lrexport step parity failed\n" + self.format_table())


def constant_states(step_onnx: Any) -> list[str]:
    """The step model's state outputs whose value depends on none of its inputs (a constant: e.g. cache writes
    that the export lost, leaving the initial zeros)."""
    info = read_step_info(step_onnx)
    if isinstance(step_onnx, (onnx.ModelProto, ir.Model)):
        model = _load_ir(step_onnx)
    else:
        model = ir.load(str(info.onnx_path))  # weights stay on disk
    inputs = set(model.graph.inputs)
    found = []
    outputs = {v.name: v for v in model.graph.outputs}
    for s in info.states:
        seen: set[int] = set()
        todo = [outputs.get(s.output)]
        reaches = False
        while todo and not reaches:
            v = todo.pop()
            if v is None or id(v) in seen:
                continue
            seen.add(id(v))
            if v in inputs:
                reaches = True
            elif v.producer() is not None:
                todo += list(v.producer().inputs)
        if not reaches:
            found.append(s.output)
    return found


def check_step_parity(module: Any, step_onnx: Any, specs: Sequence[InputSpec] | None = None,
                      chunks: Sequence[int] = (1, 7, 64), *, length: int = 100, lengths: Sequence[int] = (),
                      full_model: Any = None, linear_attention: str = "portable", batch: int | None = None,
                      seed: int = 0, precision: str = "fp32", atol: float | None = None,
                      rtol: float | None = None) -> StepParityReport:
    """Run the PyTorch ``module`` on a full random sequence of ``length`` tokens (and of each of ``lengths``)
    and the step model on the same sequence ``chunk`` tokens at a time, for every chunk; compare per output.
    With ``full_model`` (the full-sequence ONNX the step model was derived from; its linear attention lowered
    with ``linear_attention``) the states the step model ends with are compared with that model's values of
    them after the sequence. A state output that is a constant of the step model always fails."""
    from exporter.loading import LoadedModel
    from exporter.runners import TorchRunner

    info = read_step_info(step_onnx)
    module = module.module if isinstance(module, LoadedModel) else module
    specs = list(specs) if specs is not None else info.input_specs
    by_name = {s.name: s for s in specs}
    missing = [n for n in info.inputs if n not in by_name]
    if missing:
        raise LrexportError(f"no input spec for {missing[0]!r}", f"give specs for {', '.join(info.inputs)}")
    specs = [by_name[n] for n in info.inputs]
    n = _seq_length(specs, info.input_seq_axes, length)
    others = sorted({_seq_length(specs, info.input_seq_axes, t) for t in lengths} - {n})
    reference = TorchRunner(module, info.outputs, info.inputs)
    tols = Tolerances.for_precision(precision, atol, rtol)
    path = info.onnx_path if not isinstance(step_onnx, onnx.ModelProto) else step_onnx
    session = ort_session(path)
    states_ref = None
    if full_model is not None:
        ref_model = state_reference_model(full_model, info.states, linear_attention)
        states_ref = ort_session(ref_model)
    report = StepParityReport(f"pytorch {reference.precision}", n, 0, constant_states=constant_states(step_onnx))
    for t in [n, *others]:
        feeds = _sequence_feeds(specs, info.input_seq_axes, t, batch, seed + (0 if t == n else t))
        report.batch = next(iter(feeds.values())).shape[0]
        expected = reference.run(feeds)
        names = list(info.outputs)
        if states_ref is not None:
            ref_names = [o.name for o in states_ref.get_outputs()]
            full_feeds = {k: v for k, v in feeds.items() if k in {i.name for i in states_ref.get_inputs()}}
            expected.update({k: v for k, v in zip(ref_names, states_ref.run(None, full_feeds))
                             if k not in expected})
            names += [s.output for s in info.states if s.output in expected]
        for chunk in chunks:
            got = run_stepwise(info, feeds, chunk, session=session)
            comps = [compare_arrays(o, got[o], expected[o], tols.get(o)) for o in names]
            if t == n:
                report.results.append((chunk, comps))
            else:
                report.runs.append((t, chunk, comps))
    return report


# ---------------------------------------------------------------------------------------------- engine

def step_specs(result: Any, batch_range: tuple[int, ...] = (1, 4), chunk_range: tuple[int, ...] = (1, 64)
               ) -> list[InputSpec]:
    """Shape ranges of the step model for a TensorRT profile: token inputs with their sequence axis in
    ``chunk_range`` and batch in ``batch_range`` ((min, max) or (min, opt, max)), the states with the
    same batch range (a KV cache's ``past`` axis: 0 .. the model's longest sequence less the longest chunk), and
    ``position_offset`` as an int64 scalar."""
    info = read_step_info(result)

    def rng(r: tuple[int, ...], what: str) -> tuple[int, int, int]:
        if len(r) == 2:
            r = (r[0], r[0], r[1])
        if len(r) != 3 or not 1 <= r[0] <= r[1] <= r[2]:
            raise LrexportError(f"bad {what} range {r}", "give (min, max) or (min, opt, max) with 1 <= min <= max")
        return r[0], r[1], r[2]

    b, c = rng(tuple(batch_range), "batch"), rng(tuple(chunk_range), "chunk")
    out: list[InputSpec] = []
    for spec in info.input_specs:
        lo, op, hi = list(spec.min), list(spec.opt), list(spec.max)
        if spec.rank and spec.min[0] != spec.max[0]:
            lo[0], op[0], hi[0] = b
        axis = info.input_seq_axes.get(spec.name)
        if axis is not None:
            lo[axis], op[axis], hi[axis] = c
        out.append(InputSpec(spec.name, spec.dtype, tuple(lo), tuple(op), tuple(hi), spec.low, spec.high))
    longest = max((s.max[a] for s in info.input_specs for n, a in info.input_seq_axes.items() if n == s.name),
                  default=c[2])
    past = (0, max(0, min(longest - c[2], longest // 2)), max(0, longest - c[2]))  # tokens before the chunk
    for s in info.states:
        dims = [(d, d, d) if isinstance(d, int) else (past if s.kind == KV and d == PAST_DIM else b)
                for d in s.shape]
        out.append(InputSpec(s.input, s.dtype, tuple(d[0] for d in dims), tuple(d[1] for d in dims),
                             tuple(d[2] for d in dims)))
    if info.position_offset:
        out.append(InputSpec(info.position_offset, "int64", (), (), (), 0.0, float(max(0, longest - c[2]))))
    return out
