"""Write a sample model file plus its input spec (``<stem>.inputs.json``) for ``lrexport build``.

    python -m samples.make causal_lm --out model.pt2                  # torch.export archive (default)
    python -m samples.make lowrank_mlp --out model.pt --format torchscript
    python -m samples.make lowrank_mlp --out weights.pt --format state-dict   # needs --factory to build
    python -m samples.make --list
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import samples
from exporter.export import example_args, torch_dynamic_shapes
from exporter.specs import build_specs, write_sidecar

FORMATS = ("pt2", "torchscript", "state-dict", "pickle")


def make(name: str, out: str | Path, fmt: str = "pt2") -> Path:
    """Save sample ``name`` to ``out`` in ``fmt`` and write its input spec beside it."""
    sample = samples.get(name)
    model = sample.factory()
    specs = build_specs(sample.inputs, sample.shapes)
    args = example_args(specs)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "pt2":
        ep = torch.export.export(model, args, dynamic_shapes=torch_dynamic_shapes(specs), strict=False)
        torch.export.save(ep, str(out))
    elif fmt == "torchscript":
        torch.jit.save(torch.jit.trace(model, args), str(out))
    elif fmt == "state-dict":
        torch.save(model.state_dict(), str(out))
    elif fmt == "pickle":
        torch.save(model, str(out))
    else:
        raise ValueError(f"unknown format {fmt!r}; choose from {FORMATS}")
    write_sidecar(out, sample.inputs, sample.shapes)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", nargs="?", help="sample name (see --list)")
    parser.add_argument("--out", "-o", help="model file to write (default: <name>.pt2)")
    parser.add_argument("--format", default="pt2", choices=FORMATS)
    parser.add_argument("--list", action="store_true", help="list the samples")
    ns = parser.parse_args(argv)
    if ns.list or not ns.name:
        for s in samples.SAMPLES.values():
            print(f"{s.name:18s} {s.description}  [{' '.join(s.shapes)}]")
        return 0
    if ns.name not in samples.SAMPLES:
        print(f"error: unknown sample {ns.name!r}; choose one of: {', '.join(samples.SAMPLES)}", file=sys.stderr)
        return 2
    path = make(ns.name, ns.out or f"{ns.name}.pt2", ns.format)
    print(f"wrote {path} and {path.with_name(path.name.split('.')[0] + '.inputs.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
