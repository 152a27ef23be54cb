"""Input specs and shape ranges: one description of each model input drives export dynamic axes,
parity shapes and TensorRT optimization profiles.

Syntax (trtexec spirit):
  --input  NAME:DIMS[:DTYPE[:LO..HI]]          e.g. x:1x128x512:float32, ids:1x128:int64:0..255
  --shapes NAME:min=DIMS,opt=DIMS,max=DIMS      e.g. x:min=1x16x512,opt=1x128x512,max=8x4096x512
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from exporter.errors import LrexportError

DTYPES = {
    "float32": np.float32, "float16": np.float16, "float64": np.float64,
    "int64": np.int64, "int32": np.int32, "bool": np.bool_,
}
_ALIASES = {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16",
            "fp64": "float64", "double": "float64", "long": "int64", "int": "int32"}
_NAME = re.compile(r"^[A-Za-z_][\w.]*$")
SHAPE_CASES = ("min", "opt", "max", "odd")


def _dims(text: str, what: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.lower().split("x"))
    except ValueError:
        raise LrexportError(f"bad dimensions {text!r} in {what}",
                            "write them as integers joined by 'x', e.g. 1x128x512") from None
    if any(d < 1 for d in dims):
        raise LrexportError(f"dimension {min(dims)} in {what}",
                            "every dimension must be >= 1 (a zero-size input has nothing to compare)")
    return dims


def _dtype(text: str, what: str) -> str:
    name = _ALIASES.get(text.lower(), text.lower())
    if name not in DTYPES:
        raise LrexportError(f"unknown dtype {text!r} in {what}", f"use one of {', '.join(DTYPES)}")
    return name


@dataclass(frozen=True)
class InputSpec:
    """One model input: its dtype, value range and the min/opt/max shape range."""

    name: str
    dtype: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]
    low: float | None = None
    high: float | None = None
    multiple: tuple[int, ...] = ()  # per axis: sizes must be multiples of this (a dim like 16*blocks); () = all 1
    # The name of the token input this one is the padding mask of (same shape, 1 = token, 0 = padding): random
    # values are rows left-padded, right-padded and unpadded in turn, and parity compares only the tokens.
    mask_for: str | None = None

    def __post_init__(self) -> None:
        if not (len(self.min) == len(self.opt) == len(self.max)):
            raise LrexportError(f"shape range of input {self.name!r} mixes ranks "
                                f"{len(self.min)}/{len(self.opt)}/{len(self.max)}",
                                "give min, opt and max with the same number of dimensions")
        if self.multiple and len(self.multiple) != len(self.opt):
            raise ValueError(f"multiple {self.multiple} does not match the rank of input {self.name!r}")
        for axis, step in enumerate(self.multiple):
            bad = [(case, d[axis]) for case, d in (("min", self.min), ("opt", self.opt), ("max", self.max))
                   if d[axis] % step]
            if bad:
                case, size = bad[0]
                near = sorted({size // step * step, -(-size // step) * step} - {0})
                raise LrexportError(
                    f"axis {axis} of input {self.name!r} must be a multiple of {step} (the model splits it into "
                    f"blocks of {step}); the {case} size {size} is not",
                    f"use {' or '.join(map(str, near))} in --shapes")
        for axis, (lo, op, hi) in enumerate(zip(self.min, self.opt, self.max)):
            if lo > hi:
                raise LrexportError(f"shape range of input {self.name!r} has min > max on axis {axis} "
                                    f"({lo} > {hi})", "swap them or fix the range")
            if not lo <= op <= hi:
                raise LrexportError(f"shape range of input {self.name!r} has opt outside [min, max] on "
                                    f"axis {axis} ({op} not in {lo}..{hi})", "put opt between min and max")
        if self.low is not None and self.high is not None and self.low > self.high:
            raise LrexportError(f"value range of input {self.name!r} has low > high", "write it as LO..HI")

    @property
    def rank(self) -> int:
        return len(self.opt)

    @property
    def dynamic_axes(self) -> tuple[int, ...]:
        return tuple(a for a in range(self.rank) if self.min[a] != self.max[a])

    @property
    def np_dtype(self) -> type:
        return DTYPES[self.dtype]

    def step(self, axis: int) -> int:
        """The multiple every size of ``axis`` must be (1 for a free axis)."""
        return self.multiple[axis] if self.multiple else 1

    def fit_size(self, axis: int, size: int) -> int:
        """The largest valid size of ``axis`` that is <= ``size`` (and >= min): for shrinking a case."""
        step = self.step(axis)
        return max(self.min[axis], min(self.max[axis], size) // step * step)

    def shape(self, case: str) -> tuple[int, ...]:
        """The shape used for a parity case: min, opt, max, or odd (a size not divisible by 64)."""
        if case == "odd":
            return tuple(odd_size(lo, hi, op, self.step(a))
                         for a, (lo, op, hi) in enumerate(zip(self.min, self.opt, self.max)))
        return getattr(self, case)

    def export_shape(self) -> tuple[int, ...]:
        """Example shape for tracing: opt, but >= 2 on dynamic axes (torch.export specializes 0 and 1)."""
        return tuple(max(op, min(2, hi)) if lo != hi else op
                     for lo, op, hi in zip(self.min, self.opt, self.max))

    def with_static_axis(self, axis: int, size: int) -> "InputSpec":
        pin = lambda dims: tuple(size if a == axis else d for a, d in enumerate(dims))  # noqa: E731
        multiple = tuple(1 if a == axis else m for a, m in enumerate(self.multiple))
        return replace(self, min=pin(self.min), opt=pin(self.opt), max=pin(self.max), multiple=multiple)

    def with_multiple(self, axis: int, step: int) -> "InputSpec":
        """This spec with ``axis`` restricted to multiples of ``step`` (checked: a size that is not one
        is a one-line error naming the sizes to use)."""
        multiple = list(self.multiple or (1,) * self.rank)
        multiple[axis] = step
        return replace(self, multiple=tuple(multiple))

    def describe(self) -> str:
        if not self.dynamic_axes:
            dims = "x".join(map(str, self.opt))
        else:
            dims = "x".join(str(o) if lo == hi else f"[{lo}..{hi}" + (f" step {self.step(a)}]" if self.step(a) > 1
                                                                          else "]")
                            for a, (lo, o, hi) in enumerate(zip(self.min, self.opt, self.max)))
        rng = f" values {self.low:g}..{self.high:g}" if self.low is not None else ""
        return f"{self.name}: {dims} {self.dtype}{rng}"

    def input_string(self) -> str:
        """This spec as an --input string (opt shape)."""
        rng = f":{self.low:g}..{self.high:g}" if self.low is not None and self.high is not None else ""
        return f"{self.name}:{'x'.join(map(str, self.opt))}:{self.dtype}{rng}"

    def shapes_string(self) -> str:
        """This spec's range as a --shapes string."""
        dims = ["x".join(map(str, d)) for d in (self.min, self.opt, self.max)]
        return f"{self.name}:min={dims[0]},opt={dims[1]},max={dims[2]}"

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "min": list(self.min), "opt": list(self.opt),
                "max": list(self.max), "low": self.low, "high": self.high,
                "dynamic_axes": list(self.dynamic_axes), "multiple": [self.step(a) for a in range(self.rank)],
                **({"mask_for": self.mask_for} if self.mask_for else {})}

    def random(self, shape: Sequence[int], rng: np.random.Generator) -> np.ndarray:
        """Random values of this input's dtype: ints uniform in [low, high], floats standard normal."""
        dt = self.np_dtype
        if self.mask_for and len(shape) == 2:
            return padding_mask((int(shape[0]), int(shape[1])), rng).astype(dt)
        if np.issubdtype(dt, np.integer):
            lo = int(self.low if self.low is not None else 0)
            hi = int(self.high if self.high is not None else 100)
            return rng.integers(lo, hi + 1, size=tuple(shape), dtype=dt)
        if dt is np.bool_:
            return rng.random(tuple(shape)) < 0.5
        arr = rng.standard_normal(tuple(shape))
        if self.low is not None and self.high is not None:
            arr = rng.uniform(self.low, self.high, size=tuple(shape))
        return arr.astype(dt)


