"""The stages of ``lrexport build``, each a function returning a typed result with its own report
section (``text_lines`` for the terminal, ``to_dict`` for report.json):

    export -> passes (PassesStage) -> cast (CastStage) -> engine (EngineStage) -> parity (ParityReport)

``exporter.pipeline.build`` runs them in that order inside one atomic output folder. The precision cast
happens here, once; the engine builder takes the cast model as it is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import onnx
import onnx_ir as ir

from exporter.compare import Tolerance, Tolerances
from exporter.errors import LrexportError
from exporter.export import DEFAULT_OPSET, ExportResult, export_onnx, save_onnx
from exporter.loading import LoadedModel
from exporter.memory_budget import (GraphCost, MemoryBudget, MemoryPlanner, batch_slices, localization_fits,
                                    plan_feeds, planner_for_runners)
from exporter.outputs import relocated
from exporter.parity import (ParityReport, Runner, align_specs, case_feeds, output_modules, run_parity,
                             torch_reference)
from exporter.runners import OnnxRuntimeRunner
from exporter.specs import InputSpec, parity_cases
from exporter.trt_backend import BACKEND_CHOICES
from graph_passes.ort_session import has_external_data
from graph_passes.precisions import normalize_precision

if TYPE_CHECKING:
    from exporter.trt_build import EngineBuildResult
    from graph_passes import PipelineReport

BACKENDS = (*BACKEND_CHOICES, "onnxruntime")
Say = Callable[[str], None]


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
    linear_attention: str = "auto"  # lowering of lrexport.LinearAttention nodes: auto or a LOWERINGS name

    def tolerances(self, precision: str) -> Tolerances:
        return Tolerances.for_precision(precision, self.atol, self.rtol, self.per_output)


def check_options(options: BuildOptions) -> None:
    """Refuse bad options before anything slow runs (a precision alias such as "half" becomes its name)."""
    options.precision = normalize_precision(options.precision)
    if options.backend not in BACKENDS:
        raise LrexportError(f"unknown backend {options.backend!r}", f"use one of {', '.join(BACKENDS)}")
    check_linear_attention(options.linear_attention)
    if (options.fp16_keep or options.fp16_force) and options.precision == "fp32":
        raise LrexportError("--fp16-keep / --fp16-force choose what the precision cast keeps in float32, "
                            "and this build is float32", "add --fp16 (or --bf16), or leave them out")
    if options.passes:
        from graph_passes import PASS_NAMES

        unknown = [p for p in options.passes if p not in PASS_NAMES]
        if unknown:  # before the export, not after it
            raise LrexportError(f"unknown pass {unknown[0]!r}", f"choose from {', '.join(PASS_NAMES)}")


def engine_backend_notes(options: BuildOptions) -> tuple[bool, list[str]]:
    """Whether a TensorRT engine is built, and the note saying why not where ``auto`` found none
    (an explicitly asked backend that does not import is an error)."""
    if options.backend == "onnxruntime":
        return False, []
    from exporter import trt_backend

    try:
        trt_backend.get_backend(options.backend)
    except LrexportError as err:
        if options.backend in ("tensorrt", "tensorrt-rtx"):
            raise
        return False, [f"{err.problem}; ONNX Runtime (CPU) is the engine ({err.hint})"]
    return True, []


def check_linear_attention(choice: str) -> None:
    """Refuse a lowering that is not one, or the standard op where the installed onnx lacks it."""
    from graph_passes.linear_attention import LOWERINGS
    from graph_passes.linear_attention_onnx import missing_schema

    if choice != "auto" and choice not in LOWERINGS:
        raise LrexportError(f"unknown linear-attention lowering {choice!r}", f"use one of auto, {', '.join(LOWERINGS)}")
    why = missing_schema() if choice == "ai.onnx" else None
    if why:
        raise LrexportError(f"--linear-attention ai.onnx: {why}",
                            "upgrade onnx, or use --linear-attention onnxruntime (ONNX Runtime) or portable")


def choose_linear_attention(options: BuildOptions, with_engine: bool | None) -> tuple[str, str]:
    """The lowering of ``lrexport.LinearAttention`` nodes (graph_passes/linear_attention.py) and why.

    ``auto`` follows what runs ``model.onnx``: a TensorRT engine (``with_engine``) takes the loop-free form
    (TensorRT cannot run com.microsoft ops, and builds a Scan as a loop whose outputs have a dynamic
    length); ONNX Runtime alone takes its native contrib op, the fastest on
    its CPU (README: "Linear-attention rules"); where the runtime is not known (``lrexport optimize``:
    ``with_engine`` None), the portable form, which every runtime runs. An asked-for contrib op is refused
    where an engine is built from the model."""
    choice = options.linear_attention
    check_linear_attention(choice)
    if choice == "onnxruntime" and with_engine:
        raise LrexportError(f"--linear-attention onnxruntime writes com.microsoft.LinearAttention, which TensorRT "
                            f"cannot run, and this build makes a TensorRT engine from the model (--backend "
                            f"{options.backend})",
                            "use --linear-attention loop-free (or auto), or --backend onnxruntime")
    if choice != "auto":
        return choice, "asked for with --linear-attention"
    if with_engine is None:
        return "portable", ("the runtime is not known here and standard ops run on every one; --linear-attention "
                            "onnxruntime is the fastest on ONNX Runtime (CPU)")
    if with_engine:
        return "loop-free", ("a TensorRT engine is built from the model: TensorRT cannot run com.microsoft ops, and "
                             "standard ops with no Scan spare it a loop over chunks")
    return "onnxruntime", "ONNX Runtime (CPU) is this build's only backend, and its native op is the fastest there"


LOWERED_TO = {"onnxruntime": "com.microsoft.LinearAttention", "portable": "standard ops (opset <= 25)",
              "loop-free": "standard ops with no loop (opset <= 25)",
              "ai.onnx": "the standard LinearAttention op (opset 27)"}


# ------------------------------------------------------------------------------------------ export

def export_stage(loaded: LoadedModel, specs: Sequence[InputSpec], tmp: Path, options: BuildOptions,
                 say: Say) -> ExportResult:
    say("[export] exporting to ONNX")
    return export_onnx(loaded, specs, tmp / "exported.onnx", exporter=options.exporter, opset=options.opset,
                       progress=lambda m: say(f"[export] {m}"), patches=options.patches)


# ------------------------------------------------------------------------------------------ passes

@dataclass
class PassesStage:
    """The graph passes' result: the rewritten model, the per-pass report, the memory steps of the checks."""

    model: onnx.ModelProto = field(repr=False)
    report: PipelineReport
    memory: list[str]
    warnings: list[str] = field(default_factory=list)
    # the linear-attention lowering: {"lowering", "to", "why", "nodes"} (nodes lowered; 0: the model has none)
    linear_attention: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"report": self.report.to_dict(), "table": self.report.format_table(), "memory": self.memory,
                "warnings": self.warnings, "linear_attention": self.linear_attention}

    def text_lines(self) -> list[str]:
        table = self.report.format_table()
        return [f"warning: {w}" for w in self.warnings] + self.lowering_lines() + ([table] if table else [])

    def lowering_lines(self) -> list[str]:
        """One line naming the linear-attention lowering that ran and why (none where nothing was lowered)."""
        la = self.linear_attention
        if not la.get("nodes"):
            return []
        return [f"linear-attention: {la['nodes']} node{'s' if la['nodes'] > 1 else ''} lowered to {la['to']} "
                f"({la['lowering']}): {la['why']}"]

    def notes(self) -> list[str]:
        return [f"pass checks {m}" for m in self.memory]


