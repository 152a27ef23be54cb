"""Bad input, command by command: one ``error:`` line, exit 2, no traceback, nothing of the user's changed.

Each case runs in a fresh copy of a small "user folder" (a model, its ONNX export, broken files, an
earlier --out); the whole folder is hashed before and after, so a changed, removed or added file (a
temp folder left behind, a half-written output) fails the case. Ctrl-C, SIGTERM and SIGHUP during a build are
tested in a real process at the end.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from conftest import ROOT


def _tiny_onnx(path: Path, opset: int = 18, external: bool = False) -> None:
    """x[batch, seq, 512] @ W(512x512) -> y: a valid ONNX file with a large enough weight to truncate
    (``external``: the weight in ``<name>.data`` beside it)."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((512, 512)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 512])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 512])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    onnx.save(model, str(path), save_as_external_data=external, location=f"{path.name}.data")


@pytest.fixture(scope="module")
def template(sample_file, tmp_path_factory) -> Path:
    """The user's folder every case starts from."""
    base = tmp_path_factory.mktemp("user")
    src = sample_file("lowrank_mlp")
    shutil.copy(src, base / "model.pt2")
    shutil.copy(src.with_name("lowrank_mlp.inputs.json"), base / "model.inputs.json")
    data = src.read_bytes()
    (base / "trunc.pt2").write_bytes(data[: len(data) // 3])
    (base / "empty.pt2").write_bytes(b"")
    (base / "junk.bin").write_bytes(np.random.default_rng(1).bytes(4096))
    (base / "notes.txt").write_text("not a model\n")
    _tiny_onnx(base / "tiny.onnx")
    blob = (base / "tiny.onnx").read_bytes()
    (base / "trunc.onnx").write_bytes(blob[: len(blob) // 2])
    (base / "empty.onnx").write_bytes(b"")
    _tiny_onnx(base / "opset30.onnx", opset=30)  # newer than onnx and ONNX Runtime know
    _tiny_onnx(base / "nodata.onnx", external=True)
    (base / "nodata.onnx.data").unlink()  # its weights file was not copied along
    torch.save({"w": torch.zeros(2)}, base / "weights.pt")
    torch.save(torch.nn.Linear(2, 2), base / "pickled.pt")
    (base / "afile").write_text("a regular file, not a folder\n")
    (base / "prev").mkdir()
    (base / "prev" / "keep.txt").write_text("an earlier build the user keeps\n")
    (base / "prev.onnx").write_bytes(b"an earlier export")
    (base / "folder.pt2").mkdir()
    _broken_archives(base)
    subprocess.run([sys.executable, "-m", "exporter.cli", "build", "model.pt2", "--out", "earlier", "-q",
                    "--backend", "onnxruntime", "--no-passes"], cwd=base, check=True, capture_output=True)
    return base


_UNREGISTERED_OP = """
import sys, torch
@torch.library.custom_op("lrexport_elsewhere::twice", mutates_args=())
def twice(x: torch.Tensor) -> torch.Tensor:
    return x * 2
twice.register_fake(lambda x: torch.empty_like(x))
class M(torch.nn.Module):
    def forward(self, x):
        return twice(x)
ep = torch.export.export(M(), (torch.randn(2, 8),), dynamic_shapes=({0: torch.export.Dim("batch", max=4)},))
torch.export.save(ep, sys.argv[1])
"""


def _broken_archives(base: Path) -> None:
    """Archives torch or the model cannot run: a custom op this process never registered (saved by another
    Python), a weight member missing, a program that fails at batch 1 inside its own range 1..4."""
    from badmodels import picks_second_item

    subprocess.run([sys.executable, "-c", _UNREGISTERED_OP, str(base / "op.pt2")], check=True)
    with zipfile.ZipFile(base / "model.pt2") as src, zipfile.ZipFile(base / "noweight.pt2", "w") as dst:
        weights = [n for n in src.namelist() if "/data/weights/" in n and not n.endswith(".json")]
        for name in src.namelist():
            if name != weights[0]:
                dst.writestr(src.getinfo(name), src.read(name))
    dims = ({0: torch.export.Dim("batch", min=1, max=4), 1: torch.export.Dim("seq", min=1, max=32)},)
    ep = torch.export.export(picks_second_item(), (torch.randn(2, 8, 16),), dynamic_shapes=dims)
    torch.export.save(ep, str(base / "second.pt2"))


def _snapshot(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


PROGRESS = re.compile(r"^ *\d+\.\ds \[\w+\] ")
BUILD = ("build", "model.pt2", "--out", "o", "--backend", "onnxruntime", "--no-passes")

# (id, argv run inside the user's folder, a word the error line must contain)
CASES = [
    # ----------------------------------------------------------------- build: model files
    ("build-missing", ("build", "nope.pt2", "--out", "o"), "does not exist"),
    ("build-empty", ("build", "empty.pt2", "--out", "o"), "is empty"),
    ("build-truncated", ("build", "trunc.pt2", "--out", "o"), "re-save"),
    ("build-junk", ("build", "junk.bin", "--out", "o"), "junk.bin"),
    ("build-text-file", ("build", "notes.txt", "--out", "o"), "notes.txt"),
    ("build-directory", ("build", "folder.pt2", "--out", "o"), "folder.pt2"),
    ("build-pickle-untrusted", ("build", "pickled.pt", "--out", "o"), "--trust-pickle"),
    ("build-state-dict-no-factory", ("build", "weights.pt", "--out", "o"), "--factory"),
    ("build-nothing", ("build", "--out", "o"), "--factory"),
    ("build-factory-syntax", ("build", "--factory", "nocolon", "--out", "o"), "package.module:function"),
    ("build-factory-missing-module", ("build", "--factory", "no_such_module_xyz:f", "--out", "o"),
     "does not import"),
    ("build-factory-exits-at-import", ("build", "--factory", "exits_at_import:small_mlp", "--input", "x:1x4x16",
                                       "--out", "o"), "sys.exit(3)"),
    ("build-factory-exits", ("build", "--factory", "badmodels:exits_when_called", "--input", "x:1x4x16",
                             "--out", "o"), "sys.exit('no model today')"),
    ("build-forward-exits", ("build", "--factory", "badmodels:exits_in_forward", "--input", "x:1x4x16",
                             "--out", "o"), "sys.exit(0) in badmodels.py"),
    ("build-archive-unregistered-op", ("build", "op.pt2", "--out", "o"), "custom op lrexport_elsewhere::twice"),
    ("inspect-archive-unregistered-op", ("inspect", "op.pt2"), "import the library that defines it"),
    ("build-archive-missing-weight", ("build", "noweight.pt2", "--out", "o"), "has no member"),
    ("build-archive-fails-inside-its-range", ("build", "second.pt2", "--out", "o", "--backend", "onnxruntime"),
     "second.pt2 itself fails in PyTorch"),
    ("build-archive-fails-inside-its-range-no-passes", ("build", "second.pt2", "--out", "o", "--backend",
                                                         "onnxruntime", "--no-passes"), "itself fails in PyTorch"),
    ("build-nan-output", ("build", "--factory", "badmodels:nan_model", "--input", "x:1x4x16", "--shapes",
                          "x:min=1x1x16,opt=1x4x16,max=2x8x16", "--out", "o", "--backend", "onnxruntime"),
     "itself produces NaN/Inf in output 'output'"),
    ("build-factory-kwargs-json", ("build", "--factory", "samples.models:lowrank_mlp", "--factory-kwargs",
                                   "{rank: 3", "--out", "o"), "JSON"),
    # ----------------------------------------------------------------- build: specs
    ("build-input-dims", (*BUILD, "--input", "x:1xAx512"), "bad dimensions"),
    ("build-input-dtype", (*BUILD, "--input", "x:1x8x512:float99"), "unknown dtype"),
    ("build-input-range", (*BUILD, "--input", "x:1x8x512:float32:5..1"), "low > high"),
    ("build-input-range-syntax", (*BUILD, "--input", "x:1x8x512:float32:1e..5"), "bad value range"),
    ("build-input-zero-dim", (*BUILD, "--input", "x:0x8x512"), ">= 1"),
    ("build-shapes-syntax", (*BUILD, "--shapes", "x:tiny=1x2"), "min="),
    ("build-shapes-min-gt-max", (*BUILD, "--shapes", "x:min=4x8x512,max=1x8x512"), "min > max"),
    ("build-shapes-rank", (*BUILD, "--shapes", "x:min=1x8,max=4x8x512"), "mixes ranks"),
    # ----------------------------------------------------------------- build: options
    ("build-seed-negative", (*BUILD, "--seed", "-5"), "--seed"),
    ("build-fp16-and-bf16", (*BUILD, "--fp16", "--bf16"), "--bf16"),
    ("build-atol-negative", (*BUILD, "--atol", "-1"), "--atol"),
    ("build-rtol-nan", (*BUILD, "--rtol", "nan"), "--rtol"),
    ("build-tol-syntax", (*BUILD, "--tol", "output"), "NAME:atol="),
    ("build-tol-negative", (*BUILD, "--tol", "output:atol=-1"), "atol"),
    ("build-cases", (*BUILD, "--cases", "min,huge"), "huge"),
    ("build-passes", ("build", "model.pt2", "--out", "o", "--passes", "lowrank,nope"), "nope"),
    ("build-chunk-size-zero", ("build", "model.pt2", "--out", "o", "--chunk-size", "0"), "--chunk-size"),
    ("build-merge-threshold", ("build", "model.pt2", "--out", "o", "--merge-threshold", "-1"),
     "--merge-threshold"),
    ("build-opset-old", (*BUILD, "--opset", "9"), "opset"),
    ("build-opset-new", (*BUILD, "--opset", "99"), "up to opset"),
    ("build-memory-budget-too-small", (*BUILD, "--memory-budget", "1KB"), "too small"),
    ("build-tol-unknown-output", (*BUILD, "--tol", "nosuch:atol=1"), "nosuch"),
    ("build-cases-empty", (*BUILD, "--cases", ""), "--cases"),
    ("build-shapes-unknown-input", (*BUILD, "--shapes", "y:min=1x1x512,max=2x8x512"), "not one of"),
    ("build-workspace", ("build", "model.pt2", "--out", "o", "--workspace", "0"), "--workspace"),
    ("build-backend-choice", (*BUILD[:4], "--backend", "cuda"), "--backend"),
    ("build-pad-zero", (*BUILD, "--pad-to-length", "0"), "--pad-to-length"),
    ("build-unknown-option", (*BUILD, "--fp8"), "--fp8"),
    ("unknown-command", ("bogus", "model.pt2"), "bogus"),
    ("build-seed-not-int", (*BUILD, "--seed", "abc"), "--seed"),
    # ----------------------------------------------------------------- build: outputs
    ("build-out-under-file", ("build", "model.pt2", "--out", "afile/o"), "afile"),
    ("build-out-under-proc", ("build", "model.pt2", "--out", "/proc/lrexport-out"), "/proc"),
    ("build-out-is-file", ("build", "model.pt2", "--out", "afile"), "afile"),
    ("build-out-not-empty", ("build", "model.pt2", "--out", "prev"), "--force"),
    ("build-out-new-folders", ("build", "model.pt2", "--out", "new/deeper/o", "--opset", "16",
                               "--backend", "onnxruntime"), "opset 16 is too old"),  # fails inside the export
    ("build-timing-cache-dir", (*BUILD, "--timing-cache", "prev"), "prev"),
    ("build-out-empty", ("build", "model.pt2", "--out", ""), "empty"),
    ("build-out-too-long", ("build", "model.pt2", "--out", "o" * 300), "shorter"),
    # ----------------------------------------------------------------- export
    ("export-no-out", ("export", "model.pt2"), "--out"),
    ("export-out-exists", ("export", "model.pt2", "--out", "prev.onnx"), "--force"),
    ("export-out-under-file", ("export", "model.pt2", "--out", "afile/m.onnx"), "afile"),
    ("export-truncated", ("export", "trunc.pt2", "--out", "m.onnx"), "re-save"),
    ("export-opset-old", ("export", "model.pt2", "--out", "m.onnx", "--opset", "9"), "opset"),
    ("export-opset-new", ("export", "model.pt2", "--out", "m.onnx", "--opset", "99"), "up to opset"),
    ("export-opset-new-torchscript", ("export", "model.pt2", "--out", "m.onnx", "--exporter", "torchscript",
                                      "--opset", "23"), "up to opset"),
    # ----------------------------------------------------------------- check
    ("check-onnx-missing", ("check", "model.pt2", "nope.onnx"), "does not exist"),
    ("check-onnx-empty", ("check", "model.pt2", "empty.onnx"), "empty.onnx"),
    ("check-onnx-truncated", ("check", "model.pt2", "trunc.onnx"), "trunc.onnx"),
    ("check-onnx-is-model", ("check", "model.pt2", "model.pt2"), "model.pt2"),
    ("check-swapped", ("check", "tiny.onnx", "model.pt2"), "tiny.onnx"),
    ("check-report-under-file", ("check", "model.pt2", "tiny.onnx", "--report", "afile/r.json"), "afile"),
    ("check-atol-negative", ("check", "model.pt2", "tiny.onnx", "--atol", "-1"), "--atol"),
    ("check-tol-unknown-output", ("check", "model.pt2", "tiny.onnx", "--tol", "nosuch:atol=1"), "nosuch"),
    ("check-opset-new", ("check", "model.pt2", "opset30.onnx"), "up to opset"),
    # ----------------------------------------------------------------- inspect
    ("inspect-missing", ("inspect", "nope.onnx"), "does not exist"),
    ("inspect-empty", ("inspect", "empty.onnx"), "empty.onnx"),
    ("inspect-truncated-onnx", ("inspect", "trunc.onnx"), "trunc.onnx"),
    ("inspect-junk", ("inspect", "junk.bin"), "junk.bin"),
    ("inspect-directory", ("inspect", "prev"), "prev"),
    # ----------------------------------------------------------------- optimize
    ("optimize-missing", ("optimize", "nope.onnx", "o.onnx"), "does not exist"),
    ("optimize-empty", ("optimize", "empty.onnx", "o.onnx"), "is empty"),
    ("optimize-truncated", ("optimize", "trunc.onnx", "o.onnx"), "trunc.onnx"),
    ("optimize-model-file", ("optimize", "model.pt2", "o.onnx"), "model.pt2"),
    ("optimize-out-exists", ("optimize", "tiny.onnx", "prev.onnx"), "--force"),
    ("optimize-out-under-file", ("optimize", "tiny.onnx", "afile/o.onnx"), "afile"),
    ("optimize-passes", ("optimize", "tiny.onnx", "o.onnx", "--passes", "nope"), "nope"),
    ("optimize-chunk-size", ("optimize", "tiny.onnx", "o.onnx", "--chunk-size", "-3"), "--chunk-size"),
    ("optimize-opset-new", ("optimize", "opset30.onnx", "o.onnx"), "up to opset"),
    ("optimize-shapes-unknown-input", ("optimize", "tiny.onnx", "o.onnx", "--shapes", "y:min=1x1x512,max=2x2x512"),
     "not one of"),
    ("optimize-external-data-missing", ("optimize", "nodata.onnx", "o.onnx"), "nodata.onnx.data"),
    # ----------------------------------------------------------------- run
    ("run-missing", ("run", "nope.engine"), "does not exist"),
    ("run-onnx-as-engine", ("run", "tiny.onnx"), "tiny.onnx"),
    ("run-repeats", ("run", "nope.engine", "--repeats", "0"), "--repeats"),
    # ----------------------------------------------------------------- factorize
    ("factorize-no-rule", ("factorize", "model.pt2", "--out", "low.pt2"), "--rank"),
    ("factorize-two-rules", ("factorize", "model.pt2", "--out", "low.pt2", "--rank", "4", "--fraction", "0.5"),
     "one"),
    ("factorize-fraction", ("factorize", "model.pt2", "--out", "low.pt2", "--fraction", "2"), "fraction"),
    ("factorize-rank-zero", ("factorize", "model.pt2", "--out", "low.pt2", "--rank", "0"), "rank"),
    ("factorize-out-exists", ("factorize", "model.pt2", "--out", "prev.onnx", "--rank", "4"), "--force"),
    ("factorize-missing", ("factorize", "nope.pt2", "--out", "low.pt2", "--rank", "4"), "does not exist"),
    ("factorize-warn-error", ("factorize", "model.pt2", "--out", "low.pt2", "--rank", "4", "--warn-error", "-1"),
     "invalid value for '--warn-error'"),
    # ----------------------------------------------------------------- export-step
    ("export-step-suffix", ("export-step", "model.pt2", "--out", "step.txt"), ".onnx"),
    ("export-step-chunk-zero", ("export-step", "model.pt2", "--out", "step.onnx", "--chunk-max", "0"),
     "--chunk-max"),
    ("export-step-out-exists", ("export-step", "model.pt2", "--out", "prev.onnx"), "--force"),
    ("export-step-empty", ("export-step", "empty.pt2", "--out", "step.onnx"), "is empty"),
    ("export-step-out-empty", ("export-step", "model.pt2", "--out", ""), "empty"),
]


@pytest.mark.parametrize("argv,word", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(argv, word, cli, template, tmp_path):
    user = tmp_path / "user"
    shutil.copytree(template, user)
    before = _snapshot(user)
    res = cli(*argv, cwd=user)
    assert res.code == 2, res.out + res.err
    lines = res.err.strip().splitlines()
    assert "Traceback" not in res.err and lines and lines[-1].startswith("error: "), res.err
    assert all(PROGRESS.match(ln) for ln in lines[:-1]), res.err  # only progress lines before it
    assert word in lines[-1] and "{'" not in lines[-1], lines[-1]
    assert _snapshot(user) == before


def _progress_then_one_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert lines and all(PROGRESS.match(ln) for ln in lines[:-1]) and lines[-1].startswith("error: "), err
    return lines[-1]


def test_debug_shows_the_traceback_and_keeps_the_exit_code(cli, template, tmp_path, monkeypatch):
    """--debug adds the traceback; it does not turn bad input (2) or a bug (3) into another code."""
    import exporter.inspect_model

    res = cli("build", tmp_path / "nope.pt2", "--out", tmp_path / "o", "--debug")
    assert res.code == 2 and "Traceback" in res.err
    assert res.err.strip().splitlines()[-1].startswith("error: model file") and not (tmp_path / "o").exists()

    def bug(*_args, **_kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(exporter.inspect_model, "inspect_path", bug)
    res = cli("inspect", template / "tiny.onnx")
    assert res.code == 3 and "Traceback" not in res.err
    assert "internal error ZeroDivisionError" in res.err and "--debug" in res.err
    res = cli("inspect", template / "tiny.onnx", "--debug")
    assert res.code == 3 and "Traceback" in res.err and "ZeroDivisionError" in res.err
    assert res.err.strip().splitlines()[-1].startswith("error: internal error ZeroDivisionError")


def _interrupt_build(user: Path, *extra: str, signum: int = signal.SIGINT) -> subprocess.CompletedProcess:
    """Start `lrexport build` in a real process, send ``signum`` (Ctrl-C: SIGINT) once the export runs,
    wait for it."""
    argv = [sys.executable, "-m", "exporter.cli", "build", "model.pt2", "--out", *extra]
    proc = subprocess.Popen(argv, cwd=user, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    assert proc.stderr is not None
    for line in proc.stderr:
        seen.append(line)
        if "[export]" in line:
            proc.send_signal(signum)
            break
    out, err = proc.communicate(timeout=120)
    assert any("[export]" in ln for ln in seen), "".join(seen) + err
    return subprocess.CompletedProcess(argv, proc.returncode, out, "".join(seen) + err)


@pytest.mark.parametrize("signum,code,force", [
    (signal.SIGINT, 130, False), (signal.SIGINT, 130, True),
    (signal.SIGTERM, 143, False), (signal.SIGTERM, 143, True),  # `timeout`, CI cancellation, `docker stop`
    (signal.SIGHUP, 129, False),  # the terminal closed
], ids=["ctrl-c-new-out", "ctrl-c-force-over-earlier-build", "sigterm-new-out", "sigterm-force-over-earlier-build",
        "sighup-new-out"])
def test_interrupting_a_build_leaves_nothing_half_written(signum, code, force, template, tmp_path):
    user = tmp_path / "user"
    shutil.copytree(template, user)
    before = _snapshot(user)
    res = _interrupt_build(user, *(("earlier", "--force") if force else ("o",)), signum=signum)
    assert res.returncode == code, res.stderr
    assert "interrupted" in _progress_then_one_error(res.stderr) and "Traceback" not in res.stderr
    assert _snapshot(user) == before  # no --out, no temp folder; the earlier build as it was


def test_disk_full_is_the_users_to_fix_not_a_bug(cli, template, tmp_path, monkeypatch):
    """An OSError of the machine (no space, read-only, forbidden) is exit 2 with one line, not an internal error."""
    import errno

    import exporter.pipeline

    def full(_model, path, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(exporter.pipeline, "save_onnx", full)
    user = tmp_path / "user"
    shutil.copytree(template, user)
    before = _snapshot(user)
    res = cli("build", "model.pt2", "--out", "new/o", "--backend", "onnxruntime", "--no-passes", cwd=user)
    assert res.code == 2, res.err
    line = _progress_then_one_error(res.err)
    assert "No space left on device" in line and "model.onnx" in line
    assert _snapshot(user) == before


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_while_the_output_is_swapped_in_waits_for_the_swap(signum, tmp_path, monkeypatch):
    """Between moving the earlier --out aside and the new one in, Ctrl-C (or SIGTERM, as the CLI handles
    it) would leave neither in place: it is held until both moves are done, then delivered."""
    import exporter.outputs as outputs

    out = tmp_path / "o"
    out.mkdir()
    (out / "old.txt").write_text("earlier build")
    real_replace = os.replace
    calls = []

    def replace_then_interrupt(src, dst):
        calls.append(dst)
        if len(calls) == 1:  # the earlier --out has just been moved aside: Ctrl-C now
            real_replace(src, dst)
            os.kill(os.getpid(), signum)
            time.sleep(0.05)
            return
        real_replace(src, dst)

    monkeypatch.setattr(outputs.os, "replace", replace_then_interrupt)
    (out / "report.json").write_text('{"out": "o", "export": {}, "parity": {}, "files": ["o/old.txt"]}')
    with pytest.raises(KeyboardInterrupt) as raised, outputs.interrupt_on_termination():
        with outputs.atomic_dir(out, force=True) as tmp:
            (tmp / "new.txt").write_text("this build")
    assert getattr(raised.value, "signum", signal.SIGINT) == signum
    assert len(calls) == 2 and sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]  # no temp folder left
