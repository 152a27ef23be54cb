"""``torch.export`` archives (``.pt2``): the program, and the inputs and ranges it records."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from exporter.loading.common import LoadedModel
from exporter.loading.embeddings import _bound, embedding_sizes
from exporter.specs import InputSpec, parse_dim_expr


UNBOUNDED_SPAN = 8  # an axis with no upper bound gets up to this many times its example size


MAX_DEFAULT_SIZE = 65536


def _axis_range(ep: Any, expr: Any, example: int | None, what: str, notes: list[str]
                ) -> tuple[tuple[int, int, int, int], tuple[int, int | None]]:
    """(min, opt, max, multiple) of one symbolic axis of an archive, with a note for every default taken,
    and the range the archive really allows (no upper bound: None).

    torch's lower bound 0 (a ``Dim`` without ``min``) is a default, not a wish: such axes start at 1;
    a bound of 2 (``Dim.AUTO``: torch specializes 0 and 1) is kept. An unbounded axis (``int_oo``) gets
    up to ``UNBOUNDED_SPAN`` times its example size. A derived dim ``16*blocks`` keeps sizes multiples of 16."""
    step, symbol = parse_dim_expr(str(expr)) or (1, "")
    lower = upper = None
    for key, rng in ep.range_constraints.items():  # the expression's range, and step x its symbol's
        scale = 1 if key == expr else step if step > 1 and str(key) == symbol else 0
        lo_b, hi_b = _bound(rng.lower), _bound(rng.upper)
        if scale and lo_b is not None:
            lower = max(lower if lower is not None else lo_b * scale, lo_b * scale)
        if scale and hi_b is not None:
            upper = min(upper if upper is not None else hi_b * scale, hi_b * scale)
    lo = max(lower if lower is not None else 1, 1)
    lo = -(-lo // step) * step
    if lower is not None and lower < 1:
        notes.append(f"{what}: torch's lower bound {lower} is its default, not a size the model serves; using {lo}")
    ex = example if example else lo
    if upper is None:
        hi = min(max(ex * UNBOUNDED_SPAN, lo), MAX_DEFAULT_SIZE) // step * step
        notes.append(f"{what} has no upper bound in the archive (Dim.AUTO or a Dim without max): using "
                     f"{lo}..{hi} ({UNBOUNDED_SPAN}x the example size {ex}); choose it with --shapes")
    else:
        hi = min(upper, MAX_DEFAULT_SIZE) // step * step
        if upper > MAX_DEFAULT_SIZE:
            notes.append(f"{what} allows up to {upper}: checking up to {hi}; choose it with --shapes")
    opt = min(max(ex // step * step, lo), hi)
    return (lo, opt, hi, step), (lower or 0, upper)


def _specs_from_exported_program(ep: Any, notes: list[str],
                                  limits: dict[tuple[str, int], tuple[int, int | None]]) -> list[InputSpec]:
    """Input names, dtypes and dynamic ranges recorded in a torch.export archive (``limits`` gets the
    range each axis really allows, to check --shapes against)."""
    names = list(ep.graph_signature.user_inputs)
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    vocab = embedding_sizes(ep)
    examples = None
    if getattr(ep, "example_inputs", None):
        args, kwargs = ep.example_inputs
        examples = list(args) + list(kwargs.values())
    specs = []
    for i, name in enumerate(names):
        val = placeholders[name].meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        example = examples[i] if examples and i < len(examples) and isinstance(examples[i], torch.Tensor) else None
        lo: list[int] = []
        op: list[int] = []
        hi: list[int] = []
        steps: list[int] = []
        for axis, dim in enumerate(val.shape):
            if isinstance(dim, int):
                bounds, limits[(name, axis)] = (dim, dim, dim, 1), (dim, dim)
            else:
                bounds, limits[(name, axis)] = _axis_range(
                    ep, dim.node.expr, int(example.shape[axis]) if example is not None else None,
                    f"axis {axis} of input {name!r}", notes)
            for dims, value in zip((lo, op, hi, steps), bounds):
                dims.append(value)
        dtype = str(val.dtype).replace("torch.", "")
        low = high = None
        if name in vocab:
            low, high = 0.0, float(vocab[name] - 1)
        elif not val.dtype.is_floating_point and example is not None and example.numel():
            low, high = float(example.min()), float(example.max())
        specs.append(InputSpec(name, dtype, tuple(lo), tuple(op), tuple(hi), low, high,
                               tuple(steps) if any(x > 1 for x in steps) else ()))
    return specs


def _runs_at(module: nn.Module, specs: list[InputSpec], shapes: list[tuple[int, ...]]) -> bool:
    """Whether the program runs at these input shapes (guards included) with finite float outputs."""
    import numpy as np

    rng = np.random.default_rng(0)
    args = [torch.from_numpy(s.random(shape, rng)) for s, shape in zip(specs, shapes)]
    try:
        with torch.no_grad():
            out = module(*args)
    except Exception:  # a guard, or an op that needs the size >= 2
        return False
    leaves = [t for t in torch.utils._pytree.tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
    return all(torch.isfinite(t).all() for t in leaves if t.is_floating_point())


def _serve_size_one(module: nn.Module, specs: list[InputSpec], limits: dict[tuple[str, int], tuple[int, int | None]],
                    notes: list[str]) -> list[InputSpec]:
    """Axes that start at 2 only by torch's 0/1 specialization start at 1 where the program runs there (one
    forward, the other axes at the example's sizes), so an engine serves batch 1 and one token. ``Dim.AUTO`` writes ``[2, inf)``:
    torch assumes sizes 0 and 1 are special and adds no guard for them. A ``Dim`` with ``min=2`` has a ``max``
    (lrexport's own archives always do) and is left as asked."""
    from dataclasses import replace

    ones = [(i, axis) for i, spec in enumerate(specs) for axis in spec.dynamic_axes
            if spec.min[axis] == 2 and spec.step(axis) == 1 and limits.get((spec.name, axis)) == (2, None)]
    if not ones:
        return specs
    base = [list(s.opt) for s in specs]  # the example's sizes: the other axes where the guards surely hold
    together = [list(b) for b in base]
    for i, axis in ones:
        together[i][axis] = 1
    fine = ones if _runs_at(module, specs, [tuple(t) for t in together]) else []
    if not fine and len(ones) > 1:
        for i, axis in ones:
            shapes = [list(b) for b in base]
            shapes[i][axis] = 1
            if _runs_at(module, specs, [tuple(t) for t in shapes]):
                fine.append((i, axis))
    specs = list(specs)
    for i, axis in fine:
        spec = specs[i]
        specs[i] = replace(spec, min=tuple(1 if a == axis else d for a, d in enumerate(spec.min)))
        limits[(spec.name, axis)] = (1, limits[(spec.name, axis)][1])
        notes.append(f"axis {axis} of input {spec.name!r}: the archive's lower bound 2 is torch's 0/1 "
                     "specialization and the program runs at 1, so it starts at 1")
    return specs


def load_exported_program(p: Path) -> LoadedModel:
    from exporter.archive import load_archive

    ep = load_archive(p)
    notes: list[str] = []
    limits: dict[tuple[str, int], tuple[int, int | None]] = {}
    specs = _specs_from_exported_program(ep, notes, limits)
    module = ep.module()
    specs = _serve_size_one(module, specs, limits, notes)
    return LoadedModel(module, "exported-program", str(p), ep, specs, notes=notes, limits=limits)
