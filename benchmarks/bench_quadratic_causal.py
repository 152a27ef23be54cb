"""The masked quadratic form of causal linear attention, as written and after the ``quadratic-causal`` pass.

    .venv/bin/python benchmarks/bench_quadratic_causal.py [--ns 1024,4096] [--repeats 5]

Model: ``a = (phi(Q) phi(K)^T).tril(); out = (a @ V) / (a.sum(-1) + 1e-6)``, phi = elu + 1, batch 1, 8 heads,
head dim 64, inputs (1, 8, n, 64). Variants, each in its own process (median latency, peak RSS = VmHWM),
ONNX Runtime CPU, 2 threads, the same seeded inputs (benchmarks/_bench_case.py: make_feeds):
 - quadratic: the exported model with the default passes but ``quadratic-causal`` (the T x T matrix stays);
 - ort-native / portable: the default passes, the recurrence lowered to ``com.microsoft.LinearAttention`` or
   to standard ops;
 - pytorch: the module in eager PyTorch (the quadratic form).
Error: max |out - ref| / max(1, max |ref|) against the module in float64.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

H, D = 8, 64
VARIANTS = ("quadratic", "ort-native", "portable", "pytorch")


def shapes(n: int) -> list[str]:
    return [f"{x}=1x{H}x{n}x{D}" for x in "qkv"]


def build():
    import torch
    from torch.nn import functional as F

    class Quadratic(torch.nn.Module):
        def forward(self, q, k, v):
            a = ((F.elu(q) + 1) @ (F.elu(k) + 1).transpose(-2, -1)).tril()
            return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)

    return Quadratic().eval()


def export(folder: Path) -> dict[str, Path]:
    """The module exported once (dynamic sequence), then one model per ONNX Runtime variant."""
    import onnx
    import torch
    from torch.export import Dim

    from _bench_case import make_feeds
    from graph_passes import DEFAULT_PASSES, run_passes
    from graph_passes._base import PassOptions

    args = tuple(torch.from_numpy(a) for a in make_feeds(shapes(64)).values())
    t = Dim("T", min=1, max=16384)
    prog = torch.onnx.export(build(), args, dynamic_shapes=[{2: t}] * 3, dynamo=True, verbose=False,
                             input_names=["q", "k", "v"])
    paths = {}
    for variant, passes, lowering in (
            ("quadratic", [p for p in DEFAULT_PASSES if p != "quadratic-causal"], "portable"),
            ("ort-native", list(DEFAULT_PASSES), "onnxruntime"),
            ("portable", list(DEFAULT_PASSES), "portable")):
        model, report = run_passes(prog.model_proto, passes, options=PassOptions(linear_attention=lowering))
        rewritten = any(p.name == "quadratic-causal" and p.changed for p in report.passes)
        assert rewritten == (variant != "quadratic"), variant
        paths[variant] = folder / f"quadratic.{variant}.onnx"
        onnx.save(model, str(paths[variant]))
    return paths


def torch_worker(n: int, repeats: int, outputs: str) -> None:
    """Its own process: PyTorch eager latency of the module on the seeded inputs; saves its output."""
    import numpy as np
    import torch

    from _bench_case import _hwm_mb, make_feeds

    torch.set_num_threads(2)
    feeds = [torch.from_numpy(a) for a in make_feeds(shapes(n)).values()]
    model = build()
    with torch.no_grad():
        model(*feeds)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(*feeds)
            times.append((time.perf_counter() - t0) * 1e3)
        np.savez(outputs, model(*feeds).numpy())
    print(json.dumps({"median_ms": statistics.median(times), "min_ms": min(times), "peak_rss_mb": _hwm_mb()}))


def _run(cmd: list[str]) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ns", default="1024,4096")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--worker", nargs=2, metavar=("N", "OUTPUTS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_linear_attention.py
    sys.path.insert(0, str(ROOT / "benchmarks"))
    if args.worker:
        torch_worker(int(args.worker[0]), args.repeats, args.worker[1])
        return 0
    import numpy as np
    import torch

    from _bench_case import make_feeds

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        models = export(Path(tmp))
        for n in (int(x) for x in args.ns.split(",")):
            with torch.no_grad():
                want = build()(*[torch.from_numpy(a).double() for a in make_feeds(shapes(n)).values()]).numpy()
            for variant in args.variants.split(","):
                outs = Path(tmp) / f"{n}.{variant}.npz"
                if variant == "pytorch":
                    r = _run([sys.executable, __file__, "--worker", str(n), str(outs), "--repeats", str(args.repeats)])
                else:
                    cmd = [sys.executable, "benchmarks/_bench_case.py", str(models[variant]),
                           "--repeats", str(args.repeats), "--outputs", str(outs)]
                    for s in shapes(n):
                        cmd += ["--shape", s]
                    r = _run(cmd)
                got = np.load(outs)["arr_0"]
                r["err"] = float(np.abs(got - want).max()) / max(1.0, float(np.abs(want).max()))
                rows.append({"n": n, "variant": variant, **r})
                print(f"n={n} {variant:<11} {r['median_ms']:9.1f} ms {r['peak_rss_mb']:7.0f} MB  err {r['err']:.1e}",
                      file=sys.stderr, flush=True)
    head = f"{'n':>6} | {'variant':<11}| {'median ms':>9} | {'min ms':>8} | {'peak MB':>7} | {'err':>8}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['n']:>6} | {r['variant']:<11}| {r['median_ms']:>9.1f} | {r['min_ms']:>8.1f} | "
              f"{r['peak_rss_mb']:>7.0f} | {r['err']:>8.1e}")
    print(f"batch 1, {H} heads, head dim {D}, CPU, 2 threads; each cell its own process (median of {args.repeats} "
          "and min, peak RSS); err: max |x - ref| / max(1, max |ref|) vs the module in float64")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
