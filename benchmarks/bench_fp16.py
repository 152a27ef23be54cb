"""fp16 keep-list and faithful-check numbers for every sample and the third-party models of the tests.

    python benchmarks/bench_fp16.py [--precision fp16] [--table] [NAME ...]     # > one JSON line per model

Runs ``lrexport build --fp16 --backend onnxruntime --json`` in a subprocess per model and prints, per
model: nodes kept in float32 (all, those the range analysis added, and those on a sum that grows with
the sequence), the share of float-computing nodes left in the low precision (``low_nodes`` of
``compute_nodes``; what counts: ``graph_passes/precision_cast.py``), that share outside the growing
sums, the seconds the range analysis took (all shape cases, default shapes), and the max abs error
against PyTorch of ONNX Runtime's fp16 row and of the faithful row. ``--table``: a text table at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def _max_abs(report: dict, backend: str) -> float | None:
    values = [o["max_abs"] for r in report["parity"]["results"] if r["backend"] == backend for o in r["outputs"]]
    return max(values) if values else None


def run(name: str, args: list[str], precision: str, work: Path) -> dict:
    cmd = [sys.executable, "-m", "exporter.cli", "build", *args, "--out", str(work / name), f"--{precision}",
           "--backend", "onnxruntime", "--json", "-q", "--force"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "OMP_NUM_THREADS": "2"})
    if not proc.stdout.strip().startswith("{"):
        return {"model": name, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    report = json.loads(proc.stdout)
    info = report["precision"]
    sums = len(info["kept_for_growing_sums"])
    return {"model": name, "ok": report["ok"], "kept_fp32": len(info["kept_fp32_nodes"]),
            "kept_for_range": [f"{r['node']} ({r['op_type']})" for r in info["kept_for_range"]],
            "kept_for_sums": sums, "low_nodes": info["low_nodes"], "compute_nodes": info["compute_nodes"],
            "low_fraction": round(info["low_fraction"], 3),
            "low_fraction_outside_sums": round(info["low_nodes"] / (info["compute_nodes"] - sums), 3),
            "range_seconds": info["range"]["seconds"], "range_cases": info["range"]["cases"],
            "ort_max_abs": _max_abs(report, f"onnxruntime-{precision}"),
            "faithful_max_abs": _max_abs(report, f"{precision} faithful"),
            "unchecked": report["parity"]["unchecked"]}


def main() -> int:
    import samples
    import third_party_models as tpm

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*")
    parser.add_argument("--precision", default="fp16", choices=["fp16", "bf16"])
    parser.add_argument("--table", action="store_true", help="also print a text table at the end")
    ns = parser.parse_args()
    from samples.make import make

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        jobs: list[tuple[str, list[str]]] = []
        for name in samples.SAMPLES:
            jobs.append((name, [str(make(name, work / f"{name}.pt2"))]))
        for name, (inputs, shapes) in tpm.SPECS.items():
            args = ["--factory", f"third_party_models:{name}"]
            args += [a for i in inputs for a in ("--input", i)] + [a for s in shapes for a in ("--shapes", s)]
            jobs.append((name, args))
        rows = []
        for name, args in jobs:
            if ns.names and name not in ns.names:
                continue
            rows.append(run(name, args, ns.precision, work))
            print(json.dumps(rows[-1]), flush=True)
    if ns.table:
        print(_table(rows))
    return 0


def _table(rows: list[dict]) -> str:
    from exporter.table import format_table

    headers = ["model", "kept fp32", "for range", "for sums", "low share", "outside sums", "analysis s",
               "ORT max abs", "faithful max abs", "parity"]
    cells = [[r["model"], "error", "", "", "", "", "", "", "", r["error"]] if "error" in r else
             [r["model"], r["kept_fp32"], len(r["kept_for_range"]), r["kept_for_sums"],
              f"{r['low_nodes']}/{r['compute_nodes']} = {r['low_fraction']:.1%}",
              f"{r['low_fraction_outside_sums']:.1%}", r["range_seconds"], r["ort_max_abs"],
              r["faithful_max_abs"], "PASS" if r["ok"] else "FAIL"] for r in rows]
    return format_table(headers, cells)


if __name__ == "__main__":
    sys.exit(main())
