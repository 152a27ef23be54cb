"""One build stage from file to file: ``lrexport export`` and ``lrexport optimize`` as Python functions,
each writing its output atomically (the file, and its .data, appear only when the stage ran).

    export_onnx_file(loaded, specs, "model.onnx")
    optimize_onnx("model.onnx", "fused.onnx").report.format_table()
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Sequence

from exporter.export import DEFAULT_OPSET, ExportResult, export_onnx, save_onnx
from exporter.loading import LoadedModel
from exporter.outputs import atomic_files, check_new_file
from exporter.specs import InputSpec
from exporter.stages import BuildOptions, PassesStage, choose_linear_attention, run_passes_on


def export_onnx_file(loaded: LoadedModel, specs: Sequence[InputSpec], out: str | Path, *, exporter: str = "dynamo",
                     opset: int = DEFAULT_OPSET, force: bool = False, patches: bool = True,
                     progress: Callable[[str], None] | None = None) -> ExportResult:
    """Export ``loaded`` to ``out`` with dynamic axes from ``specs`` (no passes, no parity); ``patches``:
    the export patches for known libraries (exporter/patches.py)."""
    say = progress or (lambda _m: None)
    out = check_new_file(out, force, "onnx")
    with atomic_files(out, force, "onnx") as tmp:
        result = export_onnx(loaded, specs, tmp / out.name, exporter=exporter, opset=opset,
                             progress=lambda m: say(f"[export] {m}"), patches=patches)
    result.onnx_path = out
    return result


def optimize_onnx(src: str | Path, dst: str | Path, *, passes: Sequence[str] | None = None,
                  specs: Sequence[InputSpec] | None = None, chunk_size: int = 64, merge_threshold: float = 1.0,
                  seed: int = 0, force: bool = False, progress: Callable[[str], None] | None = None,
                  explicit_dtypes: Iterable[str] | None = None, linear_attention: str = "auto") -> PassesStage:
    """Run the graph passes (None: the default set) on ``src``, each checked numerically on inputs from
    ``specs`` (default: the ONNX inputs' own shapes), and write ``dst``.

    ``specs`` name ONNX inputs; what they leave out comes from the file: a spec without an explicit dtype
    (``explicit_dtypes``: the names whose --input gave one) takes the input's dtype and, for integers,
    the safe value range of :func:`specs_from_onnx`. ``linear_attention``: the lowering of
    ``lrexport.LinearAttention`` nodes (``auto``: portable, the runtime not being known here)."""
    from exporter.inspect_model import read_onnx
    from exporter.specs import merge_specs, refuse_unknown_names, specs_from_onnx
    from graph_passes.ort_session import check_opset

    say = progress or (lambda _m: None)
    dst = check_new_file(dst, force, "onnx")
    options = BuildOptions(out=dst, passes=passes, seed=seed, chunk_size=chunk_size, merge_threshold=merge_threshold,
                           linear_attention=linear_attention)
    lowering = choose_linear_attention(options, None)  # a bad choice is refused before the model is read
    model = read_onnx(Path(src), load_external_data=False)  # external weights are read lazily from src's folder
    check_opset(model, str(src))
    known = specs_from_onnx(model)
    if specs:
        refuse_unknown_names(specs, known, f"the inputs of {Path(src).name}")
        explicit = explicit_dtypes if explicit_dtypes is not None else {s.name for s in specs}
        specs = merge_specs(specs, known, set(explicit))
    stage = run_passes_on(model, options, list(specs) if specs else known, lambda m: say(f"[passes] {m}"),
                          base_dir=Path(src).parent, lowering=lowering)
    with atomic_files(dst, force, "onnx") as tmp:
        save_onnx(stage.model, tmp / dst.name, base_dir=Path(src).parent)
    return stage
