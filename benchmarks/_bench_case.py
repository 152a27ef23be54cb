"""One benchmark case in its own process: ORT CPU median latency and peak RSS of one model at one shape.

    python benchmarks/_bench_case.py MODEL.onnx --shape x=1x4096x512 [--repeats 10] [--threads 2]
                                     [--outputs OUT.npz]
    python benchmarks/_bench_case.py MODEL.onnx --feeds IDS.npy ...   (a one-input model, the caller's values)

The inputs are :func:`make_feeds`'s, seeded, so every process of a benchmark (PyTorch ones too) sees the
same; ``--outputs`` saves the model's outputs for the caller to check that the processes agree.
Prints one JSON line: median_ms, min_ms, peak_rss_mb (whole process: VmHWM of /proc/self/status),
rusage_maxrss_mb (getrusage; on Linux it carries the parent's peak over fork+exec, so it over-reads
when the parent is large: the runner reports VmHWM), base_rss_mb (after imports, before the session),
session_rss_mb (after session creation, before the first run).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    import os

    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _hwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def make_feeds(shapes: list[str]) -> dict:
    """Inputs for ``name=AxBxC[:int64]`` specs, from one seeded generator: floats standard normal, ints
    in 0..255 (a token id every sample's embedding accepts)."""
    import numpy as np

    rng = np.random.default_rng(0)
    feeds = {}
    for spec in shapes:
        name, rest = spec.split("=")
        dims, _, dtype = rest.partition(":")
        shape = tuple(int(d) for d in dims.split("x"))
        if dtype == "int64":
            feeds[name] = rng.integers(0, 256, size=shape).astype(np.int64)
        else:
            feeds[name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--shape", action="append", default=[], help="name=AxBxC[:dtype]")
    ap.add_argument("--feeds", help="a .npy file: the model's one input, as saved by the caller (instead of --shape)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--outputs", help="save the outputs of one run to this .npz")
    args = ap.parse_args(argv)

    import numpy as np
    import onnxruntime as ort

    base = _rss_mb()
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    sess = ort.InferenceSession(args.model, so, providers=["CPUExecutionProvider"])
    session_rss = _rss_mb()
    feeds = {sess.get_inputs()[0].name: np.load(args.feeds)} if args.feeds else make_feeds(args.shape)
    for _ in range(args.warmup):
        sess.run(None, feeds)
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append((time.perf_counter() - t0) * 1e3)
    if args.outputs:
        np.savez(args.outputs, *sess.run(None, feeds))
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({
        "median_ms": statistics.median(times), "min_ms": min(times),
        "peak_rss_mb": _hwm_mb(), "rusage_maxrss_mb": peak_kb / 1024, "base_rss_mb": base, "session_rss_mb": session_rss,
        "repeats": args.repeats,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
