"""Real models that fail for reasons of their own (or of torch's), each told as one line that says what
happened, instead of an internal error, a torch traceback or advice that does not fit."""

from __future__ import annotations

import re
import subprocess
import sys
from typing import List

import pytest
import torch
from torch import nn

from conftest import ROOT, error_line
import third_party_models as tpm


def lrexport(*args: str, cwd) -> tuple[int, list[str]]:
    """``lrexport ARGS`` in a fresh Python (nothing imported but what lrexport imports; torch's own log
    handlers write to the real stderr there): exit code and stderr lines."""
    res = subprocess.run([sys.executable, "-m", "exporter.cli", *args], cwd=cwd, capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2"})
    return res.returncode, res.stderr.strip().splitlines()


def one_error(lines: list[str]) -> str:
    """The error line, checking that only progress lines came before it."""
    assert lines and lines[-1].startswith("error: "), lines
    assert all(re.match(r"^ *\d+\.\ds \[\w+\] ", ln) for ln in lines[:-1]), lines
    return lines[-1]


class RnnLinearAttention(nn.Module):
    """The RNN form of causal linear attention: a Python loop over positions carrying the running sums,
    the outputs collected in a list (what `torch.jit.script` keeps as a loop)."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.nn.functional.elu(self.q(x)) + 1
        k = torch.nn.functional.elu(self.k(x)) + 1
        v = self.v(x)
        b, n, d = x.shape
        s = torch.zeros(b, d, d, dtype=x.dtype)
        z = torch.zeros(b, d, dtype=x.dtype)
        outs: List[torch.Tensor] = []
        for i in range(n):
            s = s + k[:, i, :, None] * v[:, i, None, :]
            z = z + k[:, i]
            outs.append(torch.einsum("bd,bde->be", q[:, i], s) / (q[:, i] * z).sum(-1, keepdim=True))
        return torch.stack(outs, 1)


def test_scripted_rnn_loop_builds_and_says_why_torchscript_fell_back(cli, tmp_path):
    """The TorchScript exporter writes the list as SequenceEmpty/SequenceInsert in a Loop; the cleanup pass
    kept it a sequence (it was turned into a tensor: exit 3), and the fallback warning gives torch's reason."""
    torch.manual_seed(0)
    path = tmp_path / "rnn.pt"
    torch.jit.save(torch.jit.script(RnnLinearAttention().eval()), str(path))
    res = cli("build", path, "--out", tmp_path / "o", "--backend", "onnxruntime", "--input", "x:1x8x16",
              "--shapes", "x:min=1x1x16,opt=1x8x16,max=2x24x16")
    assert res.code == 0, res.err
    assert "prim::Loop currently cannot run with dynamic value of number of iterations" in res.out
    assert "parity: PASS" in res.out and "Skipping constant folding" not in res.err


def test_an_archive_with_a_grad_mode_switch_names_it(cli, tmp_path):
    """linformer-pytorch with activation checkpointing (checkpoint_level="C1"): torch.export writes a
    wrap_with_set_grad_enabled node that torch.export.load of the same torch cannot read back."""
    pytest.importorskip("linformer_pytorch")
    from linformer_pytorch import Linformer

    torch.manual_seed(0)
    model = Linformer(input_size=64, channels=32, dim_k=16, dim_ff=64, nhead=2, depth=1, dropout=0.0,
                      dropout_ff=0.0, checkpoint_level="C1").eval()
    ep = torch.export.export(model, (torch.randn(2, 64, 32),),
                             dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4)},))
    torch.export.save(ep, str(tmp_path / "linformer.pt2"))
    code, lines = lrexport("build", "linformer.pt2", cwd=tmp_path)
    line = one_error(lines)  # torch's logged traceback is not printed
    assert code == 2 and not (tmp_path / "linformer.lrexport").exists()
    assert "wrap_with_set_grad_enabled" in line and "torch.utils.checkpoint" in line and "--factory" in line
    assert "re-save it" not in line


def test_moe_archive_names_the_op_transformers_registers(tmp_path):
    """A transformers MoE model exports its experts as transformers::grouped_mm_fallback, an op that exists
    only once transformers is imported: loading the archive in a fresh Python (lrexport never imports
    transformers) names the op and the library, instead of 're-save it with torch.export.save'."""
    pytest.importorskip("transformers")
    from transformers import Qwen3MoeConfig, Qwen3MoeModel

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            cfg = Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=4,
                                 num_experts_per_tok=2, moe_intermediate_size=16)
            self.model = Qwen3MoeModel(cfg)

        def forward(self, ids):
            return self.model(input_ids=ids, use_cache=False).last_hidden_state

    torch.manual_seed(0)
    ep = torch.export.export(Wrap().eval(), (torch.randint(0, 64, (1, 8)),),
                             dynamic_shapes=({1: torch.export.Dim("seq", min=2, max=32)},), strict=False)
    assert any("grouped_mm_fallback" in str(n.target) for n in ep.graph.nodes)
    torch.export.save(ep, str(tmp_path / "moe.pt2"))
    code, lines = lrexport("inspect", "moe.pt2", cwd=tmp_path)
    assert code == 2 and len(lines) == 1, lines
    assert "custom op transformers::grouped_mm_fallback" in lines[0] and "(transformers)" in lines[0], lines[0]


def test_archive_missing_a_weight_is_one_line(sample_file, tmp_path):
    """torch.export.load logs its error with the whole traceback (~20 lines) before raising a generic one:
    lrexport prints only its own line, naming the missing member."""
    import zipfile

    with zipfile.ZipFile(sample_file("lowrank_mlp")) as src, zipfile.ZipFile(tmp_path / "m.pt2", "w") as dst:
        weights = [n for n in src.namelist() if "/data/weights/" in n and not n.endswith(".json")]
        for name in src.namelist():
            if name != weights[0]:
                dst.writestr(src.getinfo(name), src.read(name))
    code, lines = lrexport("build", "m.pt2", "--out", "o", cwd=tmp_path)
    assert code == 2 and "has no member" in one_error(lines) and weights[0].split("/", 1)[1] in lines[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt2"]


@pytest.mark.parametrize("name", ["fla_layer", "transformers_with_fla"])
def test_triton_kernels_on_the_cpu(name, cli, tmp_path, monkeypatch):
    """fla's layers, and transformers' Qwen3-Next when fla is installed, run Triton kernels, which find no
    GPU driver on this machine: the error says so, not "check --input names, shapes and dtypes" (with
    --no-patches: lrexport's patches run transformers' torch code instead)."""
    pytest.importorskip("fla")
    monkeypatch.chdir(tmp_path)
    if name == "fla_layer":
        res = cli("build", "--factory", "third_party_models:fla_linear_attention", "--no-patches",
                  "--input", "x:1x32x64", "--out", "o", "--backend", "onnxruntime")
    else:
        res = cli("build", "--factory", "third_party_models:qwen3_next_tiny", "--input", "ids:1x8:int64:0..63",
                  "--no-patches", "--out", "o", "--backend", "onnxruntime")
    line = error_line(res)
    assert res.code == 2 and "runs Triton kernels (fla)" in line and "no CPU path" in line, line
    assert "--input" not in line and not (tmp_path / "o").exists()
