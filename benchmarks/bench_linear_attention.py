"""``lrexport::linear_attention`` per rule: its lowerings on ONNX Runtime CPU and PyTorch eager, one process a case.

    .venv/bin/python benchmarks/bench_linear_attention.py [--ns 1024,4096] [--repeats 5] [--rules ...]

Rules: linear, gated (per-head decay), gated (per-key decay), delta, gated_delta (per-head decay); batch 1,
8 heads, head dim 64, scale 64^-0.5. The model takes raw inputs and makes them what the rules expect, as
real layers do (log decay ``logsigmoid(g)``, ``beta = sigmoid(beta)``, unit keys for the delta rules),
so every process can feed the same seeded standard-normal inputs (benchmarks/_bench_case.py: make_feeds).
Variants, each timed in its own process (median latency, peak RSS = VmHWM), 2 threads:
 - ort-native: ``LinearAttentionOrtPass`` (``com.microsoft.LinearAttention``);
 - portable: ``LinearAttentionPortablePass`` (standard ops; loop-free for linear / per-head gated,
   a Scan over chunks for the delta rules and per-key decay);
 - loop-free: ``LinearAttentionLoopFreePass`` (the engine form: standard ops with no Scan, the delta rules'
   and per-key decay's chunk-to-chunk state by doubling levels sized for n <= 16384; the others as portable);
 - per-token Scan: the recurrence as written, one ``Scan`` step per position (standard ops);
 - ai-onnx: ``LinearAttentionOnnxPass`` (the standard ``LinearAttention`` op, opset 27; ONNX Runtime 1.32
   runs it through the op's function body, itself a per-token ``Scan``);
 - pytorch: the eager op (chunked, ``torch.no_grad``, OpenMP threads waiting passively like ORT's);
 - ort-op / ort-bare: what the ORT lowering adds to the native node: the op alone on inputs already
   made what the rule expects, lowered by ``LinearAttentionOrtPass`` (its Reshapes included) vs one bare
   ``com.microsoft.LinearAttention`` node fed the same values packed ``(B, T, H*D)``.
Error: max |out - ref| / max(1, max |ref|) against the recurrence token by token in float64 (PyTorch).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

H, D = 8, 64
# name -> (op rule, decay kind)
RULES = {"linear": ("linear", None), "gated-head": ("gated", "head"), "gated-key": ("gated", "key"),
         "delta": ("delta", None), "gated_delta-head": ("gated_delta", "head")}
VARIANTS = ("ort-native", "portable", "loop-free", "per-token-scan", "ai-onnx", "pytorch", "ort-op", "ort-bare")
PREPARED = ("ort-op", "ort-bare")  # variants fed the prepared inputs (prepared_feeds)


def input_shapes(name: str, n: int) -> list[str]:
    rule, decay = RULES[name]
    shapes = [f"{x}=1x{n}x{H}x{D}" for x in "qkv"]
    if decay:
        shapes.append(f"g=1x{n}x{H}" + (f"x{D}" if decay == "key" else ""))
    if rule in ("delta", "gated_delta"):
        shapes.append(f"beta=1x{n}x{H}")
    return shapes


def prepared(name: str, feeds: list):
    """The raw inputs made what the rule expects (the model's first ops): (q, k, v, g, beta)."""
    import torch

    rule, decay = RULES[name]
    q, k, v, *rest = feeds
    g = torch.nn.functional.logsigmoid(rest.pop(0)) if decay else None
    beta = torch.sigmoid(rest.pop(0)) if rule in ("delta", "gated_delta") else None
    if beta is not None:
        k = torch.nn.functional.normalize(k, dim=-1)
    return q, k, v, g, beta


def prepared_feeds(name: str, n: int) -> dict:
    """The seeded inputs made what the rule expects (numpy, (B,T,H[,D])): the ort-op / ort-bare feeds."""
    import torch

    from _bench_case import make_feeds

    feeds = [torch.from_numpy(a) for a in make_feeds(input_shapes(name, n)).values()]
    names = ("q", "k", "v", "g", "beta")
    return {nm: x.numpy() for nm, x in zip(names, prepared(name, feeds)) if x is not None}


def bare_native(name: str):
    """One ``com.microsoft.LinearAttention`` node, inputs packed ``(B, T, H*D)`` (g per head ``(B, T, H)``)."""
    import onnx_ir as ir

    rule, decay = RULES[name]
    f32 = ir.DataType.FLOAT

    def value(nm: str, dims) -> ir.Value:
        return ir.Value(name=nm, type=ir.TensorType(f32), shape=ir.Shape(dims))

    ins = [value(x, ["B", "T", H * D]) for x in "qkv"]
    g = value("g", ["B", "T", H * D if decay == "key" else H]) if decay else None
    beta = value("beta", ["B", "T", H]) if rule in ("delta", "gated_delta") else None
    node_ins = ins + [None, g, beta]
    while node_ins[-1] is None:
        node_ins.pop()
    node = ir.node("LinearAttention", node_ins, {"q_num_heads": H, "kv_num_heads": H, "update_rule": rule,
                                                 "scale": D ** -0.5}, domain="com.microsoft", num_outputs=2)
    node.outputs[0].name, node.outputs[1].name = "out", "state"
    graph = ir.Graph([x for x in ins + [g, beta] if x is not None], list(node.outputs), nodes=[node],
                     opset_imports={"": 21, "com.microsoft": 1}, name="bare")
    return ir.Model(graph, ir_version=10)


def ort_worker(model: str, feeds: str, repeats: int, outputs: str) -> None:
    """Its own process: ORT CPU latency of ``model`` on the npz ``feeds`` (reshaped to the model's input
    ranks: packed for the bare node), settings as ``_bench_case.py``; saves outputs as (B, T, H, D)."""
    import numpy as np
    import onnxruntime as ort

    from _bench_case import _hwm_mb

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    data = np.load(feeds)
    run = {i.name: data[i.name].reshape(*data[i.name].shape[:2], -1) if len(i.shape) == 3 else data[i.name]
           for i in sess.get_inputs()}
    out, state = sess.run(None, run)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, run)
        times.append((time.perf_counter() - t0) * 1e3)
    np.savez(outputs, out.reshape(*out.shape[:2], H, -1), state)
    print(json.dumps({"median_ms": statistics.median(times), "min_ms": min(times), "peak_rss_mb": _hwm_mb()}))


