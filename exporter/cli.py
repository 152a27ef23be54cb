"""The ``lrexport`` command line: build, export, check, optimize, inspect, run.

Option groups are shared across commands (as polygraphy shares argument groups across its tools).
Every user error prints one ``error:`` line and exits 2 (see ``_run`` for all exit codes); --debug adds the
traceback and keeps the exit code.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

import click

from exporter.compare import parse_output_tolerance
from exporter.errors import LrexportError
from exporter.trt_backend import BACKEND_CHOICES
from graph_passes.linear_attention import LOWERINGS

_T0 = time.perf_counter()


def _progress(quiet: bool) -> Callable[[str], None]:
    def say(msg: str) -> None:
        if not quiet:
            click.echo(f"{time.perf_counter() - _T0:6.1f}s {msg}", err=True)
    return say


def _compose(*decorators: Callable) -> Callable:
    def apply(fn: Callable) -> Callable:
        for dec in reversed(decorators):
            fn = dec(fn)
        return fn
    return apply


class _NonNegative(click.ParamType):
    """A finite number >= 0 (tolerances, thresholds): click's FloatRange lets NaN and inf through."""

    name = "number"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number) or number < 0:
            self.fail(f"{value!r} must be a finite number >= 0", param, ctx)
        return number


NON_NEGATIVE = _NonNegative()
SEED = click.IntRange(min=0)


