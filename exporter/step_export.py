"""``lrexport export-step`` as a Python function: export the whole model, derive its step model for
autoregressive decoding, check it against PyTorch token by token and chunk by chunk, and optionally build
its TensorRT engine; the step model (and engine) appear only when every step ran.

    result = export_step_model(loaded, specs, "step.onnx", chunk_max=64, engine=True)
    result.parity.assert_ok()
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from exporter.errors import LrexportError
from exporter.export import DEFAULT_OPSET, export_onnx
from exporter.loading import LoadedModel
from exporter.outputs import atomic_files, check_new_file, relocated
from exporter.patches import patch_lines, reference_patches
from exporter.recurrent import (
    CHECK_LENGTHS,
    StepExportResult,
    StepParityReport,
    check_step_parity,
    export_step,
    step_specs,
)
from exporter.specs import InputSpec

if TYPE_CHECKING:
    from exporter.trt_build import EngineBuildResult


@dataclass
class StepModelBuild:
    """What :func:`export_step_model` wrote: the step model, its parity, the engine (if asked)."""

    step: StepExportResult
    parity: StepParityReport
    chunk_max: int
    engine: EngineBuildResult | None = None
    engine_info: dict[str, Any] | None = None  # the engine's report, files named where they end up
    warnings: list[str] = field(default_factory=list)  # the export's
    patches: list[str] = field(default_factory=list)  # the export patches applied (exporter/patches.py)

    @property
    def ok(self) -> bool:
        return self.parity.ok

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step.to_dict(), "parity": self.parity.to_dict(), "engine": self.engine_info,
                "warnings": self.warnings, "patches": self.patches}

    def format_text(self) -> str:
        lines = [self.step.format_text(), self.parity.format_table()]
        lines += patch_lines(self.patches)
        if self.engine is not None:
            path = self.step.onnx_path.with_suffix(".engine")
            lines.append(f"wrote {path} ({self.engine.backend} {self.engine.precision}, "
                         f"{self.engine.engine_bytes / 2**20:.1f} MiB, built in {self.engine.build_seconds:.1f} s; "
                         f"chunk 1..{self.chunk_max})")
        return "\n".join(lines + [f"warning: {w}" for w in self.warnings])


def check_step_output(out: str | Path, force: bool, engine: bool = False) -> Path:
    """Refuse, before any slow work, a step-model path that is not .onnx, or that (or, with ``engine``, the
    engine beside it) exists without ``force`` (exporter/outputs.py says what ``force`` may replace)."""
    out = Path(out)
    if out.suffix != ".onnx":
        raise LrexportError(f"--out {out} should end in .onnx", "e.g. --out step.onnx")
    if engine:
        check_new_file(out.with_suffix(".engine"), force, "engine")
    return check_new_file(out, force, "onnx")


def step_engine_specs(step: StepExportResult, specs: Sequence[InputSpec], chunk_max: int) -> list[InputSpec]:
    """The engine profile: the model's batch range, chunks of 1..chunk_max tokens (opt: half of it)."""
    batch = next((s for s in specs if s.name in step.inputs), None)
    b_range = (batch.min[0], batch.opt[0], batch.max[0]) if batch is not None and batch.rank else (1, 1, 1)
    return step_specs(step, b_range, (1, min(chunk_max, max(1, chunk_max // 2)), chunk_max))


def export_step_model(loaded: LoadedModel, specs: Sequence[InputSpec], out: str | Path, *, chunk_max: int = 64,
                      engine: bool = False, backend: str = "auto", length: int = 100, opset: int = DEFAULT_OPSET,
                      seed: int = 0, force: bool = False, patches: bool = True, linear_attention: str = "portable",
                      progress: Callable[[str], None] | None = None) -> StepModelBuild:
    """Export ``loaded`` as a step model at ``out`` (.onnx; with ``engine``, also ``<out stem>.engine``).
    ``linear_attention``: how ``lrexport.LinearAttention`` nodes are lowered ("portable" or "onnxruntime").
    Parity runs at ``length`` tokens and at :data:`~exporter.recurrent.CHECK_LENGTHS`, outputs against PyTorch and
    states against the full-sequence export's values of them."""
    say = progress or (lambda _m: None)
    if engine and linear_attention == "onnxruntime":
        raise LrexportError("--engine builds a TensorRT engine, and TensorRT cannot run ONNX Runtime's "
                            "com.microsoft.LinearAttention (--linear-attention onnxruntime)",
                            "use --linear-attention portable with --engine")
    out = check_step_output(out, force, engine)
    with atomic_files(out, force, "onnx") as tmp, reference_patches(loaded.module, patches):
        full_dir = tmp / ".full"  # the whole model's export: an intermediate, removed before the move
        full_dir.mkdir()
        exported = export_onnx(loaded, specs, full_dir / "full.onnx", opset=opset,
                               progress=lambda m: say(f"[export] {m}"), patches=patches)
        step = export_step(exported.onnx_path, tmp / out.name, specs=exported.specs, seed=seed,
                           linear_attention=linear_attention, progress=lambda m: say(f"[step] {m}"))
        say("[parity] step model token by token and chunk by chunk vs PyTorch")
        parity = check_step_parity(loaded, step.onnx_path, exported.specs, chunks=sorted({1, 7, chunk_max}),
                                   length=length, lengths=CHECK_LENGTHS, full_model=exported.onnx_path,
                                   linear_attention=linear_attention, seed=seed)
        shutil.rmtree(full_dir)
        result = StepModelBuild(step, parity, chunk_max, warnings=list(exported.warnings),
                                patches=list(exported.patches))
        if engine:
            from exporter.trt_build import build_engine

            result.engine = build_engine(step.onnx_path, tmp / out.with_suffix(".engine").name,
                                         specs=step_engine_specs(step, exported.specs, chunk_max), backend=backend,
                                         force=True, progress=lambda m: say(f"[engine] {m}"))
            result.engine_info = relocated(result.engine.to_dict(), tmp, out.parent)
    step.onnx_path = out
    return result
