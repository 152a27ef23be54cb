"""lrexport: load -> export to ONNX -> graph passes -> TensorRT engine -> parity against PyTorch.

Python API for test suites::

    from exporter import check_parity
    report = check_parity(model, "model.onnx", shapes=["x:min=1x16x512,opt=1x128x512,max=4x512x512"])
    report.assert_ok()

Every command of the ``lrexport`` CLI is a thin shell over one of these: ``build`` (build),
``export_onnx_file`` (export), ``check_parity`` (check), ``optimize_onnx`` (optimize), ``export_step_model``
(export-step), ``factorize_model`` (factorize); ``build_engine`` is the engine stage on its own.
"""

from exporter.compare import Tolerance, Tolerances
from exporter.errors import LrexportError, ParityFailure
from exporter.export import ExportResult, export_onnx
from exporter.factorize_model import factorize_model
from exporter.file_stages import export_onnx_file, optimize_onnx
from exporter.loading import LoadedModel, load_model
from exporter.parity import ParityReport, assert_parity, check_parity
from exporter.pipeline import BuildOptions, BuildReport, build, resolve_specs
from exporter.specs import InputSpec, build_specs
from exporter.step_export import StepModelBuild, export_step_model
from exporter.trt_build import EngineBuildResult, build_engine

__all__ = [
    "BuildOptions", "BuildReport", "EngineBuildResult", "ExportResult", "InputSpec", "LoadedModel", "LrexportError",
    "ParityFailure", "ParityReport", "StepModelBuild", "Tolerance", "Tolerances", "assert_parity", "build",
    "build_engine", "build_specs", "check_parity", "export_onnx", "export_onnx_file", "export_step_model",
    "factorize_model", "load_model", "optimize_onnx", "resolve_specs",
]
