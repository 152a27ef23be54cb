"""What --force may replace: only what lrexport itself wrote (exporter/outputs.py).

Each case runs in a fresh copy of a user's folder holding a project (a model with its input sidecar and
notes), an earlier lrexport build, an ONNX file and a folder of the user's; the whole folder is hashed
before and after, so a refused command that changed, removed or added anything fails.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from conftest import error_line


@pytest.fixture(scope="module")
def template(sample_file, tmp_path_factory) -> Path:
    from exporter.cli import main

    base = tmp_path_factory.mktemp("user")
    src = sample_file("lowrank_mlp")
    (base / "proj").mkdir()
    shutil.copy(src, base / "proj" / "model.pt2")
    shutil.copy(src.with_name("lowrank_mlp.inputs.json"), base / "proj" / "model.inputs.json")
    (base / "proj" / "notes.txt").write_text("the user's notes\n")
    (base / "mine").mkdir()
    (base / "mine" / "data.txt").write_text("a folder of the user's\n")
    (base / "mine.engine").write_text("not an engine lrexport built\n")
    with pytest.raises(SystemExit) as done:  # a real earlier build, as lrexport writes it
        main(["build", str(base / "proj" / "model.pt2"), "--out", str(base / "earlier"), "--backend",
              "onnxruntime", "--no-passes", "-q"])
    assert done.value.code == 0
    shutil.copy(base / "earlier" / "model.onnx", base / "model.onnx")
    return base


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


@pytest.fixture
def user(template, tmp_path) -> Path:
    shutil.copytree(template, tmp_path / "user")
    return tmp_path / "user"


def _refused(cli, user: Path, *argv: str, cwd: Path | None = None) -> str:
    """Run a command that must be refused: exit 2, one error line, the user's folder byte-identical."""
    before = _snapshot(user)
    res = cli(*argv, cwd=cwd or user)
    assert res.code == 2, res.out + res.err
    line = error_line(res)
    assert _snapshot(user) == before
    return line


BUILD = ("--backend", "onnxruntime", "--no-passes", "-q")


def test_force_replaces_an_earlier_lrexport_build(cli, user):
    (user / "earlier" / "model.onnx").write_bytes(b"stale")  # the new build's file replaces it
    res = cli("build", "proj/model.pt2", "--out", "earlier", "--force", *BUILD, cwd=user)
    assert res.code == 0, res.err
    report = json.loads((user / "earlier" / "report.json").read_text())
    assert sorted(p.name for p in (user / "earlier").iterdir()) == sorted(
        Path(f).name for f in report["files"])
    assert (user / "earlier" / "model.onnx").read_bytes()[:1] != b"s"
    assert sorted(p.name for p in user.iterdir()) == ["earlier", "mine", "mine.engine", "model.onnx", "proj"]  # no temp left


@pytest.mark.parametrize("out,cwd,word", [
    ("proj", ".", "model.pt2, an input"),  # the folder holding the model
    (".", "proj", "current folder"),  # cd proj && lrexport build model.pt2 --out . --force
    ("$PWD", "proj", "current folder"),
    (".", ".", "current folder"),
    ("..", "proj", "above the current"),
    ("..", ".", "above the current"),
    ("mine", ".", "not written by lrexport"),  # a folder of the user's
], ids=["input-folder", "dot-in-project", "pwd", "dot", "dotdot-in-project", "dotdot", "users-folder"])
def test_force_never_replaces_a_folder_lrexport_did_not_write(cli, user, out, cwd, word):
    where = user / cwd
    model = "model.pt2" if cwd == "proj" else "proj/model.pt2"
    line = _refused(cli, user, "build", model, "--out", str(where) if out == "$PWD" else out, "--force", *BUILD,
                    cwd=where)
    assert word in line, line


def test_force_keeps_an_earlier_build_holding_the_users_files(cli, user):
    (user / "earlier" / "notes.txt").write_text("written into the output folder by the user\n")
    line = _refused(cli, user, "build", "proj/model.pt2", "--out", "earlier", "--force", *BUILD)
    assert "notes.txt" in line and "did not write" in line, line


def test_force_keeps_a_folder_holding_an_input_even_one_lrexport_wrote(cli, user):
    """The model checked against is the one inside the earlier build: replacing it would lose it."""
    line = _refused(cli, user, "build", "earlier/model.onnx", "--out", "earlier", "--force", *BUILD)
    assert "input" in line, line


@pytest.mark.parametrize("report,force,word", [
    ("proj/model.pt2", False, "input"),  # the model
    ("proj/model.pt2", True, "input"),
    ("model.onnx", True, "input"),  # the ONNX file being checked
    ("proj/model.inputs.json", True, "input"),  # the model's input sidecar
    ("proj/notes.txt", False, "--force"),  # any existing file
    ("proj/notes.txt", True, "not a JSON file lrexport writes"),
    ("mine", True, "directory"),
    ("", False, "empty"),
], ids=["model", "model-force", "checked-onnx", "sidecar", "any-file", "any-file-force", "folder", "empty"])
def test_check_report_never_overwrites_what_lrexport_did_not_write(cli, user, report, force, word):
    line = _refused(cli, user, "check", "proj/model.pt2", "model.onnx", "--report", report,
                    *(("--force",) if force else ()), "-q")
    assert word in line, line


def test_check_report_replaces_its_own_report_with_force(cli, user):
    assert cli("check", "proj/model.pt2", "model.onnx", "--report", "r.json", "-q", cwd=user).code == 0
    assert "--force" in _refused(cli, user, "check", "proj/model.pt2", "model.onnx", "--report", "r.json", "-q")
    (user / "r.json").write_text(json.dumps({**json.loads((user / "r.json").read_text()), "seed": 7}))
    assert cli("check", "proj/model.pt2", "model.onnx", "--report", "r.json", "--force", "-q", cwd=user).code == 0
    assert json.loads((user / "r.json").read_text())["seed"] == 0


@pytest.mark.parametrize("argv,word", [
    (("export", "proj/model.pt2", "--out", "proj/model.pt2", "--force"), "input"),
    (("export", "proj/model.pt2", "--out", "proj/notes.txt", "--force"), "not an ONNX model"),
    (("optimize", "model.onnx", "model.onnx", "--force"), "input"),
    (("factorize", "proj/model.pt2", "--out", "proj/model.inputs.json", "--rank", "4", "--force"), "input"),
    (("factorize", "proj/model.pt2", "--out", "model.onnx", "--rank", "4", "--force"), "not a model archive"),
    (("export-step", "proj/model.pt2", "--out", "mine.onnx", "--engine", "--force"), "not an engine"),
    (("build", "proj/model.pt2", "--out", "o", "--timing-cache", "proj/model.pt2"), "input"),
    (("build", "proj/model.pt2", "--out", "o", "--timing-cache", "o/cache"), "inside --out"),
], ids=["export-onto-model", "export-onto-text", "optimize-in-place", "factorize-onto-sidecar",
        "factorize-onto-onnx", "export-step-engine", "timing-cache-is-model", "timing-cache-in-out"])
def test_every_writing_option_follows_the_rule(cli, user, argv, word):
    line = _refused(cli, user, *argv)
    assert word in line, line
