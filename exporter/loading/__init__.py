"""Load a model into a callable ``nn.Module`` without running code from the model's files by default.

One module per format: ``exported_program`` (``torch.export`` archives, ``.pt2``), ``torchscript``
(``torch.jit.save``), ``pickled`` (``torch.save``: a state dict for ``--factory``, or a pickled module only with
``trust_pickle=True``, since unpickling runs arbitrary code), ``safetensors_file`` (a state dict for
``--factory``), ``huggingface`` (a ``save_pretrained`` folder; code shipped with it only with
``trust_remote_code=True``), ``factory`` (``--factory pkg.module:function``), ``onnx_file`` (recognized, to say
what to do with one). The kind of a file is read from its contents, not its suffix.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from exporter.errors import LrexportError
from exporter.loading.common import LoadedModel, _short, _source  # noqa: F401  (_short, _source: exporter/archive.py)
from exporter.loading.embeddings import embedding_sizes, module_embedding_sizes
from exporter.loading.exported_program import MAX_DEFAULT_SIZE, UNBOUNDED_SPAN, load_exported_program
from exporter.loading.factory import build_from_factory, import_factory
from exporter.loading.huggingface import hf_folder, load_hf_folder
from exporter.loading.onnx_file import is_onnx_file
from exporter.loading.pickled import load_torch_save, state_dict_model
from exporter.loading.safetensors_file import is_safetensors, load_safetensors
from exporter.loading.torchscript import load_torchscript

__all__ = ["LoadedModel", "MAX_DEFAULT_SIZE", "UNBOUNDED_SPAN", "build_from_factory", "detect_kind", "embedding_sizes",
           "hf_folder", "import_factory", "is_onnx_file", "is_safetensors", "load_model", "module_embedding_sizes"]


def _zip_names(path: Path) -> list[str] | None:
    if not zipfile.is_zipfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return None



def detect_kind(path: Path) -> str:
    """Guess the file's kind from its contents (not its suffix)."""
    if is_safetensors(path):
        return "safetensors"
    names = _zip_names(path)
    if names is None:
        return "torch-save"  # legacy (non-zip) torch.save / raw pickle, or corrupt
    if any(n.endswith("serialized_exported_program.json") or "/models/" in n and n.endswith(".json")
           for n in names):
        return "exported-program"
    if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
        return "torchscript"
    if any(n.endswith("data.pkl") for n in names):
        return "torch-save"
    return "unknown-zip"


def load_model(path: str | Path | None, *, factory: str | None = None, factory_kwargs: dict | str | None = None,
               trust_pickle: bool = False, trust_remote_code: bool = False) -> LoadedModel:
    """Load a model file or Hugging Face folder (or build one from a factory alone when ``path`` is None)."""
    if path is None:
        if not factory:
            raise LrexportError("no model given", "pass a model file or --factory package.module:function")
        return LoadedModel(build_from_factory(factory, factory_kwargs).eval(), "module", factory)
    p = Path(path)
    if not p.exists():
        raise LrexportError(f"model file {p} does not exist", "check the path")
    folder = hf_folder(p) if not (factory and p.is_file()) else None  # a factory takes a weights file as a state dict
    if folder is not None and factory:
        raise LrexportError(f"{p} is a Hugging Face folder, which builds its model from config.json, not --factory",
                            "leave out --factory, or pass a weights file in it with --factory to load it as a state dict")
    if folder is not None:
        return load_hf_folder(folder, trust_remote_code=trust_remote_code, trust_pickle=trust_pickle)
    if p.is_dir():
        raise LrexportError(f"model path {p} is a folder without a config.json, so not a Hugging Face "
                            "save_pretrained folder", "pass the model file itself, or the folder save_pretrained wrote")
    if p.stat().st_size == 0:
        raise LrexportError(f"model file {p} is empty", "re-save the model (torch.jit.save / torch.export.save)")
    kind = detect_kind(p)
    if kind == "safetensors":
        return state_dict_model(p, load_safetensors(p), factory, factory_kwargs)
    if kind == "torchscript":
        return load_torchscript(p)
    if kind == "exported-program":
        return load_exported_program(p)
    if kind == "unknown-zip":
        raise LrexportError(f"{p} is a zip archive but not a TorchScript, torch.export or torch.save file",
                            "save the model with torch.jit.save, torch.export.save or torch.save")
    return load_torch_save(p, factory, factory_kwargs, trust_pickle)