class _OutputPath(click.Path):
    """A path the command writes: an empty one (`--out ""`) is refused, not read as '.' or the default."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and not value.strip():
            self.fail("is empty; give a path", param, ctx)
        return super().convert(value, param, ctx)


def _one_precision(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> str:
    """--fp16/--bf16/--fp32 share one value; click would silently keep the last of two, so refuse two."""
    chosen = list(dict.fromkeys(value))
    if len(chosen) > 1:
        raise LrexportError(f"{' and '.join('--' + p for p in chosen)} were both given",
                            "pick one precision (fp16 for float16, bf16 for bfloat16)")
    return chosen[0] if chosen else "fp32"


def _precision_options(verb: str) -> Callable:
    from graph_passes.precisions import DTYPE_NAMES, LOW_PRECISIONS

    return _compose(*(click.option(f"--{p}", "precision", flag_value=p, multiple=True, callback=_one_precision,
                                   help=f"{verb} {DTYPE_NAMES[p]}{' (default)' if p == 'fp32' else ''}.")
                      for p in (*LOW_PRECISIONS, "fp32")))


model_options = _compose(
    click.option("--factory", metavar="PKG.MODULE:FN", help="Builds the model for a state-dict file."),
    click.option("--factory-kwargs", metavar="JSON", help="Keyword arguments for --factory, as a JSON object."),
    click.option("--trust-pickle", is_flag=True,
                 help="Allow loading a fully pickled module (unpickling runs code from the file)."),
    click.option("--trust-remote-code", is_flag=True, expose_value=False,
                 callback=lambda ctx, _p, v: ctx.meta.__setitem__("lrexport.trust_remote_code", v),
                 help="Allow a Hugging Face folder's own model code (config.json's auto_map) to run."),
)
input_options = _compose(
    click.option("--input", "inputs", multiple=True, metavar="NAME:DIMS[:DTYPE[:LO..HI]]",
                 help="An input, e.g. x:1x128x512:float32 or ids:1x128:int64:0..255. Repeatable."),
    click.option("--shapes", multiple=True, metavar="NAME:min=DIMS,opt=DIMS,max=DIMS",
                 help="Dynamic range of an input; drives export axes, parity shapes and engine profiles."),
)
parity_options = _compose(
    click.option("--atol", type=NON_NEGATIVE, help="Absolute tolerance (default per precision)."),
    click.option("--rtol", type=NON_NEGATIVE, help="Relative tolerance (default per precision)."),
    click.option("--tol", "tols", multiple=True, metavar="OUTPUT:atol=A,rtol=R",
                 help="Tolerance for one output (glob). Repeatable."),
    click.option("--seed", type=SEED, default=0, show_default=True, help="Seed for the random inputs."),
    click.option("--cases", metavar="LIST", help="Shape cases to check: comma list of min,opt,max,odd."),
    click.option("--memory-budget", metavar="SIZE", expose_value=False, callback=lambda ctx, _p, v: _memory_budget(ctx, v),
                 help="Memory one parity run may use, e.g. 8GB (default: $LREXPORT_MEMORY_BUDGET, else 70% of "
                      "the memory available). Larger cases run in batch slices, a float32 reference, or a "
                      "smaller sequence, as the report says."),
)


def _memory_budget(ctx: click.Context, value: str | None) -> None:
    """--memory-budget: checked at once (a bad size is a one-line error), kept for the command to read."""
    if value is not None:
        from exporter.memory_budget import parse_size

        ctx.meta["lrexport.memory_budget"] = parse_size(value)


def _given_memory_budget() -> int | None:
    return click.get_current_context().meta.get("lrexport.memory_budget")
common_options = _compose(
    click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout."),
    click.option("--quiet", "-q", is_flag=True, help="No progress lines on stderr."),
    click.option("--debug", is_flag=True, help="Show tracebacks."),
)
pass_options = _compose(
    click.option("--passes", metavar="LIST", help="Comma list of graph passes to run (default: the standard set)."),
    click.option("--chunk-size", type=click.IntRange(min=1), default=64, show_default=True,
                 help="Chunk size of the causal rewrite."),
    click.option("--merge-threshold", type=NON_NEGATIVE, default=1.0, show_default=True,
                 help="Merge a low-rank pair when r*(m+n) >= threshold*m*n."),
    click.option("--linear-attention", "linear_attention", type=click.Choice(["auto", *LOWERINGS]), default="auto",
                 show_default=True,
                 help="How the linear-attention op (lrexport.LinearAttention nodes) is lowered. onnxruntime: "
                      "com.microsoft.LinearAttention, the fastest on ONNX Runtime CPU (33-62 ms at n = 4096 against "
                      "51-130 ms portable); portable: standard ops (opset <= 25; a Scan over chunks for the "
                      "delta rules and a per-key decay), which every runtime runs; loop-free: standard ops with "
                      "no Scan or Loop (the chunk-to-chunk state by doubling levels sized from the shapes' max), "
                      "for TensorRT (it cannot run com.microsoft ops); ai.onnx: the standard op of opset 27, which "
                      "ONNX Runtime 1.32 runs as a per-token Scan, 3-5x slower than its native op. auto: build "
                      "takes onnxruntime when ONNX Runtime is its only backend, loop-free when it builds a "
                      "TensorRT engine; optimize takes portable."),
)


def _tolerances(tols: tuple[str, ...]) -> dict:
    return dict(parse_output_tolerance(t) for t in tols)


def _cases(text: str | None) -> list[str] | None:
    if text is None:
        return None
    cases = [c.strip() for c in text.split(",") if c.strip()]
    if not cases:
        raise LrexportError(f"--cases {text!r} names no shape case",
                            "give a comma list of min, opt, max, odd, or leave --cases out for all of them")
    bad = [c for c in cases if c not in ("min", "opt", "max", "odd")]
    if bad:
        raise LrexportError(f"unknown shape case {bad[0]!r}", "use min, opt, max, odd")
    return cases


def _passes(text: str | None, no_passes: bool = False) -> tuple[str, ...] | None:
    """The --passes list, checked against the pass names before anything slow runs."""
    if no_passes:
        return ()
    if text is None:
        return None
    from graph_passes import PASS_NAMES

    passes = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = [p for p in passes if p not in PASS_NAMES]
    if unknown:
        raise LrexportError(f"unknown pass {unknown[0]!r}", f"choose from {', '.join(PASS_NAMES)}")
    return passes


_STDOUT: list[Any] = []  # the real stdout while a --json command runs (model code may print)


def _emit(as_json: bool, data: dict[str, Any], text: str) -> None:
    """The result on stdout: text, or with --json one JSON object whose ``ok`` says whether it passed
    (``true`` where the result has no verdict of its own; a failed command prints ``ok: false`` instead,
    see :func:`_json_error`)."""
    if as_json:
        data = data if "ok" in data else {"ok": True, **data}
        click.echo(json.dumps(data, indent=2, default=str), file=_STDOUT[-1] if _STDOUT else None)
    else:
        click.echo(text)


def _reads(model: str | None = None, onnx_file: str | None = None) -> None:
    """Mark the command's input files (the model and its input sidecar, an ONNX file and its external
    data): no output, --force or not, may replace one or a folder holding one (exporter/outputs.py)."""
    from exporter.outputs import add_inputs
    from exporter.specs import sidecar_path

    if model not in (None, "-"):
        add_inputs(model, sidecar_path(model))
    if onnx_file is not None:
        add_inputs(onnx_file, f"{onnx_file}.data")


def _load(model: str | None, factory, factory_kwargs, trust_pickle, say):
    """MODEL may be omitted (or '-') when --factory builds the model with its own weights."""
    from exporter.loading import load_model
    from exporter.outputs import add_inputs

    path = None if model in (None, "-") else model
    say(f"[load] {path or factory}")
    loaded = load_model(path, factory=factory, factory_kwargs=factory_kwargs, trust_pickle=trust_pickle,
                        trust_remote_code=_trust_remote_code())
    if factory:  # the factory's source file is an input too
        add_inputs(getattr(sys.modules.get(factory.split(":")[0]), "__file__", None))
    return loaded


def _trust_remote_code() -> bool:
    return bool(click.get_current_context().meta.get("lrexport.trust_remote_code"))


def _load_with_specs(model, factory, factory_kwargs, trust_pickle, inputs, shapes, pad_to_length, say):
    """Load MODEL and resolve its input specs, wrapping a fixed-length model in a padder if asked."""
    from exporter.pipeline import resolve_specs

    loaded = _load(model, factory, factory_kwargs, trust_pickle, say)
    if pad_to_length:
        from exporter.linformer import apply_padding

        loaded = apply_padding(loaded, pad_to_length)  # before resolve_specs: widens .pt2-inferred specs
    specs = resolve_specs(loaded, inputs, shapes, None if model == "-" else model)
    if pad_to_length:
        from exporter.linformer import padded_specs

        specs = padded_specs(specs, pad_to_length)
    return loaded, specs


def _model_name(model: str | None, factory: str | None) -> str:
    if model not in (None, "-"):
        from exporter.loading import hf_folder

        return (hf_folder(Path(model)) or Path(model)).resolve().name.split(".")[0]
    return (factory or "model").rsplit(":", 1)[-1]


no_patches_option = click.option(
    "--no-patches", is_flag=True,
    help="Export known libraries' export-hostile functions as they are (no export patches, exporter/patches.py).")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="lrexport", message="%(prog)s %(version)s")
def cli() -> None:
    """Export low-rank and linear-attention transformers to fused ONNX and TensorRT, with parity checks."""


@cli.command()
@click.argument("model", type=click.Path(), required=False)
@click.option("--out", "-o", type=_OutputPath(file_okay=False), help="Output folder (default: <model>.lrexport).")
@click.option("--force", is_flag=True, help="Replace a --out that an earlier lrexport build wrote.")
@_precision_options("Build in")
@click.option("--fp16-keep", "fp16_keep", multiple=True, metavar="MODULE_GLOB",
              help="Keep the nodes of matching modules (and their submodules) in float32 with --fp16/--bf16. "
                   "Repeatable.")
@click.option("--fp16-force", is_flag=True,
              help="No automatic float32 keep-list: cast even the values the range analysis finds out of range.")
@click.option("--no-passes", is_flag=True, help="Skip the graph passes.")
@no_patches_option
@click.option("--pad-to-length", type=click.IntRange(min=1), metavar="N",
              help="Fixed-length model (Linformer): pad axis 1 up to N inside the graph and slice the outputs "
                   "back, so every sequence length 1..N works.")
@pass_options
@click.option("--exporter", type=click.Choice(["dynamo", "torchscript"]), default="dynamo", show_default=True)
@click.option("--opset", type=int, default=18, show_default=True)
@click.option("--backend", type=click.Choice([*BACKEND_CHOICES, "onnxruntime"]),
              default="auto", show_default=True, help="Engine backend; auto picks TensorRT, then TensorRT-RTX.")
@click.option("--timing-cache", type=_OutputPath(dir_okay=False), help="TensorRT timing cache to reuse and update.")
@click.option("--opt-level", type=click.IntRange(0, 5), help="TensorRT builder optimization level.")
@click.option("--workspace", "workspace_mb", type=click.IntRange(min=1), help="TensorRT workspace limit in MiB.")
@model_options
@input_options
@parity_options
@common_options
def build(model, out, force, precision, fp16_keep, fp16_force, no_passes, no_patches, pad_to_length, passes, chunk_size, merge_threshold, linear_attention, exporter, opset, backend,
          timing_cache, opt_level, workspace_mb, factory, factory_kwargs, trust_pickle, inputs, shapes, atol, rtol,
          tols, seed, cases, as_json, quiet, debug):
    """Load MODEL, export to ONNX, run graph passes, build an engine and check parity against PyTorch.

    MODEL is a TorchScript archive, a torch.export .pt2 archive, a state dict (with --factory) or a
    pickled module (with --trust-pickle); leave it out to build the model from --factory alone.
    """
    from exporter.outputs import check_target, check_writable
    from exporter.pipeline import BuildOptions, build as run_build

    say = _progress(quiet)
    _reads(model)
    out_dir = Path(out) if out is not None else Path(f"{_model_name(model, factory)}.lrexport")
    check_target(out_dir, force)
    check_writable(out_dir)
    if timing_cache is not None:
        _check_timing_cache(Path(timing_cache), out_dir)
    pass_list, per_output, case_list = _passes(passes, no_passes), _tolerances(tols), _cases(cases)
    loaded, specs = _load_with_specs(model, factory, factory_kwargs, trust_pickle, inputs, shapes, pad_to_length, say)
    options = BuildOptions(out=out_dir, precision=precision, passes=pass_list, exporter=exporter,
                           opset=opset, backend=backend, force=force, atol=atol, rtol=rtol,
                           per_output=per_output, seed=seed, cases=case_list,
                           timing_cache=Path(timing_cache) if timing_cache else None, opt_level=opt_level,
                           workspace_mb=workspace_mb, chunk_size=chunk_size, merge_threshold=merge_threshold,
                           fp16_keep=fp16_keep, fp16_force=fp16_force, patches=not no_patches,
                           linear_attention=linear_attention)
    options.memory_budget = _given_memory_budget()
    report = run_build(loaded, specs, options, progress=say)
    _emit(as_json, report.to_dict(), report.format_text())
    return 0 if report.ok else 1


def _check_timing_cache(cache: Path, out_dir: Path) -> None:
    """The cache is read and rewritten in place: never a file of another kind or an input, nor inside
    --out (which the build replaces)."""
    from exporter.outputs import check_new_file

    if Path(os.path.abspath(out_dir)) in Path(os.path.abspath(cache)).parents:
        raise LrexportError(f"--timing-cache {cache} is inside --out {out_dir}, which the build replaces",
                            "keep the timing cache outside --out")
    check_new_file(cache, True, "timing-cache")


@cli.command()
@click.argument("model", type=click.Path(), required=False)
@click.option("--out", "-o", type=_OutputPath(dir_okay=False), required=True, help="ONNX file to write.")
@click.option("--force", is_flag=True, help="Overwrite an existing --out.")
@click.option("--exporter", type=click.Choice(["dynamo", "torchscript"]), default="dynamo", show_default=True)
@click.option("--opset", type=int, default=18, show_default=True)
@click.option("--pad-to-length", type=click.IntRange(min=1), metavar="N",
              help="Fixed-length model (Linformer): pad axis 1 up to N inside the graph and slice the outputs "
                   "back, so every sequence length 1..N works.")
@no_patches_option
@model_options
@input_options
@common_options
def export(model, out, force, exporter, opset, pad_to_length, no_patches, factory, factory_kwargs, trust_pickle, inputs, shapes, as_json,
           quiet, debug):
    """Export MODEL to an ONNX file with dynamic axes (no passes, no parity)."""
    from exporter.file_stages import export_onnx_file
    from exporter.patches import patch_lines
    from exporter.outputs import check_new_file

    say = _progress(quiet)
    _reads(model)
    out_path = check_new_file(out, force, "onnx")
    loaded, specs = _load_with_specs(model, factory, factory_kwargs, trust_pickle, inputs, shapes, pad_to_length, say)
    result = export_onnx_file(loaded, specs, out_path, exporter=exporter, opset=opset, force=force,
                              patches=not no_patches, progress=say)
    text = "\n".join([f"wrote {out_path} ({result.exporter}, opset {result.opset}, {result.seconds:.1f} s)",
                      *(f"input {s.describe()}" for s in result.specs),
                      *patch_lines(result.patches),
                      *(f"warning: {w}" for w in result.warnings)])
    _emit(as_json, result.to_dict(), text)
    return 0


@cli.command()
@click.argument("model", type=click.Path())
@click.argument("onnx_file", type=click.Path(dir_okay=False))
@_precision_options("Use the tolerances of")
@click.option("--report", "report_path", type=_OutputPath(dir_okay=False), help="Also write the report as JSON here.")
@click.option("--force", is_flag=True, help="Overwrite a --report that lrexport wrote earlier.")
@model_options
@input_options
@parity_options
@common_options
def check(model, onnx_file, precision, report_path, force, factory, factory_kwargs, trust_pickle, inputs, shapes, atol,
          rtol, tols, seed, cases, as_json, quiet, debug):
    """Check parity of an existing ONNX_FILE (ONNX Runtime) against MODEL (PyTorch; '-' with --factory)."""
    from exporter.outputs import atomic_write_file, check_new_file
    from exporter.parity import check_parity
    from exporter.pipeline import resolve_specs

    say = _progress(quiet)
    _reads(model, onnx_file)
    if report_path is not None:
        check_new_file(report_path, force, "json")
    per_output, case_list = _tolerances(tols), _cases(cases)
    loaded = _load(model, factory, factory_kwargs, trust_pickle, say)
    specs = resolve_specs(loaded, inputs, shapes, None if model == "-" else model)
    report = check_parity(loaded, onnx_file, specs=specs, precision=precision, atol=atol, rtol=rtol,
                          per_output=per_output, seed=seed, cases=case_list,
                          progress=lambda m: say(f"[parity] {m}"), memory_budget=_given_memory_budget())
    over_budget = report.budget_error()
    if over_budget is not None:  # nothing ran: not a parity verdict
        raise over_budget
    if report_path is not None:
        atomic_write_file(report_path, json.dumps(report.to_dict(), indent=2) + "\n", force=force, kind="json")
    _emit(as_json, report.to_dict(), report.format_table())
    return 0 if report.ok else 1


@cli.command()
@click.argument("path", type=click.Path())
@model_options
@common_options
def inspect(path, factory, factory_kwargs, trust_pickle, as_json, quiet, debug):
    """Inputs, outputs, dynamic axes, op histogram and parameter count of an ONNX or model file."""
    from exporter.inspect_model import format_inspection, inspect_path

    info = inspect_path(path, factory=factory, factory_kwargs=factory_kwargs, trust_pickle=trust_pickle,
                        trust_remote_code=_trust_remote_code())
    _emit(as_json, info, format_inspection(info))
    return 0


@cli.command()
@click.argument("in_onnx", type=click.Path(dir_okay=False))
@click.argument("out_onnx", type=_OutputPath(dir_okay=False))
@click.option("--force", is_flag=True, help="Overwrite an existing OUT_ONNX.")
@pass_options
@input_options
@click.option("--seed", type=SEED, default=0, show_default=True)
@common_options
def optimize(in_onnx, out_onnx, force, passes, chunk_size, merge_threshold, linear_attention, inputs, shapes, seed,
             as_json, quiet, debug):
    """Run the graph passes on IN_ONNX and write OUT_ONNX (each pass checked numerically)."""
    from exporter.file_stages import optimize_onnx
    from exporter.outputs import check_new_file
    from exporter.specs import build_specs, explicit_dtypes

    say = _progress(quiet)
    _reads(onnx_file=in_onnx)
    src, dst = Path(in_onnx), check_new_file(out_onnx, force, "onnx")
    passes = optimize_onnx(src, dst, passes=_passes(passes), specs=build_specs(inputs, shapes) or None,
                           chunk_size=chunk_size, merge_threshold=merge_threshold, seed=seed, force=force,
                           progress=say, explicit_dtypes=explicit_dtypes(inputs), linear_attention=linear_attention)
    _emit(as_json, {"in": str(src), "out": str(dst), **passes.report.to_dict(), "warnings": passes.warnings,
                    "linear_attention": passes.linear_attention},
          "\n".join(passes.text_lines()) + f"\nwrote {dst}")
    return 0


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False), required=False)
@click.option("--out", "-o", type=_OutputPath(dir_okay=False), required=True,
              help="Model file to write (.pt2 torch.export archive, or .pt TorchScript with --format).")
@click.option("--format", "fmt", type=click.Choice(["pt2", "torchscript"]), default="pt2", show_default=True)
@click.option("--force", is_flag=True, help="Overwrite an existing --out.")
@click.option("--rank", type=int, help="The same rank for every layer.")
@click.option("--fraction", type=float, help="Rank as a fraction of each layer's break-even rank mn/(m+n).")
@click.option("--energy", type=float, help="Smallest rank keeping this share of the spectrum's energy, e.g. 0.95.")
@click.option("--include", multiple=True, metavar="GLOB", help="Only layers whose module name matches. Repeatable.")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Leave layers whose module name matches. Repeatable.")
@click.option("--include-pairs", is_flag=True, help="Also factorize layers that already are a low-rank pair.")
@click.option("--warn-error", type=NON_NEGATIVE, default=0.1, show_default=True,
              help="Warn when a layer's or the model's relative output error is above this.")
@model_options
@input_options
@click.option("--seed", type=SEED, default=0, show_default=True)
@common_options
def factorize(model, out, fmt, force, rank, fraction, energy, include, exclude, include_pairs, warn_error, factory,
              factory_kwargs, trust_pickle, inputs, shapes, seed, as_json, quiet, debug):
    """Replace Linear / Conv1D / ConvNd layers of a dense MODEL by SVD-initialized low-rank pairs."""
    from exporter.factorize_model import factorize_model
    from exporter.outputs import check_new_file
    from exporter.pipeline import resolve_specs

    say = _progress(quiet)
    _reads(model)
    out_path = check_new_file(out, force, "model")
    loaded = _load(model, factory, factory_kwargs, trust_pickle, say)
    specs = resolve_specs(loaded, inputs, shapes, None if model == "-" else model)
    report = factorize_model(loaded, specs, out_path, rank=rank, fraction=fraction, energy=energy, include=include,
                             exclude=exclude, fmt=fmt, seed=seed, force=force, include_pairs=include_pairs,
                             warn_error=warn_error, progress=say)
    _emit(as_json, {"out": str(out_path), **report.to_dict()}, report.format_table() + f"\nwrote {out_path}")
    return 0


@cli.command("export-step")
@click.argument("model", type=click.Path(), required=False)
@click.option("--out", "-o", type=_OutputPath(dir_okay=False), required=True, help="Step-model ONNX file to write.")
@click.option("--force", is_flag=True, help="Overwrite an existing --out (and its engine).")
@click.option("--chunk-max", type=click.IntRange(1), default=64, show_default=True,
              help="Most tokens per step call (the engine profile's sequence range is 1..N).")
@click.option("--engine", "with_engine", is_flag=True,
              help="Also build a TensorRT engine of the step model (<out stem>.engine).")
@click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="auto",
              show_default=True, help="Engine backend for --engine.")
@click.option("--length", type=click.IntRange(1), default=100, show_default=True,
              help="Sequence length of the step-parity check.")
@click.option("--opset", type=int, default=18, show_default=True)
@click.option("--linear-attention", type=click.Choice(["portable", "onnxruntime"]), default="portable",
              show_default=True, help="Lowering of linear-attention ops: standard ops, or ONNX Runtime's contrib op.")
@no_patches_option
@model_options
@input_options
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed for the random inputs.")
@common_options
def export_step_cmd(model, out, force, chunk_max, with_engine, backend, length, opset, linear_attention, no_patches,
                    factory, factory_kwargs, trust_pickle, inputs, shapes, seed, as_json, quiet, debug):
    """Export MODEL as a step model for autoregressive decoding (causal running sums, linear-attention ops,
    causal convolutions).

    The step model takes a chunk of tokens plus the per-layer running sums (state_<i>) and returns the
    chunk's outputs plus the new sums (new_state_<i>); models with absolute positions also take
    position_offset. Parity: the step model fed token by token and chunk by chunk is compared with
    the PyTorch model on the full sequence.
    """
    from exporter.step_export import check_step_output, export_step_model

    say = _progress(quiet)
    _reads(model)
    out_path = check_step_output(out, force, with_engine)
    loaded, specs = _load_with_specs(model, factory, factory_kwargs, trust_pickle, inputs, shapes, None, say)
    result = export_step_model(loaded, specs, out_path, chunk_max=chunk_max, engine=with_engine, backend=backend,
                               length=length, opset=opset, seed=seed, force=force, patches=not no_patches,
                               linear_attention=linear_attention, progress=say)
    _emit(as_json, result.to_dict(), result.format_text())
    return 0 if result.ok else 1


@cli.command()
@click.argument("engine", type=click.Path(dir_okay=False))
@input_options
@click.option("--repeats", type=click.IntRange(min=1), default=50, show_default=True,
              help="Timed runs (median reported).")
@click.option("--seed", type=SEED, default=0, show_default=True)
@common_options
def run(engine, inputs, shapes, repeats, seed, as_json, quiet, debug):
    """Run a TensorRT ENGINE once on random inputs and time it (needs a CUDA GPU)."""
    from exporter.specs import build_specs
    from exporter.trt_engine import run_and_time

    timing = run_and_time(engine, build_specs(inputs, shapes), repeats=repeats, seed=seed)
    _emit(as_json, timing.to_dict(), timing.format_text())
    return 0


# Exit codes: 0 parity holds, 1 an output drifts, 2 bad input (one `error:` line saying what to do),
# 3 an internal error (a bug), 128 + the signal when interrupted, as a shell reports a process the signal
# killed: 130 Ctrl-C (SIGINT), 143 SIGTERM, 129 SIGHUP; each cleans up as Ctrl-C does.
EXIT_INTERNAL = 3
# Errors of the machine the user controls (disk full, read-only or forbidden path), not bugs of lrexport.
_USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENAMETOOLONG}
_NoArgsIsHelp = getattr(click.exceptions, "NoArgsIsHelpError", ())  # click >= 8.2


def _usage_error_line(err: click.ClickException) -> str:
    """click's usage error (several lines: usage, hint, message) as one line naming the command's help."""
    message = " ".join(err.format_message().split()).rstrip(".")
    message = message[:1].lower() + message[1:]
    ctx = getattr(err, "ctx", None)
    command = ctx.command_path if ctx is not None else "lrexport"
    return f"error: {message}: see `{command} --help`"


def _run(args: list[str]) -> int:
    """The command's exit code; every failure is turned into one stderr line here."""
    from exporter.outputs import interrupt_on_termination, reading

    debug = "--debug" in args
    try:
        with interrupt_on_termination(), reading(), cli.make_context("lrexport", args) as ctx:
            code = cli.invoke(ctx)
        return code if isinstance(code, int) else 0
    except click.exceptions.Exit as done:  # --help, --version
        return done.exit_code
    except SystemExit as err:  # lrexport exits only in main(): this came from the model's own code
        if debug:
            traceback.print_exc()
        click.echo(f"error: {_user_exit(err)}", err=True)
        return 2
    except (KeyboardInterrupt, click.exceptions.Abort) as err:
        signum = getattr(err, "signum", signal.SIGINT)  # SIGTERM / SIGHUP: outputs.Interrupted
        if sys.stderr.isatty() and signum == signal.SIGINT:
            click.echo(err=True)  # past the terminal's ^C echo
        how = "" if signum == signal.SIGINT else f" ({signal.Signals(signum).name})"
        with contextlib.suppress(OSError):  # SIGHUP: the terminal may be gone
            click.echo(f"error: interrupted{how}: no half-written output was left; run the command again to "
                       "finish", err=True)
        return 128 + signum
    except _NoArgsIsHelp as err:  # plain `lrexport`: the help, as click shows it
        err.show()
        return err.exit_code
    except click.ClickException as err:
        click.echo(_usage_error_line(err), err=True)
        return 2
    except LrexportError as err:
        if debug:
            traceback.print_exc()
        click.echo(f"error: {err}", err=True)
        return err.exit_code
    except OSError as err:
        if debug:
            traceback.print_exc()
        if err.errno not in _USER_ERRNOS:
            return _internal_error(err, debug)
        where = f" ({str(err.filename)[:80]})" if err.filename else ""
        fix = ("choose a shorter path" if err.errno == errno.ENAMETOOLONG
               else "free disk space or fix the permissions, or choose another path")
        click.echo(f"error: {err.strerror}{where}: {fix}", err=True)
        return 2
    except Exception as err:  # a bug, not bad input: say so on one line
        if debug:
            traceback.print_exc()
        return _internal_error(err, debug)


