"""``lrexport build``: load -> export -> graph passes -> (precision cast) -> engine -> parity -> report.

Every artifact is written into a temporary folder that replaces ``--out`` only when all steps ran.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

import onnx

from exporter.compare import check_output_tolerances
from exporter.errors import LrexportError
from exporter.export import ExportResult, save_onnx
from exporter.patches import patch_lines, reference_patches
from exporter.loading import LoadedModel, module_embedding_sizes
from exporter.memory_budget import MemoryBudget
from exporter.outputs import atomic_dir, reading
from exporter.parity import ParityReport
from exporter.specs import (InputSpec, build_specs, merge_specs, parse_input, read_sidecar, tie_masks,
                            refuse_unknown_names)
from exporter.stages import (BACKENDS, BuildOptions, CastStage, EngineStage, PassesStage, cast_stage, check_options,
                             choose_linear_attention, engine_backend_notes, engine_stage, export_stage, parity_stage,
                             pass_check_feeds, passes_stage, run_passes_on)
from graph_passes.precisions import PRECISIONS

__all__ = ["BACKENDS", "PRECISIONS", "BuildOptions", "BuildReport", "build", "pass_check_feeds", "resolve_specs",
           "run_passes_on"]
_T = TypeVar("_T")


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
        given = build_specs(inputs, shapes)
        refuse_unknown_names(given, known, "the inputs the model archive records")
        specs = tie_masks(merge_specs(given, known, explicit), {s.name for s in given})
        _check_limits(specs, loaded.limits if loaded is not None else {})
        if inputs and not shapes and not any(s.dynamic_axes for s in specs) and loaded is not None:
            loaded.notes.append(
                "the inputs have fixed shapes (--input without --shapes), so the ONNX model is static; for dynamic "
                "batch and sequence add " + " ".join(f"--shapes {_dynamic_example(s)}" for s in specs if s.rank >= 2))
    elif side is not None:
        specs = build_specs(*side)
    elif known:
        specs = known
        if loaded is not None:  # the defaults' caveats, moot where --input / --shapes replaced them
            loaded.notes.extend(n for n in loaded.spec_notes if n not in loaded.notes)
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
class BuildReport:
    """The build's stages in order, each with its own report section; ``ok`` is parity's verdict."""

    out: Path
    model: dict[str, Any]
    export: ExportResult
    passes: PassesStage | None
    precision: CastStage | None
    engine: EngineStage | None
    parity: ParityReport
    notes: list[str]
    seconds: dict[str, float]
    files: list[Path] = field(default_factory=list)  # what the build wrote, where it ends up (under out)

    @property
    def ok(self) -> bool:
        return self.parity.ok

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "out": str(self.out), "model": self.model, "export": self.export.to_dict(),
                "passes": self.passes.to_dict() if self.passes else None,
                "precision": self.precision.to_dict() if self.precision else None,
                "engine": self.engine.to_dict() if self.engine else None,
                "parity": self.parity.to_dict(), "notes": self.notes,
                "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
                "files": [str(f) for f in self.files]}

    def __str__(self) -> str:
        return self.format_text()

    def format_text(self) -> str:
        lines = [f"model: {self.model['source']} ({self.model['kind']}, {self.model['parameters']:,} parameters)",
                 f"inputs: {'; '.join(s.describe() for s in self.export.specs)}",
                 f"export: {self.export.exporter}, opset {self.export.opset}, {self.export.seconds:.1f} s"]
        lines += patch_lines(self.export.patches)
        lines += [f"warning: {w}" for w in self.export.warnings]
        for stage in (self.passes, self.precision, self.engine):
            lines += stage.text_lines() if stage else []
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


def build(loaded: LoadedModel, specs: Sequence[InputSpec], options: BuildOptions,
          progress: Callable[[str], None] | None = None) -> BuildReport:
    """load -> export -> passes -> [precision cast] -> engine -> parity -> report, in a temporary folder
    that replaces ``options.out`` only when every stage ran."""
    say = progress or (lambda _m: None)
    options.out = Path(options.out)
    check_options(options)
    budget = MemoryBudget.resolve(options.memory_budget)  # read once; a bad value fails before any work
    with_engine, notes = engine_backend_notes(options)
    lowering = choose_linear_attention(options, with_engine)  # model.onnx is lowered for what runs it
    seconds: dict[str, float] = {}

    def timed(name: str, stage: Callable[..., _T], *args: Any) -> _T:
        start = time.perf_counter()
        result = stage(*args)
        if result is not None:
            seconds[name] = time.perf_counter() - start
        return result

    source = loaded.source if os.path.isfile(loaded.source) else None  # never inside the replaced --out
    with reading(source), atomic_dir(options.out, options.force) as tmp, \
            reference_patches(loaded.module, options.patches):
        exported = timed("export", export_stage, loaded, specs, tmp, options, say)
        check_output_tolerances(options.per_output, exported.output_names)
        # weights past 2 GB stay in exported.onnx.data: the passes read them lazily, model.onnx refers to them
        exported_model = onnx.load(str(exported.onnx_path), load_external_data=False)
        passes = timed("passes", passes_stage, exported_model, exported.specs, options, say, budget, loaded, tmp,
                       lowering)
        model = passes.model if passes else exported_model
        save_onnx(model, tmp / "model.onnx", base_dir=tmp)
        cast = timed("precision", cast_stage, model, exported.specs, options, tmp, say, tmp)
        engine = timed("engine", engine_stage, cast.onnx_path if cast else tmp / "model.onnx", exported.specs,
                       options, tmp, say) if with_engine else None
        parity = timed("parity", parity_stage, loaded, exported, exported_model, tmp / "model.onnx", model, cast,
                       engine, options, budget, say)
        over_budget = parity.budget_error()
        if over_budget is not None:  # nothing checked: no build to keep
            raise over_budget
        report = BuildReport(
            out=options.out,
            model={"source": loaded.source, "kind": loaded.kind, "parameters": loaded.parameter_count},
            export=exported, passes=passes, precision=cast, engine=engine, parity=parity,
            notes=notes + (passes.notes() if passes else []), seconds=seconds)
        _write_report(report, tmp)
    return report


def _write_report(report: BuildReport, tmp: Path) -> None:
    """Name the files where they end up under ``out`` (the exported model only where passes changed it)
    and write report.json."""
    if report.passes is None:
        (tmp / "exported.onnx").unlink()
        (tmp / "exported.onnx.data").unlink(missing_ok=True)
        report.export.onnx_path = report.out / "model.onnx"
    else:
        report.export.onnx_path = report.out / "exported.onnx"
    for stage in (report.precision, report.engine):
        if stage is not None:
            stage.relocate(tmp, report.out)
    report.files = [report.out / name for name in sorted(p.name for p in tmp.iterdir())] + [
        report.out / "report.json"]
    (tmp / "report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
