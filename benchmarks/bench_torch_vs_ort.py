"""PyTorch eager vs ONNX Runtime (as exported, and after lrexport's passes), CPU, one process a case.

    .venv/bin/python benchmarks/bench_torch_vs_ort.py [--repeats 10]

For each sample and sequence length: PyTorch eager median latency (torch.no_grad, 2 threads) and the
ONNX Runtime median latency of the plain export and of the optimized model (benchmarks/_bench_case.py,
spinning off, 2 threads), peak RSS of each process, and the ratios. Every process builds the same seeded
inputs (benchmarks/_bench_case.py: make_feeds) and saves its outputs; the three must agree within lrexport's
fp32 parity tolerance, else the benchmark stops with the case that differs. About 1 minute on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = [("causal_block", 1024), ("causal_block", 4096), ("causal_lm", 512), ("lowrank_mlp", 512),
         ("lowrank_block", 512), ("noncausal_encoder", 512)]


def torch_worker(name: str, shape: str, repeats: int, outputs: str) -> None:
    """Runs in its own process: PyTorch eager latency of sample ``name`` on the seeded input ``shape``
    (``x=1x512x512``, as the ONNX Runtime cases get it); saves the outputs to ``outputs``."""
    import numpy as np
    import torch

    import samples
    from _bench_case import _hwm_mb, make_feeds  # the same inputs and peak RSS as the ONNX Runtime cases
    from exporter.export import flatten_outputs

    torch.set_num_threads(2)
    x = torch.from_numpy(next(iter(make_feeds([shape]).values())))
    model = samples.get(name).factory()
    with torch.no_grad():
        model(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - t0) * 1e3)
        np.savez(outputs, *[t.numpy() for _, t in flatten_outputs(model(x))])
    print(json.dumps({"median_ms": statistics.median(times), "peak_rss_mb": _hwm_mb()}))


def check_agreement(case: str, files: dict[str, Path]) -> float:
    """The largest |difference| of the ONNX Runtime outputs from PyTorch's; SystemExit past the tolerance."""
    import numpy as np

    from exporter.compare import DEFAULT_TOLERANCES
    from graph_passes.tolerance import within

    loaded = {k: np.load(f) for k, f in files.items()}
    ref = loaded.pop("pytorch")
    worst = 0.0
    for what, got in loaded.items():
        for key in ref.files:
            if not within(got[key], ref[key], DEFAULT_TOLERANCES["fp32"]):
                raise SystemExit(f"error: {case}: {what} output {key} disagrees with PyTorch "
                                 f"(max abs {np.abs(got[key] - ref[key]).max():.3g})")
            worst = max(worst, float(np.abs(got[key] - ref[key]).max()))
    return worst


def _run(cmd: list[str]) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--worker", nargs=3, metavar=("SAMPLE", "SHAPE", "OUTPUTS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        torch_worker(args.worker[0], args.worker[1], args.repeats, args.worker[2])
        return 0
    import onnx

    import samples
    from exporter.export import export_onnx, save_onnx
    from exporter.specs import build_specs, random_feeds
    from graph_passes import run_passes

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        exported: dict[str, tuple[Path, Path]] = {}
        for name in dict.fromkeys(c[0] for c in CASES):
            sample = samples.get(name)
            n_max = max(n for case, n in CASES if case == name)
            specs = [replace(s, max=(s.max[0], max(n_max, s.max[1]), *s.max[2:]))
                     for s in build_specs(sample.inputs, sample.shapes)]
            raw = Path(tmp) / f"{name}.onnx"
            export_onnx(sample.factory(), specs, raw)
            optimized, _ = run_passes(onnx.load(str(raw)), feeds=[random_feeds(specs, "odd")])
            opt = Path(tmp) / f"{name}.opt.onnx"
            save_onnx(optimized, opt)
            exported[name] = (raw, opt)
            print(f"exported {name}", file=sys.stderr)
        for name, n in CASES:
            spec = build_specs(samples.get(name).inputs)[0]
            shape = f"{spec.name}=" + "x".join(map(str, (1, n, *spec.opt[2:]))) + (
                ":int64" if spec.dtype == "int64" else "")
            outs = {k: Path(tmp) / f"{name}.{n}.{k}.npz" for k in ("pytorch", "export", "passes")}
            pt = _run([sys.executable, __file__, "--worker", name, shape, str(outs["pytorch"]),
                       "--repeats", str(args.repeats)])
            ort_raw, ort_opt = (_run([sys.executable, "benchmarks/_bench_case.py", str(model), "--shape", shape,
                                      "--repeats", str(args.repeats), "--outputs", str(outs[k])])
                                for model, k in zip(exported[name], ("export", "passes")))
            err = check_agreement(f"{name} n={n}", outs)
            rows.append((name, n, pt, ort_raw, ort_opt, err))
            print(f"measured {name} n={n}", file=sys.stderr)
    head = (f"{'sample':<18}{'n':>6} | {'pytorch ms / MB':>16} | {'ORT export ms / MB':>19} | "
            f"{'ORT passes ms / MB':>19} | {'pt/export':>9} {'pt/passes':>9} | {'max abs':>8}")
    print(head)
    print("-" * len(head))
    for name, n, pt, raw, opt, err in rows:
        print(f"{name:<18}{n:>6} | {pt['median_ms']:>7.1f} {pt['peak_rss_mb']:>7.0f}  | "
              f"{raw['median_ms']:>8.1f} {raw['peak_rss_mb']:>8.0f}  | "
              f"{opt['median_ms']:>8.1f} {opt['peak_rss_mb']:>8.0f}  | "
              f"{pt['median_ms'] / raw['median_ms']:>8.2f}x {pt['median_ms'] / opt['median_ms']:>8.2f}x | {err:>8.1e}")
    print("batch 1, CPU, 2 threads; each cell its own process (median of repeats, peak RSS); ratio > 1: ORT faster;\n"
          "max abs: largest |ORT - PyTorch| over both ONNX models, on the same seeded input")
    return 0


if __name__ == "__main__":
    sys.exit(main())
