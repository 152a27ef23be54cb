"""States a step model carries besides running sums: a linear-attention node's recurrent state, and a causal
convolution's window of recent inputs.

* ``lrexport.LinearAttention`` (exporter/linear_attention, every rule) already is a recurrence with an
  ``initial_state`` input and a ``final_state`` output: the step model feeds the state of the tokens before
  the chunk to the first and returns the second. Nothing else about the node changes, so any lowering
  (``graph_passes/linear_attention.py``) runs on the step model as on the full one.
* A convolution over the sequence (a 1-D ``Conv`` whose input has the sequence on its last axis) is causal
  when the zeros padded before the sequence, less the positions a Slice of its output drops at the start,
  are at least its reach ``dilation * (kernel - 1)``: output ``t`` then reads inputs ``t - W .. t`` at most
  (``W`` that padding, the window) and no later one. That is the short convolution of Mamba, GatedDeltaNet
  or LFM2 (``Conv1d(d, d, K, groups=d, padding=K-1)(x)[..., :T]``, or ``Conv1d(F.pad(x, (K-1, 0)))``). Its
  step form prepends the last ``W`` inputs of the earlier tokens instead of zeros (zeros before the first
  chunk, as the full model pads), drops the padding, and returns the last ``W`` inputs of the concatenation
  as the new window: a chunk of any length, even shorter than ``W``, continues where the previous ended.

The sites are recognized from the graph's structure (op types, constant pads and slices, the symbolic
sequence dimension), never from names. Each carried state also names the value of the *full* model whose
value on a whole sequence is the state after it (:class:`StateTap`), so a check can compare the states a
step model returns with the full model's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from graph_passes._util import const_array, const_ints, shape_dims

LA_DOMAIN, LA_OP = "lrexport", "LinearAttention"  # exporter/linear_attention/onnx_export.py
_INT64_MAX = np.iinfo(np.int64).max


@dataclass
class StateTap:
    """How the full model computes a state's reference on a whole sequence from its value ``value``:
    ``final`` the value itself, ``last`` its last entry along ``axis``, ``window`` its last ``size`` entries
    along ``axis`` after ``size`` zeros are put before the sequence."""

    value: str
    kind: str
    axis: int = 0
    size: int = 0


def export_meta(node: ir.Node) -> dict[str, str]:
    """torch.onnx's name-scope metadata of ``node``, carried onto the nodes that replace it (the state's module)."""
    return {k: v for k, v in node.metadata_props.items() if k.startswith("pkg.torch.onnx")}


def int64_initializer(graph: ir.Graph, name: str, values: list[int] | int) -> ir.Value:
    arr = np.array(values, dtype=np.int64)
    v = ir.Value(name=name, const_value=ir.tensor(arr, name=name), shape=ir.Shape(arr.shape),
                 type=ir.TensorType(ir.DataType.INT64))
    graph.register_initializer(v)
    return v


def replace_value(graph: ir.Graph, old: ir.Value, new: ir.Value, *, uses: list[tuple[ir.Node, int]] | None = None,
                  suffix: str = "replaced") -> None:
    """Every use of ``old`` (or only ``uses``, taken before nodes that read ``old`` itself were added) reads
    ``new``; a graph output keeps its name, which ``old`` gives up for ``<name>_<suffix>``."""
    for user, idx in list(old.uses()) if uses is None else uses:
        user.replace_input_with(idx, new)
    was_output = [k for k, o in enumerate(graph.outputs) if o is old]
    if was_output:
        name = old.name
        old.name = f"{name}_{suffix}"
        new.name = name
    for k in was_output:
        graph.outputs[k] = new


def carry_window(graph: ir.Graph, data: ir.Value, axis: int, size: int, label: str, meta: dict[str, str],
                 state_name: str, out_name: str) -> tuple[ir.Value, ir.Node, ir.Node]:
    """Graph input ``state_name`` (the last ``size`` values of ``data`` along ``axis`` before the chunk), the
    Concat of it before ``data``, and the Slice of that Concat's last ``size`` values, graph output
    ``out_name``: (state, concat, keep). The caller inserts both nodes and reads the Concat."""
    dims = list(data.shape or [])
    state_dims = [size if i == axis else d for i, d in enumerate(dims)]
    dtype = data.dtype or ir.DataType.FLOAT
    state = ir.Value(name=state_name, shape=ir.Shape(state_dims), type=ir.TensorType(dtype))
    graph.inputs.append(state)
    cat = ir.node("Concat", [state, data], {"axis": axis}, name=f"{label}_concat", metadata_props=dict(meta))
    cat.outputs[0].name, cat.outputs[0].type = f"{label}_input", ir.TensorType(dtype)
    keep = ir.node("Slice", [cat.outputs[0], int64_initializer(graph, f"{label}_start", [-size]),
                             int64_initializer(graph, f"{label}_end", [_INT64_MAX]),
                             int64_initializer(graph, f"{label}_axis", [axis])],
                   name=f"{label}_last", metadata_props=dict(meta))
    out = keep.outputs[0]
    out.name, out.shape, out.type = out_name, ir.Shape(state_dims), ir.TensorType(dtype)
    graph.outputs.append(out)
    return state, cat, keep


def _attr(node: ir.Node, name: str, default: Any = None) -> Any:
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _seq_at(value: ir.Value | None, seq: str) -> list[int]:
    return [i for i, d in enumerate(shape_dims(value) or []) if d == seq]


# ------------------------------------------------------------------------------------- linear attention

def is_linear_attention(node: ir.Node) -> bool:
    return node.domain == LA_DOMAIN and node.op_type == LA_OP


def linear_attention_refusal(node: ir.Node, seq: str) -> str | None:
    """Why the node cannot carry its state from chunk to chunk, or None."""
    q = node.inputs[0] if node.inputs else None
    if _seq_at(q, seq) != [1]:
        return f"its q ({'x'.join(map(str, shape_dims(q) or ['?']))}) does not have the sequence on axis 1"
    s0 = node.inputs[5] if len(node.inputs) > 5 else None
    if s0 is not None and not _zeros(s0):
        return ("it starts from an initial_state computed in the model, so the step model cannot feed it the "
                "state of the earlier tokens")
    if len(node.outputs) < 2:
        return "it has no final_state output"
    state = node.outputs[1]
    if shape_dims(state) is None:  # a node a pass wrote (no shape inference for lrexport's domain)
        known = _state_shape(node)
        if known is not None:
            state.shape, state.type = ir.Shape(known), ir.TensorType(ir.DataType.FLOAT)
    dims = shape_dims(state)
    if dims is None or len(dims) != 4 or not all(isinstance(d, int) for d in dims[1:]):
        return f"its final_state shape ({dims}) is not (batch, heads, dk, dv) with static heads and dims"
    return None


def _state_shape(node: ir.Node) -> list[Any] | None:
    """(batch, state heads, dk, dv [+1 with the normalizer]) from the node's inputs and head attributes."""
    q, v = node.inputs[0], node.inputs[2] if len(node.inputs) > 2 else None
    if q is None or v is None or q.shape is None or v.shape is None or len(q.shape) != 4 or len(v.shape) != 4:
        return None
    heads = [_attr(node, a) for a in ("k_heads", "v_heads")]
    if None in heads or not isinstance(q.shape[3], int) or not isinstance(v.shape[3], int):
        return None
    return [q.shape[0], max(int(h) for h in heads), q.shape[3], v.shape[3] + int(bool(_attr(node, "normalize", 0)))]


