"""``lrexport build``: load -> export -> graph passes -> (precision cast) -> engine -> parity -> report.

Every artifact is written into a temporary folder that replaces ``--out`` only when all steps ran.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import onnx

from exporter.compare import Tolerance, Tolerances
from exporter.errors import LrexportError
from exporter.export import DEFAULT_OPSET, ExportResult, export_onnx, save_onnx
from exporter.patches import reference_patches
from exporter.loading import LoadedModel, module_embedding_sizes
from exporter.memory_budget import (GraphCost, MemoryBudget, MemoryPlanner, batch_slices, localization_fits,
                                    plan_feeds, planner_for_runners)
from exporter.outputs import atomic_dir, relocated
from exporter.parity import ParityReport, Runner, _align, case_feeds, output_modules, run_parity
from exporter.runners import OnnxRuntimeRunner, TorchRunner
from exporter.specs import InputSpec, build_specs, merge_specs, parity_cases, parse_input, read_sidecar

PRECISIONS = ("fp32", "fp16", "bf16")
BACKENDS = ("auto", "tensorrt", "tensorrt-rtx", "onnxruntime")


def resolve_specs(loaded: LoadedModel | None, inputs: Sequence[str] = (), shapes: Sequence[str] = (),
                  model_path: str | Path | None = None) -> list[InputSpec]:
    """Inputs from the command line (over what a .pt2 archive records: its dtypes, token-id ranges and
    axis multiples stay), else the sidecar ``<model>.inputs.json``, else the .pt2 archive.

    Integer inputs without a value range take 0..V-1 from the embedding table that reads them. A
    warning (in ``loaded.notes``) says when the command line makes a static model."""
    known = list(loaded.inferred_specs) if loaded is not None else []
    side = read_sidecar(model_path) if model_path is not None and not (inputs or shapes) else None
    if inputs or shapes:
        explicit = {parse_input(t)[0] for t in inputs if parse_input(t)[2]}
        specs = merge_specs(build_specs(inputs, shapes), known, explicit)
        _check_limits(specs, loaded.limits if loaded is not None else {})
        if inputs and not shapes and not any(s.dynamic_axes for s in specs) and loaded is not None:
            loaded.notes.append(
                "the inputs have fixed shapes (--input without --shapes), so the ONNX model is static; for dynamic "
                "batch and sequence add " + " ".join(f"--shapes {_dynamic_example(s)}" for s in specs if s.rank >= 2))
    elif side is not None:
        specs = build_specs(*side)
    elif known:
        specs = known
    else:
        raise LrexportError("the model's inputs are not known",
                            "pass --input NAME:DIMS:DTYPE (and --shapes NAME:min=..,opt=..,max=.. for dynamic axes)")
    if loaded is not None and loaded.exported_program is None and any(s.low is None for s in specs):
        vocab = module_embedding_sizes(loaded.module, specs)
        specs = [replace(s, low=0.0, high=float(vocab[s.name] - 1)) if s.name in vocab and s.low is None else s
                 for s in specs]
    return specs


def _check_limits(specs: Sequence[InputSpec], limits: Mapping[tuple[str, int], tuple[int, int | None]]) -> None:
    """A range asked for on the command line must stay inside what the archive was exported for: its
    program refuses other sizes (a guard failure deep in the reference run otherwise)."""
    for spec in specs:
        for axis in range(spec.rank):
            lo, hi = limits.get((spec.name, axis), (0, None))
            if spec.min[axis] < lo or (hi is not None and spec.max[axis] > hi):
                allowed = f"{lo}" if lo == hi else f"{lo}..{hi if hi is not None else 'any'}"
                raise LrexportError(
                    f"axis {axis} of input {spec.name!r} is {allowed} in the model archive, but the command line "
                    f"asks for {spec.min[axis]}..{spec.max[axis]}",
                    "stay inside the archive's range, or export the model again with a wider torch.export Dim")


def _dynamic_example(spec: InputSpec) -> str:
    """A --shapes string making axes 0 and 1 of a static spec dynamic (batch 1..8, sequence 1..4x)."""
    lo, hi = list(spec.opt), list(spec.opt)
    lo[0], lo[1] = 1, 1
    hi[0], hi[1] = max(8, spec.opt[0]), 4 * spec.opt[1]
    return replace(spec, min=tuple(lo), max=tuple(hi)).shapes_string()


@dataclass
class BuildOptions:
    out: Path
    precision: str = "fp32"
    passes: Sequence[str] | None = None  # None: the default passes; (): none
    exporter: str = "dynamo"
    opset: int = DEFAULT_OPSET
    backend: str = "auto"
    force: bool = False
    atol: float | None = None
    rtol: float | None = None
    per_output: Mapping[str, Tolerance] = field(default_factory=dict)
    seed: int = 0
    cases: Sequence[str] | None = None
    timing_cache: Path | None = None
    opt_level: int | None = None
    workspace_mb: int | None = None
    chunk_size: int = 64
    merge_threshold: float = 1.0
    memory_budget: str | int | None = None  # bytes or "8GB" per parity run; None: LREXPORT_MEMORY_BUDGET or detected
    fp16_keep: Sequence[str] = ()  # module globs kept in float32 by the precision cast
    fp16_force: bool = False  # no automatic (range-analysis) float32 keep-list
    patches: bool = True  # export patches for known libraries (exporter/patches.py)


@dataclass
class BuildReport:
    out: Path
    model: dict[str, Any]
    export: ExportResult
    passes: dict[str, Any] | None
    precision: dict[str, Any] | None
    engine: dict[str, Any] | None
    parity: ParityReport
    notes: list[str]
    seconds: dict[str, float]
    files: list[Path] = field(default_factory=list)  # what the build wrote, where it ends up (under out)

    @property
    def ok(self) -> bool:
        return self.parity.ok

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "out": str(self.out), "model": self.model, "export": self.export.to_dict(),
                "passes": self.passes, "precision": self.precision, "engine": self.engine,
                "parity": self.parity.to_dict(), "notes": self.notes,
                "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
                "files": [str(f) for f in self.files]}

    def __str__(self) -> str:
        return self.format_text()

    def format_text(self) -> str:
        lines = [f"model: {self.model['source']} ({self.model['kind']}, {self.model['parameters']:,} parameters)",
                 f"inputs: {'; '.join(s.describe() for s in self.export.specs)}",
                 f"export: {self.export.exporter}, opset {self.export.opset}, {self.export.seconds:.1f} s"]
        lines += [f"patches: {'; '.join(self.export.patches)}"] if self.export.patches else []
        lines += [f"warning: {w}" for w in self.export.warnings]
        if self.passes and self.passes.get("table"):
            lines.append(self.passes["table"])
        if self.precision:
            lines.append(f"precision: {self.precision.get('summary', '')}")
        if self.engine:
            lines.append(f"engine: {self.engine.get('summary', '')}")
        lines.append(self.parity.format_table())
        lines += [f"note: {n}" for n in self.notes]
        lines.append(f"wrote {len(self.files)} files to {self.out}:" if self.files else f"wrote {self.out}")
        width = max((len(str(f)) for f in self.files), default=0)
        lines += [f"  {str(f):<{width}}  {_size(f)}".rstrip() for f in self.files]
        return "\n".join(lines)


def _size(path: Path) -> str:
    """A file's size for the files-written list ('' once it is gone: the text may be printed later)."""
    try:
        size = path.stat().st_size
    except OSError:
        return ""
    return f"{size / 1e6:.1f} MB" if size >= 100_000 else f"{size / 1e3:.1f} kB"


