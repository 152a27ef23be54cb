"""Loading every supported format, and a clear error for every unsupported or broken one."""

from __future__ import annotations

from pathlib import Path

import torch
import pytest

from exporter.errors import LrexportError
from exporter.loading import detect_kind, load_model

import samples


@pytest.mark.parametrize("fmt,kind", [("pt2", "exported-program"), ("torchscript", "torchscript")])
def test_archives_load_and_match_the_sample(sample_file, fmt, kind):
    path = sample_file("lowrank_mlp", fmt)
    assert detect_kind(path) == kind
    loaded = load_model(path)
    assert loaded.kind == kind
    x = torch.randn(2, 7, 512)
    expected = samples.get("lowrank_mlp").factory()(x)
    torch.testing.assert_close(loaded.module(x), expected)
    assert loaded.parameter_count == sum(p.numel() for p in samples.get("lowrank_mlp").factory().parameters())


def test_pt2_archive_carries_its_input_spec(sample_file):
    loaded = load_model(sample_file("causal_lm", "pt2"))
    (spec,) = loaded.inferred_specs
    assert spec.name == "ids" and spec.dtype == "int64"
    assert spec.min == (1, 1) and spec.max == (4, 512)


def test_state_dict_needs_a_factory(sample_file):
    path = sample_file("lowrank_mlp", "state-dict")
    with pytest.raises(LrexportError, match="is a state dict.*--factory"):
        load_model(path)
    loaded = load_model(path, factory="samples.models:lowrank_mlp")
    assert loaded.kind == "state-dict"


def test_state_dict_that_does_not_fit_the_factory(sample_file):
    path = sample_file("lowrank_mlp", "state-dict")
    with pytest.raises(LrexportError, match="does not fit the model") as info:
        load_model(path, factory="samples.models:lowrank_mlp", factory_kwargs='{"rank": 32}')
    assert "\n" not in str(info.value)


def test_pickle_needs_the_trust_flag(sample_file):
    path = sample_file("lowrank_mlp", "pickle")
    with pytest.raises(LrexportError, match="--trust-pickle"):
        load_model(path)
    assert load_model(path, trust_pickle=True).kind == "pickle"


@pytest.mark.parametrize("factory,match", [
    ("broken_import:build", "does not import"),
    ("no_such_module_xyz:build", "does not import"),
    ("badmodels:does_not_exist", "has no callable"),
    ("badmodels:not_a_module", "not an nn.Module"),
    ("badmodels", "bad factory"),
])
def test_bad_factories(factory, match):
    with pytest.raises(LrexportError, match=match):
        load_model(None, factory=factory)


def test_bad_factory_kwargs():
    with pytest.raises(LrexportError, match="not valid JSON"):
        load_model(None, factory="badmodels:small_mlp", factory_kwargs="{rank")
    with pytest.raises(LrexportError, match="raised TypeError"):
        load_model(None, factory="badmodels:small_mlp", factory_kwargs='{"nope": 1}')


def test_missing_empty_and_corrupt_files(tmp_path, sample_file):
    with pytest.raises(LrexportError, match="does not exist"):
        load_model(tmp_path / "nope.pt")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(LrexportError, match="is empty"):
        load_model(empty)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00\x01 this is not a model" * 10)
    with pytest.raises(LrexportError, match="not a readable model archive"):
        load_model(garbage)
    truncated = tmp_path / "truncated.pt2"
    data = sample_file("lowrank_mlp", "pt2").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(LrexportError):
        load_model(truncated)


@pytest.mark.parametrize("fmt", ["pt2", "torchscript", "state-dict", "pickle"])
def test_a_file_name_that_is_not_utf8_loads(sample_file, tmp_path, fmt):
    """A name with a byte that is not UTF-8 (Python keeps it as a surrogate): torch's C++ reader cannot take
    that path and failed with an error blaming the file ('str' object has no attribute 'tell')."""
    import os
    import shutil

    path = Path(os.fsdecode(os.fsencode(str(tmp_path)) + b"/mod\xff.pt"))
    shutil.copy(sample_file("lowrank_mlp", fmt), path)
    loaded = load_model(path, factory="samples.models:lowrank_mlp" if fmt == "state-dict" else None,
                        trust_pickle=fmt == "pickle")
    x = torch.randn(2, 7, 512)
    torch.testing.assert_close(loaded.module(x), samples.get("lowrank_mlp").factory()(x))
