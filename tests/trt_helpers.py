"""Shared helpers for the TensorRT tests: ONNX export of the samples (cached per session by the tests'
module-scoped fixtures), hand-built ONNX graphs, and a patched copy of tensorrt-stubs for mypy.

``python tests/trt_helpers.py stubs`` writes the patched stubs to .work/mypy-stubs (what mypy.ini reads).
"""

from __future__ import annotations

import re
import sys
import sysconfig
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

STUBS_DIR = ROOT / ".work" / "mypy-stubs"


# ------------------------------------------------------------------------------------- mypy stubs

def _split_params(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur)
    return parts


_DEF = re.compile(r"^(\s*def \w+\()(.*)(\)\s*->.*:\s*)$")


def _fix_stub_line(line: str) -> str:
    """tensorrt-stubs 10.13 has a few lines Python cannot parse: a parameter named ``in`` and a parameter
    without default after defaulted ones (``add_scale_nd``). Fix those; leave everything else as is."""
    m = _DEF.match(line)
    if not m:
        return line
    params = _split_params(m.group(2))
    seen_default, changed = False, False
    for i, p in enumerate(params):
        name = p.split(":")[0].strip()
        if name == "in":
            p = p.replace("in", "in_", 1)
            changed = True
        if "=" in p:
            seen_default = True
        elif seen_default and name not in ("*", "/") and not name.startswith("*"):
            p = p.rstrip() + " = ..."
            changed = True
        params[i] = p
    return f"{m.group(1)}{','.join(params)}{m.group(3)}" if changed else line


def write_patched_stubs(dest: Path = STUBS_DIR) -> Path:
    """Copy tensorrt-stubs' .pyi files to ``dest`` with the unparseable lines fixed."""
    site = Path(sysconfig.get_paths()["purelib"])
    found = False
    for pkg in ("tensorrt", "tensorrt_bindings"):
        for src in sorted((site / pkg).glob("*.pyi")):
            found = True
            out = dest / pkg / src.name
            out.parent.mkdir(parents=True, exist_ok=True)
            text = "\n".join(_fix_stub_line(line) for line in src.read_text().split("\n"))
            if not out.is_file() or out.read_text() != text:
                out.write_text(text)
    if not found:
        raise FileNotFoundError(f"tensorrt-stubs not installed in {site} (pip install --no-deps tensorrt-stubs)")
    return dest



# ------------------------------------------------------------------------------------- ONNX export

import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

_EXPORT_DIR: Path | None = None
_EXPORTED: dict[str, Path] = {}

BUILD_SAMPLES = ("lowrank_mlp", "causal_block", "causal_lm", "linformer_encoder")


def export_dir() -> Path:
    """One folder per test process holding the exported ONNX files (shared by all TensorRT test modules)."""
    global _EXPORT_DIR
    if _EXPORT_DIR is None:
        _EXPORT_DIR = Path(tempfile.mkdtemp(prefix="lrexport-trt-onnx-"))
        atexit.register(shutil.rmtree, _EXPORT_DIR, True)
    return _EXPORT_DIR


def sample_specs(name: str) -> list:
    from exporter.specs import build_specs
    from samples import SAMPLES

    s = SAMPLES[name]
    return build_specs(s.inputs, s.shapes)


def export_model(model, specs: Sequence, path: Path) -> Path:
    """torch.onnx.export (dynamo, opset 18) with dynamic axes from the spec ranges; writes path + path.data."""
    import torch

    args, dynamic = [], {}
    for spec in specs:
        shape = spec.export_shape()
        if spec.dtype.startswith("int"):
            hi = int(spec.high) if spec.high is not None else 10
            args.append(torch.randint(0, hi + 1, shape, dtype=getattr(torch, spec.dtype)))
        else:
            args.append(torch.randn(shape, dtype=getattr(torch, spec.dtype)))
        dynamic[spec.name] = {ax: torch.export.Dim(f"{spec.name}_{ax}", min=spec.min[ax], max=spec.max[ax])
                              for ax in spec.dynamic_axes}
    torch.onnx.export(model, tuple(args), str(path), dynamo=True, dynamic_shapes=dynamic,
                      input_names=[s.name for s in specs], opset_version=18, verbose=False)
    return path


def exported_sample(name: str) -> Path:
    """The sample exported once per test process (cached)."""
    if name not in _EXPORTED:
        from samples import SAMPLES

        _EXPORTED[name] = export_model(SAMPLES[name].factory(), sample_specs(name), export_dir() / f"{name}.onnx")
    return _EXPORTED[name]


