"""The portable lowering of ``lrexport.LinearAttention`` (Scan over chunks for the delta rules and a per-key
decay) and the loop-free one (doubling levels instead) parse and build with TensorRT-RTX (which builds on
CPU): one small engine per rule form and lowering."""

from __future__ import annotations

from pathlib import Path

import onnx
import onnx_ir as ir
import pytest

from exporter.specs import build_specs
from exporter.trt_build import build_engine
from graph_passes._base import PassOptions
from graph_passes.linear_attention_loopfree import LinearAttentionLoopFreePass
from graph_passes.linear_attention_portable import LinearAttentionPortablePass
from test_linear_attention_op import _onnx

try:
    import tensorrt_rtx  # noqa: F401
except ImportError as _err:
    _WHY: str | None = f"tensorrt_rtx does not import ({_err}); pip install tensorrt-rtx-cu13"
else:
    _WHY = None


def _specs(proto: onnx.ModelProto) -> list:
    """Each input as exported; the sequence axis (dim 1 of q/k/v/g/beta) ranges 1..256."""
    ins, ranges = [], []
    for vi in proto.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
        if len(dims) >= 2 and dims[1] is None:
            def at(n: int) -> str:
                return "x".join(str(x) for x in [dims[0], n, *dims[2:]])
            ins.append(f"{vi.name}:{at(32)}:float32")
            ranges.append(f"{vi.name}:min={at(1)},opt={at(32)},max={at(256)}")
        else:
            ins.append(f"{vi.name}:{'x'.join(map(str, dims))}:float32")
    return build_specs(ins, ranges)


@pytest.mark.skipif(_WHY is not None, reason=_WHY or "")
@pytest.mark.parametrize("case", ["delta", "gated_delta-head", "gated-key", "gated_delta-key"])
def test_portable_scan_lowering_builds_with_tensorrt_rtx(case: str, tmp_path: Path) -> None:
    model, _ = _onnx(case)
    LinearAttentionPortablePass()(model)
    assert "Scan" in [n.op_type for n in model.graph]
    proto = ir.to_proto(model)
    onnx.save(proto, str(tmp_path / "m.onnx"))
    res = build_engine(tmp_path / "m.onnx", tmp_path / "m.engine", specs=_specs(proto), backend="tensorrt-rtx",
                       opt_level=0)
    assert res.unsupported_nodes == [] and (tmp_path / "m.engine").stat().st_size == res.engine_bytes > 0


@pytest.mark.skipif(_WHY is not None, reason=_WHY or "")
@pytest.mark.parametrize("case", ["delta", "gated-key", "gated_delta-key"])
def test_loop_free_lowering_builds_with_tensorrt_rtx(case: str, tmp_path: Path) -> None:
    """No Scan or Loop: levels sized for the profile's max of 256 positions."""
    model, _ = _onnx(case)
    LinearAttentionLoopFreePass(PassOptions(max_positions=256))(model)
    assert not {"Scan", "Loop"} & {n.op_type for n in model.graph.all_nodes()}
    proto = ir.to_proto(model)
    onnx.save(proto, str(tmp_path / "m.onnx"))
    res = build_engine(tmp_path / "m.onnx", tmp_path / "m.engine", specs=_specs(proto), backend="tensorrt-rtx",
                       opt_level=0)
    assert res.unsupported_nodes == [] and (tmp_path / "m.engine").stat().st_size == res.engine_bytes > 0
