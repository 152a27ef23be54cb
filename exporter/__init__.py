"""lrexport: load -> export to ONNX -> graph passes -> TensorRT engine -> parity against PyTorch.

Python API for test suites::

    from exporter import check_parity
    report = check_parity(model, "model.onnx", shapes=["x:min=1x16x512,opt=1x128x512,max=4x512x512"])
    report.assert_ok()
"""

from exporter.compare import Tolerance, Tolerances
from exporter.errors import LrexportError, ParityFailure
from exporter.export import ExportResult, export_onnx
from exporter.loading import LoadedModel, load_model
from exporter.parity import ParityReport, assert_parity, check_parity
from exporter.pipeline import BuildOptions, BuildReport, build, resolve_specs
from exporter.specs import InputSpec, build_specs

__all__ = [
    "BuildOptions", "BuildReport", "ExportResult", "InputSpec", "LoadedModel", "LrexportError", "ParityFailure",
    "ParityReport", "Tolerance", "Tolerances", "assert_parity", "build", "build_specs", "check_parity",
    "export_onnx", "load_model", "resolve_specs",
]
