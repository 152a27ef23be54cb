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

import samples
from exporter.export import MODEL_FORMATS, save_model
from exporter.specs import build_specs

FORMATS = MODEL_FORMATS


def make(name: str, out: str | Path, fmt: str = "pt2") -> Path:
    """Save sample ``name`` to ``out`` in ``fmt`` and write its input spec beside it."""
    sample = samples.get(name)
    return save_model(sample.factory(), build_specs(sample.inputs, sample.shapes), out, fmt)


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