def pass_check_feeds(model: onnx.ModelProto, options: BuildOptions, specs: Sequence[InputSpec],
                     budget: MemoryBudget | None, base_dir: Path | None = None) -> tuple[list[dict], list[str]]:
    """The inputs each pass is checked on (min and odd shapes), planned against the memory budget like
    parity cases (batch slices become separate feeds; no float64 here); plus the steps taken."""
    planner = MemoryPlanner(budget, specs, [GraphCost("onnxruntime", model, base_dir)])
    feeds: list[dict] = []
    memory: list[str] = []
    cases = [c for c in parity_cases(specs) if c in ("min", "odd")] or ["opt"]  # a static model has only opt
    for i, case in enumerate(cases):
        plan = planner.plan(case, {s.name: s.shape(case) for s in specs}, allow_float32=False)
        memory += [f"{case}: {step}" for step in plan.steps]
        if not plan.skip:
            feeds += batch_slices(plan_feeds(specs, plan, options.seed + 100 + i), plan.batch_chunk)
    return feeds, memory


def run_passes_on(model: onnx.ModelProto, options: BuildOptions, specs: Sequence[InputSpec], progress: Say,
                  budget: MemoryBudget | None = None, loaded: LoadedModel | None = None,
                  base_dir: Path | None = None, lowering: tuple[str, str] | None = None) -> PassesStage:
    """The graph passes on ``model``, each checked in ONNX Runtime (also ``lrexport optimize``). ``loaded``,
    the PyTorch model ``model`` was exported from, tells a model that fails (or gives NaN/Inf) on the check
    inputs by itself from an export bug. ``base_dir``: where the external data of a model loaded without
    it lies (the result refers to it too). ``lowering``: the linear-attention lowering and why
    (:func:`choose_linear_attention`; default: its choice where the runtime is not known)."""
    import graph_passes
    from exporter.model_errors import explain_input_model_error

    lowering = lowering or choose_linear_attention(options, None)
    feeds, memory = pass_check_feeds(model, options, specs, budget, base_dir)
    chunk, warnings = clamp_chunk(options.chunk_size, specs)
    opts = graph_passes.PassOptions(chunk_size=chunk, merge_threshold=options.merge_threshold,
                                    linear_attention=lowering[0], max_positions=served_positions(specs))
    passes = options.passes
    if passes is not None and "linear-attention" not in passes:  # no runtime runs lrexport's own op: it is
        passes = [*passes, "linear-attention"]  # always lowered (causal-chunk and quadratic-causal write it)
    try:
        new_model, report = graph_passes.run_passes(model, passes, options=opts, feeds=feeds,
                                                    progress=progress, base_dir=base_dir)
    except graph_passes.InputModelError as err:
        raise (explain_input_model_error(err, loaded, [i.name for i in model.graph.input]) or err) from None
    except graph_passes.PassParityError as err:
        raise LrexportError(f"graph pass broke parity: {err}",
                            "rerun with --no-passes (or leave that pass out with --passes) and report the bug") from None
    except ValueError as err:
        raise LrexportError(str(err), "see `lrexport optimize --help` for the pass names") from None
    lowered = sum(1 for p in report.passes if p.name == "linear-attention" for d in p.details
                  if d.get("kind") == "linear-attention" and d.get("rewritten"))
    return PassesStage(new_model, report, memory, warnings, {"lowering": lowering[0], "to": LOWERED_TO[lowering[0]],
                                                             "why": lowering[1], "nodes": lowered})


