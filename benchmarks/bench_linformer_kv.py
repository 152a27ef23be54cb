"""Does fusing a Linformer's shared E·K and E·V into one MatMul pay on ONNX Runtime CPU?

    .venv/bin/python benchmarks/bench_linformer_kv.py [--quick] [--rounds 3] [--repeats 30] [--json out.json]

With key/value sharing ('kv' or 'layerwise' in linformer-pytorch) one projection E (Linear(n, k)) is
applied to both K and V along the sequence. Variants, each exported by the dynamo exporter (batch 1,
static shapes) from the same weights, outputs (E·K, E·V):

 - separate: K = x Wk, V = x Wv; E(K^T), E(V^T)           (what the exporter writes: two MatMuls)
 - concat:   E([K | V]^T) -> Split                          (what a graph pass would make of it:
                                                             Concat + one MatMul of twice the width)
 - fusedqkv: [K | V] = x [Wk | Wv]; E(.^T) -> Split        (upper bound: K and V already come out
                                                             of one projection, so no Concat is needed)

Each (shape, variant) runs in its own process (benchmarks/_bench_case.py: ORT CPU, 2 intra-op threads,
session.intra_op.allow_spinning=0, median of --repeats after a warm-up); the processes of all variants
are interleaved over --rounds rounds and the median of the per-process medians is reported, with the
ratio to 'separate'. Numerics are checked once per shape in this process, on the seeded input the
timed processes get: every variant's ONNX outputs must match PyTorch's 'separate' module within lrexport's
fp32 parity tolerance, or the benchmark stops naming the variant.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

VARIANTS = ("separate", "concat", "fusedqkv")
SHAPES = [  # (n, c, k): sequence length, width of K/V (one head: 64; all heads: 512), projected length
    (512, 64, 128),
    (512, 512, 128),
    (2048, 64, 256),
    (2048, 512, 256),
    (8192, 512, 256),
]
QUICK = [(512, 64, 128), (2048, 512, 256)]


class KV(nn.Module):
    def __init__(self, n: int, c: int, k: int, variant: str):
        super().__init__()
        torch.manual_seed(0)
        self.variant, self.c = variant, c
        self.wk = nn.Linear(c, c, bias=False)
        self.wv = nn.Linear(c, c, bias=False)
        self.E = nn.Linear(n, k)  # shared by keys and values (bias as in linformer-pytorch)
        if variant == "fusedqkv":
            self.wkv = nn.Linear(c, 2 * c, bias=False)
            with torch.no_grad():
                self.wkv.weight.copy_(torch.cat([self.wk.weight, self.wv.weight], 0))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.variant == "separate":
            return self.E(self.wk(x).transpose(1, 2)), self.E(self.wv(x).transpose(1, 2))
        kv = self.wkv(x) if self.variant == "fusedqkv" else torch.cat([self.wk(x), self.wv(x)], dim=-1)
        p = self.E(kv.transpose(1, 2))  # b, 2c, k
        return p[:, : self.c], p[:, self.c:]


def export(n: int, c: int, k: int, variant: str, path: Path) -> Path:
    model = KV(n, c, k, variant).eval()
    prog = torch.onnx.export(model, (torch.randn(1, n, c),), dynamo=True, optimize=True, input_names=["x"],
                             output_names=["ek", "ev"])
    onnx.save_model(prog.model_proto, str(path))
    return path


def check_numerics(paths: dict[str, Path], n: int, c: int, k: int) -> float:
    """The largest |difference| of any variant's outputs from PyTorch's; SystemExit past the tolerance."""
    from _bench_case import make_feeds

    from exporter.compare import DEFAULT_TOLERANCES
    from graph_passes.ort_session import ort_session
    from graph_passes.tolerance import within

    x = make_feeds([f"x=1x{n}x{c}"])["x"]  # what the timed processes run on
    with torch.no_grad():
        ref = [t.numpy() for t in KV(n, c, k, "separate").eval()(torch.from_numpy(x))]
    worst = 0.0
    for variant, path in paths.items():
        for name, got, want in zip(("ek", "ev"), ort_session(path).run(None, {"x": x}), ref, strict=True):
            if not within(got, want, DEFAULT_TOLERANCES["fp32"]):
                raise SystemExit(f"error: n={n} c={c} k={k}: variant {variant} output {name} disagrees with "
                                 f"PyTorch (max abs {np.abs(got - want).max():.3g})")
            worst = max(worst, float(np.abs(got - want).max()))
    return worst


def run_case(path: Path, n: int, c: int, repeats: int) -> dict:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "_bench_case.py"), str(path), "--shape", f"x=1x{n}x{c}",
           "--repeats", str(repeats), "--threads", "2"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-2000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n, c, k in (QUICK if args.quick else SHAPES):
            paths = {v: export(n, c, k, v, Path(tmp) / f"{v}_{n}_{c}_{k}.onnx") for v in VARIANTS}
            err = check_numerics(paths, n, c, k)
            times: dict[str, list[float]] = {v: [] for v in VARIANTS}
            for _ in range(args.rounds):
                for v in VARIANTS:
                    times[v].append(run_case(paths[v], n, c, args.repeats)["median_ms"])
            med = {v: statistics.median(t) for v, t in times.items()}
            row = {"n": n, "c": c, "k": k, "max_abs_diff": err, **{f"{v}_ms": med[v] for v in VARIANTS},
                   **{f"{v}_ratio": med[v] / med["separate"] for v in VARIANTS[1:]},
                   "per_process_ms": times}
            rows.append(row)
            print(f"n={n:5d} c={c:4d} k={k:4d}  separate {med['separate']:8.3f} ms  concat {med['concat']:8.3f} ms "
                  f"({row['concat_ratio']:.2f}x)  fusedqkv {med['fusedqkv']:8.3f} ms ({row['fusedqkv_ratio']:.2f}x)"
                  f"  max|diff| {err:.1e}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
