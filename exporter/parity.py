"""Parity of exported models against PyTorch: run every backend at several shapes, compare per output.

``check_parity(model, "model.onnx", shapes=[...])`` is the Python API for test suites;
``report.assert_ok()`` raises an AssertionError that carries the whole table.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np
import onnx
import onnx_ir as ir
from torch import nn

from exporter.compare import (OutputComparison, Tolerance, Tolerances, check_output_tolerances, compare_outputs,
                              tokens_only)
from exporter.errors import LrexportError
from exporter.loading import LoadedModel
from exporter.model_errors import describe_model, fails_in_pytorch
from exporter.memory_budget import (MemoryBudget, MemoryPlanner, budget_too_small, plan_feeds, planner_for_runners,
                                    run_planned)
from exporter.runners import OnnxRuntimeRunner, TorchRunner
from exporter.served_range import guard_error
from exporter.specs import InputSpec, build_specs, parity_cases, random_feeds
from exporter.table import fmt_num, fmt_shapes, format_table
from graph_passes.name_scopes import module_path, name_scopes


class Runner(Protocol):
    name: str

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


@dataclass
class CaseResult:
    backend: str
    case: str
    shapes: dict[str, list[int]]
    outputs: list[OutputComparison]
    seconds: float
    memory: list[str] = field(default_factory=list)  # how this case was scaled down to fit in memory, and why

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outputs)

    def to_dict(self) -> dict:
        return {"backend": self.backend, "case": self.case, "shapes": self.shapes, "ok": self.ok,
                "seconds": round(self.seconds, 4), "outputs": [o.to_dict() for o in self.outputs],
                "memory": list(self.memory)}


@dataclass
class ParityReport:
    reference: str  # "pytorch float64" or "pytorch float32"
    precision: str
    seed: int
    results: list[CaseResult] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # backends not run, with the reason
    drift: list[dict] = field(default_factory=list)  # where a failing low-precision model starts to drift
    plans: dict[str, Any] = field(default_factory=dict, repr=False)  # case -> memory_budget.CasePlan

    @property
    def memory_notes(self) -> list[str]:
        """Each step a case was scaled down by to fit in memory, with why: ``"max: seq 16384 -> 4096 (...)"``."""
        return [f"{case}: {step}" for case, plan in self.plans.items() for step in plan.steps]
    unchecked: dict[str, str] = field(default_factory=dict)  # precision -> why no backend checked it

    @property
    def ok(self) -> bool:
        return bool(self.results) and all(r.ok for r in self.results)

    def failures(self) -> list[tuple[CaseResult, OutputComparison]]:
        return [(r, o) for r in self.results for o in r.outputs if not o.ok]

    def to_dict(self) -> dict:
        return {"ok": self.ok, "reference": self.reference, "precision": self.precision, "seed": self.seed,
                "results": [r.to_dict() for r in self.results], "skipped": self.skipped, "drift": self.drift,
                "memory": [p.to_dict() for p in self.plans.values() if p.scaled],
                "unchecked": self.unchecked}

    def __str__(self) -> str:
        return self.format_table()

    def format_table(self) -> str:
        """One row per backend, case and output. ``min atol`` / ``min rtol``: the smallest atol that passes at
        this rtol, and the smallest rtol that passes at this atol (each alone would fix a failing row).

        The plain max relative error is left to the JSON (``max_rel``): where the reference is near zero it
        is huge on rows that pass (|a - r| is inside atol there), e.g. 157.6 on a passing fp16 row. ``min
        rtol`` is the relative error over the elements that atol does not cover, so it is never above the
        rtol of a passing row and says how far a failing row is off.
        """
        headers = ["backend", "case", "shapes", "output", "max abs", "rel L2", "cosine",
                   "fail/total", "min atol", "min rtol", "atol/rtol", "status"]
        rows = []
        for r in self.results:
            shapes = " ".join("x".join(map(str, s)) for s in r.shapes.values())
            for o in r.outputs:
                rows.append([r.backend, r.case, shapes, o.output, o.max_abs, o.rel_l2,
                             f"{o.cosine:.6f}", f"{o.mismatches + o.nonfinite}/{o.total}", o.min_atol, o.min_rtol,
                             f"{fmt_num(o.atol)}/{fmt_num(o.rtol)}", "ok" if o.ok else "FAIL"])
        lines = [format_table(headers, rows, title=f"parity vs {self.reference} (seed {self.seed})")]
        for r, o in self.failures():
            where = f" in module {o.module!r}" if o.module else ""
            what = (f"{o.nonfinite} NaN/Inf values" if o.nonfinite
                    else f"{o.mismatches} elements past atol {fmt_num(o.atol)} and rtol {fmt_num(o.rtol)}")
            lines.append(f"  {r.backend} {r.case}: output {o.output!r}{where} drifts: {what}; worst at "
                         f"{list(o.worst_index)}: got {fmt_num(o.worst_actual)}, expected "
                         f"{fmt_num(o.worst_expected)} (passes with atol >= {fmt_num(o.min_atol)})")
        for d in self.drift:
            lines.append(f"  {d['backend']} {d['case']}: {d['text']}")
        lines += [f"  memory: {note}" for note in self.memory_notes]
        for s in self.skipped:
            lines.append(f"  skipped: {s}")
        lines.append(f"parity: {self.verdict}")
        return "\n".join(lines)

    @property
    def verdict(self) -> str:
        """PASS / FAIL, except that a precision no backend ran, or a case the memory budget left out, never
        reads as PASS; and a run of which the budget let nothing run is "not checked", not FAIL."""
        over_budget = [p.case for p in self.plans.values() if p.skip]
        if not self.results and over_budget:
            return "not checked: no case fits the memory budget"
        if not self.ok:
            return "FAIL"
        notes = [f"{p} not checked: {why}" for p, why in self.unchecked.items()]
        if over_budget:
            notes.append(f"{', '.join(over_budget)} not checked: over the memory budget")
        return "; ".join(notes) + " (checked rows pass)" if notes else "PASS"

    def budget_error(self) -> LrexportError | None:
        """The error for a run of which the memory budget let no case run (the CLI exits 2 with it)."""
        return budget_too_small(list(self.plans.values())) if not self.results else None

    def assert_ok(self) -> None:
        """For test suites: raise AssertionError with the full table when any output drifts."""
        if not self.ok:
            raise AssertionError("lrexport parity failed\n" + self.format_table())


def output_modules(model: onnx.ModelProto | ir.Model) -> dict[str, str]:
    """Module path of the node producing each graph output, from the dynamo exporter's metadata."""
    graph = (model if isinstance(model, ir.Model) else ir.from_proto(model)).graph
    result = {}
    for out in graph.outputs:
        node = out.producer()
        for _ in range(20):  # walk back through Identity/Cast that carry no scope
            if node is None:
                break
            if name_scopes(node) is not None:
                result[out.name or ""] = module_path(node)
                break
            first = node.inputs[0] if node.inputs else None
            node = first.producer() if first is not None else None
    return result