def longest_sequence(specs: Sequence[InputSpec]) -> int:
    """The longest sequence (axis 1) the inputs allow; 0 where no input has a second axis."""
    return max((s.max[1] for s in specs if s.rank >= 2), default=0)


MIN_SERVED_POSITIONS = 4096


def served_positions(specs: Sequence[InputSpec]) -> int | None:
    """The positions a loop-free recurrence is sized for (``PassOptions.max_positions``): twice the longest
    sequence the inputs allow (axis 1), room for tokens a model adds to its input, and at least
    ``MIN_SERVED_POSITIONS``, since the op's sequence need not be an input's axis 1 (patches of an image);
    each doubling of it is one more level of ~20 small nodes. Past it the lowered op gives NaN, which
    parity at the max shape shows. None: not known."""
    longest = longest_sequence(specs)
    return max(2 * longest, MIN_SERVED_POSITIONS) if longest else None


def clamp_chunk(chunk_size: int, specs: Sequence[InputSpec]) -> tuple[int, list[str]]:
    """The causal-chunk pass's chunk, at most the longest sequence (axis 1) the inputs allow: a larger chunk
    only pads every sequence up to it (4096 for a max of 512: 600x the FLOPs), so it is clamped, and said."""
    longest = longest_sequence(specs)
    if not longest or chunk_size <= longest:
        return chunk_size, []
    return longest, [f"--chunk-size {chunk_size} is larger than the longest sequence the inputs allow ({longest}): "
                     f"chunks of {longest} instead (a larger chunk only pads every sequence up to it)"]


