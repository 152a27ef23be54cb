"""Step models of softmax-attention models: ``lrexport export-step`` carries each softmax attention's keys and
values as a KV cache (``past_key_<j>``/``past_value_<j>`` in, ``present_key_<j>``/``present_value_<j>`` out,
graph_passes/kv_cache.py) next to the recurrent states of the hybrids' other layers.

Real torch.export, real ONNX Runtime: a hand-written causal softmax attention (and two that hide earlier keys,
refused), the tiny Hugging Face hybrids of tests/hf_tiny_models.py and save_pretrained folders (LFM2, Llama).
Each export-step runs parity token by token and in chunks against PyTorch at 1, 63, 64, 65 and 130 tokens,
states compared with the full-sequence export's values of them.
"""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import error_line
from exporter.errors import LrexportError
from exporter.recurrent import initial_states, read_step_info, run_stepwise, step_specs

pytest.importorskip("transformers")

from test_hf_architectures import arch_folder  # noqa: E402,F401  (save_pretrained folders of every architecture)
from test_hf_folders import hf_folder  # noqa: E402,F401  (the session fixture of save_pretrained folders)

ROOT = Path(__file__).resolve().parents[1]
D, H, DK = 16, 2, 8


class TinyAttention(nn.Module):
    """x -> q, k, v (2 heads of 8, rotary-free) -> softmax(q k^T / sqrt(dk) + mask) v -> out projection.
    ``mask``: "causal" (tril), "window" (causal, only the last 4 keys), "none" (every key: not causal)."""

    def __init__(self, mask: str):
        super().__init__()
        self.mask = mask
        self.qkv = nn.Linear(D, 3 * H * DK)
        self.out = nn.Linear(H * DK, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (z.reshape(b, t, H, DK).transpose(1, 2) for z in self.qkv(x).chunk(3, dim=-1))
        scores = q @ k.transpose(-1, -2) / math.sqrt(DK)
        pos = torch.arange(t)
        if self.mask != "none":
            hidden = pos[None, :] > pos[:, None]
            if self.mask == "window":
                hidden = hidden | (pos[None, :] < pos[:, None] - 3)
            scores = scores.masked_fill(hidden, float("-inf"))
        y = torch.softmax(scores, dim=-1) @ v
        return self.out(y.transpose(1, 2).reshape(b, t, H * DK))


def tiny_attention(mask: str = "causal") -> nn.Module:
    torch.manual_seed(0)
    return TinyAttention(mask).eval()


def _tiny(cli, out, mask, *extra):
    return cli("export-step", "--factory", "test_hf_step:tiny_attention", "--factory-kwargs",
               json.dumps({"mask": mask}), "--input", "x:2x20x16:float32", "--shapes",
               "x:min=1x1x16,opt=2x20x16,max=2x130x16", "--out", out, "--chunk-max", "16", "--length", "40",
               *extra)


def test_kv_cache_of_a_causal_softmax_attention(cli, tmp_path):
    """The Softmax over the keys gets a KV cache: keys (batch x heads x dk x past, as the scores MatMul reads
    them) and values (batch x heads x past x dk); parity token by token and in chunks, caches compared with the
    full model's keys/values; a sequence continues from the caches, at the position they say."""
    out = tmp_path / "step.onnx"
    try:  # TensorRT-RTX builds without a GPU: the engine's profile takes the caches' past axis 0 .. 130 - 16
        import tensorrt_rtx  # noqa: F401
        engine = ["--engine"]
    except ImportError:
        engine = []
    res = _tiny(cli, out, "causal", "--json", "-q", *engine)
    assert res.code == 0, res.err[-3000:]
    report = json.loads(res.out)
    if engine:
        assert out.with_suffix(".engine").is_file()
        assert {"past_key_0", "past_value_0"} <= {i["name"] for i in report["engine"]["inputs"]}
    specs = {s.name: s for s in step_specs(read_step_info(out), (1, 2), (1, 16))}
    assert (specs["past_key_0"].min, specs["past_key_0"].max) == ((1, H, DK, 0), (2, H, DK, 114))
    states = {s["input"]: s for s in report["step"]["states"]}
    assert set(states) == {"past_key_0", "past_value_0"}
    assert states["past_key_0"]["shape"] == ["batch", H, DK, "past"] and states["past_key_0"]["kind"] == "kv-cache"
    assert states["past_value_0"]["shape"] == ["batch", H, "past", DK]
    assert report["parity"]["ok"]
    checked = {(r["length"], r["chunk"]) for r in report["parity"]["results"] + report["parity"]["runs"]}
    assert {(130, 1), (130, 7), (65, 16), (64, 16), (63, 7)} <= checked
    names = {o["output"] for r in report["parity"]["results"] for o in r["outputs"]}
    assert {"present_key_0", "present_value_0"} <= names

    info = read_step_info(out)
    x = np.random.default_rng(0).standard_normal((2, 15, D)).astype(np.float32)
    with torch.no_grad():
        expected = tiny_attention("causal")(torch.from_numpy(x)).numpy()
    first = run_stepwise(info, {"x": x[:, :10]}, chunk=4)
    caches = {"past_key_0": first["present_key_0"], "past_value_0": first["present_value_0"]}
    assert caches["past_key_0"].shape == (2, H, DK, 10) and caches["past_value_0"].shape == (2, H, 10, DK)
    rest = run_stepwise(info, {"x": x[:, 10:]}, chunk=1, states=caches, position=10)
    got = np.concatenate([first[info.outputs[0]], rest[info.outputs[0]]], axis=1)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-4)
    assert initial_states(info, 3)["past_key_0"].shape == (3, H, DK, 0)
    with pytest.raises(LrexportError, match="position 3 is not the 10 tokens the KV caches hold"):
        run_stepwise(info, {"x": x[:, 10:]}, chunk=1, states=caches, position=3)


