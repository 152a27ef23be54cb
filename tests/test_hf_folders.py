"""Hugging Face ``save_pretrained`` folders: ``lrexport build|export|check|inspect FOLDER`` (or its config.json or
model.safetensors), from tiny configs saved into tmp folders (hidden 32, 2 layers, vocab 128; no downloads).

Loading, refusals and parity's padded masks on Llama and GPT-2; every linear-attention / SSM architecture (and
LFM2) built from its folder: tests/test_hf_architectures.py.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch

from conftest import error_line

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
SHAPES = "input_ids:min=1x1,opt=2x32,max=4x64"  # most builds: sequence 1..64
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=128)


def _llama(**kw):
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY, "max_position_embeddings": 128, **kw}))


def _gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128,
                                                                n_positions=64, bos_token_id=0, eos_token_id=0))


BUILDERS = {"llama": _llama, "llama_tied": lambda: _llama(tie_word_embeddings=True), "gpt2": _gpt2,
            "llama_sharded": _llama}


@pytest.fixture(scope="session")
def hf_folder(tmp_path_factory):
    """``hf_folder(name)`` -> (folder, the model saved there); each saved once per session."""
    cache: dict[str, tuple[Path, torch.nn.Module]] = {}
    base = tmp_path_factory.mktemp("hf")

    def get(name: str) -> tuple[Path, torch.nn.Module]:
        if name not in cache:
            torch.manual_seed(0)
            model = BUILDERS[name]().eval()
            folder = base / name
            model.save_pretrained(folder, **({"max_shard_size": "20KB"} if name == "llama_sharded" else {}))
            cache[name] = folder, model
        return cache[name]

    return get


def _logits(model, ids, mask=None):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids) if mask is None else mask, use_cache=False)
    return out.logits if hasattr(out, "logits") else out["logits"]


def _copy(folder: Path, tmp_path: Path) -> Path:
    dst = tmp_path / folder.name
    shutil.copytree(folder, dst)
    return dst


# ------------------------------------------------------------------------------------------------ builds


@pytest.fixture(scope="session")
def readme_build(hf_folder, tmp_path_factory):
    """The README's "Hugging Face models" example, as written: its Python block saves ``tiny-llama``, then its
    first command builds it with the default range from config.json (max_position_embeddings=128)."""
    from exporter.cli import main

    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Hugging Face models", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, re.S)
    (commands,) = re.findall(r"```bash\n(.*?)```", section, re.S)
    work = tmp_path_factory.mktemp("readme_hf")
    cwd = Path.cwd()
    import os

    os.chdir(work)
    try:
        exec(block, {})
        results = []
        for line in commands.strip().splitlines():
            argv = shlex.split(line.split("#", 1)[0])
            assert argv[0] == "lrexport"
            try:
                main([*argv[1:], "--json", "-q"])
                code = 0
            except SystemExit as exc:
                code = exc.code
            results.append((argv, code))
    finally:
        os.chdir(cwd)
    return work, results


def test_readme_example_builds_with_default_range(readme_build, capsys):
    work, results = readme_build
    assert [code for _, code in results] == [0] * len(results), results
    report = json.loads((work / "tiny-llama.lrexport" / "report.json").read_text())
    inputs = {i["name"]: i for i in report["export"]["inputs"]}
    # default range from config.json: batch 1..4, sequence 1..min(max_position_embeddings=128, 4096)
    assert (inputs["input_ids"]["min"], inputs["input_ids"]["max"]) == ([1, 1], [4, 128])
    assert (inputs["attention_mask"]["min"], inputs["attention_mask"]["max"]) == ([1, 1], [4, 128])
    assert inputs["input_ids"]["dtype"] == inputs["attention_mask"]["dtype"] == "int64"
    assert inputs["input_ids"]["high"] == 127.0
    assert report["export"]["pinned_axes"] == []
    parity = report["parity"]
    assert parity["ok"] and {r["case"] for r in parity["results"]} == {"min", "opt", "max", "odd"}
    import onnx

    model = onnx.load(str(work / "tiny-llama.lrexport" / "model.onnx"))
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert dims == {"input_ids": ["batch", "seq"], "attention_mask": ["batch", "seq"]}
    assert [o.name for o in model.graph.output] == ["logits"]


def test_build_folder(cli, hf_folder, tmp_path):
    """--shapes for input_ids alone: its padding mask takes the same range."""
    folder, _ = hf_folder("gpt2")
    res = cli("build", folder, "--shapes", SHAPES, "--backend", "onnxruntime", "--out", tmp_path / "o", "--json", "-q")
    assert res.code == 0, res.out[-3000:] + res.err[-3000:]
    report = json.loads(res.out)
    inputs = {i["name"]: (i["min"], i["max"]) for i in report["export"]["inputs"]}
    assert inputs == {"input_ids": ([1, 1], [4, 64]), "attention_mask": ([1, 1], [4, 64])}
    assert report["parity"]["ok"] and {r["case"] for r in report["parity"]["results"]} == {"min", "opt", "max", "odd"}


def test_parity_feeds_padded_masks_and_compares_tokens_only(cli, readme_build, monkeypatch, tmp_path):
    """Parity's masks are left-padded, right-padded and unpadded rows; the logits at padded positions (queries
    that attend to nothing) differ between ONNX Runtime and PyTorch, so only the tokens are compared."""
    from exporter import parity
    from exporter.loading import load_model
    from exporter.specs import random_feeds

    work, _ = readme_build
    folder, onnx_file = work / "tiny-llama", work / "tiny-llama.lrexport" / "model.onnx"
    specs = load_model(folder).inferred_specs
    mask = random_feeds(specs, "max")["attention_mask"]  # 4 x 128
    assert mask[0, 0] == 0 and mask[0, -1] == 1  # left-padded
    assert mask[1, 0] == 1 and mask[1, -1] == 0  # right-padded
    assert mask[2].all() and mask.any(axis=1).all()
    res = cli("check", folder, onnx_file, "--json", "-q")
    assert res.code == 0, res.out[-3000:] + res.err[-3000:]
    monkeypatch.setattr(parity, "tokens_only", lambda outputs, feeds, specs: outputs)
    res = cli("check", folder, onnx_file, "--json", "-q")
    assert res.code == 1, res.out[-3000:] + res.err[-3000:]
    failed = {r["case"] for r in json.loads(res.out)["results"] if not r["ok"]}
    assert failed and failed <= {"opt", "max", "odd"}  # the cases with padded rows


# ------------------------------------------------------------------------------------------------ loading


def test_config_json_and_safetensors_paths(cli, hf_folder):
    folder, _ = hf_folder("llama")
    for path in (folder / "config.json", folder / "model.safetensors", folder):
        res = cli("inspect", path, "--json", "-q")
        assert res.code == 0, res.err
        info = json.loads(res.out)
        assert info["kind"] == "huggingface" and "LlamaForCausalLM" in info["module_histogram"]
        assert [(i["name"], i["max"]) for i in info["inputs"]] == [("input_ids", [4, 128]), ("attention_mask", [4, 128])]


def test_sharded_safetensors(hf_folder):
    from exporter.loading import load_model

    folder, model = hf_folder("llama_sharded")
    assert (folder / "model.safetensors.index.json").is_file() and len(list(folder.glob("*.safetensors"))) > 1
    loaded = load_model(folder)
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    torch.testing.assert_close(loaded.module(ids, mask)["logits"], _logits(model, ids, mask), rtol=0, atol=0)


def test_tied_weights_retied(hf_folder):
    """tie_word_embeddings: lm_head.weight is not in the file; the loaded head is the embedding again."""
    from safetensors import safe_open

    from exporter.loading import load_model

    folder, model = hf_folder("llama_tied")
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys() and "model.embed_tokens.weight" in f.keys()
    inner = load_model(folder).module.model
    assert inner.lm_head.weight is inner.model.embed_tokens.weight
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(_logits(inner, ids), _logits(model, ids), rtol=0, atol=0)


def test_missing_weight_refused(cli, hf_folder, tmp_path):
    """A weight the file lacks is refused, not left at its random initialization."""
    from safetensors.torch import load_file, save_file

    folder = _copy(hf_folder("llama")[0], tmp_path)
    state = load_file(str(folder / "model.safetensors"))
    del state["lm_head.weight"]
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    res = cli("inspect", folder)
    assert res.code == 2
    assert "do not fit LlamaForCausalLM: missing lm_head.weight" in error_line(res)


def test_remote_code_needs_the_flag(cli, hf_folder, tmp_path, monkeypatch):
    """auto_map: refused in one line naming --trust-remote-code, before anything runs; with the flag, the
    folder's own class is built."""
    import sys

    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))  # where transformers copies the code
    monkeypatch.setattr(sys, "path", list(sys.path))
    folder = _copy(hf_folder("llama")[0], tmp_path)
    (folder / "modeling_tiny.py").write_text(
        "from transformers import LlamaForCausalLM\n\n\nclass TinyForCausalLM(LlamaForCausalLM):\n    pass\n")
    config = json.loads((folder / "config.json").read_text())
    config.update(architectures=["TinyForCausalLM"], auto_map={"AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    res = cli("build", folder, "--out", tmp_path / "o")
    assert res.code == 2
    line = error_line(res)
    assert "auto_map: modeling_tiny.TinyForCausalLM" in line and "--trust-remote-code" in line
    assert not (tmp_path / "o").exists() and not (tmp_path / "modules").exists()
    res = cli("inspect", folder, "--trust-remote-code", "--json", "-q")
    assert res.code == 0, res.err
    assert "TinyForCausalLM" in json.loads(res.out)["module_histogram"]


def test_pickle_only_folder_refused(cli, hf_folder, tmp_path):
    folder = _copy(hf_folder("llama")[0], tmp_path)
    state = {k: v.clone() for k, v in hf_folder("llama")[1].state_dict().items()}
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    res = cli("build", folder, "--out", tmp_path / "o")
    assert res.code == 2
    line = error_line(res)
    assert "only as pytorch_model.bin, a pickle" in line and "--trust-pickle" in line
    assert not (tmp_path / "o").exists()
    from exporter.loading import load_model

    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(4))
    loaded = load_model(folder, trust_pickle=True)  # trusted: transformers reads the .bin
    torch.testing.assert_close(_logits(loaded.module.model, ids), _logits(hf_folder("llama")[1], ids), rtol=0, atol=0)


def test_export_step_folder_gets_kv_caches(cli, hf_folder, tmp_path):
    """export-step takes the folder like the other commands; GPT-2's softmax attention layers carry KV caches
    (tests/test_hf_step.py has the other models and the refusals)."""
    folder, _ = hf_folder("gpt2")
    res = cli("export-step", folder, "--shapes", "input_ids:min=1x1,opt=1x8,max=2x16", "--out", tmp_path / "s.onnx",
              "--length", "16", "--chunk-max", "4", "--json", "-q")
    assert res.code == 0, res.err[-3000:]
    report = json.loads(res.out)
    assert [s["input"] for s in report["step"]["states"]] == ["past_key_0", "past_value_0", "past_key_1",
                                                              "past_value_1"]
    assert report["parity"]["ok"] and (tmp_path / "s.onnx").is_file()


def test_folder_without_config_refused(cli, tmp_path):
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "notes.txt").write_text("x")
    res = cli("build", tmp_path / "weights", "--out", tmp_path / "o")
    assert res.code == 2
    assert "folder without a config.json" in error_line(res)


