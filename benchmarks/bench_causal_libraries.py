"""Benchmark causal linear attention from other libraries: naive export vs lrexport, ORT CPU, one process a case.

    .venv/bin/python benchmarks/bench_causal_libraries.py [--out DIR] [--ns 1024,4096] [--rounds 2] [--json F]

Models (tests/third_party_models.py, small configs, no downloads): performer-pytorch's causal LM,
fast-transformers' causal-linear encoder, fla's LinearAttention layer and linear-attention-transformer's
causal LM (a library that is not installed is left out, and said so). Variants:
 - naive: ``torch.export`` + ``torch.onnx`` as lrexport's ``--no-passes`` ships it, with export patches only
   where the model cannot export at all without them (fast-transformers, fla); fla's patch writes the
   linear-attention op, which the naive model carries as the standard opset-27 op (ONNX Runtime runs it as a
   per-token Scan); performer exports without its patch only with the sequence pinned, so its naive model is
   exported once per n at that n;
 - lrexport: patched export (dynamic sequence) + the default graph passes, the linear-attention op lowered
   to ONNX Runtime's native kernel.
Both variants get the same seeded inputs at n = 1024 and 4096, and their outputs are checked for agreement
before timing. Each timing is its own process (benchmarks/_bench_case.py): median latency (lowest of the
--rounds process medians: the 2-core machine is shared) and peak RSS (highest). 2 threads, batch 1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402
import onnx  # noqa: E402

# name -> (module that must import, builder, kwargs, input spec at n, patch needed to export at all)
MODELS = {
    "performer": ("performer_pytorch", "performer_causal_lm_long", {"max_seq_len": 4096}, "ids:1x{n}:int64:0..255",
                  False),
    "fast-transformers": ("fast_transformers.causal_product", "fast_transformers_causal", {}, "x:1x{n}x64:float32",
                          True),
    "fla": ("fla.layers", "fla_linear_attention", {}, "x:1x{n}x64:float32", True),
    "linear-attention-transformer": ("linear_attention_transformer", "lat_causal_lm_long", {"max_seq_len": 4096},
                                     "ids:1x{n}:int64:0..255", False),
}


def _specs(spec: str, n_max: int | None):
    """Batch 1, sequence 1..n_max (opt 128); n_max None: static at the spec's n (already formatted)."""
    from exporter.specs import build_specs

    if n_max is None:
        return build_specs([spec])
    name, dims, dtype, *rest = spec.split(":")
    feat = dims.split("x")[2:]

    def shape(n: int) -> str:
        return "x".join(["1", str(n), *feat])

    inp = ":".join([name, shape(128), dtype, *rest])
    return build_specs([inp], [f"{name}:min={shape(1)},opt={shape(128)},max={shape(n_max)}"])


def _export(module, specs, path: Path, patches: bool) -> onnx.ModelProto:
    from exporter.export import export_onnx
    from exporter.patches import reference_patches

    with reference_patches(module, patches):
        result = export_onnx(module, specs, path, patches=patches)
    if result.pinned:
        print(f"  note: {result.pinned[0].message()}", flush=True)
    return onnx.load(str(path))


def _optimize(model: onnx.ModelProto, path: Path, feeds: list[dict]) -> Path:
    from graph_passes import DEFAULT_PASSES, PassOptions, run_passes

    # ONNX Runtime runs the models: the linear-attention op (fla) lowered to its native kernel, as `build
    # --backend onnxruntime` does
    opt, report = run_passes(model, DEFAULT_PASSES, feeds=feeds, options=PassOptions(linear_attention="onnxruntime"))
    causal = next(p for p in report.to_dict()["passes"] if p["name"] == "causal-chunk")
    print(f"  causal-chunk: changed={causal['changed']} matches={causal['matches']}", flush=True)
    onnx.save(opt, str(path))
    return path


def _feed(spec: str, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    name, dims, dtype = spec.split(":")[:3]
    shape = tuple(int(d) for d in dims.format(n=n).split("x"))
    if dtype == "int64":
        return {name: rng.integers(0, 256, size=shape).astype(np.int64)}
    return {name: rng.standard_normal(shape).astype(np.float32)}


def _agree(a: Path, b: Path, feeds: dict) -> float:
    import onnxruntime as ort

    outs = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feeds)[0] for p in (a, b)]
    return float(np.abs(outs[0].astype(np.float64) - outs[1]).max())


