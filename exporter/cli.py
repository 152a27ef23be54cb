"""The ``lrexport`` command line: build, export, check, optimize, inspect, run.

Option groups are shared across commands (as polygraphy shares argument groups across its tools).
Every user error prints one line and exits non-zero; --debug shows the traceback.
"""

from __future__ import annotations

import functools
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import click

from exporter.compare import parse_output_tolerance
from exporter.errors import LrexportError

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


model_options = _compose(
    click.option("--factory", metavar="PKG.MODULE:FN", help="Builds the model for a state-dict file."),
    click.option("--factory-kwargs", metavar="JSON", help="Keyword arguments for --factory, as a JSON object."),
    click.option("--trust-pickle", is_flag=True,
                 help="Allow loading a fully pickled module (unpickling runs code from the file)."),
)
input_options = _compose(
    click.option("--input", "inputs", multiple=True, metavar="NAME:DIMS[:DTYPE[:LO..HI]]",
                 help="An input, e.g. x:1x128x512:float32 or ids:1x128:int64:0..255. Repeatable."),
    click.option("--shapes", multiple=True, metavar="NAME:min=DIMS,opt=DIMS,max=DIMS",
                 help="Dynamic range of an input; drives export axes, parity shapes and engine profiles."),
)
parity_options = _compose(
    click.option("--atol", type=float, help="Absolute tolerance (default per precision)."),
    click.option("--rtol", type=float, help="Relative tolerance (default per precision)."),
    click.option("--tol", "tols", multiple=True, metavar="OUTPUT:atol=A,rtol=R",
                 help="Tolerance for one output (glob). Repeatable."),
    click.option("--seed", type=int, default=0, show_default=True, help="Seed for the random inputs."),
    click.option("--cases", metavar="LIST", help="Shape cases to check: comma list of min,opt,max,odd."),
)
common_options = _compose(
    click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout."),
    click.option("--quiet", "-q", is_flag=True, help="No progress lines on stderr."),
    click.option("--debug", is_flag=True, help="Show tracebacks."),
)
pass_options = _compose(
    click.option("--passes", metavar="LIST", help="Comma list of graph passes to run (default: the standard set)."),
    click.option("--chunk-size", type=int, default=64, show_default=True, help="Chunk size of the causal rewrite."),
    click.option("--merge-threshold", type=float, default=1.0, show_default=True,
                 help="Merge a low-rank pair when r*(m+n) >= threshold*m*n."),
)


def _tolerances(tols: tuple[str, ...]) -> dict:
    return dict(parse_output_tolerance(t) for t in tols)


def _cases(text: str | None) -> list[str] | None:
    if not text:
        return None
    cases = [c.strip() for c in text.split(",") if c.strip()]
    bad = [c for c in cases if c not in ("min", "opt", "max", "odd")]
    if bad:
        raise LrexportError(f"unknown shape case {bad[0]!r}", "use min, opt, max, odd")
    return cases


def _passes(text: str | None, no_passes: bool = False) -> tuple[str, ...] | None:
    if no_passes:
        return ()
    if text is None:
        return None
    return tuple(p.strip() for p in text.split(",") if p.strip())


_STDOUT: list[Any] = []  # the real stdout while a --json command runs (model code may print)


def _emit(as_json: bool, data: dict[str, Any], text: str) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str), file=_STDOUT[-1] if _STDOUT else None)
    else:
        click.echo(text)


def _load(model: str | None, factory, factory_kwargs, trust_pickle, say):
    """MODEL may be omitted (or '-') when --factory builds the model with its own weights."""
    from exporter.loading import load_model

    path = None if model in (None, "-") else model
    say(f"[load] {path or factory}")
    return load_model(path, factory=factory, factory_kwargs=factory_kwargs, trust_pickle=trust_pickle)


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
        return Path(model).name.split(".")[0]
    return (factory or "model").rsplit(":", 1)[-1]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="lrexport", message="%(prog)s %(version)s")
def cli() -> None:
    """Export low-rank and linear-attention transformers to fused ONNX and TensorRT, with parity checks."""


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False), required=False)
@click.option("--out", "-o", type=click.Path(file_okay=False), help="Output folder (default: <model>.lrexport).")
@click.option("--force", is_flag=True, help="Replace a non-empty --out.")
@click.option("--fp16", "precision", flag_value="fp16", help="Build in float16.")
@click.option("--bf16", "precision", flag_value="bf16", help="Build in bfloat16.")
@click.option("--fp32", "precision", flag_value="fp32", default=True, help="Build in float32 (default).")
@click.option("--fp16-keep", "fp16_keep", multiple=True, metavar="MODULE_GLOB",
              help="Keep the nodes of matching modules (and their submodules) in float32 with --fp16/--bf16. "
                   "Repeatable.")
