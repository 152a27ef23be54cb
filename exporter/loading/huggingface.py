"""Hugging Face ``save_pretrained`` folders: ``config.json`` plus ``model.safetensors`` (or shards listed in
``model.safetensors.index.json``).

The model class is the one ``config.json`` names in ``architectures``, found in transformers' own Auto
mappings (the Auto class whose mapping lists that class for the config's ``model_type``; config and model
classes are transformers' own, whatever another library registered under the same model_type), and its weights
come through ``from_pretrained(folder, local_files_only=True, use_safetensors=True)``: nothing is downloaded,
nothing is unpickled, and tied weights (``tie_word_embeddings``, not saved twice) are tied again by
transformers itself. Every weight the model has must come from the folder: a missing or mismatched one
is refused rather than left at its random initialization. Code shipped in the folder (``auto_map``) runs
only with ``trust_remote_code``; weights only as ``pytorch_model.bin`` (a pickle) only with ``trust_pickle``.

The model is wrapped so that export sees tensors only: ``forward(input_ids, attention_mask)`` returns
``{"logits": ...}``, a prefill without a cache (``use_cache=False``). The default shape range comes from the
config: batch 1..4, sequence 1..min(max positions, 4096); ``attention_mask`` is declared a padding mask
over ``input_ids`` (``InputSpec.mask_for``), so parity also feeds left- and right-padded rows.
"""

from __future__ import annotations

import contextlib
import inspect
import json
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from exporter.errors import LrexportError
from exporter.loading.common import LoadedModel
from exporter.specs import InputSpec

CONFIG = "config.json"
SAFETENSORS = ("model.safetensors", "model.safetensors.index.json")
PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
MAX_DEFAULT_SEQ = 4096
DEFAULT_BATCH = (1, 2, 4)  # min, opt, max
# Config fields that bound the sequence, in transformers' families' spellings (the first one set is used).
_POSITION_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx",
                    "max_seq_len")


def hf_folder(path: Path) -> Path | None:
    """The ``save_pretrained`` folder ``path`` is, or whose ``config.json`` / weights file it is; else None."""
    if path.is_dir():
        return path if (path / CONFIG).is_file() else None
    if path.is_file() and (path.name == CONFIG or path.name.endswith((".safetensors", ".safetensors.index.json"))
                           or path.name in PICKLES):
        return path.parent if (path.parent / CONFIG).is_file() else None
    return None


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise LrexportError(f"{path} is not valid JSON ({err})", "re-save the model with save_pretrained") from None
    if not isinstance(raw, dict) or not raw.get("model_type"):
        raise LrexportError(f"{path} is not a Hugging Face model config (it has no model_type)",
                            "pass a folder that transformers' save_pretrained wrote")
    return raw


def _weights(folder: Path, trust_pickle: bool) -> bool:
    """Whether the folder's weights are safetensors (True) or, allowed by ``trust_pickle``, a pickle (False)."""
    if any((folder / name).is_file() for name in SAFETENSORS):
        return True
    pickles = [name for name in PICKLES if (folder / name).is_file()]
    if not pickles:
        raise LrexportError(f"{folder} has a config.json but no weights (no model.safetensors or "
                            "model.safetensors.index.json)", "save the model with save_pretrained into this folder")
    if not trust_pickle:
        raise LrexportError(f"{folder} holds its weights only as {pickles[0]}, a pickle, and unpickling runs code "
                            "from the file", "pass --trust-pickle if you trust its source, or re-save it with "
                            "save_pretrained (safetensors is its default)")
    return False


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' progress bars and load reports go to the user's terminal otherwise."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def auto_class(config: Any) -> Any:
    """The transformers Auto class whose mapping lists the class ``config.architectures`` names for the
    config's ``model_type`` (e.g. ``AutoModelForCausalLM`` for ``LlamaForCausalLM``)."""
    return _auto_and_class(config)[0]