def cast_copy(onnx_path: Path, precision: str) -> tuple[Path, dict]:
    """``onnx_path`` cast to fp16/bf16 by the precision cast (once per test process): the engine builder
    takes models as they are, so low-precision engines are built from a cast copy, as `lrexport build` does."""
    from graph_passes.precision_cast import cast_precision_file

    key = f"{onnx_path.stem}.{precision}"
    if key not in _CAST:
        target = export_dir() / f"{key}.onnx"
        _CAST[key] = (target, cast_precision_file(onnx_path, target, precision))
    return _CAST[key]


_CAST: dict[str, tuple[Path, dict]] = {}


def chunked_causal_model(d: int = 64, heads: int = 2, chunk: int = 16):
    """Chunked causal linear attention: pads n up to a multiple of ``chunk`` inside the graph, reshapes to
    (b, n/chunk, chunk, ...), masked attention within chunks plus an exclusive CumSum of chunk states."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    class ChunkedCausal(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.h, self.c = heads, chunk
            self.qkv = nn.Linear(d, 3 * d)
            self.out = nn.Linear(d, d)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, n, dm = x.shape
            C, h = self.c, self.h
            x = F.pad(x, (0, 0, 0, (C - n % C) % C))
            g = x.shape[1] // C
            q, k, v = self.qkv(x).reshape(b, g, C, 3, h, dm // h).unbind(3)
            q, k = F.elu(q) + 1, F.elu(k) + 1
            mask = torch.tril(torch.ones(C, C, dtype=x.dtype))
            att = torch.einsum("bgihd,bgjhd->bghij", q, k) * mask
            intra = torch.einsum("bghij,bgjhe->bgihe", att, v)
            kv = torch.einsum("bgjhd,bgjhe->bghde", k, v)
            state = torch.cumsum(kv, dim=1) - kv  # exclusive over chunks
            ksum = k.sum(2)
            z = torch.cumsum(ksum, dim=1) - ksum
            inter = torch.einsum("bgihd,bghde->bgihe", q, state)
            den = att.sum(-1).permute(0, 1, 3, 2) + torch.einsum("bgihd,bghd->bgih", q, z)
            out = (intra + inter) / (den.unsqueeze(-1) + 1e-6)
            return self.out(out.reshape(b, g * C, dm)[:, :n])

    torch.manual_seed(0)
    return ChunkedCausal().eval()


def exported_chunked() -> tuple[Path, list]:
    from exporter.specs import InputSpec

    specs = [InputSpec("x", "float32", (1, 1, 64), (2, 100, 64), (3, 300, 64))]
    if "chunked" not in _EXPORTED:
        _EXPORTED["chunked"] = export_model(chunked_causal_model(), specs, export_dir() / "chunked.onnx")
    return _EXPORTED["chunked"], specs


# ------------------------------------------------------------------------------ hand-built graphs

def unparseable_model(path: Path) -> Path:
    """x -> Relu('relu_in') -> Det('det_node') -> Foo('custom_foo', domain lrexport.test) -> y."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu_in"),
             helper.make_node("Det", ["r"], ["d"], name="det_node"),
             helper.make_node("Foo", ["d"], ["y"], name="custom_foo", domain="lrexport.test")]
    graph = helper.make_graph(nodes, "bad", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                    helper.make_opsetid("lrexport.test", 1)])
    onnx.save(model, str(path))
    return path


def ln_softmax_model():
    """x[b,n,16] -> LayerNorm -> MatMul -> Div(const) -> Softmax -> MatMul -> y: a small cast test graph."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "w2"),
             numpy_helper.from_array(np.ones(16, np.float32), "ln_scale"),
             numpy_helper.from_array(np.zeros(16, np.float32), "ln_bias"),
             numpy_helper.from_array(np.array(4.0, np.float32), "scale")]
    nodes = [helper.make_node("LayerNormalization", ["x", "ln_scale", "ln_bias"], ["ln"], name="ln", axis=-1),
             helper.make_node("MatMul", ["ln", "w1"], ["h"], name="mm1"),
             helper.make_node("Div", ["h", "scale"], ["logits"], name="scale_div"),
             helper.make_node("Softmax", ["logits"], ["p"], name="softmax", axis=-1),
             helper.make_node("MatMul", ["p", "w2"], ["y"], name="mm2")]
    graph = helper.make_graph(nodes, "ln_softmax",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "n", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "n", 16])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def stray_temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.endswith(".tmp")]


if __name__ == "__main__":
    if sys.argv[1:] == ["stubs"]:
        print(write_patched_stubs())
    else:
        print("usage: python tests/trt_helpers.py stubs")