@click.option("--fp16-force", is_flag=True,
              help="No automatic float32 keep-list: cast even the values the range analysis finds out of range.")
@click.option("--no-passes", is_flag=True, help="Skip the graph passes.")
@click.option("--pad-to-length", type=click.IntRange(min=1), metavar="N",
              help="Fixed-length model (Linformer): pad axis 1 up to N inside the graph and slice the outputs "
                   "back, so every sequence length 1..N works.")
@pass_options
@click.option("--exporter", type=click.Choice(["dynamo", "torchscript"]), default="dynamo", show_default=True)
@click.option("--opset", type=int, default=18, show_default=True)
@click.option("--backend", type=click.Choice(["auto", "tensorrt", "tensorrt-rtx", "onnxruntime"]),
              default="auto", show_default=True, help="Engine backend; auto picks TensorRT, then TensorRT-RTX.")
@click.option("--timing-cache", type=click.Path(dir_okay=False), help="TensorRT timing cache to reuse and update.")
@click.option("--opt-level", type=click.IntRange(0, 5), help="TensorRT builder optimization level.")
@click.option("--workspace", "workspace_mb", type=int, help="TensorRT workspace limit in MiB.")
@model_options
@input_options
@parity_options
@common_options
def build(model, out, force, precision, fp16_keep, fp16_force, no_passes, pad_to_length, passes, chunk_size, merge_threshold, exporter, opset, backend,
          timing_cache, opt_level, workspace_mb, factory, factory_kwargs, trust_pickle, inputs, shapes, atol, rtol,
          tols, seed, cases, as_json, quiet, debug):
    """Load MODEL, export to ONNX, run graph passes, build an engine and check parity against PyTorch.

    MODEL is a TorchScript archive, a torch.export .pt2 archive, a state dict (with --factory) or a
    pickled module (with --trust-pickle); leave it out to build the model from --factory alone.
    """
    from exporter.pipeline import BuildOptions, build as run_build, resolve_specs

    say = _progress(quiet)
    loaded, specs = _load_with_specs(model, factory, factory_kwargs, trust_pickle, inputs, shapes, pad_to_length, say)
    out_dir = Path(out) if out else Path(f"{_model_name(model, factory)}.lrexport")
    options = BuildOptions(out=out_dir, precision=precision, passes=_passes(passes, no_passes), exporter=exporter,
                           opset=opset, backend=backend, force=force, atol=atol, rtol=rtol,
                           per_output=_tolerances(tols), seed=seed, cases=_cases(cases),
                           timing_cache=Path(timing_cache) if timing_cache else None, opt_level=opt_level,
                           workspace_mb=workspace_mb, chunk_size=chunk_size, merge_threshold=merge_threshold,
                           fp16_keep=fp16_keep, fp16_force=fp16_force)
    report = run_build(loaded, specs, options, progress=say)
    _emit(as_json, report.to_dict(), report.format_text())
    return 0 if report.ok else 1


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False), required=False)
@click.option("--out", "-o", type=click.Path(dir_okay=False), required=True, help="ONNX file to write.")
@click.option("--force", is_flag=True, help="Overwrite an existing --out.")
@click.option("--exporter", type=click.Choice(["dynamo", "torchscript"]), default="dynamo", show_default=True)
@click.option("--opset", type=int, default=18, show_default=True)
@click.option("--pad-to-length", type=click.IntRange(min=1), metavar="N",
              help="Fixed-length model (Linformer): pad axis 1 up to N inside the graph and slice the outputs "
                   "back, so every sequence length 1..N works.")
