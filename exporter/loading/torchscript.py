"""TorchScript archives (``torch.jit.save``)."""

from __future__ import annotations

from pathlib import Path

import torch

from exporter.errors import LrexportError
from exporter.loading.common import LoadedModel, _short, _source


def load_torchscript(p: Path) -> LoadedModel:
    try:
        with _source(p) as src:
            module = torch.jit.load(src, map_location="cpu")
    except Exception as err:
        raise LrexportError(f"TorchScript archive {p} could not be loaded ({_short(err)})",
                            "re-save it with torch.jit.save") from None
    return LoadedModel(module.eval(), "torchscript", str(p))