def _case(path: Path, shape: str, repeats: int) -> dict:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "_bench_case.py"), str(path), "--shape", shape,
           "--repeats", str(repeats)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    if res.returncode != 0:
        return {"error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"rc={res.returncode}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def _measure(variants: dict[str, Path], shape: str, repeats: int, rounds: int) -> dict[str, dict]:
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for _ in range(rounds):
        for v, path in variants.items():
            runs[v].append(_case(path, shape, repeats))
    out = {}
    for v, rs in runs.items():
        good = [r for r in rs if "error" not in r]
        out[v] = rs[0] if not good else {"median_ms": min(r["median_ms"] for r in good),
                                         "peak_rss_mb": max(r["peak_rss_mb"] for r in good)}
    return out


def bench_model(key: str, ns: list[int], out: Path, rounds: int, log) -> list[dict]:
    import third_party_models as tpm

    _, builder, kwargs, spec, needs_patch = MODELS[key]
    module = getattr(tpm, builder)(**kwargs)
    n_max = max(ns)
    lrx = _export(module, _specs(spec, n_max), out / f"{key}.export.onnx", patches=True)
    small = [_feed(spec, n, 1) for n in (1, 37, 100)]
    lrx_path = _optimize(lrx, out / f"{key}.lrexport.onnx", small)
    naive_dyn = None if not needs_patch else out / f"{key}.export.onnx"
    if naive_dyn is not None:  # a patched export holding the linear-attention op: the standard op is its naive form
        from exporter.export import runnable_copy

        (out / key).mkdir(exist_ok=True)
        naive_dyn = runnable_copy(naive_dyn, out / key, "ai.onnx")
    rows = []
    for n in ns:
        naive = naive_dyn
        if naive is None:  # exports without patches only at one length: the naive model at this n
            naive = out / f"{key}.naive{n}.onnx"
            _export(module, _specs(spec.format(n=n), None), naive, patches=False)
        feeds = _feed(spec, n)
        diff = _agree(naive, lrx_path, feeds)
        name, dims, dtype = spec.split(":")[:3]
        shape = f"{name}={dims.format(n=n)}" + (":int64" if dtype == "int64" else "")
        row = {"model": key, "n": n, "max_abs_diff": diff,
               **_measure({"naive": naive, "lrexport": lrx_path}, shape, 10 if n <= 1024 else 5, rounds)}
        log(json.dumps(row))
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    head = f"{'model':<30}{'n':>6} | {'naive ms / MB':>17} | {'lrexport ms / MB':>17} | {'speedup':>7} {'mem':>6} | diff"
    lines = [head, "-" * len(head)]
    for r in rows:
        nv, lx = r["naive"], r["lrexport"]
        cells = [f"{'error':>17}" if "error" in v else f"{v['median_ms']:8.1f} {v['peak_rss_mb']:8.0f}"
                 for v in (nv, lx)]
        ratio = "      -      -" if "error" in nv or "error" in lx else \
            f"{nv['median_ms'] / lx['median_ms']:6.2f}x {nv['peak_rss_mb'] / lx['peak_rss_mb']:5.1f}x"
        lines.append(f"{r['model']:<30}{r['n']:>6} | {cells[0]} | {cells[1]} | {ratio} | {r['max_abs_diff']:.1e}")
    lines.append("ms = ORT CPU median latency (2 threads, batch 1); MB = peak RSS of the case's process; "
                 "diff = max |naive - lrexport| on the same seeded input")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="where the .onnx files go (default: a temp dir)")
    ap.add_argument("--ns", default="1024,4096")
    ap.add_argument("--rounds", type=int, default=2, help="processes per variant and case (interleaved)")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="lrexport-bench-libs-"))
    out.mkdir(parents=True, exist_ok=True)
    ns = [int(n) for n in args.ns.split(",")]
    t0 = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)

    import importlib

    rows: list[dict] = []
    for key in args.models.split(","):
        try:
            importlib.import_module(MODELS[key][0])
        except ImportError as err:
            log(f"{key}: left out ({err})")
            continue
        log(f"{key}: exporting")
        rows += bench_model(key, ns, out, args.rounds, log)
    print()
    print(format_table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    log("done")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())