def passes_stage(model: onnx.ModelProto, specs: Sequence[InputSpec], options: BuildOptions, say: Say,
                 budget: MemoryBudget | None, loaded: LoadedModel | None = None,
                 base_dir: Path | None = None, lowering: tuple[str, str] | None = None) -> PassesStage | None:
    if options.passes is not None and not len(options.passes):
        return None
    say("[passes] running graph passes")
    return run_passes_on(model, options, specs, lambda m: say(f"[passes] {m}"), budget, loaded, base_dir, lowering)


# -------------------------------------------------------------------------------------------- cast

def with_weights(model: onnx.ModelProto, base_dir: Path) -> onnx.ModelProto:
    """``model`` with the external weights it refers to (in ``base_dir``) read into it, for the steps that
    rewrite or expose every value (the cast, drift localization); ``model`` itself where it has none."""
    if not has_external_data(model):
        return model
    lazy = ir.serde.deserialize_model(model)
    ir.external_data.set_base_dir(lazy.graph, base_dir)
    return ir.to_proto(ir.external_data.load_to_model(lazy))


@dataclass
class CastStage:
    """The one precision cast of a build: the fp16/bf16 model, where it was written, what was kept."""

    precision: str
    onnx_path: Path
    model: onnx.ModelProto = field(repr=False)
    info: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return self.info

    def text_lines(self) -> list[str]:
        return [f"precision: {self.info.get('summary', '')}"]

    def relocate(self, tmp: Path, out: Path) -> None:
        """Name the cast model where it ends up once the build's folder has moved."""
        self.onnx_path = relocated(self.onnx_path, tmp, out)


def cast_stage(model: onnx.ModelProto, specs: Sequence[InputSpec], options: BuildOptions, tmp: Path,
               say: Say, base_dir: Path | None = None) -> CastStage | None:
    """Cast to fp16/bf16, keeping in float32 what the range analysis measures out of range on the parity
    inputs; written as ``model.<precision>.onnx``. None for an fp32 build. ``base_dir``: where the
    external data of a model loaded without it lies (the cast reads every weight, so it loads them)."""
    if options.precision == "fp32":
        return None
    model = with_weights(model, base_dir or tmp)
    say(f"[precision] measuring value ranges, casting to {options.precision}")
    from exporter.fp16_range import cast_with_range_analysis

    range_specs = align_specs(specs, [i.name for i in model.graph.input])
    range_feeds = case_feeds(range_specs, parity_cases(range_specs), options.seed).values()
    cast, info = cast_with_range_analysis(model, options.precision, list(range_feeds),
                                          keep_modules=options.fp16_keep, force=options.fp16_force)
    path = tmp / f"model.{options.precision}.onnx"
    save_onnx(cast, path)
    return CastStage(options.precision, path, cast, info)


# ------------------------------------------------------------------------------------------ engine

class EngineRunner:
    """A built engine as a parity backend (deserialized once, on the first case)."""

    name = "tensorrt"

    def __init__(self, path: Path):
        self.path = path
        self._engine: Any = None

    def run(self, feeds):
        if self._engine is None:
            from exporter import trt_engine

            self._engine = trt_engine.load_engine(self.path)
        return self._engine.run(feeds)


@dataclass
class EngineStage:
    """The TensorRT engine: the build result (paths named where they end up), and either the runner
    parity checks it with or why it cannot run here."""

    result: EngineBuildResult
    info: dict[str, Any]
    runner: EngineRunner | None = None
    skip: str = ""

    def to_dict(self) -> dict[str, Any]:
        return self.info

    def text_lines(self) -> list[str]:
        return [f"engine: {self.info.get('summary', '')}"]

    def relocate(self, tmp: Path, out: Path) -> None:
        """Name the engine's files where they end up once the build's folder has moved."""
        r = self.result
        r.engine_path, r.meta_path = relocated(r.engine_path, tmp, out), relocated(r.meta_path, tmp, out)
        r.network_onnx = relocated(r.network_onnx, tmp, out)


