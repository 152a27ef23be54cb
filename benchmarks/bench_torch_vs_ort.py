"""PyTorch eager vs ONNX Runtime (as exported, and after lrexport's passes), CPU, one process a case.

    .venv/bin/python benchmarks/bench_torch_vs_ort.py [--repeats 10]

For each sample and sequence length: PyTorch eager median latency (torch.no_grad, 2 threads) and the
ONNX Runtime median latency of the plain export and of the optimized model (benchmarks/_bench_case.py,
spinning off, 2 threads), peak RSS of each process, and the ratios. About 1 minute on 2 cores.
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


def torch_worker(name: str, n: int, repeats: int) -> None:
    """Runs in its own process: PyTorch eager latency of sample ``name`` at batch 1, length n."""
    import torch

    import samples
    from _bench_case import _hwm_mb  # peak RSS the same way as the ONNX Runtime cases
    from exporter.specs import build_specs

    torch.set_num_threads(2)
    sample = samples.get(name)
    spec = build_specs(sample.inputs, sample.shapes)[0]
    shape = (1, n, *spec.opt[2:])
    x = torch.randint(0, 256, shape) if spec.dtype == "int64" else torch.randn(shape)
    model = sample.factory()
    with torch.no_grad():
        model(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - t0) * 1e3)
    print(json.dumps({"median_ms": statistics.median(times), "peak_rss_mb": _hwm_mb()}))


def _run(cmd: list[str]) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--worker", nargs=2, metavar=("SAMPLE", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        torch_worker(args.worker[0], int(args.worker[1]), args.repeats)
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
            shape = "x".join(map(str, (1, n, *spec.opt[2:]))) + (":int64" if spec.dtype == "int64" else "")
            pt = _run([sys.executable, __file__, "--worker", name, str(n), "--repeats", str(args.repeats)])
            raw, opt = exported[name]
            ort_raw = _run([sys.executable, "benchmarks/_bench_case.py", str(raw), "--shape", f"{spec.name}={shape}",
                            "--repeats", str(args.repeats)])
            ort_opt = _run([sys.executable, "benchmarks/_bench_case.py", str(opt), "--shape", f"{spec.name}={shape}",
                            "--repeats", str(args.repeats)])
            rows.append((name, n, pt, ort_raw, ort_opt))
            print(f"measured {name} n={n}", file=sys.stderr)
    head = (f"{'sample':<18}{'n':>6} | {'pytorch ms / MB':>16} | {'ORT export ms / MB':>19} | "
            f"{'ORT passes ms / MB':>19} | {'pt/export':>9} {'pt/passes':>9}")
    print(head)
    print("-" * len(head))
    for name, n, pt, raw, opt in rows:
        print(f"{name:<18}{n:>6} | {pt['median_ms']:>7.1f} {pt['peak_rss_mb']:>7.0f}  | "
              f"{raw['median_ms']:>8.1f} {raw['peak_rss_mb']:>8.0f}  | {opt['median_ms']:>8.1f} {opt['peak_rss_mb']:>8.0f}  | "
              f"{pt['median_ms'] / raw['median_ms']:>8.2f}x {pt['median_ms'] / opt['median_ms']:>8.2f}x")
    print("batch 1, CPU, 2 threads; each cell its own process (median of repeats, peak RSS); ratio > 1: ORT faster")
    return 0


if __name__ == "__main__":
    sys.exit(main())