@model_options
@input_options
@common_options
def export(model, out, force, exporter, opset, pad_to_length, factory, factory_kwargs, trust_pickle, inputs, shapes, as_json,
           quiet, debug):
    """Export MODEL to an ONNX file with dynamic axes (no passes, no parity)."""
    from exporter.export import export_onnx
    from exporter.outputs import atomic_files
    from exporter.pipeline import resolve_specs

    say = _progress(quiet)
    out_path = Path(out)
    if out_path.exists() and not force:
        raise LrexportError(f"{out_path} already exists", "pass --force to overwrite it")
    loaded, specs = _load_with_specs(model, factory, factory_kwargs, trust_pickle, inputs, shapes, pad_to_length, say)
    with atomic_files(out_path, force) as tmp:
        result = export_onnx(loaded, specs, tmp / out_path.name, exporter=exporter, opset=opset,
                             progress=lambda m: say(f"[export] {m}"))
    result.onnx_path = out_path
    text = "\n".join([f"wrote {out_path} ({result.exporter}, opset {result.opset}, {result.seconds:.1f} s)",
                      *(f"input {s.describe()}" for s in result.specs),
                      *(f"warning: {w}" for w in result.warnings)])
    _emit(as_json, result.to_dict(), text)
    return 0


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("onnx_file", type=click.Path(dir_okay=False))
@click.option("--fp16", "precision", flag_value="fp16", help="Use float16 tolerances.")
@click.option("--bf16", "precision", flag_value="bf16", help="Use bfloat16 tolerances.")
@click.option("--fp32", "precision", flag_value="fp32", default=True, help="Use float32 tolerances (default).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Also write the report as JSON here.")
@model_options
@input_options
@parity_options
@common_options
def check(model, onnx_file, precision, report_path, factory, factory_kwargs, trust_pickle, inputs, shapes, atol,
          rtol, tols, seed, cases, as_json, quiet, debug):
    """Check parity of an existing ONNX_FILE (ONNX Runtime) against MODEL (PyTorch; '-' with --factory)."""
    from exporter.outputs import atomic_write_file
    from exporter.parity import check_parity
    from exporter.pipeline import resolve_specs

    say = _progress(quiet)
    loaded = _load(model, factory, factory_kwargs, trust_pickle, say)
    specs = resolve_specs(loaded, inputs, shapes, None if model == "-" else model)
    report = check_parity(loaded, onnx_file, specs=specs, precision=precision, atol=atol, rtol=rtol,
                          per_output=_tolerances(tols), seed=seed, cases=_cases(cases),
                          progress=lambda m: say(f"[parity] {m}"))
    if report_path:
        atomic_write_file(report_path, json.dumps(report.to_dict(), indent=2) + "\n", force=True)
    _emit(as_json, report.to_dict(), report.format_table())
    return 0 if report.ok else 1


@cli.command()
@click.argument("path", type=click.Path(dir_okay=False))
@model_options
@common_options
def inspect(path, factory, factory_kwargs, trust_pickle, as_json, quiet, debug):
    """Inputs, outputs, dynamic axes, op histogram and parameter count of an ONNX or model file."""
    from exporter.inspect_model import format_inspection, inspect_path

    info = inspect_path(path, factory=factory, factory_kwargs=factory_kwargs, trust_pickle=trust_pickle)
    _emit(as_json, info, format_inspection(info))
    return 0


@cli.command()
@click.argument("in_onnx", type=click.Path(dir_okay=False))
@click.argument("out_onnx", type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="Overwrite an existing OUT_ONNX.")
@pass_options
@input_options
@click.option("--seed", type=int, default=0, show_default=True)
@common_options
def optimize(in_onnx, out_onnx, force, passes, chunk_size, merge_threshold, inputs, shapes, seed, as_json, quiet,
             debug):
    """Run the graph passes on IN_ONNX and write OUT_ONNX (each pass checked numerically)."""
    import onnx

    from exporter.export import save_onnx
    from exporter.outputs import atomic_files
    from exporter.pipeline import BuildOptions, run_passes_on
    from exporter.specs import build_specs, specs_from_onnx

    say = _progress(quiet)
    src, dst = Path(in_onnx), Path(out_onnx)
    if not src.is_file():
        raise LrexportError(f"ONNX file {src} does not exist", "check the path")
    if dst.exists() and not force:
        raise LrexportError(f"{dst} already exists", "pass --force to overwrite it")
    try:
        model = onnx.load(str(src))
    except Exception as err:
        raise LrexportError(f"{src} is not a readable ONNX file ({type(err).__name__})", "re-export it") from None
    specs = build_specs(inputs, shapes) if (inputs or shapes) else specs_from_onnx(model)
    options = BuildOptions(out=dst, passes=_passes(passes), seed=seed, chunk_size=chunk_size,
                           merge_threshold=merge_threshold)
    new_model, info = run_passes_on(model, options, specs, lambda m: say(f"[passes] {m}"))
    with atomic_files(dst, force) as tmp:
        save_onnx(new_model, tmp / dst.name)
    _emit(as_json, {"in": str(src), "out": str(dst), **info["report"]}, info["table"] + f"\nwrote {dst}")
    return 0


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False), required=False)
@click.option("--out", "-o", type=click.Path(dir_okay=False), required=True,
              help="Model file to write (.pt2 torch.export archive, or .pt TorchScript with --format).")
