"""Benchmark lrexport's graph passes: samples exported with and without passes, ORT CPU, one process a case.

    .venv/bin/python benchmarks/bench_passes.py [--out DIR] [--quick] [--json results.json]

Cases: the causal linear-attention block (h=8, d=64, d_model=512) at n = 1024, 4096, 16384, as
 - naive: the straightforward Einsum->CumSum->Einsum export,
 - passes: the same export after graph_passes.DEFAULT_PASSES,
 - hand: the same block written by hand in chunked form (C=64) and exported (the reference);
and the low-rank MLP / block / no-pay MLP at n = 128 and 512 (naive vs passes), the non-causal
encoder (only its Einsums change: einsum lowering) at n = 128 and 512, and the sibling
first-factor concatenation (sibling pass) on the low-rank block at n = 16, 128, 512.
Each case runs in its own process (benchmarks/_bench_case.py): median of repeats per process, the
lowest of those medians over --rounds interleaved processes, and peak RSS (VmHWM) of the process.
ORT spinning is off, 2 intra-op threads, batch 1. About 4-5 minutes on 2 cores (--quick: 1 minute).
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

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.export import Dim  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from graph_passes import DEFAULT_PASSES, PassOptions, run_passes  # noqa: E402
from samples import SAMPLES  # noqa: E402
from samples.layers import CausalLinearAttention, elu_feature_map  # noqa: E402


class HandChunkedCausal(CausalLinearAttention):
    """The benchmark block written directly in chunked form (what the causal-chunk pass should reach)."""

    def __init__(self, base: CausalLinearAttention, chunk: int = 64):
        d_model = base.q_proj.in_features
        super().__init__(d_model, base.heads, eps=base.eps)
        self.load_state_dict(base.state_dict())
        self.chunk = chunk
        self.register_buffer("mask", torch.tril(torch.ones(chunk, chunk)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        cs = self.chunk
        q = elu_feature_map(self._split(self.q_proj(x)))
        k = elu_feature_map(self._split(self.k_proj(x)))
        v = self._split(self.v_proj(x))
        pad = (cs - n % cs) % cs
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        h, d = q.shape[1], q.shape[-1]
        q, k, v = (t.reshape(b, h, -1, cs, d) for t in (q, k, v))  # b h nc C d
        scores = (q @ k.transpose(-1, -2)) * self.mask
        kv = k.transpose(-1, -2) @ v  # b h nc d e
        states = kv.cumsum(2) - kv  # exclusive over chunks
        ksum = k.sum(3)  # b h nc d
        zprev = ksum.cumsum(2) - ksum
        num = scores @ v + q @ states
        den = scores.sum(-1, keepdim=True) + q @ zprev.unsqueeze(-1) + self.eps
        out = (num / den).reshape(b, h, -1, d)[:, :, :n]
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


def _export(model: nn.Module, x: torch.Tensor, path: Path) -> onnx.ModelProto:
    dyn = ({0: Dim("batch", min=1, max=8), 1: Dim("seq", min=2, max=32768)},)
    with torch.no_grad():
        torch.onnx.export(model, (x,), str(path), dynamo=True, dynamic_shapes=dyn, input_names=["x"],
                          output_names=["y"], opset_version=18, verbose=False)
    return onnx.load(str(path))


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def _feeds(d: int, seqs=(1, 37, 100)) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [{"x": rng.standard_normal((1, n, d)).astype(np.float32)} for n in seqs]


def _case(path: Path, n: int, d: int, repeats: int) -> dict:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "_bench_case.py"), str(path), "--shape", f"x=1x{n}x{d}",
           "--repeats", str(repeats)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
        return {"error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"rc={res.returncode}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def _measure(variants: dict[str, Path], n: int, d: int, repeats: int, rounds: int) -> dict[str, dict]:
    """Each variant in `rounds` fresh processes, interleaved; latency = lowest per-process median
    (the 2-core machine is shared, so a busy neighbour only ever adds time), memory = highest peak."""
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for _ in range(rounds):
        for v, path in variants.items():
            runs[v].append(_case(path, n, d, repeats))
    out = {}
    for v, rs in runs.items():
        good = [r for r in rs if "error" not in r]
        if not good:
            out[v] = rs[0]
            continue
        out[v] = {"median_ms": min(r["median_ms"] for r in good), "peak_rss_mb": max(r["peak_rss_mb"] for r in good),
                  "medians_ms": [round(r["median_ms"], 2) for r in good], "repeats": repeats}
    return out


def _repeats(n: int, quick: bool) -> int:
    r = 20 if n <= 1024 else 10 if n <= 4096 else 5
    return max(2, r // 4) if quick else r


def build_models(out: Path, log) -> dict[str, dict[str, Path]]:
    """name -> {variant: path}; each passes-variant is checked for parity at small n on the way."""
    models: dict[str, dict[str, Path]] = {}
    x = torch.randn(1, 128, 512)
    base = SAMPLES["causal_block"].factory()
    naive = _export(base, x, out / "causal_naive.onnx")
    log("exported causal_block")
    opt, report = run_passes(naive, DEFAULT_PASSES, feeds=_feeds(512, (1, 37, 100, 200)))
    log(report.format_table())
    hand = _export(HandChunkedCausal(base).eval(), x, out / "causal_hand.onnx")
    models["causal_block"] = {"naive": out / "causal_naive.onnx",
                              "passes": _save(opt, out / "causal_passes.onnx"),
                              "hand": out / "causal_hand.onnx"}
    del hand
    for name in ("lowrank_mlp", "lowrank_block", "lowrank_nopay"):
        m = _export(SAMPLES[name].factory(), x, out / f"{name}_naive.onnx")
        opt, report = run_passes(m, DEFAULT_PASSES, feeds=_feeds(512, (2, 37)))
        models[name] = {"naive": out / f"{name}_naive.onnx", "passes": _save(opt, out / f"{name}_passes.onnx")}
        sib, _ = run_passes(opt, ["sibling", "cleanup"], feeds=_feeds(512, (2, 37)))
        models[name]["passes+sibling"] = _save(sib, out / f"{name}_sibling.onnx")
        log(f"exported + passes {name}")
    enc = _export(SAMPLES["noncausal_encoder"].factory(), torch.randn(1, 128, 128), out / "noncausal_naive.onnx")
    opt, report = run_passes(enc, DEFAULT_PASSES, feeds=_feeds(128, (2, 37)))
    models["noncausal_encoder"] = {"naive": out / "noncausal_naive.onnx",
                                   "passes": _save(opt, out / "noncausal_passes.onnx")}
    log("exported + passes noncausal_encoder (einsum lowering only)")
    return models


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="where the .onnx files go (default: a temp dir)")
    ap.add_argument("--quick", action="store_true", help="fewer repeats, n=16384 skipped")
    ap.add_argument("--json", type=Path, default=None, help="write all figures here")
    ap.add_argument("--rounds", type=int, default=3, help="processes per variant and case (interleaved)")
    args = ap.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="lrexport-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)

    models = build_models(out, log)
    rows = []
    causal_ns = (1024, 4096) if args.quick else (1024, 4096, 16384)
    rounds = 1 if args.quick else args.rounds
    for n in causal_ns:
        row = {"case": "causal_block", "n": n}
        row.update(_measure(models["causal_block"], n, 512, _repeats(n, args.quick), rounds))
        log(f"causal_block n={n}: " + json.dumps(row))
        rows.append(row)
    for name in ("lowrank_mlp", "lowrank_block", "lowrank_nopay", "noncausal_encoder"):
        for n in (128, 512):
            row = {"case": name, "n": n}
            pick = {v: models[name][v] for v in ("naive", "passes")}
            d = 128 if name == "noncausal_encoder" else 512
            row.update(_measure(pick, n, d, _repeats(n, args.quick) * 2, rounds))
            log(f"{name} n={n}: " + json.dumps(row))
            rows.append(row)
    sibling_rows = []
    for n in (16, 128, 512):
        row = {"case": "lowrank_block", "n": n}
        pick = {v: models["lowrank_block"][v] for v in ("passes", "passes+sibling")}
        row.update(_measure(pick, n, 512, _repeats(n, args.quick) * 2, rounds))
        sibling_rows.append(row)
        log(f"sibling lowrank_block n={n}: " + json.dumps(row))
    print()
    print(format_table(rows))
    print()
    print(format_sibling(sibling_rows))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "sibling": sibling_rows}, indent=1))
    log("done")
    return 0


def _fmt(r: dict | None) -> str:
    if not r:
        return f"{'-':>17}"
    if "error" in r:
        return f"{'error':>17}"
    return f"{r['median_ms']:8.1f} {r['peak_rss_mb']:8.0f}"


def format_table(rows: list[dict]) -> str:
    head = (f"{'case':<18}{'n':>6} | {'naive ms / MB':>17} | {'passes ms / MB':>17} | {'hand ms / MB':>17} | "
            f"{'speedup':>7} {'mem':>6} | {'vs hand':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        nv, ps, hd = r.get("naive"), r.get("passes"), r.get("hand")
        speed, mem, vs = "      -", "     -", "      -"
        if nv is not None and ps is not None and "error" not in nv and "error" not in ps:
            speed = f"{nv['median_ms'] / ps['median_ms']:6.2f}x"
            mem = f"{nv['peak_rss_mb'] / ps['peak_rss_mb']:5.1f}x"
            if hd is not None and "error" not in hd:
                vs = f"{ps['median_ms'] / hd['median_ms']:6.2f}x"
        lines.append(f"{r['case']:<18}{r['n']:>6} | {_fmt(nv)} | {_fmt(ps)} | {_fmt(hd)} | {speed} {mem} | {vs}")
    lines.append("ms = ORT CPU median latency (2 threads, batch 1); MB = peak RSS of the case's process;"
                 " speedup/mem = naive/passes; vs hand = passes/hand (<= 1.10 is the target)")
    return "\n".join(lines)


def format_sibling(rows: list[dict]) -> str:
    lines = [f"{'sibling (lowrank_block)':<24}{'n':>6} | {'passes ms':>10} | {'+sibling ms':>11} | {'ratio':>6}"]
    for r in rows:
        a, b = r["passes"], r["passes+sibling"]
        if "error" in a or "error" in b:
            lines.append(f"{'':<24}{r['n']:>6} | error")
            continue
        lines.append(f"{'':<24}{r['n']:>6} | {a['median_ms']:10.2f} | {b['median_ms']:11.2f} | "
                     f"{b['median_ms'] / a['median_ms']:5.2f}x")
    lines.append("ratio < 1: concatenating the q/k/v first factors pays")
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())
