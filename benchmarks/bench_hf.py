"""Prefill and decode of tiny Hugging Face causal LMs, one process a case.

Prefill: lrexport's ONNX (ONNX Runtime CPU) vs transformers eager vs the naive export (torch.onnx at the fixed
length, no patches, no passes). Decode: lrexport's step model (``lrexport export-step``, ONNX Runtime CPU,
greedy, one token a step after a prompt fed as one chunk) vs transformers' own ``generate`` with its cache.

    .venv/bin/python benchmarks/bench_hf.py [--models qwen3_5_lm,mamba_lm] [--ns 1024,4096] [--repeats 5]
                                            [--variants lrexport,eager,naive,step,generate] [--prompt 64 --new 128]

Models are ``tests/hf_tiny_models.py`` builders (configs of hidden size 32, no downloads): what is measured
is the recurrence and graph overhead per token, not a production model's matmuls. Per model, lrexport builds
once (``lrexport build --backend onnxruntime``, sequence 1..max n, parity at ``opt``); the naive export is
made per n and may fail or time out (``--naive-timeout``), which the table says. Every case runs in its own
process on the same seeded token ids (batch 1); latency is the median of ``--repeats`` after one warm-up,
peak memory the process's VmHWM, and ``err`` the max |logits - eager| / max |eager logits| (float32 both).
Decode rows give tokens/s over ``--new`` greedy tokens (generate: the time of ``--new`` tokens minus the time of
one, so the prompt's prefill is not counted; step: the decode loop alone); ``agree``: the fraction of the step
model's greedy tokens that transformers' forward (no cache) picks at the same prefix, and ``same_as_generate``
the fraction equal to generate's (tiny random models have near-ties: after one differs, the rest do too).
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
DEFAULT_MODELS = "qwen3_5_lm,qwen3_next_lm,mamba2_lm,mamba_lm,recurrent_gemma_lm,rwkv_lm,xlstm_lm"
VARIANTS = ("lrexport", "eager", "naive")
DECODE_VARIANTS = ("step", "generate")


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")  # see bench_linear_attention.py
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks"),
                                         env.get("PYTHONPATH", "")])
    return env


def _ids(n: int):
    import numpy as np

    return np.random.default_rng(0).integers(0, 128, size=(1, n)).astype(np.int64)


def _module(name: str):
    import hf_tiny_models

    return getattr(hf_tiny_models, name)()


def eager_worker(name: str, n: int, repeats: int, outputs: str) -> None:
    """Its own process: transformers eager on the seeded ids (``torch.no_grad``, 2 threads, transformers' torch
    code: the reference patches of parity)."""
    import numpy as np
    import torch

    from _bench_case import _hwm_mb

    from exporter.patches import reference_patches

    torch.set_num_threads(2)
    model = _module(name)
    ids = torch.from_numpy(_ids(n))
    # transformers' own torch code, as parity's reference runs it (with fla importable transformers would
    # pick fla's Triton kernels, which have no CPU path)
    with torch.no_grad(), reference_patches(model):
        model(ids)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(ids)
            times.append((time.perf_counter() - t0) * 1e3)
        np.savez(outputs, model(ids).numpy())
    print(json.dumps({"median_ms": statistics.median(times), "min_ms": min(times), "peak_rss_mb": _hwm_mb()}))


def generate_worker(name: str, prompt: int, new: int, repeats: int, outputs: str) -> None:
    """Its own process: transformers' ``generate`` (greedy, its own cache) on the seeded prompt, under the
    reference patches as :func:`eager_worker`; decode time = time(new tokens) - time(1 token)."""
    import numpy as np
    import torch

    from _bench_case import _hwm_mb

    from exporter.patches import reference_patches

    torch.set_num_threads(2)
    model = _module(name)
    lm = getattr(model, "lm", model)
    ids = torch.from_numpy(_ids(prompt))

    def run(k: int) -> tuple[float, torch.Tensor]:
        t0 = time.perf_counter()
        out = lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=k, min_new_tokens=k,
                          do_sample=False, use_cache=True, pad_token_id=0)
        return time.perf_counter() - t0, out

    with torch.no_grad(), reference_patches(model):
        run(2)
        one = statistics.median(run(1)[0] for _ in range(repeats))
        runs = [run(new) for _ in range(repeats)]
    tokens = runs[-1][1][:, prompt:].numpy()
    decode_s = max(statistics.median(t for t, _ in runs) - one, 1e-9)
    np.savez(outputs, tokens)
    print(json.dumps({"tok_s": (new - 1) / decode_s, "median_ms": decode_s * 1e3 / (new - 1),
                      "peak_rss_mb": _hwm_mb()}))


def verify_worker(name: str, prompt: int, tokens_file: str) -> None:
    """Its own process: transformers' forward (no cache, reference patches) over the prompt and the step model's
    greedy tokens; the fraction of those tokens that are the argmax of its logits at the prefix before them.
    Teacher-forced, so one near-tie does not make every later token differ (as it does against generate)."""
    import numpy as np
    import torch

    from exporter.patches import reference_patches

    torch.set_num_threads(2)
    model = _module(name)
    tokens = np.load(tokens_file)["arr_0"]
    seq = torch.from_numpy(np.concatenate([_ids(prompt), tokens], axis=1))
    with torch.no_grad(), reference_patches(model):
        logits = model(seq)
    picks = logits[:, prompt - 1:-1].argmax(-1).numpy()
    print(json.dumps({"agree": float((picks == tokens).mean())}))


def step_worker(step_model: str, prompt: int, new: int, repeats: int, outputs: str) -> None:
    """Its own process: the step model on ONNX Runtime CPU (2 threads): the prompt as one chunk, then ``new``
    greedy tokens one step each, states carried by :func:`exporter.recurrent.run_stepwise`."""
    import numpy as np

    from _bench_case import _hwm_mb

    from exporter.recurrent import read_step_info, run_stepwise
    from graph_passes.ort_session import ort_session

    info = read_step_info(step_model)
    from graph_passes.ort_session import session_options

    session = ort_session(step_model, session_options(threads=2))
    (token_input,) = info.inputs
    (logits,) = info.outputs

    def decode() -> tuple[float, np.ndarray]:
        out = run_stepwise(info, {token_input: _ids(prompt)}, chunk=prompt, session=session)
        states = {s.input: out[s.output] for s in info.states}
        tok = out[logits][:, -1].argmax(-1)[:, None].astype(np.int64)
        tokens = [tok]
        t0 = time.perf_counter()
        for i in range(new - 1):
            out = run_stepwise(info, {token_input: tok}, chunk=1, states=states, position=prompt + i,
                               session=session)
            states = {s.input: out[s.output] for s in info.states}
            tok = out[logits][:, -1].argmax(-1)[:, None].astype(np.int64)
            tokens.append(tok)
        return time.perf_counter() - t0, np.concatenate(tokens, axis=1)

    decode()
    runs = [decode() for _ in range(repeats)]
    decode_s = statistics.median(t for t, _ in runs)
    np.savez(outputs, runs[-1][1])
    print(json.dumps({"tok_s": (new - 1) / decode_s, "median_ms": decode_s * 1e3 / (new - 1),
                      "peak_rss_mb": _hwm_mb()}))


def naive_worker(name: str, n: int, out: str) -> None:
    """Its own process: ``torch.onnx.export`` of the model as it is, at 1 x n, no dynamic axes."""
    import torch

    model = _module(name)
    ids = torch.from_numpy(_ids(n))
    t0 = time.perf_counter()
    torch.onnx.export(model, (ids,), out, dynamo=True, input_names=["ids"], verbose=False, external_data=False)
    print(json.dumps({"export_s": time.perf_counter() - t0}))


def _last_line(err: BaseException) -> str:
    """The last line a failed case printed (a subprocess's stderr, or the error's own text)."""
    text = getattr(err, "stderr", None) or str(err)
    return (text.strip().splitlines() or ["?"])[-1][:160]


def _run(cmd: list[str], timeout: float | None = None) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT, env=_env(),
                         timeout=timeout).stdout
    return json.loads(out.strip().splitlines()[-1])


def _ort(model: Path, n: int, repeats: int, outputs: Path) -> dict:
    import numpy as np

    feeds = outputs.with_suffix(".ids.npy")
    np.save(feeds, _ids(n))
    return _run([sys.executable, "benchmarks/_bench_case.py", str(model), "--repeats", str(repeats), "--outputs",
                 str(outputs), "--feeds", str(feeds)])


def _decode_rows(name: str, variants: list[str], args: argparse.Namespace, tmp: Path) -> list[dict]:
    """generate first (the reference tokens), then the step model exported by ``lrexport export-step`` with the
    ONNX Runtime lowering of the recurrences, covering ``prompt + new`` tokens."""
    import numpy as np

    rows, want = [], None
    for variant in variants:
        outs = tmp / f"{name}.decode.{variant}.npz"
        row: dict = {"model": name, "prompt": args.prompt, "new": args.new, "variant": variant}
        try:
            if variant == "generate":
                r = _run([sys.executable, __file__, "--worker", "generate", name, "0", str(outs), "--repeats",
                          str(args.repeats), "--prompt", str(args.prompt), "--new", str(args.new)])
            else:
                step = tmp / f"{name}.step.onnx"
                t0 = time.perf_counter()
                total = args.prompt + args.new
                exp = subprocess.run(
                    [sys.executable, "-m", "exporter.cli", "export-step", "--factory", f"hf_tiny_models:{name}",
                     "--input", f"ids:1x{min(args.prompt, 64)}:int64:0..127", "--shapes",
                     f"ids:min=1x1,opt=1x{args.prompt},max=1x{total}", "--linear-attention", "onnxruntime",
                     "--out", str(step), "--force", "-q"], capture_output=True, text=True, cwd=ROOT, env=_env())
                if exp.returncode != 0:
                    raise RuntimeError(exp.stderr)  # its last line becomes the row's failure
                export_s = time.perf_counter() - t0
                r = _run([sys.executable, __file__, "--worker", "step", str(step), "0", str(outs), "--repeats",
                          str(args.repeats), "--prompt", str(args.prompt), "--new", str(args.new)])
                r["export_s"] = round(export_s, 1)
            got = np.load(outs)["arr_0"]
            if variant == "generate":
                want = got
            else:
                r.update(_run([sys.executable, __file__, "--worker", "verify", name, "0", str(outs), "--prompt",
                               str(args.prompt)]))
                if want is not None:
                    r["same_as_generate"] = float((got == want).mean())
            row.update(r)
        except (subprocess.CalledProcessError, RuntimeError) as err:
            row["failed"] = _last_line(err)
        rows.append(row)
        print(f"  decode {variant:<9} {json.dumps({k: v for k, v in row.items() if k not in ('model', 'variant')})}",
              file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=DEFAULT_MODELS)
    ap.add_argument("--ns", default="1024,4096")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--variants", default=",".join(VARIANTS + DECODE_VARIANTS))
    ap.add_argument("--prompt", type=int, default=64, help="decode: prompt tokens, fed as one chunk")
    ap.add_argument("--new", type=int, default=128, help="decode: greedy tokens generated after the prompt")
    ap.add_argument("--naive-timeout", type=float, default=600.0, help="seconds for one naive export")
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--worker", nargs=4, metavar=("KIND", "MODEL", "N", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]
    if args.worker:
        kind, name, n, out = args.worker
        if kind == "eager":
            eager_worker(name, int(n), args.repeats, out)
        elif kind == "generate":
            generate_worker(name, args.prompt, args.new, args.repeats, out)
        elif kind == "step":
            step_worker(name, args.prompt, args.new, args.repeats, out)
        elif kind == "verify":
            verify_worker(name, args.prompt, out)
        else:
            naive_worker(name, int(n), out)
        return 0
    import numpy as np

    ns = [int(x) for x in args.ns.split(",")]
    asked = args.variants.split(",")
    unknown = sorted(set(asked) - set(VARIANTS + DECODE_VARIANTS))
    if unknown:
        ap.error(f"unknown variant {unknown[0]!r}: choose from {', '.join(VARIANTS + DECODE_VARIANTS)}")
    variants = sorted((v for v in asked if v in VARIANTS), key=lambda v: v != "eager")  # eager: the reference
    decode = sorted((v for v in asked if v in DECODE_VARIANTS), key=lambda v: v != "generate")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            if decode:
                rows += _decode_rows(name, decode, args, Path(tmp))
            if not variants:
                continue
            build_dir = Path(tmp) / f"{name}.lrexport"
            t0 = time.perf_counter()
            build = subprocess.run(
                [sys.executable, "-m", "exporter.cli", "build", "--factory", f"hf_tiny_models:{name}",
                 "--input", f"ids:1x{min(ns)}:int64:0..127", "--shapes",
                 f"ids:min=1x1,opt=1x{min(ns)},max=1x{max(ns)}", "--backend", "onnxruntime", "--cases", "opt",
                 "--out", str(build_dir), "-q", "--json"], capture_output=True, text=True, cwd=ROOT, env=_env())
            build_s = time.perf_counter() - t0
            built = build.returncode == 0
            print(f"{name}: lrexport build exit {build.returncode} in {build_s:.0f} s", file=sys.stderr, flush=True)
            for n in ns:
                want = None
                for variant in variants:
                    outs = Path(tmp) / f"{name}.{n}.{variant}.npz"
                    row = {"model": name, "n": n, "variant": variant}
                    try:
                        if variant == "eager":
                            r = _run([sys.executable, __file__, "--worker", "eager", name, str(n), str(outs),
                                      "--repeats", str(args.repeats)])
                        elif variant == "lrexport":
                            if not built:
                                raise RuntimeError(build.stderr.strip().splitlines()[-1][:200])
                            r = _ort(build_dir / "model.onnx", n, args.repeats, outs)
                            r["build_s"] = round(build_s, 1)
                        else:
                            onnx_path = Path(tmp) / f"{name}.{n}.naive.onnx"
                            e = _run([sys.executable, __file__, "--worker", "naive", name, str(n), str(onnx_path)],
                                     timeout=args.naive_timeout)
                            r = {**_ort(onnx_path, n, args.repeats, outs), **e}
                        got = np.load(outs)["arr_0"]
                        if variant == "eager":
                            want = got
                        if want is not None:
                            r["err"] = float(np.abs(got - want).max() / max(float(np.abs(want).max()), 1e-30))
                        row.update(r)
                    except subprocess.TimeoutExpired:
                        row["failed"] = f"export timed out after {args.naive_timeout:.0f} s"
                    except (subprocess.CalledProcessError, RuntimeError) as err:
                        row["failed"] = _last_line(err)
                    rows.append(row)
                    print(f"  n={n} {variant:<9} {json.dumps({k: v for k, v in row.items() if k not in ('model', 'n', 'variant')})}",
                          file=sys.stderr, flush=True)
    rows, decode_rows = [r for r in rows if "new" not in r], [r for r in rows if "new" in r]
    head = f"{'model':<20}{'n':>6} | {'variant':<9}| {'median ms':>9} | {'peak MB':>7} | {'err':>8} | note"
    if rows:
        print(head)
        print("-" * len(head))
    for r in rows:
        if "failed" in r:
            print(f"{r['model']:<20}{r['n']:>6} | {r['variant']:<9}| {'-':>9} | {'-':>7} | {'-':>8} | {r['failed']}")
            continue
        note = f"export {r['export_s']:.0f} s" if "export_s" in r else (f"build {r['build_s']:.0f} s" if "build_s" in r else "")
        print(f"{r['model']:<20}{r['n']:>6} | {r['variant']:<9}| {r['median_ms']:>9.1f} | {r['peak_rss_mb']:>7.0f} | "
              f"{r['err'] if 'err' in r else float('nan'):>8.1e} | {note}")
    if rows:
        print(f"batch 1, CPU, 2 threads; each cell its own process (median of {args.repeats}); err vs transformers eager")
    if decode_rows:
        head = f"{'model':<20}{'prompt':>6} {'new':>5} | {'variant':<9}| {'tok/s':>8} | {'ms/token':>8} | {'peak MB':>7} | {'agree':>5} | note"
        print(head)
        print("-" * len(head))
        for r in decode_rows:
            lead = f"{r['model']:<20}{r['prompt']:>6} {r['new']:>5} | {r['variant']:<9}| "
            if "failed" in r:
                print(lead + f"{'-':>8} | {'-':>8} | {'-':>7} | {'-':>5} | {r['failed']}")
                continue
            note = f"export-step {r['export_s']:.0f} s" if "export_s" in r else ""
            agree = f"{r['agree']:.2f}" if "agree" in r else "-"
            print(lead + f"{r['tok_s']:>8.0f} | {r['median_ms']:>8.2f} | {r['peak_rss_mb']:>7.0f} | {agree:>5} | {note}")
        print(f"batch 1, CPU, 2 threads, greedy; each cell its own process (median of {args.repeats}); agree: the "
              "fraction of the step model's tokens that transformers' forward picks at the same prefix")
    if args.json:
        Path(args.json).write_text(json.dumps(rows + decode_rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