@click.option("--format", "fmt", type=click.Choice(["pt2", "torchscript"]), default="pt2", show_default=True)
@click.option("--force", is_flag=True, help="Overwrite an existing --out.")
@click.option("--rank", type=int, help="The same rank for every layer.")
@click.option("--fraction", type=float, help="Rank as a fraction of each layer's break-even rank mn/(m+n).")
@click.option("--energy", type=float, help="Smallest rank keeping this share of the spectrum's energy, e.g. 0.95.")
@click.option("--include", multiple=True, metavar="GLOB", help="Only layers whose module name matches. Repeatable.")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Leave layers whose module name matches. Repeatable.")
@model_options
@input_options
@click.option("--seed", type=int, default=0, show_default=True)
@common_options
def factorize(model, out, fmt, force, rank, fraction, energy, include, exclude, factory, factory_kwargs,
              trust_pickle, inputs, shapes, seed, as_json, quiet, debug):
    """Replace Linear / Conv1D / ConvNd layers of a dense MODEL by SVD-initialized low-rank pairs."""
    import copy

    import torch

    from exporter.export import order_specs, save_model
    from exporter.factorize import factorize as run_factorize, output_error
    from exporter.outputs import atomic_files
    from exporter.pipeline import resolve_specs
    from exporter.specs import random_feeds

    say = _progress(quiet)
    out_path = Path(out)
    if out_path.exists() and not force:
        raise LrexportError(f"{out_path} already exists", "pass --force to overwrite it")
    loaded = _load(model, factory, factory_kwargs, trust_pickle, say)
    specs = order_specs(loaded.module, resolve_specs(loaded, inputs, shapes, None if model == "-" else model))
    original = copy.deepcopy(loaded.module)
    say("[factorize] truncated SVD per layer")
    report = run_factorize(loaded.module, rank=rank, fraction=fraction, energy=energy, include=include,
                           exclude=exclude)
    feeds = random_feeds(specs, "opt", seed)
    args = [torch.from_numpy(feeds[s.name]) for s in specs]
    report.output_rel_error = output_error(original, loaded.module, args)
    say(f"[factorize] saving {out_path}")
    with atomic_files(out_path, force) as tmp:
        save_model(loaded.module, specs, tmp / out_path.name, fmt)
    _emit(as_json, {"out": str(out_path), **report.to_dict()}, report.format_table() + f"\nwrote {out_path}")
    return 0


@cli.command("export-step")
@click.argument("model", type=click.Path(dir_okay=False), required=False)
@click.option("--out", "-o", type=click.Path(dir_okay=False), required=True, help="Step-model ONNX file to write.")
@click.option("--force", is_flag=True, help="Overwrite an existing --out (and its engine).")
@click.option("--chunk-max", type=click.IntRange(1), default=64, show_default=True,
              help="Most tokens per step call (the engine profile's sequence range is 1..N).")
@click.option("--engine", "with_engine", is_flag=True,
              help="Also build a TensorRT engine of the step model (<out stem>.engine).")
@click.option("--backend", type=click.Choice(["auto", "tensorrt", "tensorrt-rtx"]), default="auto",
              show_default=True, help="Engine backend for --engine.")
@click.option("--length", type=click.IntRange(1), default=100, show_default=True,
              help="Sequence length of the step-parity check.")
