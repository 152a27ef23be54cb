"""The sizes an exported program really serves, found by evaluating torch's guards at size classes.

An exported program's ``range_constraints`` are not the whole truth: a Python loop over chunks (transformers'
gated-DeltaNet fallback, say) is unrolled to the example's chunk count, and torch records that only as guards
(``(T + pad) // 64 == 2``) that ``ep.module()`` asserts when called. The range then reads ``[2, inf)`` while the
program (and the ONNX made from it) is right only for T in 65..127. Here each dynamic axis is tried at its size
classes: min, max, min+1, max-1, opt, a few odd sizes, and every multiple of a chunk size found in the guards
(``% 64``, ``// 64``) +-1; each pass/fail transition is then bisected to the exact boundary. Guards are
evaluated by the program's own guard function on zero-stride tensors (no forward pass), so a probe costs
milliseconds.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from exporter.errors import LrexportError
from exporter.specs import InputSpec, odd_size

_CHUNK = re.compile(r"(?:%|//)\s*\(?\s*(\d+)\b")
_MAX_MULTIPLES = 48  # per chunk size: all multiples up to this many, else the first/last few and around opt


@dataclass
class ServedAxis:
    """A dynamic axis whose program serves only part of the requested range."""

    input: str
    axis: int
    requested: tuple[int, int]
    served: list[tuple[int, int]]  # disjoint, sorted; empty: no size of the range
    guard: str  # the first guard that failed, as torch words it
    example: int | None = None  # the program's example size of this axis (served, by its guards)

    def served_text(self) -> str:
        text = ", ".join(f"{lo}" if lo == hi else f"{lo}..{hi}" for lo, hi in self.served)
        if text:
            return f"only {text}"
        return "none of it" + (f" (it serves its example size {self.example})" if self.example else "")

    def message(self) -> str:
        lo, hi = self.requested
        return (f"axis {self.axis} of input {self.input!r} was requested as {lo}..{hi}, but the exported model "
                f"serves {self.served_text()} (torch's guard fails outside: {_short(self.guard)})")

    def error(self, specs: Sequence[InputSpec]) -> LrexportError:
        hint = "ask for sizes inside that range with --shapes"
        if self.served:
            lo, hi = max(self.served, key=lambda r: r[1] - r[0])
            spec = next(s for s in specs if s.name == self.input)
            dims = [list(spec.min), list(spec.opt), list(spec.max)]
            for d, v in zip(dims, (lo, min(max(spec.opt[self.axis], lo), hi), hi)):
                d[self.axis] = v
            text = ",".join(f"{k}={'x'.join(map(str, d))}" for k, d in zip(("min", "opt", "max"), dims))
            hint += f" (e.g. --shapes {self.input}:{text})"
        hint += ", or export the model so its code does not fix the size (a Python loop over chunks, say)"
        return LrexportError(self.message(), hint)


def _short(text: str, limit: int = 160) -> str:
    text = " ".join(text.replace("Guard failed:", "").split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


class GuardChecker:
    """Evaluates an exported program's guards at given input shapes (None: they hold; else the failing guard)."""

    def __init__(self, ep: Any, specs: Sequence[InputSpec], module: Any = None):
        self.specs = list(specs)
        module = module if module is not None else ep.module()  # ep.module() rebuilds the graph module: reuse one
        self.fn: Callable[..., Any] | None = getattr(module, "_guards_fn", None)
        self.code = " ".join(getattr(ep, "_guards_code", None) or [])
        user = list(ep.graph_signature.user_inputs)
        by_name = {s.name: i for i, s in enumerate(self.specs)}
        # the program's flat inputs, in its order: a spec by name where the names match, else by position
        self.order = [by_name.get(n, i) for i, n in enumerate(user)] if len(user) == len(self.specs) else []
        # axes the program holds equal (one symbol: src and tgt of one batch) move together
        by_expr: dict[str, list[tuple[int, int]]] = {}
        placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
        for pos, name in enumerate(user if self.order else []):
            val = placeholders[name].meta.get("val") if name in placeholders else None
            for axis, dim in enumerate(getattr(val, "shape", ())):
                expr = getattr(getattr(dim, "node", None), "expr", None)
                if expr is not None and not isinstance(dim, int):
                    by_expr.setdefault(str(expr), []).append((self.order[pos], axis))
        self.tied = {key: group for group in by_expr.values() for key in group}
        self.base = [list(s.opt) for s in self.specs]

    @property
    def usable(self) -> bool:
        return self.fn is not None and bool(self.order)

    def judges_example(self, ep: Any) -> bool:
        """Whether the guards hold at the program's own example inputs, as they must (a guard on something
        other than sizes, strides say, would fail on the zero-stride tensors used here)."""
        example = getattr(ep, "example_inputs", None)
        if not example:
            return True
        args, kwargs = example
        flat = [t for t in [*args, *kwargs.values()] if isinstance(t, torch.Tensor)]
        if len(flat) != len(self.order):
            return True
        shapes = [list(s.opt) for s in self.specs]
        for pos, i in enumerate(self.order):
            if len(flat[pos].shape) == self.specs[i].rank:
                shapes[i] = list(flat[pos].shape)
        if self.failure(shapes) is not None:
            return False
        self.base = shapes  # the other axes sit here while one axis is probed: sizes the guards allow
        return True

    def chunk_sizes(self) -> list[int]:
        """Sizes the guards divide an axis by (``% 64``, ``// 64``): a chunk loop's chunk."""
        return sorted({int(m) for m in _CHUNK.findall(self.code) if 1 < int(m) <= 1 << 20})

    def failure(self, shapes: Sequence[Sequence[int]]) -> str | None:
        if self.fn is None:
            return None
        args = []
        for i in self.order:
            spec = self.specs[i]
            dtype = getattr(torch, spec.dtype) if spec.dtype != "bool" else torch.bool
            args.append(torch.zeros((), dtype=dtype).expand(*shapes[i]))  # sizes only: no memory
        try:
            self.fn(*args)
        except AssertionError as err:
            return str(err).strip().splitlines()[0] if str(err).strip() else "a guard"
        except Exception as err:  # a guard that cannot be evaluated at this size: it is not served either
            return f"{type(err).__name__}: {str(err).strip()[:200]}"
        return None