def padding_mask(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A (batch, seq) padding mask whose rows are, in turn, left-padded, right-padded and unpadded, each padded
    row keeping 1..seq-1 tokens (a single token cannot be padded)."""
    batch, seq = shape
    mask = np.ones(shape, dtype=np.int64)
    for row in range(batch):
        if seq < 2 or row % 3 == 2:
            continue
        pad = int(rng.integers(1, seq))
        if row % 3 == 0:
            mask[row, :pad] = 0
        else:
            mask[row, seq - pad:] = 0
    return mask


def tie_masks(specs: Sequence[InputSpec], given: Iterable[str] = ()) -> list[InputSpec]:
    """A padding mask has its tokens' shape range: where the command line gave the range of only one of the
    two, the other takes it."""
    by_name = {s.name: s for s in specs}
    given = set(given)
    out = []
    for spec in specs:
        tokens = by_name.get(spec.mask_for or "")
        if tokens is not None and spec.name not in given:
            spec = replace(spec, min=tokens.min, opt=tokens.opt, max=tokens.max, multiple=tokens.multiple)
        out.append(spec)
    by_name = {s.name: s for s in out}
    for i, spec in enumerate(out):
        mask = next((m for m in out if m.mask_for == spec.name), None)
        if mask is not None and mask.name in given and spec.name not in given:
            out[i] = replace(spec, min=mask.min, opt=mask.opt, max=mask.max, multiple=mask.multiple)
    return out


def odd_size(lo: int, hi: int, opt: int, step: int = 1) -> int:
    """A size inside [lo, hi] that is not a multiple of 64 or 2 where possible (catches padding bugs);
    with ``step`` > 1 (an axis of blocks), a multiple of ``step`` that is an odd number of blocks."""
    if lo == hi:
        return lo
    for cand in (opt - opt // 4 - 1, opt + 37, (lo + hi) // 3 | 1, hi - 1, lo + 1):
        cand = cand // step * step if step > 1 else cand
        odd = (cand // step) % 2 if step > 1 else cand % 2
        if lo <= cand <= hi and cand % 64 and odd and cand != opt:
            return cand
    return hi if hi != opt else lo


@dataclass
class _Partial:
    dtype: str | None = None
    dims: tuple[int, ...] | None = None
    low: float | None = None
    high: float | None = None
    ranges: dict[str, tuple[int, ...]] = field(default_factory=dict)


def parse_input(text: str) -> tuple[str, tuple[int, ...], str | None, float | None, float | None]:
    """Parse ``NAME:DIMS[:DTYPE[:LO..HI]]``."""
    what = f"--input {text!r}"
    parts = text.split(":")
    if len(parts) < 2 or len(parts) > 4 or not _NAME.match(parts[0]):
        raise LrexportError(f"bad input spec {text!r}",
                            "write NAME:DIMS[:DTYPE[:LO..HI]], e.g. x:1x128x512:float32 or ids:1x128:int64:0..255")
    dims = _dims(parts[1], what)
    dtype = _dtype(parts[2], what) if len(parts) > 2 and parts[2] else None
    low = high = None
    if len(parts) == 4:
        m = re.fullmatch(r"\s*(-?[\d.eE+-]+)\s*\.\.\s*(-?[\d.eE+-]+)\s*", parts[3])
        if not m:
            raise LrexportError(f"bad value range {parts[3]!r} in {what}", "write it as LO..HI, e.g. 0..255")
        try:
            low, high = float(m.group(1)), float(m.group(2))
        except ValueError:  # number-like but not a number, e.g. "1e"
            raise LrexportError(f"bad value range {parts[3]!r} in {what}", "write it as LO..HI, e.g. 0..255") from None
        if low > high:
            raise LrexportError(f"value range {parts[3]!r} in {what} has low > high", "write it as LO..HI")
    return parts[0], dims, dtype, low, high


def parse_shapes(text: str) -> tuple[str, dict[str, tuple[int, ...]]]:
    """Parse ``NAME:min=DIMS,opt=DIMS,max=DIMS`` (opt optional: defaults to min)."""
    name, sep, rest = text.partition(":")
    if not sep or not _NAME.match(name):
        raise LrexportError(f"bad shape range {text!r}",
                            "write NAME:min=DIMS,opt=DIMS,max=DIMS, e.g. x:min=1x16x512,opt=1x128x512,max=8x4096x512")
    ranges: dict[str, tuple[int, ...]] = {}
    for item in rest.split(","):
        key, eq, val = item.partition("=")
        key = key.strip().lower()
        if not eq or key not in ("min", "opt", "max"):
            raise LrexportError(f"bad shape range {text!r}: {item!r} is not min=, opt= or max=",
                                "write NAME:min=DIMS,opt=DIMS,max=DIMS")
        ranges[key] = _dims(val.strip(), f"--shapes {text!r}")
    if "min" not in ranges or "max" not in ranges:
        raise LrexportError(f"shape range {text!r} lacks min= or max=", "give both (opt= is optional)")
    ranges.setdefault("opt", ranges["min"])
    return name, ranges


def build_specs(inputs: Iterable[str] = (), shapes: Iterable[str] = ()) -> list[InputSpec]:
    """Combine --input and --shapes strings into InputSpecs (order: first mention)."""
    partial: dict[str, _Partial] = {}
    for text in inputs:
        name, dims, dtype, low, high = parse_input(text)
        p = partial.setdefault(name, _Partial())
        p.dims, p.dtype, p.low, p.high = dims, dtype, low, high
    for text in shapes:
        name, ranges = parse_shapes(text)
        partial.setdefault(name, _Partial()).ranges = ranges
    specs = []
    for name, p in partial.items():
        if p.ranges:
            lo, op, hi = p.ranges["min"], p.ranges["opt"], p.ranges["max"]
            if p.dims is not None and len(p.dims) != len(op):
                raise LrexportError(f"input {name!r}: --input has {len(p.dims)} dims but --shapes has {len(op)}",
                                    "give both the same rank")
        elif p.dims is not None:
            lo = op = hi = p.dims
        else:  # pragma: no cover - every partial has one of the two
            continue
        specs.append(InputSpec(name, p.dtype or "float32", lo, op, hi, p.low, p.high))
    return specs


def explicit_dtypes(inputs: Iterable[str]) -> set[str]:
    """The names whose --input string gives a dtype (the others take the model file's)."""
    return {name for name, _dims, dtype, _lo, _hi in map(parse_input, inputs) if dtype}


def sidecar_path(model_path: str | Path) -> Path:
    """``model.pt2`` -> ``model.inputs.json``: the input spec a sample script writes beside its model."""
    p = Path(model_path)
    return p.with_name(p.name.split(".")[0] + ".inputs.json")


def write_sidecar(model_path: str | Path, inputs: Sequence[str], shapes: Sequence[str]) -> Path:
    path = sidecar_path(model_path)
    path.write_text(json.dumps({"inputs": list(inputs), "shapes": list(shapes)}, indent=2) + "\n")
    return path


def read_sidecar(model_path: str | Path) -> tuple[list[str], list[str]] | None:
    path = sidecar_path(model_path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        return list(data.get("inputs", [])), list(data.get("shapes", []))
    except (ValueError, AttributeError) as err:
        raise LrexportError(f"input spec file {path} is not valid JSON ({err})",
                            'fix it or pass --input/--shapes; format: {"inputs": [...], "shapes": [...]}') from None


def parity_cases(specs: Sequence[InputSpec]) -> list[str]:
    """The distinct shape cases (min, opt, max, odd) worth running; static models get just 'opt'."""
    opt_key = tuple(s.shape("opt") for s in specs)
    seen: dict[tuple, str] = {opt_key: "opt"}
    for case in SHAPE_CASES:
        seen.setdefault(tuple(s.shape(case) for s in specs), case)
    return [c for c in SHAPE_CASES if c in seen.values()]


def random_feeds(specs: Sequence[InputSpec], case: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs for one shape case, reproducible from the seed."""
    rng = np.random.default_rng(seed)
    return {s.name: s.random(s.shape(case), rng) for s in specs}


_DIM_EXPR = re.compile(r"^\s*(?:(\d+)\s*\*\s*)?([A-Za-z_]\w*)(?:\s*\*\s*(\d+))?\s*$")


def parse_dim_expr(text: str) -> tuple[int, str] | None:
    """``16*s11`` / ``s11*16`` / ``seq`` -> (multiple, symbol); None for other expressions (``2*s0 + 1``).

    torch.export writes a derived dim (``16*blocks``) this way in its range constraints, and the dynamo
    exporter writes it into the ONNX input's dim_param, so one parser serves both."""
    m = _DIM_EXPR.match(text)
    if not m or (m.group(1) and m.group(3)):
        return None
    return int(m.group(1) or m.group(3) or 1), m.group(2)


def merge_specs(given: Sequence[InputSpec], known: Sequence[InputSpec], explicit_dtypes: set[str]) -> list[InputSpec]:
    """Specs from --input/--shapes over the ones a model file records: shapes from the command line;
    dtypes, value ranges and axis multiples from the file unless the command line gave them."""
    by_name = {s.name: s for s in known}
    out = []
    for spec in given:
        base = by_name.get(spec.name)
        if base is not None:
            if base.rank != spec.rank:
                raise LrexportError(f"input {spec.name!r} has {base.rank} dims in the model file but {spec.rank} "
                                    "on the command line", "give --shapes/--input with the model's rank")
            spec = replace(spec, dtype=spec.dtype if spec.name in explicit_dtypes else base.dtype,
                           low=spec.low if spec.low is not None else base.low,
                           high=spec.high if spec.high is not None else base.high,
                           multiple=base.multiple, mask_for=base.mask_for)
        out.append(spec)
    named = {s.name for s in given}
    return out + [s for s in known if s.name not in named]


def refuse_unknown_names(given: Sequence[InputSpec], known: Sequence[InputSpec | str], where: str) -> None:
    """A --input/--shapes name the model does not have is a typo: one line naming the inputs it has
    (left alone, it reaches the exporter or ONNX Runtime as an unexplained failure)."""
    names = [k if isinstance(k, str) else k.name for k in known]
    unknown = [s.name for s in given if s.name not in names]
    if names and unknown:
        raise LrexportError(f"input {unknown[0]!r} of --input/--shapes is not one of {where}: "
                            f"{', '.join(map(repr, names))}", "name the inputs as the model does")


def specs_from_onnx(model: Any) -> list[InputSpec]:
    """Specs for a bare ONNX model (``onnx.ModelProto`` or ``ir.Model``): static dims as they are; symbolic
    dims get a modest default range (axis 0: 1..4, others 1..256; a dim written ``16*blocks`` in multiples
    of 16), ints the safe value range 0..1 (any embedding accepts it)."""
    import onnx_ir as ir

    graph = (model if isinstance(model, ir.Model) else ir.from_proto(model)).graph
    specs = []
    for v in graph.inputs:
        dtype = v.dtype.numpy().name if v.dtype is not None else "float32"
        bounds = [_default_range(axis, d) for axis, d in enumerate(v.shape or [])]
        lo, op, hi, steps = (tuple(b[k] for b in bounds) for k in range(4))
        is_int = np.issubdtype(np.dtype(dtype), np.integer)
        specs.append(InputSpec(v.name or "", dtype if dtype in DTYPES else "float32", lo, op, hi,
                               0.0 if is_int else None, 1.0 if is_int else None,
                               steps if any(x > 1 for x in steps) else ()))
    return specs


def _default_range(axis: int, dim: Any) -> tuple[int, int, int, int]:
    """(min, opt, max, multiple) of one input axis: a static dim as it is; a symbolic one a default range."""
    if isinstance(dim, int):
        return dim, dim, dim, 1
    step = (parse_dim_expr(dim.value or "") or (1, ""))[0]
    lo, op, hi = (1, 2, 4) if axis == 0 else (1, 64, 256)
    return max(step, lo // step * step), -(-op // step) * step, -(-hi // step) * step, step
