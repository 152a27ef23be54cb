"""Parity must never OOM-kill the machine: estimate each run's memory before it starts, scale it down.

Before the backends run at a shape case, the memory of each run is estimated from its ONNX graph
(:func:`graph_passes.cost.estimate_memory`: input dims bound, shapes inferred, a liveness walk; the
PyTorch reference priced on the unoptimized export, float64 at 8 bytes) and compared with the memory
parity may use. A case that does not fit is scaled down in this order, each step only when the ones
before it are not enough, and each step is stated in the report with the estimate that made it needed:

1. batch items a few at a time (slices of axis 0 run separately, outputs concatenated): valid for
   models whose batch items are independent, and done only when every output carries the batch on
   axis 0 (checked on the inferred output shapes);
2. the PyTorch reference in float32 instead of float64;
3. a smaller sequence inside the range (dynamic axes past axis 0 halved until the case fits, each size
   the largest valid one, ``InputSpec.fit_size``); the engine's profile keeps the requested max.

A case that does not fit even at the smallest sizes is not run, and the report says so.

The budget: ``--memory-budget`` or ``LREXPORT_MEMORY_BUDGET`` (bytes, or 512MB, 8GB, 8GiB), else
70% of the memory available when parity starts (MemAvailable, bounded by the cgroup limit), less what
this process has grown by since (sessions and copies loaded after the reading).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnx

from exporter.errors import LrexportError
from exporter.specs import InputSpec

BUDGET_ENV = "LREXPORT_MEMORY_BUDGET"
SAFETY_FRACTION = 0.7  # of the memory available: room for what the estimate leaves out and for neighbours
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}

Shapes = Mapping[str, tuple[int, ...]]


def parse_size(text: str | int, what: str = "--memory-budget") -> int:
    """``"8GB"`` -> 8_000_000_000 (k/M/G/T decimal, KiB/MiB/GiB/TiB binary, a bare number is bytes)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS:
        raise LrexportError(f"bad memory budget {str(text)!r} in {what}",
                            "give bytes or a size with a unit, e.g. 8GB, 512MB or 2GiB")
    value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise LrexportError(f"memory budget {str(text)!r} in {what} is not above 0", "give a size such as 8GB")
    return value


def fmt_bytes(n: float) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.1f} GB"
    if n >= 1e6:
        return f"{n / 1e6:.0f} MB"
    return f"{n / 1e3:.0f} kB"


