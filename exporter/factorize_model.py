"""``lrexport factorize`` as a Python function: factorize a loaded dense model (``exporter.factorize``),
measure its output error against the original on seeded random inputs, and save it atomically.

    report = factorize_model(loaded, specs, "low.pt2", fraction=0.5)
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable, Sequence

from exporter.factorize import WARN_ERROR, FactorizeReport, factorize, output_error
from exporter.loading import LoadedModel
from exporter.outputs import atomic_files, check_new_file
from exporter.specs import InputSpec, random_feeds


def factorize_model(loaded: LoadedModel, specs: Sequence[InputSpec], out: str | Path, *, rank: int | None = None,
                    fraction: float | None = None, energy: float | None = None, include: Sequence[str] = (),
                    exclude: Sequence[str] = (), fmt: str = "pt2", seed: int = 0, force: bool = False,
                    include_pairs: bool = False, warn_error: float = WARN_ERROR,
                    progress: Callable[[str], None] | None = None) -> FactorizeReport:
    """Replace ``loaded.module``'s layers by SVD-initialized low-rank pairs (in place) and save it to ``out``
    (.pt2 archive or TorchScript, with the input sidecar); the report has the output error at the opt shapes.
    The same inputs find the layers that already are low-rank pairs (left as they are unless
    ``include_pairs``) and measure each layer's output error (warnings above ``warn_error``)."""
    import torch

    from exporter.export import order_specs, save_model

    say = progress or (lambda _m: None)
    out = check_new_file(out, force, "model")
    specs = order_specs(loaded.module, specs)
    original = copy.deepcopy(loaded.module)
    say("[factorize] truncated SVD per layer")
    feeds = random_feeds(specs, "opt", seed)
    args = [torch.from_numpy(feeds[s.name]) for s in specs]
    report = factorize(loaded.module, rank=rank, fraction=fraction, energy=energy, include=include, exclude=exclude,
                       example_args=args, include_pairs=include_pairs, warn_error=warn_error)
    report.set_output_error(output_error(original, loaded.module, args))
    say(f"[factorize] saving {out}")
    with atomic_files(out, force, "model") as tmp:
        save_model(loaded.module, specs, tmp / out.name, fmt)
    return report