@pytest.mark.parametrize("mask", ["window", "none"])
def test_softmax_hiding_earlier_keys_or_seeing_later_ones_refused(cli, tmp_path, mask):
    """A sliding window hides earlier keys, no mask shows later ones: neither has a KV-cache step form. The
    numeric self-check refuses them, one line naming the Softmax, and nothing is written."""
    res = _tiny(cli, tmp_path / "step.onnx", mask, "-q")
    assert res.code == 2, res.err[-3000:]
    line = error_line(res)
    assert "cannot export a step model" in line and "differs from the full model" in line
    assert "(Softmax) gets a KV cache" in line
    assert list(tmp_path.iterdir()) == []


# per model: the kinds of state it carries
HYBRIDS = {
    "qwen3_5_lm": {"conv-window", "linear-attention", "kv-cache"},
    "kimi_linear_lm": {"conv-window", "linear-attention", "kv-cache"},
    "bamba_lm": {"conv-window", "linear-attention", "kv-cache"},
    "mamba2_lm": {"conv-window", "linear-attention"},
}


def _parity_max_abs(parity: dict) -> float:
    return max(o["max_abs"] for r in parity["results"] + parity["runs"] for o in r["outputs"])


@pytest.mark.parametrize("name", list(HYBRIDS))
def test_export_step_hf_hybrid(cli, tmp_path, name):
    """Qwen3.5, Kimi-Linear, Bamba (a recurrent layer, then softmax attention) and Mamba-2: one step model with
    every layer's state, parity PASS token by token and in chunks, states included."""
    res = cli("export-step", "--factory", f"hf_tiny_models:{name}", "--input", "ids:2x40:int64:0..127",
              "--shapes", "ids:min=1x1,opt=2x40,max=2x130", "--out", tmp_path / "step.onnx", "--chunk-max", "16",
              "--length", "40", "--json", "-q")
    assert res.code == 0, res.err[-3000:]
    report = json.loads(res.out)
    assert {s["kind"] for s in report["step"]["states"]} == HYBRIDS[name]
    assert report["parity"]["ok"] and _parity_max_abs(report["parity"]) < 1e-4
    kv = [s for s in report["step"]["states"] if s["kind"] == "kv-cache"]
    assert [s["input"] for s in kv] == (["past_key_0", "past_value_0"] if kv else [])


@pytest.mark.parametrize("name", ["lfm2", "llama"])
def test_export_step_hf_folder(cli, hf_folder, arch_folder, tmp_path, name):  # noqa: F811
    """A save_pretrained folder (input_ids and attention_mask): LFM2 (short convs and attention) and Llama (every
    layer attention) get one KV cache per attention layer; the mask covers the chunk's tokens."""
    folder = arch_folder(name) if name == "lfm2" else hf_folder(name)[0]
    res = cli("export-step", folder, "--shapes", "input_ids:min=1x1,opt=2x40,max=2x130", "--out",
              tmp_path / "step.onnx", "--chunk-max", "16", "--length", "40", "--json", "-q")
    assert res.code == 0, res.err[-3000:]
    report = json.loads(res.out)
    assert report["step"]["inputs"] == ["input_ids", "attention_mask"]
    kv = [s["input"] for s in report["step"]["states"] if s["kind"] == "kv-cache"]
    assert kv == (["past_key_0", "past_value_0"] if name == "lfm2" else
                  ["past_key_0", "past_value_0", "past_key_1", "past_value_1"])
    assert report["parity"]["ok"] and _parity_max_abs(report["parity"]) < 1e-4


def test_readme_kv_cache_example(cli, hf_folder, tmp_path):  # noqa: F811
    """The README's export-step example for a Hugging Face folder, as written (``tiny-llama`` saved first)."""
    import re
    import shutil

    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Step model for autoregressive decoding", 1)[1].split("\n## ", 1)[0]
    (commands,) = [b for b in re.findall(r"```bash\n(.*?)```", section, re.S) if "tiny-llama" in b]
    shutil.copytree(hf_folder("llama")[0], tmp_path / "tiny-llama")
    for line in commands.strip().splitlines():
        argv = shlex.split(line.split("#", 1)[0])
        assert argv[0] == "lrexport"
        res = cli(*argv[1:], "-q", cwd=tmp_path)
        assert res.code == 0, res.err[-3000:]
    info = read_step_info(tmp_path / "step.onnx")
    assert [s.input for s in info.kv_states] == ["past_key_0", "past_value_0", "past_key_1", "past_value_1"]