class Layer:
    """``torch.nn.Module`` factory (built lazily so the ORT processes need not import torch)."""

    @staticmethod
    def build(name: str, op_only: bool = False):
        """The layer; ``op_only``: the op alone, its inputs already what the rule expects."""
        import torch

        from exporter.linear_attention import linear_attention

        rule, decay = RULES[name]

        class _Layer(torch.nn.Module):
            def forward(self, *feeds):
                if op_only:
                    q, k, v, *rest = feeds
                    g = rest.pop(0) if decay else None
                    beta = rest.pop(0) if rule in ("delta", "gated_delta") else None
                else:
                    q, k, v, g, beta = prepared(name, list(feeds))
                return linear_attention(q, k, v, g=g, beta=beta, rule=rule, scale=D ** -0.5)

        return _Layer().eval()


def reference64(name: str, feeds: list):
    """The recurrence token by token in float64: (out, final state)."""
    import torch

    q, k, v, g, beta = (None if x is None else x.double() for x in prepared(name, feeds))
    b, t, h, dk = q.shape
    S = torch.zeros(b, h, dk, v.shape[-1], dtype=torch.float64)
    out = torch.empty(b, t, h, v.shape[-1], dtype=torch.float64)
    for i in range(t):
        if g is not None:
            S = S * (g[:, i].exp()[..., None] if g.dim() == 4 else g[:, i].exp()[..., None, None])
        vi = v[:, i]
        if beta is not None:
            vi = beta[:, i, :, None] * (vi - torch.einsum("bhkv,bhk->bhv", S, k[:, i]))
        S = S + k[:, i, ..., None] * vi[..., None, :]
        out[:, i] = D ** -0.5 * torch.einsum("bhkv,bhk->bhv", S, q[:, i])
    return out, S


