"""Prefill of tiny Hugging Face causal LMs: lrexport's ONNX (ONNX Runtime CPU) vs transformers eager vs the
naive export (torch.onnx at the fixed length, no patches, no passes), one process a case.

    .venv/bin/python benchmarks/bench_hf.py [--models qwen3_5_lm,mamba_lm] [--ns 1024,4096] [--repeats 5]

Models are ``tests/hf_tiny_models.py`` builders (configs of hidden size 32, no downloads): what is measured
is the recurrence and graph overhead per token, not a production model's matmuls. Per model, lrexport builds
once (``lrexport build --backend onnxruntime``, sequence 1..max n, parity at ``opt``); the naive export is
made per n and may fail or time out (``--naive-timeout``), which the table says. Every case runs in its own
process on the same seeded token ids (batch 1); latency is the median of ``--repeats`` after one warm-up,
peak memory the process's VmHWM, and ``err`` the max |logits - eager| / max |eager logits| (float32 both).
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
DEFAULT_MODELS = "qwen3_5_lm,qwen3_next_lm,mamba2_lm,mamba_lm,recurrent_gemma_lm,rwkv_lm,xlstm_lm"
VARIANTS = ("lrexport", "eager", "naive")


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")  # see bench_linear_attention.py
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks"),
                                         env.get("PYTHONPATH", "")])
    return env


def _ids(n: int):
    import numpy as np

    return np.random.default_rng(0).integers(0, 128, size=(1, n)).astype(np.int64)


def _module(name: str):
    import hf_tiny_models

    return getattr(hf_tiny_models, name)()


def eager_worker(name: str, n: int, repeats: int, outputs: str) -> None:
    """Its own process: transformers eager on the seeded ids (``torch.no_grad``, 2 threads, transformers' torch
    code: the reference patches of parity)."""
    import numpy as np
    import torch

    from _bench_case import _hwm_mb

    from exporter.patches import reference_patches

    torch.set_num_threads(2)
    model = _module(name)
    ids = torch.from_numpy(_ids(n))
    # transformers' own torch code, as parity's reference runs it (with fla importable transformers would
    # pick fla's Triton kernels, which have no CPU path)
    with torch.no_grad(), reference_patches(model):
        model(ids)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(ids)
            times.append((time.perf_counter() - t0) * 1e3)
        np.savez(outputs, model(ids).numpy())
    print(json.dumps({"median_ms": statistics.median(times), "min_ms": min(times), "peak_rss_mb": _hwm_mb()}))


def naive_worker(name: str, n: int, out: str) -> None:
    """Its own process: ``torch.onnx.export`` of the model as it is, at 1 x n, no dynamic axes."""
    import torch

    model = _module(name)
    ids = torch.from_numpy(_ids(n))
    t0 = time.perf_counter()
    torch.onnx.export(model, (ids,), out, dynamo=True, input_names=["ids"], verbose=False, external_data=False)
    print(json.dumps({"export_s": time.perf_counter() - t0}))


def _run(cmd: list[str], timeout: float | None = None) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT, env=_env(),
                         timeout=timeout).stdout
    return json.loads(out.strip().splitlines()[-1])


def _ort(model: Path, n: int, repeats: int, outputs: Path) -> dict:
    import numpy as np

    feeds = outputs.with_suffix(".ids.npy")
    np.save(feeds, _ids(n))
    return _run([sys.executable, "benchmarks/_bench_case.py", str(model), "--repeats", str(repeats), "--outputs",
                 str(outputs), "--feeds", str(feeds)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=DEFAULT_MODELS)
    ap.add_argument("--ns", default="1024,4096")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--naive-timeout", type=float, default=600.0, help="seconds for one naive export")
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--worker", nargs=4, metavar=("KIND", "MODEL", "N", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]
    if args.worker:
        kind, name, n, out = args.worker
        (eager_worker(name, int(n), args.repeats, out) if kind == "eager" else naive_worker(name, int(n), out))
        return 0
    import numpy as np

    ns = [int(x) for x in args.ns.split(",")]
    variants = sorted(args.variants.split(","), key=lambda v: v != "eager")  # eager first: the others' reference
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            build_dir = Path(tmp) / f"{name}.lrexport"
            t0 = time.perf_counter()
            build = subprocess.run(
                [sys.executable, "-m", "exporter.cli", "build", "--factory", f"hf_tiny_models:{name}",
                 "--input", f"ids:1x{min(ns)}:int64:0..127", "--shapes",
                 f"ids:min=1x1,opt=1x{min(ns)},max=1x{max(ns)}", "--backend", "onnxruntime", "--cases", "opt",
                 "--out", str(build_dir), "-q", "--json"], capture_output=True, text=True, cwd=ROOT, env=_env())
            build_s = time.perf_counter() - t0
            built = build.returncode == 0
            print(f"{name}: lrexport build exit {build.returncode} in {build_s:.0f} s", file=sys.stderr, flush=True)
            for n in ns:
                want = None
                for variant in variants:
                    outs = Path(tmp) / f"{name}.{n}.{variant}.npz"
                    row = {"model": name, "n": n, "variant": variant}
                    try:
                        if variant == "eager":
                            r = _run([sys.executable, __file__, "--worker", "eager", name, str(n), str(outs),
                                      "--repeats", str(args.repeats)])
                        elif variant == "lrexport":
                            if not built:
                                raise RuntimeError(build.stderr.strip().splitlines()[-1][:200])
                            r = _ort(build_dir / "model.onnx", n, args.repeats, outs)
                            r["build_s"] = round(build_s, 1)
                        else:
                            onnx_path = Path(tmp) / f"{name}.{n}.naive.onnx"
                            e = _run([sys.executable, __file__, "--worker", "naive", name, str(n), str(onnx_path)],
                                     timeout=args.naive_timeout)
                            r = {**_ort(onnx_path, n, args.repeats, outs), **e}
                        got = np.load(outs)["arr_0"]
                        if variant == "eager":
                            want = got
                        if want is not None:
                            r["err"] = float(np.abs(got - want).max() / max(float(np.abs(want).max()), 1e-30))
                        row.update(r)
                    except subprocess.TimeoutExpired:
                        row["failed"] = f"export timed out after {args.naive_timeout:.0f} s"
                    except (subprocess.CalledProcessError, RuntimeError) as err:
                        text = getattr(err, "stderr", None) or str(err)
                        row["failed"] = (text.strip().splitlines() or ["?"])[-1][:160]
                    rows.append(row)
                    print(f"  n={n} {variant:<9} {json.dumps({k: v for k, v in row.items() if k not in ('model', 'n', 'variant')})}",
                          file=sys.stderr, flush=True)
    head = f"{'model':<20}{'n':>6} | {'variant':<9}| {'median ms':>9} | {'peak MB':>7} | {'err':>8} | note"
    print(head)
    print("-" * len(head))
    for r in rows:
        if "failed" in r:
            print(f"{r['model']:<20}{r['n']:>6} | {r['variant']:<9}| {'-':>9} | {'-':>7} | {'-':>8} | {r['failed']}")
            continue
        note = f"export {r['export_s']:.0f} s" if "export_s" in r else (f"build {r['build_s']:.0f} s" if "build_s" in r else "")
        print(f"{r['model']:<20}{r['n']:>6} | {r['variant']:<9}| {r['median_ms']:>9.1f} | {r['peak_rss_mb']:>7.0f} | "
              f"{r['err'] if 'err' in r else float('nan'):>8.1e} | {note}")
    print(f"batch 1, CPU, 2 threads; each cell its own process (median of {args.repeats}); err vs transformers eager")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
