"""Memory estimate vs measured peak: how close exporter/memory_budget.py's pricing of a run is.

    .venv/bin/python benchmarks/bench_memory_estimate.py [--sizes 1024,4096]

For the causal_block sample (naive Einsum->CumSum->Einsum, d=512, 8 heads) at batch 1 and each length:
the estimate (graph_passes.cost.estimate_memory, priced as parity prices it) next to the measured
growth of peak RSS over one run, each run in its own process (peak reset through /proc/self/clear_refs
after a warm-up run, then VmHWM after the run minus VmRSS before it), for the PyTorch reference in
float64 and float32 (priced on the naive export), ONNX Runtime on the naive export and on the model
after lrexport's passes (runs as parity makes them: the CPU arena shrunk after each run). About 1 GB per 1024 of length at
float64: keep the sizes within the machine.

    .venv/bin/python benchmarks/bench_memory_estimate.py --worker KIND MODEL BxNxD

runs one measurement (KIND: torch64, torch32, ort; MODEL: a sample name for torch, an ONNX file for ort)
and prints {"measured_bytes": ...} (tests/test_memory_budget.py uses it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KINDS = ("torch64", "torch32", "ort-naive", "ort-optimized")


def worker(kind: str, model: str, shape: tuple[int, ...]) -> None:
    """Runs in its own process: peak RSS growth of one run of ``kind`` at ``shape``."""
    import numpy as np

    from _bench_case import _hwm_mb, _rss_mb  # the same peak-RSS reader as the latency cases

    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    small = {"x": x[:, :8]}
    if kind.startswith("torch"):
        import torch

        import samples
        from exporter.runners import TorchRunner

        torch.set_num_threads(2)
        runner = TorchRunner(samples.get(model).factory(), ["output"], ["x"], prefer_float64=kind == "torch64")
        run = runner.run
    else:
        from exporter.runners import OnnxRuntimeRunner

        run = OnnxRuntimeRunner(model).run
    run(small)  # libraries loaded, kernels picked
    base = _rss_mb()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    run({"x": x})
    print(json.dumps({"measured_bytes": int((_hwm_mb() - base) * 2**20)}))


def measure(kind: str, model: str | Path, shape: tuple[int, ...]) -> int:
    """Peak RSS growth of one run, measured in a fresh process."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, str(model), "x".join(map(str, shape))]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout
    return int(json.loads(out.strip().splitlines()[-1])["measured_bytes"])


def naive_and_optimized(folder: Path) -> tuple[Path, Path]:
    """causal_block exported as is, and after the default graph passes."""
    import onnx

    import graph_passes
    import samples
    from exporter.export import export_onnx, save_onnx
    from exporter.specs import build_specs

    sample = samples.get("causal_block")
    specs = build_specs(sample.inputs, ["x:min=1x1x512,opt=1x256x512,max=4x65536x512"])
    naive = export_onnx(sample.factory(), specs, folder / "naive.onnx").onnx_path
    optimized, _ = graph_passes.run_passes(onnx.load(str(naive)))
    save_onnx(optimized, folder / "optimized.onnx")
    return Path(naive), folder / "optimized.onnx"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1024,4096")
    ap.add_argument("--worker", nargs=3, metavar=("KIND", "MODEL", "SHAPE"))
    args = ap.parse_args(argv)
    if args.worker:
        kind, model, shape = args.worker
        worker(kind, model, tuple(int(d) for d in shape.split("x")))
        return 0
    from exporter.memory_budget import GraphCost, fmt_bytes

    with tempfile.TemporaryDirectory() as tmp:
        naive, optimized = naive_and_optimized(Path(tmp))
        ref, ort_naive, ort_opt = (GraphCost.from_path("pytorch", naive, ort_scratch=False),
                                   GraphCost.from_path("onnxruntime", naive), GraphCost.from_path("onnxruntime", optimized))
        print(f"{'case':<26}{'estimate':>10}{'measured':>10}{'measured/estimate':>19}")
        for n in (int(s) for s in args.sizes.split(",")):
            shape = (1, n, 512)
            for kind, cost, model, fb in (("torch64", ref, "causal_block", 8.0), ("torch32", ref, "causal_block", 4.0),
                                          ("ort-naive", ort_naive, naive, None),
                                          ("ort-optimized", ort_opt, optimized, None)):
                est = cost.estimate({"x": shape}, fb).peak
                got = measure("torch64" if kind == "torch64" else "torch32" if kind == "torch32" else "ort",
                              model, shape)
                print(f"{kind + ' n=' + str(n):<26}{fmt_bytes(est):>10}{fmt_bytes(got):>10}{got / est:>19.2f}",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