def _trt_error(backend: str) -> LrexportError | None:
    """None when a TensorRT backend imports, else the error saying what to install."""
    from exporter import trt_backend

    try:
        trt_backend.get_backend(backend)
    except LrexportError as err:
        return err
    return None


def run_passes_on(model: onnx.ModelProto, options: BuildOptions, specs: Sequence[InputSpec],
                  progress: Callable[[str], None], budget: MemoryBudget | None = None
                  ) -> tuple[onnx.ModelProto, dict[str, Any]]:
    import graph_passes

    feeds, memory = pass_check_feeds(model, options, specs, budget)
    opts = graph_passes.PassOptions(chunk_size=options.chunk_size, merge_threshold=options.merge_threshold)
    try:
        new_model, report = graph_passes.run_passes(model, options.passes, options=opts, feeds=feeds,
                                                    progress=progress)
    except graph_passes.PassParityError as err:
        raise LrexportError(f"graph pass broke parity: {err}",
                            "rerun with --no-passes (or leave that pass out with --passes) and report the bug") from None
    except ValueError as err:
        raise LrexportError(str(err), "see `lrexport optimize --help` for the pass names") from None
    return new_model, {"report": report.to_dict(), "table": report.format_table(), "memory": memory}


def pass_check_feeds(model: onnx.ModelProto, options: BuildOptions, specs: Sequence[InputSpec],
                     budget: MemoryBudget | None) -> tuple[list[dict], list[str]]:
    """The inputs each pass is checked on (min and odd shapes), planned against the memory budget like
    parity cases (batch slices become separate feeds; no float64 here); plus the steps taken."""
    planner = MemoryPlanner(budget, specs, [GraphCost("onnxruntime", model)])
    feeds: list[dict] = []
    memory: list[str] = []
    cases = [c for c in parity_cases(specs) if c in ("min", "odd")] or ["opt"]  # a static model has only opt
    for i, case in enumerate(cases):
        plan = planner.plan(case, {s.name: s.shape(case) for s in specs}, allow_float32=False)
        memory += [f"{case}: {step}" for step in plan.steps]
        if not plan.skip:
            feeds += batch_slices(plan_feeds(specs, plan, options.seed + 100 + i), plan.batch_chunk)
    return feeds, memory


