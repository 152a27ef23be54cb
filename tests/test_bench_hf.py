"""benchmarks/bench_hf.py runs end to end on one tiny model: lrexport builds it, and its ONNX agrees with
transformers eager (run on transformers' own torch code) on the benchmark's seeded ids."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_hf_lrexport_agrees_with_eager(tmp_path):
    """Prefill rows (lrexport's ONNX vs eager) and decode rows (the step model's greedy tokens vs transformers'
    generate with its cache) from one run."""
    rows_file = tmp_path / "rows.json"
    res = subprocess.run([sys.executable, "benchmarks/bench_hf.py", "--models", "mamba2_lm", "--ns", "16",
                          "--variants", "eager,lrexport,step,generate", "--prompt", "9", "--new", "8",
                          "--repeats", "1", "--json", str(rows_file)],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = {r["variant"]: r for r in json.loads(rows_file.read_text())}
    assert set(rows) == {"eager", "lrexport", "step", "generate"}, rows
    assert not any("failed" in r for r in rows.values()), rows
    assert rows["lrexport"]["err"] < 1e-4, rows["lrexport"]
    assert rows["lrexport"]["median_ms"] > 0 and rows["eager"]["median_ms"] > 0
    assert rows["step"]["agree"] == 1.0, rows["step"]  # transformers picks each of the step model's 8 tokens
    assert rows["step"]["tok_s"] > 0 and rows["generate"]["tok_s"] > 0
    assert "tok/s" in res.stdout and "agree" in res.stdout