def _candidates(spec: InputSpec, axis: int, chunks: Sequence[int], example: int) -> list[int]:
    """The size classes of one axis: its ends and their neighbours, opt and the program's example size (a
    chunk loop serves only the example's chunk count), odd sizes, and each chunk multiple +-1."""
    lo, hi, opt, step = spec.min[axis], spec.max[axis], spec.opt[axis], spec.step(axis)
    sizes = {lo, lo + 1, hi - 1, hi, opt, opt - 1, opt + 1, example, odd_size(lo, hi, opt, step),
             (lo + hi) // 2 | 1, (lo + 2 * hi) // 3 | 1}
    for c in chunks:
        first, last = -(-lo // c), hi // c
        ks: list[int] = list(range(first, last + 1))
        if len(ks) > _MAX_MULTIPLES:
            mid = opt // c
            ks = sorted({*range(first, first + 8), *range(last - 7, last + 1), *range(mid - 2, mid + 3),
                         *(first + (last - first) * j // 16 for j in range(17))})
        for k in ks:
            sizes.update((k * c - 1, k * c, k * c + 1))
    return sorted(s for s in sizes if lo <= s <= hi and s % step == 0)


def probe_axis(check: GuardChecker, index: int, axis: int) -> tuple[list[tuple[int, int]], str]:
    """The sub-ranges of ``specs[index]``'s ``axis`` (inside its requested range) that the guards allow, the
    other axes at the program's example sizes (else opt); and the first failing guard."""
    spec = check.specs[index]
    step = spec.step(axis)
    base = check.base
    first_fail = ""

    group = check.tied.get((index, axis), [(index, axis)])
    others = [(i, a) for i, s in enumerate(check.specs) for a in s.dynamic_axes if (i, a) not in group]

    def ok(size: int) -> bool:
        """Served at ``size``: the guards hold with the other axes at opt, or with one other axis at the same
        size (a guard that ties two inputs' axes without torch making them one symbol: ``64*b0*n == 64*b1*n``)."""
        nonlocal first_fail
        shapes = [list(b) for b in base]
        for i, a in group:
            shapes[i][a] = size
        fail = check.failure(shapes)
        if fail is None:
            return True
        for i, a in others:
            spec_i = check.specs[i]
            if spec_i.min[a] <= size <= spec_i.max[a] and size % spec_i.step(a) == 0 and shapes[i][a] != size:
                tied = [list(t) for t in shapes]
                tied[i][a] = size
                if check.failure(tied) is None:
                    return True
        first_fail = first_fail or fail
        return False

    sizes = _candidates(spec, axis, check.chunk_sizes(), base[index][axis])
    results = [(s, ok(s)) for s in sizes]
    served: list[tuple[int, int]] = []
    start = None
    for i, (size, good) in enumerate(results):
        if good and start is None:
            start = size
            if i > 0:  # the exact first served size between the last failing and this one
                a, b = results[i - 1][0], size  # a fails, b passes
                while b - a > step:
                    mid = (a + b) // 2 // step * step
                    mid = mid if mid > a else a + step
                    a, b = (a, mid) if ok(mid) else (mid, b)
                start = b
        if not good and start is not None:
            a, b = results[i - 1][0], size  # a passes, b fails
            while b - a > step:
                mid = (a + b) // 2 // step * step
                mid = mid if mid > a else a + step
                a, b = (mid, b) if ok(mid) else (a, mid)
            served.append((start, a))
            start = None
    if start is not None:
        served.append((start, results[-1][0]))
    return served, first_fail


def unserved_axes(ep: Any, specs: Sequence[InputSpec], module: Any = None) -> list[ServedAxis]:
    """Every dynamic axis of ``specs`` whose requested range the program's guards do not wholly allow
    (``module``: ``ep.module()`` where the caller has it)."""
    check = GuardChecker(ep, specs, module)
    if not check.usable or not check.judges_example(ep):
        return []  # no guards, or guards this checker cannot judge (they fail even at the example's sizes)
    found = []
    for index, spec in enumerate(check.specs):
        for axis in spec.dynamic_axes:
            served, guard = probe_axis(check, index, axis)
            want = (spec.min[axis], spec.max[axis])
            if served != [want]:
                found.append(ServedAxis(spec.name, axis, want, served, guard, check.base[index][axis]))
    return found


def check_served(ep: Any, specs: Sequence[InputSpec], module: Any = None) -> None:
    """Refuse (exit 2, one line naming the axis, the requested range and what is served) a program whose
    guards do not allow the whole requested range of every dynamic axis."""
    found = unserved_axes(ep, specs, module)
    if found:
        raise found[0].error(specs)


def guard_error(err: BaseException, shapes: Mapping[str, Sequence[int]], case: str) -> LrexportError | None:
    """A guard of the exported program failing while it runs (parity's reference): a size the model does not
    serve, said in one line, not a crash."""
    text = str(err).strip()
    if not isinstance(err, AssertionError) or not text.startswith("Guard failed"):
        return None
    where = " ".join(f"{k} {'x'.join(map(str, v))}" for k, v in shapes.items())
    m = re.search(r"(\w+)\.size\(\)\[(\d+)\]", text)
    axis = f"axis {m.group(2)} of input {m.group(1)!r} " if m else ""
    return LrexportError(f"the model does not serve shape case {case} ({where}): {axis}is outside what its "
                         f"torch.export guards allow ({_short(text)})",
                         "ask for sizes the model serves with --shapes")


def _outside(axis: ServedAxis, step: int) -> list[int]:
    """The sizes of the requested range the guards exclude that are worth running: both ends and the middle
    of every excluded stretch, on the axis' multiples."""
    lo, hi = axis.requested
    gaps, start = [], lo
    for a, b in axis.served:
        if a > start:
            gaps.append((start, a - 1))
        start = b + 1
    if start <= hi:
        gaps.append((start, hi))
    sizes: list[int] = []
    for a, b in gaps:
        for size in (a, (a + b) // 2, b):
            size = -(-size // step) * step
            if a <= size <= b and size not in sizes:
                sizes.append(size)
    return sizes


def confirm_outside_guards(onnx_path: Any, module: Any, specs: Sequence[InputSpec], found: Sequence[ServedAxis],
                           warnings_out: list[str], seed: int = 0) -> None:
    """Guards are sufficient conditions, not the truth: a branch the trace did not take may compute the same
    thing (a padder that pads by zero at the full length). Where the eager model is at hand, the ONNX is run
    against it at the sizes the guards exclude (other axes at opt), with parity's runners and its fp32
    tolerances; all agreeing, the requested range stands with a warning; any disagreement, failure or
    non-finite output refuses the axis as before (exit 2)."""
    from exporter.export import runnable_copy

    if not found:
        return
    with tempfile.TemporaryDirectory() as folder:  # export's own ops lowered so that a runtime runs them
        _confirm(runnable_copy(onnx_path, folder), module, specs, found, warnings_out, seed)


def _confirm(onnx_path: Any, module: Any, specs: Sequence[InputSpec], found: Sequence[ServedAxis],
             warnings_out: list[str], seed: int) -> None:
    import numpy as np

    from exporter.compare import Tolerances, compare_outputs, tokens_only
    from exporter.runners import OnnxRuntimeRunner, TorchRunner

    onnx_runner = OnnxRuntimeRunner(onnx_path)
    reference = TorchRunner(module, onnx_runner.output_names, [s.name for s in specs], prefer_float64=False)
    tolerances = Tolerances.for_precision("fp32")
    rng = np.random.default_rng(seed)
    for axis in found:
        spec = next(s for s in specs if s.name == axis.input)
        sizes = _outside(axis, spec.multiple[axis.axis] if spec.multiple else 1)
        for size in sizes:
            feeds = {s.name: s.random([size if (axis.input in (s.name, s.mask_for) and a == axis.axis) else d
                                       for a, d in enumerate(s.opt)], rng) for s in specs}  # a mask has its tokens' shape
            try:
                agree = all(c.ok for c in compare_outputs(tokens_only(onnx_runner.run(feeds), feeds, specs),
                                                          tokens_only(reference.run(feeds), feeds, specs), tolerances))
            except Exception:
                agree = False
            if not agree:
                raise axis.error(specs) from None
        warnings_out.append(f"{axis.message()}; the ONNX matches PyTorch at the sizes outside "
                            f"({', '.join(map(str, sizes))}), so the requested range stands: parity checks it too")