def per_token_scan(model) -> None:
    """Replace each ``lrexport.LinearAttention`` node (equal head counts, no initial state) by the
    recurrence as written: one ``Scan`` step per position, in standard ops."""
    import numpy as np
    import onnx_ir as ir

    from graph_passes.linear_attention_ort import DOMAIN, OP_TYPE, _attr, _Builder

    f32 = ir.DataType.FLOAT
    for node in [n for n in model.graph if n.domain == DOMAIN and n.op_type == OP_TYPE]:
        q, k, v, g, beta = (list(node.inputs) + [None] * 6)[:5]
        delta = _attr(node, "rule") in ("delta", "gated_delta")
        per_key = _attr(node, "decay", "none") == "key"
        b = _Builder("ref")
        c = b.const
        shp = b.op("Concat", [b.op("Shape", [q], {"start": 0, "end": 1}), c([H, D, D])], {"axis": 0})
        s0 = b.op("ConstantOfShape", [shp], {"value": ir.tensor(np.zeros(1, np.float32))})
        body = _Builder("ref/scan")
        bc = body.const
        names = iter(range(100))

        def val() -> ir.Value:
            return ir.Value(name=f"ref/scan/in{next(names)}", type=ir.TensorType(f32))

        S, qt, kt, vt = val(), val(), val(), val()  # S (B,H,dk,dv); q_t, k_t, v_t (B,H,d)
        gt = val() if g is not None else None
        bt = val() if beta is not None else None
        if gt is not None:  # (B,H) -> (B,H,1,1); (B,H,dk) -> (B,H,dk,1)
            S_dec = body.op("Mul", [S, body.op("Exp", [body.op("Unsqueeze", [gt, bc([-1] if per_key else [-1, -2])])])])
        else:
            S_dec = S
        u = body.op("Unsqueeze", [vt, bc([2])])  # (B,H,1,dv)
        k_row = body.op("Unsqueeze", [kt, bc([2])])  # (B,H,1,dk)
        if bt is not None:
            pred = body.op("MatMul", [k_row, S_dec])
            u = body.op("Mul", [body.op("Unsqueeze", [bt, bc([2, 3])]), body.op("Sub", [u, pred])])
        S_new = body.op("Add", [S_dec, body.op("MatMul", [body.op("Unsqueeze", [kt, bc([3])]), u])])
        o = body.op("Squeeze", [body.op("MatMul", [body.op("Unsqueeze", [qt, bc([2])]), S_new]), bc([2])])
        o = body.op("Mul", [o, bc(np.float32(_attr(node, "scale", 1.0)), np.float32)])
        S_out = body.op("Identity", [S_new])
        for i, n in enumerate(body.nodes):
            for j, out in enumerate(n.outputs):
                out.name = f"ref/scan/v{i}_{j}"
        ins = [S, qt, kt, vt] + [x for x in (gt, bt) if x is not None]
        graph = ir.Graph(ins, [S_out, o], nodes=body.nodes, name="ref_scan_body")
        scans = [q, k, v] + [x for x in (g, beta) if x is not None]
        S_fin, out = b.op("Scan", [s0] + scans, {"body": ir.AttrGraph("body", graph), "num_scan_inputs": len(scans),
                                                 "scan_input_axes": [1] * len(scans), "scan_output_axes": [1]},
                          outputs=2)
        ir.convenience.replace_nodes_and_values(model.graph, node, [node], b.nodes, list(node.outputs), [out, S_fin])