def engine_stage(onnx_path: Path, specs: Sequence[InputSpec], options: BuildOptions, tmp: Path,
                 say: Say) -> EngineStage:
    """Build the engine from ``onnx_path`` as given (the cast model for fp16/bf16: no second cast)."""
    say(f"[engine] building a TensorRT engine ({options.precision})")
    from exporter import trt_build, trt_engine

    result = trt_build.build_engine(
        onnx_path, tmp / "model.engine", specs=specs, backend=options.backend, timing_cache=options.timing_cache,
        opt_level=options.opt_level, workspace_mb=options.workspace_mb, force=True,
        progress=lambda m: say(f"[engine] {m}"))
    info = relocated(result.to_dict(), tmp, options.out)  # name the files where they end up
    info["summary"] = (f"{result.backend} {result.backend_version}, {result.precision}, "
                       f"{result.engine_bytes / 1e6:.1f} MB, built in {result.build_seconds:.1f} s")
    has_gpu, why = trt_engine.gpu_available()
    if has_gpu:
        return EngineStage(result, info, EngineRunner(tmp / "model.engine"))
    return EngineStage(result, info, skip=f"tensorrt: engine built but not run, so not checked: {why}")


# ------------------------------------------------------------------------------------------ parity

@dataclass
class _Backends:
    runners: list[Runner]
    tolerances: dict[str, Tolerances]
    skipped: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)  # why each low-precision backend did not run


def _low_precision_backends(cast: CastStage, specs: Sequence[InputSpec], options: BuildOptions, into: _Backends,
                            say: Say) -> None:
    """ONNX Runtime on the cast model, and the faithful fp16/bf16 evaluator; each says why where it cannot run."""
    name = f"onnxruntime-{cast.precision}"
    try:
        low = OnnxRuntimeRunner(cast.onnx_path, name=name)
    except LrexportError as err:  # ORT's CPU kernels mostly lack bfloat16
        op = re.search(r"of operator \((\w+)\)", err.problem)
        kernel = f"no {cast.precision} kernel{' for ' + op.group(1) if op else ''}"
        into.skipped.append(f"{name}: ONNX Runtime cannot run the {cast.precision} model ({kernel}); "
                            "the TensorRT engine carries its parity where a GPU runs it")
        into.unchecked.append(f"ONNX Runtime has {kernel}")
    else:
        into.tolerances[low.name] = options.tolerances(cast.precision)
        into.runners.append(low)
    from exporter.faithful import faithful_runner

    say(f"[parity] {cast.precision} arithmetic (faithful evaluator)")
    faithful, why = faithful_runner(cast.model, cast.precision,
                                    case_feeds(specs, list(options.cases or parity_cases(specs)), options.seed))
    if faithful is None:
        into.skipped.append(f"{cast.precision} faithful: {why}")
        into.unchecked.append(str(why))
    else:
        into.tolerances[faithful.name] = options.tolerances(cast.precision)
        into.runners.append(faithful)


