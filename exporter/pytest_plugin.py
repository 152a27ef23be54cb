"""pytest plugin (auto-loaded when lrexport is installed): the ``lrexport_parity`` fixture.

    def test_my_model(lrexport_parity, tmp_path):
        lrexport_parity(model, "model.onnx", shapes=["x:min=1x8x64,opt=2x32x64,max=4x128x64"])

The fixture asserts parity and prints the full per-output table when it fails.
"""

from __future__ import annotations

import pytest


@pytest.fixture
def lrexport_parity():
    from exporter.parity import assert_parity

    return assert_parity
