"""Every transformers architecture lrexport serves, built the way a user has it: a ``save_pretrained`` folder
(config.json + model.safetensors, tiny configs of tests/hf_tiny_models.py, no downloads) and
``lrexport build FOLDER``: inputs ``input_ids`` + ``attention_mask`` (parity feeds left/right-padded masks),
output ``logits``, the sequence dynamic from 1 token to 130, parity at min/opt/max/odd, and a graph whose node
count does not depend on the example's length.

These run in-process with fla importable (a test dependency), so transformers binds fla's Triton kernels
(no CPU path) into Qwen3-Next, Qwen3.5, OLMo-hybrid and Kimi-Linear; ``test_builds_without_fla`` builds them
where ``fla`` cannot be imported, so transformers binds its own torch code instead. The patches' equality with
transformers' own code, layer by layer: tests/test_hf_patches.py, tests/test_hf_recurrences.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Callable

import onnx
import pytest
import torch

transformers = pytest.importorskip("transformers")

import hf_tiny_models as hf  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MAX = 130
SHAPES = f"input_ids:min=1x1,opt=2x70,max=4x{MAX}"  # 70 > 64: transformers' gated-delta chunk


def _lfm2() -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.Lfm2ForCausalLM(transformers.Lfm2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=hf.VOCAB, max_position_embeddings=128, layer_types=["conv", "full_attention"]))


def _tiny(name: str) -> Callable[[], torch.nn.Module]:
    return lambda: getattr(hf, name)().lm


# name -> (the transformers model, how many of its layers become lrexport's linear-attention op).
ARCHS: dict[str, tuple[Callable[[], torch.nn.Module], int]] = {
    "qwen3_5": (_tiny("qwen3_5_lm"), 1),
    "qwen3_next": (_tiny("qwen3_next_lm"), 1),  # MoE MLPs
    "olmo_hybrid": (_tiny("olmo_hybrid_lm"), 1),
    "kimi_linear": (_tiny("kimi_linear_lm"), 1),
    "minimax": (_tiny("minimax_lm"), 1),
    "mamba2": (_tiny("mamba2_lm"), 2),
    "bamba": (_tiny("bamba_lm"), 1),
    "falcon_h1": (_tiny("falcon_h1_lm"), 2),  # each layer has a Mamba-2 mixer beside its attention
    "nemotron_h": (_tiny("nemotron_h_lm"), 1),
    "granite_moe_hybrid": (_tiny("granite_moe_hybrid_lm"), 1),
    "zamba2": (_tiny("zamba2_lm"), 2),  # the hybrid layer has a Mamba-2 mixer too
    "jamba": (_tiny("jamba_lm"), 1),
    "mamba": (_tiny("mamba_lm"), 2),
    "falcon_mamba": (_tiny("falcon_mamba_lm"), 2),
    "recurrent_gemma": (_tiny("recurrent_gemma_lm"), 2),
    "lfm2": (_lfm2, 0),  # gated short convolutions and attention: nothing to patch
    "rwkv": (_tiny("rwkv_lm"), 0),  # a torch scan per layer (SCANS)
    "xlstm": (_tiny("xlstm_lm"), 0),
}
# Per-token recurrences that are not the op: one ONNX Scan over positions per layer.
SCANS = {"rwkv": 2, "xlstm": 2}
WITH_ENGINE = {"qwen3_next"}  # built for the default backend too: a TensorRT(-RTX) engine from the portable lowering
# One architecture per kind of patched layer: their graphs are also exported from a 17-token example.
NODE_COUNT = ["qwen3_5", "kimi_linear", "minimax", "mamba2", "mamba", "recurrent_gemma", "rwkv", "xlstm"]
# transformers binds fla's kernels in these when fla is importable.
FLA_BOUND = ["qwen3_5", "kimi_linear"]


@pytest.fixture(scope="session")
def arch_folder(tmp_path_factory):
    """``arch_folder(name)`` -> the folder that architecture's tiny model is saved in (once per session)."""
    base = tmp_path_factory.mktemp("archs")
    builders = {n: b for n, (b, _) in ARCHS.items()}

    def get(name: str) -> Path:
        folder = base / name
        if not folder.is_dir():
            builders[name]().save_pretrained(folder)
        return folder

    return get


def _build(cli, folder: Path, out: Path, engine: bool = False):
    backend = [] if engine else ["--backend", "onnxruntime"]
    return cli("build", folder, "--shapes", SHAPES, *backend, "--out", out, "--json", "-q")


@pytest.fixture(scope="session")
def arch_build(arch_folder, tmp_path_factory):
    """``arch_build(cli, name)`` -> (the build's report, its folder), built once per session."""
    base = tmp_path_factory.mktemp("arch_builds")
    cache: dict[str, tuple[dict, Path]] = {}

    def get(cli, name: str) -> tuple[dict, Path]:
        if name not in cache:
            res = _build(cli, arch_folder(name), base / name, engine=name in WITH_ENGINE)
            assert res.code == 0, res.err[-3000:]
            cache[name] = json.loads(res.out), base / name
        return cache[name]

    return get


