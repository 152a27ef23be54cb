"""What every transformers family patch needs: the modeling modules the model's layers come from, and the
swaps of a kernel by identity wherever a layer can reach it.

transformers' linear-attention layers call their kernels through module globals of their own modeling module
(``torch_chunk_gated_delta_rule(...)`` inside ``Qwen3NextGatedDeltaNet.forward``); older releases bound them
on the instance (``self.chunk_gated_delta_rule``). Both are swapped: every global of a module that defines one
of the model's classes, and every instance attribute of the model's modules, whose value *is* a known kernel.
The global is a dispatch wrapper (``use_kernel_func_from_hub_with_fallback``) that calls fla's Triton kernel
when fla is importable and the torch code (``__wrapped__``) otherwise; both count as the kernel.
"""

from __future__ import annotations

import inspect
import sys
from types import ModuleType
from typing import Any, Callable, Iterable

from torch import nn

from exporter.patches import Swap

MODELS = "transformers.models."


def model_modules(model: nn.Module) -> list[ModuleType]:
    """The transformers modeling modules that define a class of one of ``model``'s submodules."""
    names = {type(m).__module__ for m in model.modules()}
    return [sys.modules[n] for n in sorted(names) if n.startswith(MODELS) and n in sys.modules]


def takes_params(fn: Any, names: tuple[str, ...]) -> bool:
    """``fn`` is callable and its parameters begin with ``names``: how a patch knows a function of which
    transformers keeps identical copies in several modeling modules (one object each)."""
    try:
        return tuple(inspect.signature(fn).parameters)[:len(names)] == names
    except (TypeError, ValueError):
        return False


def loaded_models_attr(name: str) -> list[Any]:
    """``name`` in every loaded transformers modeling module that defines it."""
    found: list[Any] = []
    for mod_name, mod in list(sys.modules.items()):
        if mod_name.startswith(MODELS) and mod is not None:
            value = mod.__dict__.get(name)
            if value is not None and all(value is not f for f in found):
                found.append(value)
    return found


def torch_code(fn: Any) -> Any:
    """The torch function under transformers' kernel dispatch (the function itself if not wrapped)."""
    return getattr(fn, "__wrapped__", fn)


def kernel_swaps(model: nn.Module, kernels: Iterable[Any], value: Callable[[Any], Any]) -> list[Swap]:
    """Swaps of every global of the model's modeling modules and every instance attribute of its modules that
    is one of ``kernels`` (by identity) for ``value(kernel)``."""
    kernels = list(kernels)

    def known(v: Any) -> bool:
        return callable(v) and any(v is k for k in kernels)

    swaps = [Swap(mod, name, value(v)) for mod in model_modules(model)
             for name, v in list(mod.__dict__.items()) if known(v)]
    for m in model.modules():
        swaps += [Swap(m, name, value(v)) for name, v in list(vars(m).items()) if known(v)]
    return swaps


def fla_function(module: str, name: str) -> Any:
    """fla's kernel ``name`` from ``module`` if the process imported it."""
    mod = sys.modules.get(module)
    return getattr(mod, name, None) if mod is not None else None


def kernel_map(torch_names: tuple[str, ...], fla: tuple[tuple[str, str], ...] = ()) -> dict[Any, Any]:
    """Each form a layer may call -> transformers' torch code for it (the parity reference): the dispatch
    wrappers named ``torch_names`` in the loaded modeling modules and their torch code, and fla's kernels
    (``fla[i]`` pairs with ``torch_names[i]``) when fla is imported."""
    ref: dict[Any, Any] = {}
    for name in torch_names:
        for fn in loaded_models_attr(name):
            ref[fn] = ref[torch_code(fn)] = torch_code(fn)
    for (module, name), torch_name in zip(fla, torch_names):
        fn = fla_function(module, name)
        torch_fns = [torch_code(f) for f in loaded_models_attr(torch_name)]
        if fn is not None and torch_fns:
            ref[fn] = torch_fns[0]
    return ref


def swap_finders(torch_names: tuple[str, ...], fla: tuple[tuple[str, str], ...], replacement: Callable
                 ) -> tuple[Callable[[nn.Module], list[Swap]], Callable[[nn.Module], list[Swap]]]:
    """(find, reference): swap every form of the kernels for ``replacement`` (export), or for transformers'
    torch code (the eager reference)."""
    def find(model: nn.Module) -> list[Swap]:
        return kernel_swaps(model, kernel_map(torch_names, fla), lambda _k: replacement)

    def reference(model: nn.Module) -> list[Swap]:
        ref = kernel_map(torch_names, fla)
        return kernel_swaps(model, ref, ref.__getitem__)

    return find, reference
