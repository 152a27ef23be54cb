"""The README's Python examples, run as written (only ``model`` is supplied: a bundled sample)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _python_block(containing: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    (block,) = [b for b in blocks if containing in b]
    return block


def test_api_example_runs(tmp_path, monkeypatch):
    import samples

    monkeypatch.chdir(tmp_path)
    scope = {"model": samples.get("lowrank_mlp").factory().eval()}  # x: (batch, seq, 512)
    exec(_python_block("from exporter import check_parity"), scope)
    assert scope["report"].ok and (tmp_path / "model.onnx").is_file()


def test_pytest_fixture_example_runs(tmp_path):
    test_file = tmp_path / "test_fixture_example.py"
    test_file.write_text("import torch\nmodel = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.Linear(16, 64))\n"
                         + _python_block("def test_export(lrexport_parity"))
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test_file)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 passed" in res.stdout