def case_feeds(specs: Sequence[InputSpec], cases: Sequence[str], seed: int) -> dict[str, dict[str, np.ndarray]]:
    """The random inputs of each shape case (the same ones every backend of a report sees)."""
    return {case: random_feeds(specs, case, seed + i) for i, case in enumerate(cases)}


def run_parity(reference: TorchRunner, backends: Sequence[Runner], specs: Sequence[InputSpec], *,
               tolerances: Mapping[str, Tolerances], seed: int = 0, cases: Sequence[str] | None = None,
               modules: Mapping[str, str] | None = None, precision: str = "fp32",
               progress: Callable[[str], None] | None = None, memory: MemoryPlanner | None = None,
               memory_budget: str | int | MemoryBudget | None = None) -> ParityReport:
    """Run the reference and each backend at every shape case, compare, and collect a report.

    Each case is first planned against the memory budget (exporter/memory_budget.py): run as asked, or
    scaled down (batch slices, float32 reference, smaller sequence) or left out, as the report says.
    ``memory`` prices the runs on given graphs; by default on the ONNX Runtime backends' files.
    """
    say = progress or (lambda _m: None)
    cases = list(cases or parity_cases(specs))
    report = ParityReport(reference="pytorch", precision=precision, seed=seed)
    planner = memory or planner_for_runners(reference, backends, specs, MemoryBudget.resolve(memory_budget))
    for i, case in enumerate(cases):
        plan = report.plans[case] = planner.plan(case, {s.name: s.shape(case) for s in specs})
        plan.seed = seed + i
        for step in plan.steps:
            say(f"parity {case}: {step}")
        if plan.skip:
            report.skipped.append(f"{case}: {plan.steps[-1]}")
            continue
        feeds = plan_feeds(specs, plan, plan.seed)
        shapes = {k: list(v.shape) for k, v in feeds.items()}
        say(f"parity {i + 1}/{len(cases)}: {case} {' '.join('x'.join(map(str, s)) for s in shapes.values())}")
        try:
            expected = run_planned(functools.partial(reference.run, float64=not plan.reference_float32), feeds, plan)
        except (LrexportError, MemoryError):
            raise
        except Exception as err:  # the model's own code fails at a size inside its range: not lrexport's bug
            guard = guard_error(err, shapes, case)
            if guard is not None:  # a torch.export guard: a size the program does not serve
                raise guard from None
            raise fails_in_pytorch(reference.what, f"shape case {case} ({fmt_shapes(shapes)})", err,
                                   reference.archive) from None
        expected = tokens_only(expected, feeds, specs)
        for name, arr in expected.items():
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                raise LrexportError(f"the PyTorch model itself produces NaN/Inf in output {name!r} at shape "
                                    f"case {case} ({fmt_shapes(shapes)})",
                                    "check the weights and the --input value ranges; parity needs finite outputs")
        for backend in backends:
            only = getattr(backend, "cases", None)  # a backend that runs on some shape cases only
            if only is not None and case not in only:
                continue
            start = time.perf_counter()
            actual = tokens_only(run_planned(backend.run, feeds, plan), feeds, specs)
            seconds = time.perf_counter() - start
            comps = compare_outputs(actual, expected, tolerances[backend.name])
            for c in comps:
                c.module = (modules or {}).get(c.output)
            report.results.append(CaseResult(backend.name, case, shapes, comps, seconds, list(plan.steps)))
    report.reference = f"pytorch {reference.precision}"
    return report