def _user_exit(err: SystemExit) -> str:
    """The line for a sys.exit() in the model's code (a forward, a module it imports), naming where."""
    frames = traceback.extract_tb(err.__traceback__)
    where = f" in {Path(frames[-1].filename).name}:{frames[-1].lineno} ({frames[-1].name})" if frames else ""
    return (f"the model's code called sys.exit({err.code!r}){where} while lrexport ran it, so nothing was written; "
            "remove the exit from that code path")


def _internal_error(err: BaseException, debug: bool) -> int:
    first = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
    then = "please report it with the traceback above" if debug else "rerun with --debug for the traceback"
    click.echo(f"error: internal error {type(err).__name__}: {first} ({then})", err=True)
    return EXIT_INTERNAL


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--debug" not in args:  # torch's deprecation chatter is not the user's problem
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    if "--json" in args:  # keep stdout pure JSON: whatever the model's own code prints goes to stderr
        _STDOUT.append(sys.stdout)
        sys.stderr = tee = _ErrorLineTee(sys.stderr)
        sys.stdout = sys.stderr
    code = None
    try:
        code = _run(args)
    finally:
        if _STDOUT:
            sys.stdout = _STDOUT.pop()
            sys.stderr = tee.stream
            if code is not None and code >= 2:
                _json_error(tee.error, code)
    sys.exit(code)


class _ErrorLineTee:
    """stderr as it is, remembering the last ``error:`` line written (for --json's error object)."""

    encoding, errors = "utf-8", "strict"

    def __init__(self, stream: Any) -> None:
        self.stream, self._line = stream, ""
        self.error: str | None = None

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError("a text stream")  # click probes for a binary stream with b""
        self._line += text
        *done, self._line = self._line.split("\n")
        self.error = next((ln for ln in reversed(done) if ln.startswith("error: ")), self.error)
        return self.stream.write(text)

    def __getattr__(self, name: str) -> Any:  # fileno, isatty, flush, ... of the real stderr
        return getattr(self.stream, name)


def _json_error(line: str | None, code: int) -> None:
    """With --json, a failed command (exit 2, 3 or an interrupt) still prints one JSON object on stdout:
    ``{"ok": false, "error": "<the error line, without 'error: '>", "exit_code": N}``."""
    error = line[len("error: "):] if line else f"failed with exit code {code}"
    click.echo(json.dumps({"ok": False, "error": error, "exit_code": code}, indent=2))


if __name__ == "__main__":  # pragma: no cover
    main()