_RESHAPES = frozenset({"Expand", "Tile", "Reshape", "Unsqueeze", "Squeeze", "Cast", "Identity", "Flatten"})


def _zeros(value: ir.Value | None) -> bool:
    """Zeros whatever the shape (a constant of zeros, ConstantOfShape of 0, either expanded or reshaped, as
    ``torch.zeros(b, ...)`` exports): the same as no initial state."""
    arr = const_array(value)
    if arr is not None:
        return not arr.any()
    node = value.producer() if value is not None else None
    if node is None or node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type in _RESHAPES:
        return _zeros(node.inputs[0])
    if node.op_type != "ConstantOfShape":
        return False
    fill = node.attributes.get("value")
    return fill is None or not fill.value.numpy().any()


def carry_linear_attention(graph: ir.Graph, node: ir.Node, state_name: str, out_name: str
                           ) -> tuple[ir.Value, ir.Value, StateTap]:
    """Feed graph input ``state_name`` as the node's initial_state (instead of nothing or zeros) and return its
    final_state as graph output ``out_name`` (through an Identity: the node's own output may have other users)."""
    final = node.outputs[1]
    tap = StateTap(final.name or "", "final")
    state = ir.Value(name=state_name, shape=ir.Shape(list(final.shape or [])),
                     type=ir.TensorType(final.dtype or ir.DataType.FLOAT))
    graph.inputs.append(state)
    inputs = list(node.inputs) + [None] * (6 - len(node.inputs))
    inputs[5] = state
    new = ir.node(node.op_type, inputs, dict(node.attributes), domain=node.domain, num_outputs=len(node.outputs),
                  name=node.name, metadata_props=dict(node.metadata_props))
    for old, fresh in zip(node.outputs, new.outputs):
        fresh.name, fresh.shape, fresh.type = old.name, old.shape, old.type
        old.name = None
    graph.insert_before(node, [new])
    for old, fresh in zip(node.outputs, new.outputs):
        for user, idx in list(old.uses()):
            user.replace_input_with(idx, fresh)
        for k, o in enumerate(graph.outputs):
            if o is old:
                graph.outputs[k] = fresh
    graph.remove(node, safe=True)
    ident = ir.node("Identity", [new.outputs[1]], name=f"{node.name or 'linear_attention'}_final_state",
                    metadata_props=export_meta(node))
    out = ident.outputs[0]
    out.name, out.shape, out.type = out_name, final.shape, final.type
    graph.insert_after(new, [ident])
    graph.outputs.append(out)
    return state, out, tap