def _check_served_from_one(data: dict) -> None:
    inputs = {i["name"]: i for i in data["export"]["inputs"]}
    assert set(inputs) == {"input_ids", "attention_mask"}
    for spec in inputs.values():
        assert spec["min"] == [1, 1] and spec["max"] == [4, MAX] and spec["dynamic_axes"] == [0, 1]
    # no pinned axis, and no guard narrowing the range (e.g. unpatched Mamba-2: "serves only 17..31, 33..47, ...")
    assert not data["export"]["pinned_axes"] and not data["export"]["warnings"]
    cases = {c["case"]: c for c in data["parity"]["results"]}
    assert set(cases) == {"min", "opt", "max", "odd"} and all(c["ok"] for c in cases.values()), cases
    assert cases["min"]["shapes"]["input_ids"] == [1, 1] and cases["max"]["shapes"]["input_ids"] == [4, MAX]
    assert data["parity"]["ok"]


@pytest.mark.parametrize("name", list(ARCHS))
def test_folder_builds_dynamic_from_one_token(cli, arch_build, name):
    """Exit 0; batch 1..4 and sequence 1..130 for both inputs; parity PASS at min/opt/max/odd with padded masks;
    one linear-attention op per recurrent layer."""
    data, out = arch_build(cli, name)
    _check_served_from_one(data)
    assert (data["passes"].get("linear_attention") or {}).get("nodes", 0) == ARCHS[name][1]
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    assert [o.name for o in graph.output] == ["logits"]
    if name in SCANS:  # (elsewhere a Scan may be the portable lowering's loop over chunks, for the engine)
        assert [n.op_type for n in graph.node].count("Scan") == SCANS[name]
    assert (out / "model.engine").is_file() == (name in WITH_ENGINE)


def test_padding_mask_is_applied_as_the_eager_model_does(cli, arch_folder, arch_build):
    """transformers skips its data-dependent all-ones mask check (``torch.all(attention_mask == 1)``) while
    tracing, so the mask stays an input of the graph: the built Qwen3.5 given a left-padded mask gives the eager
    model's logits at the tokens (the gated-DeltaNet layer zeroes padded positions, attention masks them)."""
    import onnxruntime as ort

    from exporter.loading import load_model
    from exporter.patches import reference_patches

    _, out = arch_build(cli, "qwen3_5")
    model = load_model(arch_folder("qwen3_5")).module
    ids = torch.randint(0, hf.VOCAB, (2, 37), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 37, dtype=torch.int64)
    mask[0, :9] = 0  # left padding
    with torch.no_grad(), reference_patches(model):
        ref, unpadded = model(ids, mask)["logits"], model(ids, torch.ones_like(mask))["logits"]
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    keep = mask.bool()
    assert (torch.from_numpy(got)[keep] - ref[keep]).abs().max() < 1e-4
    assert (unpadded[keep] - ref[keep]).abs().max() > 1e-3  # the mask does change the outputs


def _nodes(path: Path) -> int:
    return len(onnx.load(str(path), load_external_data=False).graph.node)


@pytest.mark.parametrize("name", NODE_COUNT)
def test_node_count_does_not_depend_on_the_example_length(cli, arch_folder, arch_build, tmp_path, name):
    """The build exports from a 70-token example; exported from a 17-token one, the graph is the same size
    (a loop over chunks or positions unrolled by the trace would make it grow)."""
    data, out = arch_build(cli, name)
    res = cli("export", arch_folder(name), "--shapes", f"input_ids:min=1x1,opt=1x17,max=4x{MAX}",
              "--out", tmp_path / "short.onnx", "-q")
    assert res.code == 0, res.err[-2000:]
    assert _nodes(tmp_path / "short.onnx") == _nodes(out / "exported.onnx")