def export(name: str, folder: Path) -> dict[str, Path]:
    """The layer exported once (dynamic sequence), then one model per ONNX Runtime variant."""
    import onnx
    import onnx_ir as ir
    import torch
    from torch.export import Dim

    from _bench_case import make_feeds
    from exporter.linear_attention.onnx_export import TRANSLATION_TABLE
    from graph_passes.linear_attention_onnx import LinearAttentionOnnxPass
    from graph_passes.linear_attention_ort import LinearAttentionOrtPass
    from graph_passes._base import PassOptions
    from graph_passes.linear_attention_loopfree import LinearAttentionLoopFreePass
    from graph_passes.linear_attention_portable import LinearAttentionPortablePass

    shapes = input_shapes(name, 64)
    args = tuple(torch.from_numpy(a) for a in make_feeds(shapes).values())
    t = Dim("T", min=1, max=16384)
    prog = torch.onnx.export(Layer.build(name), args, dynamic_shapes=(tuple({1: t} for _ in args),), dynamo=True,
                             custom_translation_table=TRANSLATION_TABLE, verbose=False,
                             input_names=[s.split("=")[0] for s in shapes])
    raw = prog.model_proto.SerializeToString()
    paths = {}
    pargs = tuple(torch.from_numpy(a) for a in prepared_feeds(name, 64).values())
    names = list(prepared_feeds(name, 1))
    op_prog = torch.onnx.export(Layer.build(name, op_only=True), pargs, dynamic_shapes=(tuple({1: t} for _ in pargs),),
                                dynamo=True, custom_translation_table=TRANSLATION_TABLE, verbose=False, input_names=names)
    op_model = ir.from_proto(op_prog.model_proto)
    LinearAttentionOrtPass()(op_model)
    for variant, model in (("ort-op", op_model), ("ort-bare", bare_native(name))):
        paths[variant] = folder / f"{name}.{variant}.onnx"
        onnx.save(ir.to_proto(model), str(paths[variant]))
    for variant, lower in (("ort-native", lambda m: LinearAttentionOrtPass()(m)),
                           ("portable", lambda m: LinearAttentionPortablePass()(m)),
                           ("loop-free", lambda m: LinearAttentionLoopFreePass(PassOptions(max_positions=16384))(m)),
                           ("per-token-scan", per_token_scan),
                           ("ai-onnx", lambda m: LinearAttentionOnnxPass()(m))):
        model = ir.from_proto(onnx.load_from_string(raw))
        lower(model)
        assert not [n for n in model.graph if n.domain == "lrexport"], (name, variant)
        paths[variant] = folder / f"{name}.{variant}.onnx"
        onnx.save(ir.to_proto(model), str(paths[variant]))
    return paths


def torch_worker(name: str, n: int, repeats: int, outputs: str) -> None:
    """Its own process: PyTorch eager latency of the layer on the seeded inputs; saves its outputs."""
    import numpy as np
    import torch

    from _bench_case import _hwm_mb, make_feeds

    torch.set_num_threads(2)
    feeds = [torch.from_numpy(a) for a in make_feeds(input_shapes(name, n)).values()]
    layer = Layer.build(name)
    with torch.no_grad():
        layer(*feeds)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            layer(*feeds)
            times.append((time.perf_counter() - t0) * 1e3)
        np.savez(outputs, *[t.numpy() for t in layer(*feeds)])
    print(json.dumps({"median_ms": statistics.median(times), "min_ms": min(times), "peak_rss_mb": _hwm_mb()}))


def _run(cmd: list[str]) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])