def torch_reference(model: nn.Module | LoadedModel, output_names: Sequence[str],
                    specs: Sequence[InputSpec]) -> TorchRunner:
    """Parity's PyTorch reference for ``model``, named for error lines (an archive as the archive)."""
    module = model.module if isinstance(model, LoadedModel) else model
    reference = TorchRunner(module, output_names, [s.name for s in specs])
    reference.what = describe_model(model)
    reference.archive = isinstance(model, LoadedModel) and model.kind == "exported-program"
    return reference


def check_parity(model: nn.Module | LoadedModel, onnx_path: str | Path, *,
                 specs: Sequence[InputSpec] | None = None, inputs: Sequence[str] = (),
                 shapes: Sequence[str] = (), precision: str = "fp32", atol: float | None = None,
                 rtol: float | None = None, per_output: Mapping[str, Tolerance] | None = None,
                 seed: int = 0, cases: Sequence[str] | None = None,
                 extra_backends: Sequence[tuple[Runner, str]] = (),
                 progress: Callable[[str], None] | None = None,
                 memory_budget: str | int | MemoryBudget | None = None) -> ParityReport:
    """Compare an ONNX file (ONNX Runtime CPU) with the PyTorch model at min/opt/max/odd shapes.

    ``specs`` or ``inputs``/``shapes`` strings (``"x:min=1x16x512,opt=1x128x512,max=8x512x512"``)
    describe the inputs. ``extra_backends`` adds (runner, precision) pairs, e.g. a TensorRT engine.
    ``memory_budget`` (bytes or ``"8GB"``; default ``LREXPORT_MEMORY_BUDGET``, else 70% of the memory
    available) bounds each run: larger cases are scaled down as the report says. The PyTorch reference
    is priced on this ONNX file's graph (an optimized file underprices a naive model's reference).
    """
    module = model.module if isinstance(model, LoadedModel) else model
    if specs is None:
        specs = build_specs(inputs, shapes)
    if not specs:
        raise LrexportError("check_parity needs the model's inputs", "pass specs= or inputs=/shapes= strings")
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise LrexportError(f"ONNX file {onnx_path} does not exist",
                            "export it first (export_onnx / lrexport export), or use assert_parity, which does")
    ort_runner = OnnxRuntimeRunner(onnx_path)
    check_output_tolerances(per_output or {}, ort_runner.output_names)
    specs = align_specs(specs, ort_runner.input_names)
    reference = torch_reference(model, ort_runner.output_names, specs)
    tols = {ort_runner.name: Tolerances.for_precision(precision if precision != "fp32" else "fp32",
                                                      atol, rtol, per_output)}
    backends: list[Runner] = [ort_runner]
    for runner, prec in extra_backends:
        tols[runner.name] = Tolerances.for_precision(prec, atol, rtol, per_output)
        backends.append(runner)
    return run_parity(reference, backends, specs, tolerances=tols, seed=seed, cases=cases,
                      modules=output_modules(ir.load(str(onnx_path))), precision=precision,
                      progress=progress, memory_budget=memory_budget)


def align_specs(specs: Sequence[InputSpec], onnx_inputs: Sequence[str]) -> list[InputSpec]:
    """Order specs like the ONNX inputs; a name mismatch is the user's input spec being wrong."""
    by_name = {s.name: s for s in specs}
    unknown = [n for n in by_name if n not in onnx_inputs]
    if unknown or len(specs) != len(onnx_inputs):
        raise LrexportError(f"input spec names {sorted(by_name)} do not match the ONNX inputs {list(onnx_inputs)}",
                            "name every model input in --input/--shapes")
    return [by_name[n] for n in onnx_inputs]




def assert_parity(model: nn.Module | LoadedModel, onnx_path: str | Path, **kwargs: Any) -> ParityReport:
    """``check_parity`` that raises AssertionError (with the table) on any drift; returns the report.

    Where ``onnx_path`` does not exist yet, the model is exported there first (with the same specs), so
    a test can be the one line ``lrexport_parity(model, tmp_path / "model.onnx", shapes=[...])``."""
    if not Path(onnx_path).exists():
        from exporter.export import export_onnx

        specs = kwargs.pop("specs", None) or build_specs(kwargs.pop("inputs", ()), kwargs.pop("shapes", ()))
        kwargs["specs"] = export_onnx(model, specs, onnx_path).specs
    report = check_parity(model, onnx_path, **kwargs)
    report.assert_ok()
    return report