def build(loaded: LoadedModel, specs: Sequence[InputSpec], options: BuildOptions,
          progress: Callable[[str], None] | None = None) -> BuildReport:
    say = progress or (lambda _m: None)
    options.out = Path(options.out)
    if options.precision not in PRECISIONS:
        raise LrexportError(f"unknown precision {options.precision!r}", f"use one of {', '.join(PRECISIONS)}")
    if options.backend not in BACKENDS:
        raise LrexportError(f"unknown backend {options.backend!r}", f"use one of {', '.join(BACKENDS)}")
    if (options.fp16_keep or options.fp16_force) and options.precision == "fp32":
        raise LrexportError("--fp16-keep / --fp16-force choose what the precision cast keeps in float32, "
                            "and this build is float32", "add --fp16 (or --bf16), or leave them out")
    if options.passes:
        from graph_passes import PASS_NAMES

        unknown = [p for p in options.passes if p not in PASS_NAMES]
        if unknown:  # before the export, not after it
            raise LrexportError(f"unknown pass {unknown[0]!r}", f"choose from {', '.join(PASS_NAMES)}")
    notes: list[str] = []
    seconds: dict[str, float] = {}
    budget = MemoryBudget.resolve(options.memory_budget)  # read once; a bad value fails before any work
    trt_err = None if options.backend == "onnxruntime" else _trt_error(options.backend)
    if trt_err is not None and options.backend in ("tensorrt", "tensorrt-rtx"):
        raise trt_err
    trt_ok = options.backend != "onnxruntime" and trt_err is None
    if trt_err is not None:
        notes.append(f"{trt_err.problem}; ONNX Runtime (CPU) is the engine ({trt_err.hint})")
    with atomic_dir(options.out, options.force) as tmp, reference_patches(loaded.module, options.patches):
        t = time.perf_counter()
        say("[export] exporting to ONNX")
        exported = export_onnx(loaded, specs, tmp / "exported.onnx", exporter=options.exporter,
                               opset=options.opset, progress=lambda m: say(f"[export] {m}"),
                               patches=options.patches)
        seconds["export"] = time.perf_counter() - t
        specs = exported.specs
        model = exported_model = onnx.load(str(exported.onnx_path))
        passes_info = None
        if options.passes is None or len(options.passes):
            t = time.perf_counter()
            say("[passes] running graph passes")
            model, passes_info = run_passes_on(model, options, specs, lambda m: say(f"[passes] {m}"), budget)
            notes += [f"pass checks {m}" for m in passes_info["memory"]]
            seconds["passes"] = time.perf_counter() - t
        final = tmp / "model.onnx"
        save_onnx(model, final)
        ort_onnx = final
        precision_info = None
        if options.precision != "fp32":
            t = time.perf_counter()
            say(f"[precision] measuring value ranges, casting to {options.precision}")
            from exporter.fp16_range import cast_with_range_analysis

            range_specs = _align(specs, [i.name for i in model.graph.input])
            range_feeds = case_feeds(range_specs, parity_cases(range_specs), options.seed).values()
            cast, precision_info = cast_with_range_analysis(model, options.precision, list(range_feeds),
                                                            keep_modules=options.fp16_keep,
                                                            force=options.fp16_force)
            ort_onnx = tmp / f"model.{options.precision}.onnx"
            save_onnx(cast, ort_onnx)
            seconds["precision"] = time.perf_counter() - t
        engine_info = None
        engine_runner: Runner | None = None
        engine_skip = ""
        if trt_ok:
            t = time.perf_counter()
            say(f"[engine] building a TensorRT engine ({options.precision})")
            from exporter import trt_build, trt_engine

            result = trt_build.build_engine(
                ort_onnx if options.precision != "fp32" else final, tmp / "model.engine", specs=specs,
                precision=options.precision, backend=options.backend, timing_cache=options.timing_cache,
                opt_level=options.opt_level, workspace_mb=options.workspace_mb, force=True,
                progress=lambda m: say(f"[engine] {m}"))
            engine_info = relocated(result.to_dict(), tmp, options.out)  # name the files where they end up
            engine_info["summary"] = (f"{result.backend} {result.backend_version}, {result.precision}, "
                                      f"{result.engine_bytes / 1e6:.1f} MB, built in {result.build_seconds:.1f} s")
            seconds["engine"] = time.perf_counter() - t
            has_gpu, why = trt_engine.gpu_available()
            if has_gpu:
                engine_runner = _EngineRunner(tmp / "model.engine")
            else:
                engine_skip = f"tensorrt: engine built but not run, so not checked: {why}"
        t = time.perf_counter()
        say("[parity] comparing with PyTorch")
        ort_runner = OnnxRuntimeRunner(final)
        specs = _align(specs, ort_runner.input_names)
        reference = TorchRunner(loaded.module, ort_runner.output_names, [s.name for s in specs])
        tols = {ort_runner.name: Tolerances.for_precision("fp32", options.atol, options.rtol, options.per_output)}
        backends: list[Runner] = [ort_runner]
        skipped: list[str] = []
        unchecked: list[str] = []  # why each low-precision backend did not run
        if options.precision != "fp32":
            name = f"onnxruntime-{options.precision}"
            try:
                low = OnnxRuntimeRunner(ort_onnx, name=name)
            except LrexportError as err:  # ORT's CPU kernels mostly lack bfloat16
                op = re.search(r"of operator \((\w+)\)", err.problem)
                kernel = f"no {options.precision} kernel{' for ' + op.group(1) if op else ''}"
                skipped.append(f"{name}: ONNX Runtime cannot run the {options.precision} model ({kernel}); "
                               "the TensorRT engine carries its parity where a GPU runs it")
                unchecked.append(f"ONNX Runtime has {kernel}")
            else:
                tols[low.name] = Tolerances.for_precision(options.precision, options.atol, options.rtol,
                                                          options.per_output)
                backends.append(low)
            from exporter.faithful import faithful_runner

            run_cases = list(options.cases or parity_cases(specs))
            say(f"[parity] {options.precision} arithmetic (faithful evaluator)")
            faithful, faithful_skip = faithful_runner(cast, options.precision,
                                                      case_feeds(specs, run_cases, options.seed))
            if faithful is None:
                skipped.append(f"{options.precision} faithful: {faithful_skip}")
                unchecked.append(str(faithful_skip))
            else:
                tols[faithful.name] = Tolerances.for_precision(options.precision, options.atol, options.rtol,
                                                               options.per_output)
                backends.append(faithful)
        if engine_runner is not None:
            tols[engine_runner.name] = Tolerances.for_precision(options.precision, options.atol, options.rtol,
                                                                options.per_output)
            backends.append(engine_runner)
        planner = planner_for_runners(reference, backends, specs, budget, reference_graph=exported_model)
        parity = run_parity(reference, backends, specs, tolerances=tols, seed=options.seed, cases=options.cases,
                            modules=output_modules(model), precision=options.precision,
                            progress=lambda m: say(f"[parity] {m}"), memory=planner)
        if exported.program is not None:
            _localize_against_torch(parity, exported.program, exported_model, specs, options, budget)
        if options.precision != "fp32":
            _localize_low_precision(parity, model, cast, specs, options, backends, budget)
        parity.skipped.extend(skipped)
        if engine_skip:  # said once, where the backends are: in the parity report
            parity.skipped.append(engine_skip)
        low_rows = [r for r in parity.results if r.backend != ort_runner.name]
        if options.precision != "fp32" and not low_rows:  # a skipped precision never reads as PASS
            parity.unchecked[options.precision] = "; ".join(unchecked + ["no GPU ran an engine"])
        seconds["parity"] = time.perf_counter() - t
        report = BuildReport(
            out=options.out,
            model={"source": loaded.source, "kind": loaded.kind, "parameters": loaded.parameter_count},
            export=exported, passes=passes_info, precision=precision_info, engine=engine_info,
            parity=parity, notes=notes, seconds=seconds)
        if passes_info is None:
            (tmp / "exported.onnx").unlink()
            report.export.onnx_path = options.out / "model.onnx"
        else:
            report.export.onnx_path = options.out / "exported.onnx"
        report.files = [options.out / name for name in sorted(p.name for p in tmp.iterdir())] + [
            options.out / "report.json"]
        (tmp / "report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return report


def _failing_with_feeds(parity: ParityReport, specs: Sequence[InputSpec], seed: int,
                        backend: Callable[[str], bool], models: Sequence[onnx.ModelProto] = (),
                        budget: MemoryBudget | None = None) -> list[tuple[Any, dict]]:
    """The failing results of the matching backends, each with the inputs its case ran on (the first
    batch slice of a case run in slices). Where keeping every intermediate of ``models`` at once does not
    fit in the memory budget, the result gets a drift note instead."""
    failing = [r for r in parity.results if backend(r.backend) and not r.ok]
    out = []
    for r in failing:
        plan = parity.plans[r.case]
        feeds = batch_slices(plan_feeds(specs, plan, plan.seed), plan.batch_chunk)[0]
        why = localization_fits([GraphCost("onnxruntime", m) for m in models],
                                {k: v.shape for k, v in feeds.items()}, budget)
        if why:
            _add_drift(parity, r, None, why)
        else:
            out.append((r, feeds))
    return out


def _add_drift(parity: ParityReport, result: Any, loc: Any, text: str) -> None:
    parity.drift.append({"backend": result.backend, "case": result.case, "text": text,
                         "location": loc.to_dict() if loc else None})


def _localize_against_torch(parity: ParityReport, program: Any, exported_model: onnx.ModelProto,
                            specs: Sequence[InputSpec], options: BuildOptions,
                            budget: MemoryBudget | None = None) -> None:
    """For the first failing case of the float32 ONNX model, name the first operation that departs from
    PyTorch (on the model as exported: the passes were each checked against it already)."""
    from exporter.localize import localize_against_torch

    for r, feeds in _failing_with_feeds(parity, specs, options.seed, lambda b: b == "onnxruntime",
                                        [exported_model, exported_model], budget)[:1]:
        loc = localize_against_torch(program, exported_model, feeds, [s.name for s in specs])
        _add_drift(parity, r, loc, loc.describe().replace("first drift", "first drift from PyTorch") if loc else
                   "no intermediate of the exported model departs from PyTorch (float32) by more than 1e-3 "
                   "(rel L2): the difference builds up gradually (check the tolerances)")


def _localize_low_precision(parity: ParityReport, fp32_model: onnx.ModelProto, low_model: onnx.ModelProto,
                            specs: Sequence[InputSpec], options: BuildOptions, backends: Sequence[Runner],
                            budget: MemoryBudget | None = None) -> None:
    """For each failing case of the fp16/bf16 ONNX model (in ONNX Runtime or the faithful evaluator),
    name the first node that drifts from float32."""
    from exporter.localize import localize_drift

    faithful = {b.name: b for b in backends if hasattr(b, "intermediates")}
    for r, feeds in _failing_with_feeds(parity, specs, options.seed,
                                        lambda b: b.startswith("onnxruntime-") or b in faithful,
                                        [fp32_model, low_model], budget):
        run = getattr(faithful.get(r.backend), "intermediates", None)
        loc = localize_drift(fp32_model, low_model, feeds, run_candidate=run)
        _add_drift(parity, r, loc, loc.describe() if loc else
                   "no intermediate departs from float32 by more than 1e-2 (rel L2)")


class _EngineRunner:
    """The built engine as a parity backend (deserialized once, on the first case)."""

    name = "tensorrt"

    def __init__(self, path: Path):
        self.path = path
        self._engine: Any = None

    def run(self, feeds):
        if self._engine is None:
            from exporter import trt_engine

            self._engine = trt_engine.load_engine(self.path)
        return self._engine.run(feeds)