def config_class(model_type: str) -> Any | None:
    """transformers' own config class for ``model_type`` (None where transformers defines no such type: a
    library's own model, registered with the Auto classes, is read through them)."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    name = CONFIG_MAPPING_NAMES.get(model_type)
    return getattr(transformers, name, None) if name else None


def _auto_and_class(config: Any) -> tuple[Any, Any]:
    """That Auto class, and transformers' own class ``config.architectures`` names (``transformers.
    Mamba2ForCausalLM``), which builds the model: not the class the Auto registry gives for the model_type,
    since other libraries register theirs under transformers' model types when imported (fla its own
    ``mamba`` and ``mamba2``), and the folder would then build a different model or fail to load."""
    import transformers

    archs = list(getattr(config, "architectures", None) or [])
    model_type = getattr(config, "model_type", "")
    autos = sorted(n for n in dir(transformers) if n.startswith("AutoModel"))
    for arch in archs:
        for name in autos:
            auto = getattr(transformers, name, None)
            mapping = getattr(getattr(auto, "_model_mapping", None), "_model_mapping", {})
            listed = mapping.get(model_type)
            if arch == listed or (isinstance(listed, (tuple, list)) and arch in listed):
                return auto, getattr(transformers, arch, None)
    if not archs:
        raise LrexportError(f"config.json (model_type {model_type!r}) names no class in architectures",
                            "save the model with save_pretrained, which records its class there")
    raise LrexportError(f"transformers {transformers.__version__} has no Auto class for {archs[0]} "
                        f"(model_type {model_type!r})", "install the transformers version the model was saved with")


def _remote_class(raw: dict[str, Any]) -> tuple[str, str] | None:
    """(Auto class name, its reference) for the architecture ``auto_map`` points at."""
    auto_map = raw.get("auto_map") or {}
    archs = raw.get("architectures") or []
    items = [(k, v[0] if isinstance(v, (list, tuple)) else v) for k, v in auto_map.items()
             if k.startswith("AutoModel")]
    for key, ref in items:
        if isinstance(ref, str) and any(ref.rsplit(".", 1)[-1] == a for a in archs):
            return key, ref
    return items[0] if items else None


def load_hf_folder(folder: Path, *, trust_remote_code: bool = False, trust_pickle: bool = False) -> LoadedModel:
    raw = _read_config(folder)
    if raw.get("auto_map") and not trust_remote_code:
        refs = ", ".join(sorted({str(v[0] if isinstance(v, (list, tuple)) else v) for v in raw["auto_map"].values()}))
        raise LrexportError(f"{folder} needs code shipped with the model (config.json's auto_map: {refs}), and "
                            "loading it runs that code", "pass --trust-remote-code if you trust its source")
    safetensors = _weights(folder, trust_pickle)
    try:
        import transformers
    except ImportError:
        raise LrexportError("loading a Hugging Face folder needs transformers, which is not installed",
                            "pip install transformers") from None
    kwargs = {"local_files_only": True, "trust_remote_code": trust_remote_code}
    with _quiet_transformers():
        own = None if trust_remote_code and raw.get("auto_map") else config_class(str(raw["model_type"]))
        try:
            if own is not None:
                config = own.from_pretrained(str(folder), local_files_only=True)
            else:
                config = transformers.AutoConfig.from_pretrained(str(folder), **kwargs)
        except Exception as err:
            raise LrexportError(f"transformers {transformers.__version__} cannot read {folder / CONFIG} "
                                f"({_first_line(err)})", "check model_type, or install the transformers version "
                                "the model was saved with") from None
        remote = _remote_class(raw) if trust_remote_code else None
        auto, own_class = (getattr(transformers, remote[0], None), None) if remote else _auto_and_class(config)
        if auto is None and remote:
            raise LrexportError(f"config.json's auto_map names {remote[0]}, which transformers does not have",
                                "check the folder's auto_map")
        if auto is None:
            raise LrexportError(f"no transformers Auto class builds a model for {type(config).__name__}",
                                "check config.json's architectures and model_type")
        builder = own_class or auto
        try:
            model, info = builder.from_pretrained(str(folder), config=config, use_safetensors=safetensors,
                                               dtype=torch.float32, output_loading_info=True, **kwargs)
        except Exception as err:
            raise LrexportError(f"transformers cannot build {folder.name} with {builder.__name__} "
                                f"({_first_line(err)})", "check that the folder is complete (config.json and "
                                "every weights file) and was saved by this transformers version") from None
    problems = [f"{what} {', '.join(sorted(keys)[:3])}" + (f" (+{len(keys) - 3})" if len(keys) > 3 else "")
                for what, keys in (("missing", info.get("missing_keys") or []),
                                   ("mismatched", [k[0] if isinstance(k, tuple) else k
                                                   for k in info.get("mismatched_keys") or []]))
                if keys]
    if problems:
        raise LrexportError(f"the weights in {folder} do not fit {type(model).__name__}: {'; '.join(problems)}",
                            "re-save the model with save_pretrained, or check config.json against the weights")
    model.eval()
    wrapper = CausalLMLogits(model)
    notes: list[str] = []
    specs = default_specs(config, notes)
    return LoadedModel(wrapper, "huggingface", str(folder), inferred_specs=specs, spec_notes=notes)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300]}" if text else type(err).__name__


def _text_config(config: Any) -> Any:
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def max_positions(config: Any) -> int | None:
    """The longest sequence the config says the model takes, or None where it names no such bound."""
    for cfg in (_text_config(config), config):
        for name in _POSITION_FIELDS:
            value = getattr(cfg, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def default_specs(config: Any, notes: list[str]) -> list[InputSpec]:
    """``input_ids`` (token ids 0..vocab-1) and its padding mask ``attention_mask``, both int64, batch 1..4,
    sequence 1..min(max positions, 4096)."""
    vocab = getattr(_text_config(config), "vocab_size", None)
    if not isinstance(vocab, int) or vocab < 1:
        raise LrexportError("config.json has no vocab_size, so the token ids are not known",
                            "pass --input input_ids:DIMS:int64:0..V-1 (and --shapes)")
    positions = max_positions(config)
    if positions is None:
        notes.append(f"config.json names no maximum sequence length: using 1..{MAX_DEFAULT_SEQ}; choose it with "
                     "--shapes")
    seq = min(positions or MAX_DEFAULT_SEQ, MAX_DEFAULT_SEQ)
    b_lo, b_opt, b_hi = DEFAULT_BATCH
    lo, opt, hi = (b_lo, 1), (b_opt, max(1, min(seq // 2, 128))), (b_hi, seq)
    return [InputSpec("input_ids", "int64", lo, opt, hi, 0.0, float(vocab - 1)),
            InputSpec("attention_mask", "int64", lo, opt, hi, 0.0, 1.0, mask_for="input_ids")]


class CausalLMLogits(nn.Module):
    """A transformers model as export sees it: token ids and their padding mask in, ``logits`` out
    (a prefill: no cache; a model without logits gives its first output, under its own name)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        params: Any
        try:
            params = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            params = {}
        takes = lambda name: name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())  # noqa: E731
        self._extra = {k: v for k, v in (("use_cache", False), ("return_dict", True)) if takes(k)}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **self._extra)
        if isinstance(out, tuple):  # return_dict not taken: the first output is the prediction
            return {"logits": out[0]}
        if getattr(out, "logits", None) is not None:
            return {"logits": out.logits}
        name, value = next((k, v) for k, v in out.items() if isinstance(v, torch.Tensor))
        return {name: value}
