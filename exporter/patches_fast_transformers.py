"""fast-transformers: placeholder until the library is installed here."""

from __future__ import annotations

from exporter.patches import Patch

PATCHES: list[Patch] = []