def summary(rows: list[dict]) -> list[str]:
    """The targets per rule and n: portable <= 3x native and >= 3x faster than the per-token Scan; the ORT
    lowering of the op within 1.2x of the bare native node. From each cell's min, which a busy machine
    perturbs less than the median."""
    cells = {(r["rule"], r["n"], r["variant"]): r["min_ms"] for r in rows}
    lines = []
    for rule, n in dict.fromkeys((r["rule"], r["n"]) for r in rows):
        got = {v: cells.get((rule, n, v)) for v in VARIANTS}
        parts = []
        for label, num, den, ok in (("portable/native", "portable", "ort-native", lambda x: x <= 3),
                                    ("scan/portable", "per-token-scan", "portable", lambda x: x >= 3),
                                    ("op/bare", "ort-op", "ort-bare", lambda x: x <= 1.2)):
            if got[num] and got[den]:
                x = got[num] / got[den]
                parts.append(f"{label} {x:.2f}{'' if ok(x) else ' (missed)'}")
        if parts:
            lines.append(f"{rule:<17}{n:>6}: " + ", ".join(parts))
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ns", default="1024,4096,16384")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rules", default=",".join(RULES))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--worker", nargs=3, metavar=("RULE", "N", "OUTPUTS"), help=argparse.SUPPRESS)
    ap.add_argument("--ort-worker", nargs=3, metavar=("MODEL", "FEEDS", "OUTPUTS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    # PyTorch's OpenMP threads spin while they wait, as ORT's do unless told not to (_bench_case.py turns
    # ORT's off): on a shared 2-core machine spinning threads take turns, and one eager call measured 524 ms
    # against 14 ms passive (n = 1024, linear). Set before torch is imported; the workers inherit it.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    if args.ort_worker:
        ort_worker(args.ort_worker[0], args.ort_worker[1], args.repeats, args.ort_worker[2])
        return 0
    if args.worker:
        torch_worker(args.worker[0], int(args.worker[1]), args.repeats, args.worker[2])
        return 0
    import numpy as np
    import torch

    from _bench_case import make_feeds

    rows = []
    variants = args.variants.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.rules.split(","):
            models = export(name, Path(tmp))
            for n in (int(x) for x in args.ns.split(",")):
                shapes = input_shapes(name, n)
                t0 = time.perf_counter()
                want, want_s = reference64(name, [torch.from_numpy(a) for a in make_feeds(shapes).values()])
                print(f"{name} n={n}: float64 reference in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
                for variant in variants:
                    outs = Path(tmp) / f"{name}.{n}.{variant}.npz"
                    if variant in PREPARED:
                        feeds = Path(tmp) / f"{name}.{n}.prepared.npz"
                        if not feeds.exists():
                            np.savez(feeds, **prepared_feeds(name, n))
                        r = _run([sys.executable, __file__, "--ort-worker", str(models[variant]), str(feeds),
                                  str(outs), "--repeats", str(args.repeats)])
                    elif variant == "pytorch":
                        r = _run([sys.executable, __file__, "--worker", name, str(n), str(outs),
                                  "--repeats", str(args.repeats)])
                    else:
                        cmd = [sys.executable, "benchmarks/_bench_case.py", str(models[variant]),
                               "--repeats", str(args.repeats), "--outputs", str(outs)]
                        for s in shapes:
                            cmd += ["--shape", s]
                        r = _run(cmd)
                    got = np.load(outs)
                    scale = max(1.0, float(want.abs().max()))
                    r["err"] = float(np.abs(got["arr_0"] - want.numpy()).max()) / scale
                    r["state_err"] = float(np.abs(got["arr_1"] - want_s.numpy()).max()) / max(
                        1.0, float(want_s.abs().max()))
                    rows.append({"rule": name, "n": n, "variant": variant, **r})
                    print(f"  {variant:<15} {r['median_ms']:9.1f} ms {r['peak_rss_mb']:7.0f} MB  "
                          f"err {r['err']:.1e} state {r['state_err']:.1e}", file=sys.stderr, flush=True)
    head = (f"{'rule':<17}{'n':>6} | {'variant':<15}| {'median ms':>9} | {'min ms':>8} | {'peak MB':>7} | "
            f"{'out err':>8} | {'state err':>9}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['rule']:<17}{r['n']:>6} | {r['variant']:<15}| {r['median_ms']:>9.1f} | {r['min_ms']:>8.1f} | {r['peak_rss_mb']:>7.0f} | "
              f"{r['err']:>8.1e} | {r['state_err']:>9.1e}")
    print(f"batch 1, {H} heads, head dim {D}, CPU, 2 threads; each cell its own process (median of "
          f"{args.repeats} and min, peak RSS); err: max |x - ref| / max(1, max |ref|) vs the float64 recurrence")
    for line in summary(rows):
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
