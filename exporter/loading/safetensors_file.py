"""safetensors files outside a Hugging Face folder: a state dict (tensors only, nothing to unpickle) for
the model ``--factory`` builds."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from exporter.errors import LrexportError

_HEADER_LIMIT = 100 * 2**20  # safetensors' own bound on the JSON header


def is_safetensors(path: Path) -> bool:
    """True when the file starts as safetensors does: an 8-byte little-endian header length, then a JSON object."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return False
            (size,) = struct.unpack("<Q", head)
            if not 2 <= size <= _HEADER_LIMIT:
                return False
            header = f.read(size)
    except OSError:
        return False
    try:
        return isinstance(json.loads(header), dict)
    except (ValueError, UnicodeDecodeError):
        return False


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as err:
        text = str(err).strip().splitlines()
        raise LrexportError(f"{path} is not a readable safetensors file ({type(err).__name__}: "
                            f"{text[0][:200] if text else ''})", "the file may be truncated; save it again") from None