@pytest.mark.parametrize("name, cls", [("mamba", "MambaForCausalLM"), ("mamba2", "Mamba2ForCausalLM")])
def test_transformers_class_built_after_another_library_registered_its_model_type(arch_folder, name, cls):
    """fla, once imported (transformers imports it for Qwen3.5's kernels), registers its own Mamba and Mamba2
    under transformers' model types "mamba" and "mamba2". The folder still builds transformers' class with its
    weights (before: fla's Mamba2, which runs Triton, and for Mamba 'transformers cannot build mamba ...
    ignore_mismatched_sizes')."""
    pytest.importorskip("fla")
    import fla  # noqa: F401

    from exporter.loading import load_model

    assert transformers.AutoConfig.for_model(name).__module__.startswith("fla.")  # the Auto registry's answer
    loaded = load_model(arch_folder(name))
    assert type(loaded.module.model) is getattr(transformers, cls)
    ids = torch.randint(0, hf.VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = loaded.module(ids, torch.ones_like(ids))["logits"]
        want = ARCHS[name][0]()(input_ids=ids).logits
    assert torch.equal(got, want)


def test_default_range_warning_only_where_the_default_is_used(arch_folder):
    """A config without a maximum length (Mamba): the default sequence 1..4096 is a warning, and none where
    --shapes chose the range (the builds above)."""
    from exporter.loading import load_model
    from exporter.pipeline import resolve_specs

    loaded = load_model(arch_folder("mamba"))
    resolve_specs(loaded, (), (SHAPES,))
    assert loaded.notes == []
    resolve_specs(loaded, (), ())
    assert loaded.notes == ["config.json names no maximum sequence length: using 1..4096; choose it with --shapes"]


def _bound() -> dict[str, str]:
    """The module of the implementation transformers bound behind each Qwen3.5 / Kimi-Linear kernel function."""
    from transformers.models.kimi_linear import modeling_kimi_linear as mk
    from transformers.models.qwen3_5 import modeling_qwen3_5 as mq

    kernels = (mq.torch_chunk_gated_delta_rule, mq.torch_recurrent_gated_delta_rule, mk.chunk_kimi_delta_attention,
               mk.recurrent_kimi_delta_attention)
    cells = [dict(zip(f.__code__.co_freevars, (c.cell_contents for c in f.__closure__ or ()))) for f in kernels]
    return {f.__name__: c["implementation"].__module__ for f, c in zip(kernels, cells)}


def test_fla_is_bound_in_process():
    """What the in-process builds above run against: fla importable, its Triton kernels bound by transformers."""
    pytest.importorskip("fla")
    assert all(m.startswith("fla.ops.") for m in _bound().values()), _bound()


# Imported before transformers: every finder on sys.meta_path stops finding ``fla`` (as if not installed), so
# transformers' kernel decorators fall back to its torch code.
NO_FLA = """
import sys
class NoFla:
    def __init__(self, finder):
        self.finder = finder
    def find_spec(self, name, path=None, target=None):
        if name == "fla" or name.startswith("fla."):
            return None
        return self.finder.find_spec(name, path, target)
    def __getattr__(self, attr):
        return getattr(self.finder, attr)
sys.meta_path[:] = [NoFla(f) for f in sys.meta_path]
"""


def test_builds_without_fla(arch_folder, tmp_path):
    """Where fla cannot be imported, transformers runs its own torch code in the layers fla serves otherwise;
    the same folders build with parity PASS."""
    import os

    folders = [str(arch_folder(n)) for n in FLA_BOUND]
    script = NO_FLA + f"""
import json, importlib.util
from exporter.cli import main
assert importlib.util.find_spec("fla") is None
from test_hf_architectures import _bound
assert all(m.startswith("transformers.models.") for m in _bound().values()), _bound()
for i, folder in enumerate({folders!r}):
    try:
        main(["build", folder, "--shapes", {SHAPES!r}, "--backend", "onnxruntime",
              "--out", {str(tmp_path)!r} + f"/o{{i}}", "--json", "-q"])
    except SystemExit as exc:
        assert not exc.code, exc.code
assert not any(m == "fla" or m.startswith("fla.") for m in sys.modules)
"""
    path = [str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    res = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for i, name in enumerate(FLA_BOUND):
        data = json.loads((tmp_path / f"o{i}" / "report.json").read_text())
        assert data["parity"]["ok"], name
        assert {c["case"] for c in data["parity"]["results"]} == {"min", "opt", "max", "odd"}
        _check_served_from_one(data)


def test_a_pinned_sequence_pins_its_padding_mask_too(cli, arch_folder, tmp_path):
    """xLSTM without lrexport's patches: transformers' chunk loop pins the sequence at the example's 16 tokens
    (one warning, exit 0). The attention mask is the same axis, so it is pinned with it: before, it kept 1..64
    and parity fed 16 tokens with masks of 1, 64 and 11 positions."""
    res = cli("build", arch_folder("xlstm"), "--no-patches", "--shapes", "input_ids:min=1x1,opt=1x16,max=2x64",
              "--backend", "onnxruntime", "--out", tmp_path / "o", "--json", "-q")
    assert res.code == 0, res.err[-3000:]
    data = json.loads(res.out)
    assert [(p["input"], p["axis"], p["size"]) for p in data["export"]["pinned_axes"]] == [("input_ids", 1, 16)]
    inputs = {i["name"]: (i["min"], i["max"]) for i in data["export"]["inputs"]}
    assert inputs == {"input_ids": ([1, 16], [2, 16]), "attention_mask": ([1, 16], [2, 16])}
    for case in data["parity"]["results"]:
        assert case["shapes"]["input_ids"] == case["shapes"]["attention_mask"], case