def test_factory_with_folder_refused(cli, hf_folder):
    res = cli("inspect", hf_folder("llama")[0], "--factory", "samples.models:lowrank_mlp")
    assert res.code == 2
    assert "Hugging Face folder, which builds its model from config.json, not --factory" in error_line(res)


def test_safetensors_state_dict_with_factory(cli, tmp_path):
    """A safetensors state dict outside a Hugging Face folder loads into the model --factory builds."""
    import samples
    from safetensors.torch import save_file

    model = samples.get("lowrank_mlp").factory()
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    res = cli("inspect", tmp_path / "w.safetensors", "--factory", "samples.models:lowrank_mlp", "--json", "-q")
    assert res.code == 0, res.err
    assert json.loads(res.out)["kind"] == "state-dict"
    res = cli("inspect", tmp_path / "w.safetensors")
    assert res.code == 2 and "is a state dict" in error_line(res)


@pytest.mark.parametrize("given", ["input_ids", "attention_mask"])
def test_shapes_of_one_input_set_both(given):
    """--shapes for the tokens or for their padding mask alone: the other takes the same range."""
    from torch import nn

    from exporter.loading import LoadedModel
    from exporter.loading.huggingface import default_specs
    from exporter.pipeline import resolve_specs

    config = transformers.LlamaConfig(**TINY, max_position_embeddings=2048)
    loaded = LoadedModel(nn.Identity(), "huggingface", "x", inferred_specs=default_specs(config, []))
    assert [(s.min, s.max) for s in loaded.inferred_specs] == [((1, 1), (4, 2048))] * 2
    specs = resolve_specs(loaded, (), (f"{given}:min=1x3,opt=2x9,max=3x40",))
    by_name = {s.name: s for s in specs}
    assert {n: (s.min, s.opt, s.max, s.dtype) for n, s in by_name.items()} == {
        "input_ids": ((1, 3), (2, 9), (3, 40), "int64"), "attention_mask": ((1, 3), (2, 9), (3, 40), "int64")}
    assert by_name["input_ids"].high == 127 and by_name["attention_mask"].mask_for == "input_ids"