@click.option("--opset", type=int, default=18, show_default=True)
@model_options
@input_options
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the random inputs.")
@common_options
def export_step_cmd(model, out, force, chunk_max, with_engine, backend, length, opset, factory, factory_kwargs,
                    trust_pickle, inputs, shapes, seed, as_json, quiet, debug):
    """Export MODEL as a step model for autoregressive decoding (causal running-sum models only).

    The step model takes a chunk of tokens plus the per-layer running sums (state_<i>) and returns the
    chunk's outputs plus the new sums (new_state_<i>); models with absolute positions also take
    position_offset. Parity: the step model fed token by token and chunk by chunk is compared with
    the PyTorch model on the full sequence.
    """
    import tempfile

    from exporter.export import export_onnx
    from exporter.outputs import atomic_files
    from exporter.recurrent import check_step_parity, export_step, step_specs

    say = _progress(quiet)
    out_path = Path(out)
    if out_path.suffix != ".onnx":
        raise LrexportError(f"--out {out_path} should end in .onnx", "e.g. --out step.onnx")
    engine_path = out_path.with_suffix(".engine")
    if out_path.exists() and not force:
        raise LrexportError(f"{out_path} already exists", "pass --force to overwrite it")
    loaded, specs = _load_with_specs(model, factory, factory_kwargs, trust_pickle, inputs, shapes, None, say)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".lrexport-step-", dir=out_path.parent) as full_dir:
        exported = export_onnx(loaded, specs, Path(full_dir) / "full.onnx", opset=opset,
                               progress=lambda m: say(f"[export] {m}"))
        with atomic_files(out_path, force=True) as tmp:
            result = export_step(exported.onnx_path, tmp / out_path.name, specs=exported.specs, seed=seed,
                                 progress=lambda m: say(f"[step] {m}"))
            say("[parity] step model token by token and chunk by chunk vs PyTorch")
            report = check_step_parity(loaded, result.onnx_path, exported.specs, chunks=sorted({1, 7, chunk_max}),
                                       length=length, seed=seed)
            engine = None
            if with_engine:
                from exporter.trt_build import build_engine

                batch = next((s for s in exported.specs if s.name in result.inputs), None)
                b_range = (batch.min[0], batch.opt[0], batch.max[0]) if batch is not None and batch.rank else (1, 1, 1)
                c_opt = min(chunk_max, max(1, chunk_max // 2))
                engine = build_engine(result.onnx_path, tmp / engine_path.name,
                                      specs=step_specs(result, b_range, (1, c_opt, chunk_max)), backend=backend,
                                      force=True, progress=lambda m: say(f"[engine] {m}"))
    result.onnx_path = out_path
    data = {"step": result.to_dict(), "parity": report.to_dict(),
            "engine": None if engine is None else {**engine.to_dict(), "engine_path": str(engine_path),
                                                    "meta_path": str(engine_path) + ".json"},
            "warnings": exported.warnings}
    lines = [result.format_text(), report.format_table()]
    if engine is not None:
        lines.append(f"wrote {engine_path} ({engine.backend} {engine.precision}, {engine.engine_bytes / 2**20:.1f} "
                     f"MiB, built in {engine.build_seconds:.1f} s; chunk 1..{chunk_max})")
    lines += [f"warning: {w}" for w in exported.warnings]
    _emit(as_json, data, "\n".join(lines))
    return 0 if report.ok else 1


@cli.command()
@click.argument("engine", type=click.Path(dir_okay=False))
@input_options
@click.option("--repeats", type=int, default=50, show_default=True, help="Timed runs (median reported).")
@click.option("--seed", type=int, default=0, show_default=True)
@common_options
def run(engine, inputs, shapes, repeats, seed, as_json, quiet, debug):
    """Run a TensorRT ENGINE once on random inputs and time it (needs a CUDA GPU)."""
    from exporter import trt_engine
    from exporter.specs import build_specs, random_feeds

    meta = trt_engine.check_engine(Path(engine))  # refuses corrupted / foreign engines before the GPU check
    specs = build_specs(inputs, shapes) or trt_engine.specs_from_meta(meta.meta)
    feeds = random_feeds(specs, "opt", seed)
    ok, why = trt_engine.gpu_available()
    if not ok:
        raise LrexportError(f"cannot run {engine}: {why}", "run it on a machine with a CUDA GPU")
    outputs = trt_engine.run_engine(Path(engine), feeds)
    median_ms = trt_engine.time_engine(Path(engine), feeds, repeats)
    data = {"engine": engine, "median_ms": median_ms, "repeats": repeats,
            "inputs": {k: list(v.shape) for k, v in feeds.items()},
            "outputs": {k: list(v.shape) for k, v in outputs.items()}}
    text = "\n".join([f"{k}: {list(v.shape)} {v.dtype}" for k, v in outputs.items()]
                     + [f"median latency {median_ms:.3f} ms over {repeats} runs"])
    _emit(as_json, data, text)
    return 0


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    if not debug:  # torch's deprecation chatter is not the user's problem
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    if "--json" in args:  # keep stdout pure JSON: whatever the model's own code prints goes to stderr
        _STDOUT.append(sys.stdout)
        sys.stdout = sys.stderr
    try:
        code = cli.main(args=args, prog_name="lrexport", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except LrexportError as err:
        if debug:
            raise
        click.echo(f"error: {err}", err=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as err:  # a bug, not bad input: say so on one line
        if debug:
            raise
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
        click.echo(f"error: internal error {type(err).__name__}: {first} (rerun with --debug for the traceback)",
                   err=True)
        sys.exit(3)
    finally:
        if _STDOUT:
            sys.stdout = _STDOUT.pop()
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    main()