def parity_stage(loaded: LoadedModel, exported: ExportResult, exported_model: onnx.ModelProto,
                 model_path: Path, model: onnx.ModelProto, cast: CastStage | None, engine: EngineStage | None,
                 options: BuildOptions, budget: MemoryBudget | None, say: Say) -> ParityReport:
    """Every backend (float32 ONNX Runtime, the cast model, the engine) against PyTorch; a failing case
    names where it first drifts; a precision no backend checked is marked unchecked, never PASS."""
    say("[parity] comparing with PyTorch")
    ort_runner = OnnxRuntimeRunner(model_path)
    specs = align_specs(exported.specs, ort_runner.input_names)
    reference = torch_reference(loaded, ort_runner.output_names, specs)
    backends = _Backends([ort_runner], {ort_runner.name: options.tolerances("fp32")})
    if cast is not None:
        _low_precision_backends(cast, specs, options, backends, say)
    if engine is not None and engine.runner is not None:
        backends.tolerances[engine.runner.name] = options.tolerances(options.precision)
        backends.runners.append(engine.runner)
    planner = planner_for_runners(reference, backends.runners, specs, budget,  # a path: external weights stay on disk
                                  reference_graph=exported.onnx_path if has_external_data(exported_model) else exported_model)
    parity = run_parity(reference, backends.runners, specs, tolerances=backends.tolerances, seed=options.seed,
                        cases=options.cases, modules=output_modules(model), precision=options.precision,
                        progress=lambda m: say(f"[parity] {m}"), memory=planner)
    failing = not all(r.ok for r in parity.results)  # localization reads every weight: only where it runs
    if exported.program is not None and failing:
        exported_model = with_weights(exported_model, model_path.parent)
        _localize_against_torch(parity, exported.program, exported_model, specs, budget)
    if cast is not None and failing:
        _localize_low_precision(parity, with_weights(model, model_path.parent), cast.model, specs, backends.runners,
                                budget)
    parity.skipped.extend(backends.skipped)
    if engine is not None and engine.skip:  # said once, where the backends are: in the parity report
        parity.skipped.append(engine.skip)
    low_rows = [r for r in parity.results if r.backend != ort_runner.name]
    if options.precision != "fp32" and not low_rows:  # a skipped precision never reads as PASS
        parity.unchecked[options.precision] = "; ".join(backends.unchecked + ["no GPU ran an engine"])
    return parity


def _failing_with_feeds(parity: ParityReport, specs: Sequence[InputSpec], backend: Callable[[str], bool],
                        models: Sequence[onnx.ModelProto] = (), budget: MemoryBudget | None = None
                        ) -> list[tuple[Any, dict]]:
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
                            specs: Sequence[InputSpec], budget: MemoryBudget | None = None) -> None:
    """For the first failing case of the float32 ONNX model, name the first operation that departs from
    PyTorch (on the model as exported: the passes were each checked against it already)."""
    from exporter.localize import localize_against_torch
    from graph_passes.linear_attention_ort import DOMAIN

    if any(n.domain == DOMAIN for n in exported_model.graph.node):  # lrexport's own ops: no runtime runs them
        for r in [r for r in parity.results if r.backend == "onnxruntime" and not r.ok][:1]:
            _add_drift(parity, r, None, "not localized against PyTorch: the exported model holds lrexport's own "
                       f"ops ({DOMAIN} domain), which only the graph passes' lowering makes runnable")
        return
    for r, feeds in _failing_with_feeds(parity, specs, lambda b: b == "onnxruntime",
                                        [exported_model, exported_model], budget)[:1]:
        loc = localize_against_torch(program, exported_model, feeds, [s.name for s in specs])
        _add_drift(parity, r, loc, loc.describe().replace("first drift", "first drift from PyTorch") if loc else
                   "no intermediate of the exported model departs from PyTorch (float32) by more than 1e-3 "
                   "(rel L2): the difference builds up gradually (check the tolerances)")


def _localize_low_precision(parity: ParityReport, fp32_model: onnx.ModelProto, low_model: onnx.ModelProto,
                            specs: Sequence[InputSpec], backends: Sequence[Runner],
                            budget: MemoryBudget | None = None) -> None:
    """For each failing case of the fp16/bf16 ONNX model (in ONNX Runtime or the faithful evaluator),
    name the first node that drifts from float32."""
    from exporter.localize import localize_drift

    faithful = {b.name: b for b in backends if hasattr(b, "intermediates")}
    for r, feeds in _failing_with_feeds(parity, specs, lambda b: b.startswith("onnxruntime-") or b in faithful,
                                        [fp32_model, low_model], budget):
        run = getattr(faithful.get(r.backend), "intermediates", None)
        loc = localize_drift(fp32_model, low_model, feeds, run_candidate=run)
        _add_drift(parity, r, loc, loc.describe() if loc else
                   "no intermediate departs from float32 by more than 1e-2 (rel L2)")
