"""Shared fixtures: sample model files (made once per session) and an in-process CLI runner."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
os.environ.setdefault("OMP_NUM_THREADS", "2")


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture(scope="session")
def sample_file(tmp_path_factory):
    """``sample_file(name, fmt="pt2")`` -> path of that sample saved in that format (cached)."""
    from samples.make import make

    cache: dict[tuple[str, str], Path] = {}
    base = tmp_path_factory.mktemp("samples")

    def get(name: str, fmt: str = "pt2") -> Path:
        key = (name, fmt)
        if key not in cache:
            suffix = {"pt2": ".pt2", "torchscript": ".pt", "state-dict": ".weights.pt", "pickle": ".pkl.pt"}[fmt]
            cache[key] = make(name, base / fmt / f"{name}{suffix}", fmt)
        return cache[key]

    return get


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run ``lrexport ARGS`` in-process; returns exit code, stdout, stderr."""
    from exporter.cli import main

    def run(*args: str, cwd: Path | None = None) -> CliResult:
        if cwd is not None:
            monkeypatch.chdir(cwd)
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


def error_line(result: CliResult) -> str:
    """The one 'error: ...' line a failing command printed (and assert it printed no traceback)."""
    assert "Traceback" not in result.err, result.err
    lines = [ln for ln in result.err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, result.err
    return lines[0]


sys.path.insert(0, str(FIXTURES))