def _read_int(path: str) -> int | None:
    try:
        return int(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None  # missing, or "max" (no cgroup limit)


def _stat(path: str, key: str) -> int:
    try:
        for line in Path(path).read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def available_memory() -> int | None:
    """Bytes this process could still allocate: MemAvailable, bounded by the cgroup's limit less its
    working set (usage less inactive file cache), cgroup v2 or v1. None where /proc/meminfo is unreadable."""
    values = []
    kb = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                kb = int(line.split()[1])
    except (OSError, ValueError, IndexError):
        kb = 0
    if kb:
        values.append(kb * 1024)
    for folder, limit, usage, stat, inactive in (
            ("/sys/fs/cgroup", "memory.max", "memory.current", "memory.stat", "inactive_file"),
            ("/sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "memory.stat",
             "total_inactive_file")):
        lim, use = _read_int(f"{folder}/{limit}"), _read_int(f"{folder}/{usage}")
        if lim is not None and use is not None and lim < 2**60:
            values.append(max(0, lim - max(0, use - _stat(f"{folder}/{stat}", inactive))))
    return min(values) if values else None


def _rss() -> int:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


@dataclass
class MemoryBudget:
    """How many bytes one parity run may take. Given (option, variable, API): that number for every run.
    Detected: read once, then less what this process has grown by since."""

    limit: int
    source: str
    detected: bool = False
    _rss0: int = 0

    @classmethod
    def resolve(cls, value: "str | int | MemoryBudget | None" = None) -> "MemoryBudget | None":
        """From ``value`` (``--memory-budget``), else ``LREXPORT_MEMORY_BUDGET``, else the machine
        (None where the machine does not say: runs are then not scaled)."""
        if isinstance(value, MemoryBudget):
            return value
        if value is not None and str(value).strip():
            return cls(parse_size(value), "--memory-budget")
        env = os.environ.get(BUDGET_ENV, "").strip()
        if env:
            return cls(parse_size(env, BUDGET_ENV), BUDGET_ENV)
        avail = available_memory()
        if avail is None:
            return None
        return cls(int(avail * SAFETY_FRACTION), f"{SAFETY_FRACTION:.0%} of the memory available",
                   detected=True, _rss0=_rss())

    def available(self) -> int:
        return max(0, self.limit - max(0, _rss() - self._rss0)) if self.detected else self.limit

    def describe(self, available: int) -> str:
        return f"{fmt_bytes(available)} available" if self.detected else f"{fmt_bytes(available)} memory budget"

    def to_dict(self) -> dict[str, Any]:
        return {"bytes": self.limit, "source": self.source}


@dataclass
class GraphCost:
    """One backend's runs, priced on an ONNX graph (estimates cached per shape)."""

    backend: str
    model: onnx.ModelProto
    base_dir: Path | None = None
    ort_scratch: bool = True  # ONNX Runtime kernels' scratch space (not PyTorch's)
    _cache: dict = field(default_factory=dict)

    @classmethod
    def from_path(cls, backend: str, path: str | Path, **kw: Any) -> "GraphCost":
        path = Path(path)
        return cls(backend, onnx.load(str(path), load_external_data=False), base_dir=path.parent, **kw)

    def estimate(self, shapes: Shapes, float_bytes: float | None = None) -> Any:
        from graph_passes.cost import estimate_memory

        key = (tuple(sorted((k, tuple(v)) for k, v in shapes.items())), float_bytes)
        if key not in self._cache:
            self._cache[key] = estimate_memory(self.model, {k: tuple(v) for k, v in shapes.items()},
                                               float_bytes=float_bytes, ort_scratch=self.ort_scratch,
                                               base_dir=self.base_dir)
        return self._cache[key]


@dataclass
class CasePlan:
    """How one shape case runs within the memory budget, and why."""

    case: str
    requested: dict[str, tuple[int, ...]]
    shapes: dict[str, tuple[int, ...]]  # what it runs at (a smaller sequence after step 3)
    batch_chunk: int | None = None  # run this many batch items at a time
    reference_float32: bool = False
    skip: bool = False
    steps: list[str] = field(default_factory=list)  # one sentence per step, in order
    estimate: int | None = None  # bytes, as it runs
    available: int | None = None
    seed: int = 0  # of the case's random inputs (plan_feeds)
    budget_source: str | None = None
    needed: int | None = None  # bytes a skipped case needs at the smallest sizes tried

    @property
    def scaled(self) -> bool:
        return bool(self.steps)

    def to_dict(self) -> dict[str, Any]:
        return {"case": self.case, "requested": {k: list(v) for k, v in self.requested.items()},
                "shapes": {k: list(v) for k, v in self.shapes.items()}, "batch_chunk": self.batch_chunk,
                "reference_float32": self.reference_float32, "skipped": self.skip, "steps": list(self.steps),
                "estimate_bytes": self.estimate, "available_bytes": self.available,
                "budget_source": self.budget_source}


def budget_too_small(plans: Sequence[CasePlan]) -> LrexportError | None:
    """The error for a parity run of which the budget let no case run (None where one ran or none was
    planned): it names the budget and what the cheapest case needs."""
    skipped = [p for p in plans if p.skip]
    if not skipped or len(skipped) < len(plans):
        return None
    needed = min(p.needed or p.estimate or 0 for p in skipped)
    source = skipped[0].budget_source or "the memory budget"
    available = fmt_bytes(skipped[0].available or 0)
    return LrexportError(f"the memory budget ({available}, {source}) is too small to run any parity case: the "
                         f"smallest needs an estimated {fmt_bytes(needed)}, so nothing was checked",
                         f"give --memory-budget {size_text(needed)} or more (or {BUDGET_ENV}) if the machine "
                         "has that memory free")


def size_text(n: int) -> str:
    """``n`` bytes rounded up to a whole kB, MB or GB, as --memory-budget reads it (``30kB``)."""
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            return f"{-(-n // scale)}{unit}"
    return f"{max(n, 1)}B"


def _dims(shapes: Shapes) -> str:
    return " ".join("x".join(map(str, s)) for s in shapes.values())


class MemoryPlanner:
    """Plans every shape case of a parity run against one budget (see the module docstring)."""

    def __init__(self, budget: MemoryBudget | None, specs: Sequence[InputSpec], backends: Sequence[GraphCost],
                 reference: GraphCost | None = None, reference_float64: bool = False):
        self.budget = budget
        self.specs = list(specs)
        self.backends = list(backends)
        self.reference = reference
        self.reference_float64 = reference_float64

    # -- estimates -----------------------------------------------------------------------------------
    def _run_shapes(self, shapes: Shapes, chunk: int | None) -> dict[str, tuple[int, ...]]:
        return {k: ((chunk, *v[1:]) if chunk else tuple(v)) for k, v in shapes.items()}

    def estimate(self, shapes: Shapes, chunk: int | None = None, reference_float32: bool = False) -> int | None:
        """Bytes of the largest run of a case with what stays in memory meanwhile: a backend runs while the
        reference's outputs are kept; with ``chunk``, the whole inputs stay too, and each run's slice
        outputs are gathered, then concatenated (twice the case's outputs)."""
        run = self._run_shapes(shapes, chunk)
        ref_bytes = 4.0 if reference_float32 or not self.reference_float64 else 8.0
        totals, kept = [], 0
        for cost, float_bytes in [*((c, None) for c in self.backends), (self.reference, ref_bytes)]:
            if cost is None:
                continue
            e, full = cost.estimate(run, float_bytes), cost.estimate(shapes, float_bytes)
            if e is None or full is None:
                return None
            totals.append((e.peak + (2 * full.output_bytes if chunk else 0), cost is self.reference))
            if cost is self.reference:
                kept = full.output_bytes
        inputs = sum(int(np.prod(shapes[s.name])) * np.dtype(s.np_dtype).itemsize for s in self.specs
                     if s.name in shapes) if chunk else 0
        return max((t + (0 if is_ref else kept) for t, is_ref in totals), default=0) + inputs

    def _outputs(self, shapes: Shapes) -> dict[str, tuple[int, ...] | None] | None:
        cost = self.reference or (self.backends[0] if self.backends else None)
        e = cost.estimate(shapes, 4.0) if cost is not None else None
        return None if e is None else e.outputs

    # -- the steps -----------------------------------------------------------------------------------
    def _batch_chunk(self, shapes: Shapes) -> tuple[int | None, str | None]:
        """(items per run, None), or (None, why the batch cannot be split); (None, None) for batch 1."""
        sizes = {v[0] if len(v) else None for v in shapes.values()}
        if len(sizes) != 1 or None in sizes:
            return None, "the inputs do not share a batch axis 0"
        batch = int(next(iter(sizes)))  # type: ignore[arg-type]
        if batch <= 1:
            return None, None
        if any(s.min[0] == s.max[0] for s in self.specs):
            return None, "axis 0 is not dynamic"
        chunk = max(s.fit_size(0, 1) for s in self.specs)
        if chunk >= batch or batch % chunk:
            return None, f"the smallest batch the range allows ({chunk}) does not divide {batch}"
        full, part = self._outputs(shapes), self._outputs(self._run_shapes(shapes, chunk))
        if full is None or part is None:
            return None, "the output shapes are not known"
        for name, dims in full.items():
            if not dims or dims[0] != batch or not part.get(name) or part[name][0] != chunk:  # type: ignore[index]
                return None, f"output {name!r} does not carry the batch on axis 0"
        return chunk, None

    def _shrink(self, shapes: Shapes, div: int) -> dict[str, tuple[int, ...]]:
        out: dict[str, tuple[int, ...]] = {}
        for spec in self.specs:
            dims = list(shapes[spec.name])
            for axis in range(1, len(dims)):
                if spec.min[axis] != spec.max[axis]:
                    dims[axis] = spec.fit_size(axis, max(1, dims[axis] // div))
            out[spec.name] = tuple(dims)
        for name, given in shapes.items():
            out.setdefault(name, tuple(given))
        return out

    @staticmethod
    def _seq_change(before: Shapes, after: Shapes) -> str:
        changes: list[str] = []
        for name, dims in before.items():
            for axis, (a, b) in enumerate(zip(dims, after[name])):
                text = f"{'seq' if axis == 1 else f'axis {axis}'} {a} -> {b}"
                if a != b and text not in changes:
                    changes.append(text)
        return ", ".join(changes)

    def plan(self, case: str, shapes: Shapes, allow_float32: bool = True) -> CasePlan:
        shapes = {k: tuple(v) for k, v in shapes.items()}
        plan = CasePlan(case, dict(shapes), dict(shapes))
        if self.budget is None:
            return plan
        avail = plan.available = self.budget.available()
        plan.budget_source = self.budget.source
        total = self.estimate(shapes)
        if total is None:
            plan.steps.append("memory not estimated (the graph's shapes could not be inferred at "
                              f"{_dims(shapes)}): run as asked")
            return plan
        plan.estimate = total
        if total <= avail:
            return plan
        over = lambda est: f"estimated {fmt_bytes(est)} > {self.budget.describe(avail)}"  # noqa: E731
        chunk, why_not = self._batch_chunk(shapes)
        if chunk:
            batch = next(iter(shapes.values()))[0]
            items = "one item" if chunk == 1 else f"{chunk} items"
            plan.steps.append(f"batch of {batch} run {items} at a time ({over(total)})")
            plan.batch_chunk = chunk
            total = self.estimate(shapes, chunk) or total
        elif why_not:
            plan.steps.append(f"batch not split: {why_not}")
        if total > avail and allow_float32 and self.reference is not None and self.reference_float64:
            plan.steps.append(f"reference float32 instead of float64 ({over(total)})")
            plan.reference_float32 = True
            total = self.estimate(shapes, plan.batch_chunk, True) or total
        if total > avail:
            div, smaller, est = 2, dict(shapes), total
            while True:
                cand = self._shrink(shapes, div)
                if cand == smaller:
                    break  # at the smallest sizes the range allows
                smaller, div = cand, div * 2
                est = self.estimate(smaller, plan.batch_chunk, plan.reference_float32) or est
                if est <= avail:
                    break
            change = self._seq_change(shapes, smaller)
            if est <= avail and change:
                plan.steps.append(f"{change} ({over(total)}; {fmt_bytes(est)} at the smaller size)")
                plan.shapes, total = smaller, est
            else:
                at = f" even at {_dims(smaller)}" if change else ""
                if plan.batch_chunk:
                    at += " one item at a time" if plan.batch_chunk == 1 else f" {plan.batch_chunk} items at a time"
                plan.steps.append(f"not run: {over(est)}{at}; give parity more memory with --memory-budget "
                                  f"or {BUDGET_ENV} if the machine has it")
                plan.skip, plan.needed = True, est
        plan.estimate = total
        return plan


def plan_feeds(specs: Sequence[InputSpec], plan: CasePlan, seed: int) -> dict[str, np.ndarray]:
    """The random inputs of a planned case (reproducible: the same seed and shapes give the same values)."""
    rng = np.random.default_rng(seed)
    return {s.name: s.random(plan.shapes[s.name], rng) for s in specs}


def batch_slices(feeds: Mapping[str, np.ndarray], chunk: int | None) -> list[dict[str, np.ndarray]]:
    """``feeds`` cut into slices of ``chunk`` items along axis 0 (one slice: all of it)."""
    if not chunk:
        return [dict(feeds)]
    batch = next(iter(feeds.values())).shape[0]
    return [{k: v[i:i + chunk] for k, v in feeds.items()} for i in range(0, batch, chunk)]


def run_planned(run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], feeds: Mapping[str, np.ndarray],
                plan: CasePlan | None) -> dict[str, np.ndarray]:
    """``run`` on ``feeds`` as ``plan`` says: whole, or slice by slice with the outputs concatenated."""
    chunk = plan.batch_chunk if plan is not None else None
    if not chunk:
        return run(dict(feeds))
    parts = [run(f) for f in batch_slices(feeds, chunk)]
    return {k: np.concatenate([p[k] for p in parts], axis=0) for k in parts[0]}


def localization_fits(costs: Sequence[GraphCost], shapes: Shapes, budget: MemoryBudget | None) -> str | None:
    """None when drift localization (every intermediate of each model kept at once) fits the budget,
    else the sentence saying why it is left out."""
    if budget is None:
        return None
    avail = budget.available()
    total = 0
    for cost in costs:
        e = cost.estimate(shapes)
        if e is None:
            return None
        total += e.all_values + e.peak
    if total <= avail:
        return None
    return (f"not localized: comparing every intermediate needs about {fmt_bytes(total)} > "
            f"{budget.describe(avail)}")


def planner_for_runners(reference: Any, backends: Sequence[Any], specs: Sequence[InputSpec],
                        budget: MemoryBudget | None, reference_graph: onnx.ModelProto | str | Path | None = None
                        ) -> MemoryPlanner:
    """A planner pricing each ONNX Runtime backend on its file and the PyTorch reference on
    ``reference_graph`` (the unoptimized export where there is one), else on the first backend's file.
    Backends without an ONNX file (a TensorRT engine: GPU memory) are not priced."""
    from exporter.runners import OnnxRuntimeRunner

    costs = [GraphCost.from_path(b.name, b.path) for b in backends if isinstance(b, OnnxRuntimeRunner)]
    ref: GraphCost | None = None
    if isinstance(reference_graph, onnx.ModelProto):
        ref = GraphCost("pytorch", reference_graph, ort_scratch=False)
    elif reference_graph is not None:
        ref = GraphCost.from_path("pytorch", reference_graph, ort_scratch=False)
    elif costs:
        ref = GraphCost("pytorch", costs[0].model, costs[0].base_dir, ort_scratch=False)
    return MemoryPlanner(budget, specs, costs, ref, reference_float64=bool(getattr(reference, "uses_float64", False)))