# ---------------------------------------------------------------------------------- causal convolutions

@dataclass
class CausalConv:
    """A convolution over the sequence (its input's last axis) with ``window`` zeros before the sequence and
    no later input read: ``pad`` (a Pad of its input, or None) -> ``conv`` -> ``crop`` (a Slice of its output
    along the sequence, or None). ``reach`` = dilation * (kernel - 1) <= ``window``; a window of 0 (a pointwise
    convolution) reads no other position and carries nothing."""

    conv: ir.Node
    pad: ir.Node | None
    crop: ir.Node | None
    data: ir.Value  # the input before the padding
    window: int
    reach: int

    @property
    def nodes(self) -> list[ir.Node]:
        return [n for n in (self.pad, self.conv, self.crop) if n is not None]

    @property
    def result(self) -> ir.Value:
        return (self.crop or self.conv).outputs[0]


def _zero_pad_along(node: ir.Node, axis: int, rank: int) -> tuple[int, int] | None:
    """(before, after) zeros a constant-mode Pad puts along ``axis`` and nowhere else, else None."""
    if node.op_type != "Pad" or node.domain not in ("", "ai.onnx") or _attr(node, "mode", "constant") != "constant":
        return None
    pads = const_ints(node.inputs[1]) if len(node.inputs) > 1 else None
    if pads is None:
        return None
    value = node.inputs[2] if len(node.inputs) > 2 else None
    if value is not None:
        arr = const_array(value)
        if arr is None or arr.size and float(arr.reshape(-1)[0]) != 0.0:
            return None
    axes = const_ints(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else list(range(rank))
    if axes is None or len(pads) != 2 * len(axes):
        return None
    k = len(axes)
    found = (0, 0)
    for j, a in enumerate(axes):
        a = a + rank if a < 0 else a
        if a == axis:
            found = (pads[j], pads[j + k])
        elif pads[j] or pads[j + k]:
            return None
    return found


def _crop_start(node: ir.Node, axis: int, rank: int) -> int | None:
    """The constant start of a step-1 Slice along ``axis`` only, else None."""
    if node.op_type != "Slice" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 3:
        return None
    starts = const_ints(node.inputs[1])
    axes = const_ints(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else (
        None if starts is None else list(range(len(starts))))
    steps = const_ints(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else [1]
    if starts is None or axes is None or len(axes) != 1 or (axes[0] + rank if axes[0] < 0 else axes[0]) != axis:
        return None
    if steps != [1] or starts[0] < 0:
        return None
    return starts[0]


def causal_conv(node: ir.Node, seq: str) -> CausalConv | str | None:
    """The causal-convolution site ``node`` (a Conv) belongs to, a reason it is not causal (str), or None when
    it does not run over the sequence."""
    if node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
        return None
    x = node.inputs[0]
    dims = shape_dims(x)
    if dims is None or not [p for p in _seq_at(x, seq) if p >= 2]:
        return None  # not over the sequence (a sequence on the batch axis: each token convolved on its own)
    if len(dims) != 3 or _seq_at(x, seq) != [2]:
        return "convolves along the sequence axis, but not as a 1-D convolution over the last axis"
    if not isinstance(dims[1], int):
        return "convolves along the sequence axis with a dynamic channel count"
    if _attr(node, "auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return f"convolves along the sequence axis with auto_pad {_attr(node, 'auto_pad')}"
    if list(_attr(node, "strides", [1]) or [1]) != [1]:
        return "convolves along the sequence axis with a stride (it skips positions)"
    w = node.inputs[1]
    kernel = _attr(node, "kernel_shape")
    if kernel is None:
        wd = shape_dims(w)
        kernel = wd[2:] if wd is not None and len(wd) == 3 and isinstance(wd[2], int) else None
    if kernel is None:
        return "convolves along the sequence axis with an unknown kernel size"
    reach = int(list(_attr(node, "dilations", [1]) or [1])[0]) * (int(list(kernel)[0]) - 1)
    before, after = [int(p) for p in (list(_attr(node, "pads", [0, 0])) or [0, 0])]
    pad = x.producer()
    data = x
    padded = _zero_pad_along(pad, 2, 3) if pad is not None else None
    if padded is not None and len(list(x.uses())) == 1 and pad is not None and pad.inputs[0] is not None:
        before, after = before + padded[0], after + padded[1]
        data = pad.inputs[0]
    else:
        pad = None
    y = node.outputs[0]
    crop, start = None, 0
    users = list(y.uses())
    if len(users) == 1 and not any(o is y for o in (node.graph.outputs if node.graph else [])):
        user = users[0][0]
        s = _crop_start(user, 2, 3)
        if s is not None and users[0][1] == 0:
            crop, start = user, s
    extra = before + after - reach  # the output is this much longer than the input
    if crop is not None:
        if _seq_at(crop.outputs[0], seq) != [2]:
            ends = const_ints(crop.inputs[2])
            if ends is None or ends[0] >= 0 or extra + ends[0] - start != 0:
                return ("convolves along the sequence axis and slices the result to a length lrexport cannot "
                        "tell is the input's")
    elif extra != 0:
        return (f"convolves along the sequence axis with {before} + {after} padding for a reach of {reach}: "
                "its output is not one value per input position")
    window = before - start
    if window < reach:
        return (f"convolves along the sequence axis reading {reach - window} later position(s) (anti-causal: "
                "a step model cannot know the tokens after the chunk)")
    return CausalConv(node, pad, crop, data, window, reach)


def carry_conv(graph: ir.Graph, site: CausalConv, state_name: str, out_name: str
               ) -> tuple[ir.Value, ir.Value, StateTap]:
    """Prepend graph input ``state_name`` (the last ``window`` inputs before the chunk) instead of zeros and
    return the new last ``window`` inputs as graph output ``out_name``."""
    data, conv, label = site.data, site.conv, site.conv.name or "conv"
    tap = StateTap(data.name or "", "window", 2, site.window)
    meta = export_meta(conv)
    state, cat, keep = carry_window(graph, data, 2, site.window, f"{label}_window", meta, state_name, out_name)
    attrs = dict(conv.attributes)
    attrs["pads"] = ir.AttrInt64s("pads", [0, 0])
    attrs.pop("auto_pad", None)
    step_conv = ir.node("Conv", [cat.outputs[0], *conv.inputs[1:]], attrs, name=conv.name,
                        metadata_props=dict(conv.metadata_props))
    result = step_conv.outputs[0]
    new = [cat, keep, step_conv]
    if site.window > site.reach:  # output t reads window positions t .. t + reach: the chunk's are the first T
        crop = ir.node("Slice", [result, int64_initializer(graph, f"{label}_crop_start", [0]),
                                 int64_initializer(graph, f"{label}_crop_end", [site.reach - site.window]),
                                 int64_initializer(graph, f"{label}_crop_axis", [2])],
                       name=f"{label}_window_crop", metadata_props=dict(meta))
        new.append(crop)
        result = crop.outputs[0]
    old = site.result
    result.shape, result.type = old.shape, old.type
    graph.insert_before(site.conv, new)
    replace_value(graph, old, result, suffix="unwindowed")
    for n in reversed(site.nodes):
        graph.remove(n, safe=True)
    return state, keep.outputs[0], tap
