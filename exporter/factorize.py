"""``lrexport factorize``: turn a dense model into a low-rank one from a truncated SVD of each weight.

Linear(in, out) -> Sequential(Linear(in, r, bias=False), Linear(r, out)); Hugging Face GPT-style
``Conv1D`` (a transposed linear) likewise; ConvNd(in, out, k) -> Sequential(ConvNd(in, r, k, same
stride/padding/dilation, bias=False), ConvNd(r, out, 1)). W = U S V^T is split as
(U sqrt(S)) (sqrt(S) V^T), so both factors carry half the spectrum (balanced, well-conditioned).
The result is a plain nn.Module whose pairs the graph passes recognize.

Layers that already are a low-rank pair (``A: in -> r`` feeding ``B: r -> out`` directly, with
r*(in+out) < in*out) are left as they are: factorizing a factor again only loses accuracy (rank 12 of
``fc1.down`` 32x128 gave 63% output error). The pairs are found from the data flow: with example
inputs, forward hooks see which layer's input is which layer's output; without, the graph of an
exported program or an fx trace (else adjacent layers of an ``nn.Sequential``). ``include_pairs=True``
factorizes them anyway.
Each layer's output error is measured on the inputs it saw (else estimated by the weight's relative
error); layers, and the model, above ``warn_error`` get a warning line.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from exporter.errors import LrexportError
from exporter.table import format_table

RANDOMIZED_ABOVE = 4096 * 4096  # weights with more elements use a randomized SVD
WARN_ERROR = 0.10  # warn when a layer's (or the model's) relative output error exceeds this


@dataclass
class LayerResult:
    name: str
    kind: str
    shape: tuple[int, int]  # (out, in * prod(kernel))
    rank: int | None
    params_before: int
    params_after: int
    weight_rel_error: float | None
    skipped: str | None = None  # why the layer was left dense
    output_rel_error: float | None = None  # of this layer's output: measured on its example inputs, else the weight's
    output_error_measured: bool = False  # output_rel_error was measured (not estimated from the weight)
    pair_with: str | None = None  # the other factor, when the layer already is one of a low-rank pair

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__, shape=list(self.shape))


@dataclass
class FactorizeReport:
    layers: list[LayerResult] = field(default_factory=list)
    output_rel_error: float | None = None
    warn_error: float = WARN_ERROR
    warnings: list[str] = field(default_factory=list)

    @property
    def params_before(self) -> int:
        return sum(r.params_before for r in self.layers)

    @property
    def params_after(self) -> int:
        return sum(r.params_after for r in self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {"layers": [r.to_dict() for r in self.layers], "params_before": self.params_before,
                "params_after": self.params_after, "output_rel_error": self.output_rel_error,
                "warn_error": self.warn_error, "warnings": list(self.warnings)}

    def set_output_error(self, error: float) -> None:
        """The model's output error against the original; a warning when it is above ``warn_error``."""
        self.output_rel_error = error
        if error > self.warn_error:
            self.warnings.append(f"model output error {error:.1%} on random inputs is above {self.warn_error:.0%}; "
                                 "raise the rank (--rank/--fraction/--energy) or --exclude the layers warned about")

    def format_table(self) -> str:
        rows = [[r.name, r.kind, f"{r.shape[0]}x{r.shape[1]}", r.rank if r.rank else "-", r.params_before,
                 r.params_after, r.weight_rel_error, r.output_rel_error, r.skipped or "factorized"]
                for r in self.layers]
        text = format_table(["layer", "type", "out x in", "rank", "params before", "params after",
                             "weight rel err", "output rel err", "result"], rows)
        tail = (f"factorized layers: {self.params_before:,} -> {self.params_after:,} parameters "
                f"({self.params_after / max(self.params_before, 1):.1%})")
        if self.output_rel_error is not None:
            tail += f"; model output rel L2 error {self.output_rel_error:.3e} on random inputs"
        return "\n".join([text, tail, *(f"warning: {w}" for w in self.warnings)])


def _is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face GPT-2's ``Conv1D``: weight (in, out), y = x @ W + b."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def _matrix(module: nn.Module) -> tuple[str, torch.Tensor] | None:
    """(kind, W as out x in*prod(k)) for the layers we know how to factorize."""
    if isinstance(module, nn.Linear):
        return "Linear", module.weight.detach()
    if _is_hf_conv1d(module):
        return "Conv1D", module.weight.detach().t()
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        w = module.weight.detach()
        return type(module).__name__, w.reshape(w.shape[0], -1)
    return None


def choose_rank(singular: torch.Tensor, m: int, n: int, rank: int | None, fraction: float | None,
                energy: float | None) -> int:
    """A fixed rank, a fraction of the break-even rank mn/(m+n), or the smallest rank holding
    ``energy`` of the spectrum's energy (sum of squared singular values)."""
    full = min(m, n)
    if rank is not None:
        return max(1, min(rank, full))
    if fraction is not None:
        return max(1, min(int(fraction * m * n / (m + n)), full))
    if energy is not None:
        e = singular.double() ** 2
        cum = torch.cumsum(e, 0) / e.sum().clamp_min(1e-30)
        return max(1, min(int(torch.searchsorted(cum, torch.tensor(energy, dtype=cum.dtype)).item()) + 1, full))
    raise LrexportError("no rank rule given", "pass --rank N, --fraction F or --energy E")


def _svd(w: torch.Tensor, r: int, randomized: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    w64 = w.double()
    if randomized:
        u, s, v = torch.svd_lowrank(w64, q=min(r + 10, min(w.shape)), niter=4)
        return u, s, v.t()
    return torch.linalg.svd(w64, full_matrices=False)


def _factor(module: nn.Module, kind: str, w: torch.Tensor, r: int, randomized: bool) -> tuple[nn.Module, float]:
    u, s, vh = _svd(w, r, randomized)
    root = s[:r].sqrt()
    first = (root[:, None] * vh[:r]).to(w.dtype)  # r x n
    second = (u[:, :r] * root[None, :]).to(w.dtype)  # m x r
    err = float(torch.linalg.norm(w.double() - second.double() @ first.double()) / torch.linalg.norm(w.double()).clamp_min(1e-30))
    bias = getattr(module, "bias", None)
    if kind in ("Linear", "Conv1D"):
        out_f, in_f = w.shape
        a, b = nn.Linear(in_f, r, bias=False), nn.Linear(r, out_f, bias=bias is not None)
        a.weight.data.copy_(first)
        b.weight.data.copy_(second)
    else:
        conv = module
        cls = type(conv)
        a = cls(conv.in_channels, r, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                dilation=conv.dilation, bias=False, padding_mode=conv.padding_mode)
        b = cls(r, conv.out_channels, 1, bias=bias is not None)
        a.weight.data.copy_(first.reshape(a.weight.shape))
        b.weight.data.copy_(second.reshape(b.weight.shape))
    if bias is not None:
        b.bias.data.copy_(bias.detach())
    pair = nn.Sequential(a, b)
    pair.train(module.training)
    return pair.to(w.device), err


_CONVS: dict[str, type[nn.Module]] = {"conv1d": nn.Conv1d, "conv2d": nn.Conv2d, "conv3d": nn.Conv3d}


def restore_layers(gm: torch.fx.GraphModule) -> int:
    """Give an exported program's module its layers back, so the module-level factorization applies to
    ``.pt2`` archives too: such a module keeps each layer's weights in a plain container and calls
    ``aten.linear`` / ``aten.convNd`` on them. Each call whose weight (and bias) only it reads becomes
    a call of an ``nn.Linear`` / ``nn.ConvNd`` holding the same parameters, at the same module path
    (so --include/--exclude globs name layers as in the original model). Returns how many."""
    count = 0
    for node in list(gm.graph.nodes):
        op = getattr(node.target, "__name__", "").split(".")[0] if node.op == "call_function" else ""
        if op != "linear" and op not in _CONVS:
            continue
        args = list(node.args) + [None] * (7 - len(node.args))
        weight, bias = args[1], args[2]
        used = [a for a in (weight, bias) if a is not None]
        if node.kwargs or any(getattr(a, "op", None) != "get_attr" or len(a.users) != 1 for a in used):
            continue
        path = weight.target.rpartition(".")[0]
        holder = gm.get_submodule(path) if path else None
        params = {n for n, _ in holder.named_parameters(recurse=False)} if holder is not None else set()
        if (holder is None or type(holder) is not nn.Module or list(holder.children())
                or weight.target != f"{path}.weight" or params != ({"weight", "bias"} if bias is not None else {"weight"})
                or (bias is not None and bias.target != f"{path}.bias")):
            continue
        w = holder.weight
        if op == "linear":
            layer: nn.Module = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta")
        else:
            stride, padding, dilation, groups = [a if a is not None else d for a, d in zip(args[3:7], (1, 0, 1, 1))]
            layer = _CONVS[op](w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), stride=stride, padding=padding,
                               dilation=dilation, groups=groups, bias=bias is not None, device="meta")
        layer.weight = w
        if bias is not None:
            layer.bias = holder.bias
        _replace(gm, path, layer.train(holder.training))
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(path, (node.args[0],))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        for dead in (node, *used):
            gm.graph.erase_node(dead)
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count


def _selected(name: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    if include and not any(fnmatch.fnmatchcase(name, p) for p in include):
        return False
    return not any(fnmatch.fnmatchcase(name, p) for p in exclude)


def _observe(model: nn.Module, names: dict[nn.Module, str], args: Sequence[Any]
             ) -> tuple[list[tuple[str, str]], dict[str, tuple[Any, ...]]]:
    """Run ``model(*args)`` once (eval mode, no grad) with forward hooks on the layers in ``names``: the
    edges (A, B) where B's input is A's output tensor itself, and each layer's first inputs."""
    inputs: dict[str, tuple[Any, ...]] = {}
    made: dict[int, tuple[str, torch.Tensor]] = {}  # id(output) -> (layer, output): kept alive, so ids stay unique
    edges: list[tuple[str, str]] = []

    def hook(module: nn.Module, layer_args: tuple[Any, ...], output: Any) -> None:
        name = names[module]
        if name in inputs:
            return
        inputs[name] = layer_args
        x = layer_args[0] if layer_args else None
        if isinstance(x, torch.Tensor) and id(x) in made and made[id(x)][1] is x:
            edges.append((made[id(x)][0], name))
        if isinstance(output, torch.Tensor):
            made[id(output)] = (name, output)

    modes = {m: m.training for m in model.modules()}
    handles = [m.register_forward_hook(hook) for m in names]
    try:
        for m in modes:  # eval mode set by hand: an exported program's module refuses .eval()
            m.training = False
        with torch.no_grad():
            model(*args)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return edges, inputs


def _structural_edges(model: nn.Module, names: dict[nn.Module, str]) -> list[tuple[str, str]]:
    """Without inputs: a layer call whose only user is another layer call, in an exported program's graph
    or in an fx trace of the model with the layers as leaves; when the trace fails, adjacent layers of an
    ``nn.Sequential``."""
    graph = model.graph if isinstance(model, torch.fx.GraphModule) else None
    if graph is None:
        layers = set(names)

        class _Tracer(torch.fx.Tracer):
            def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
                return m in layers or super().is_leaf_module(m, qualname)

        try:
            graph = _Tracer().trace(model)
        except Exception:  # data-dependent control flow etc.: fx cannot trace every model
            graph = None
    edges = []
    if graph is not None:
        known = set(names.values())
        for node in graph.nodes:
            if node.op == "call_module" and node.target in known and len(node.users) == 1:
                (user,) = node.users
                if user.op == "call_module" and user.target in known and user.args and user.args[0] is node:
                    edges.append((node.target, user.target))
        return edges
    for mod in model.modules():
        if isinstance(mod, nn.Sequential):
            kids = list(mod.children())
            edges += [(names[a], names[b]) for a, b in zip(kids, kids[1:]) if a in names and b in names]
    return edges


def find_pairs(model: nn.Module, example_args: Sequence[Any] | None = None
               ) -> tuple[dict[str, tuple[str, int]], dict[str, tuple[Any, ...]]]:
    """Layers that already are a factor of a low-rank pair: ``A: in -> r`` whose output is ``B: r -> out``'s
    input, with r*(in+out) < in*out (the pair saves work against one dense in x out layer). Returns
    {layer: (other factor, r)} and, with ``example_args``, each layer's first inputs."""
    names = {mod: name for name, mod in model.named_modules() if name and _matrix(mod) is not None}
    inputs: dict[str, tuple[Any, ...]] = {}
    if example_args is not None:
        edges, inputs = _observe(model, names, example_args)
    else:
        edges = _structural_edges(model, names)
    shapes = {name: _matrix(mod)[1].shape for mod, name in names.items()}  # type: ignore[index]
    pairs: dict[str, tuple[str, int]] = {}
    for a, b in edges:
        (r, n_in), (n_out, r_b) = shapes[a], shapes[b]
        if r == r_b and r * (n_in + n_out) < n_in * n_out:
            pairs[a], pairs[b] = (b, r), (a, r)
    return pairs, inputs


def _rel(got: Any, ref: Any) -> float:
    got, ref = torch.as_tensor(got).double(), torch.as_tensor(ref).double()
    return float(torch.linalg.norm(got - ref) / torch.linalg.norm(ref).clamp_min(1e-30))


def factorize(model: nn.Module, *, rank: int | None = None, fraction: float | None = None,
              energy: float | None = None, include: Sequence[str] = (), exclude: Sequence[str] = (),
              randomized_above: int = RANDOMIZED_ABOVE, example_args: Sequence[Any] | None = None,
              include_pairs: bool = False, warn_error: float = WARN_ERROR) -> FactorizeReport:
    """Replace eligible layers of ``model`` in place; returns the per-layer report. ``model`` may be an
    exported program's module (``torch.export.load(path).module()``): its layers are restored first.
    ``example_args`` (one call's positional inputs) find existing pairs by data flow and measure each
    layer's output error; layers of existing pairs stay unless ``include_pairs``."""
    if sum(x is not None for x in (rank, fraction, energy)) != 1:
        raise LrexportError("give exactly one rank rule", "pass one of --rank N, --fraction F, --energy E")
    if rank is not None and rank < 1:
        raise LrexportError(f"rank {rank} is not positive", "pass --rank >= 1")
    if fraction is not None and not 0 < fraction <= 1:
        raise LrexportError(f"fraction {fraction} is outside (0, 1]", "e.g. --fraction 0.5 of the break-even rank")
    if energy is not None and not 0 < energy <= 1:
        raise LrexportError(f"energy {energy} is outside (0, 1]", "e.g. --energy 0.95")
    if not 0 <= warn_error < math.inf:
        raise LrexportError(f"warn-error {warn_error} is not a finite number >= 0", "e.g. --warn-error 0.1 (10%)")
    report = FactorizeReport(warn_error=warn_error)
    if isinstance(model, torch.fx.GraphModule):
        restore_layers(model)
    targets = [(name, mod) for name, mod in model.named_modules() if name and _matrix(mod) is not None
               and _selected(name, include, exclude)]
    if not targets:
        raise LrexportError("no Linear, Conv1D or ConvNd layer matches", "check --include/--exclude patterns")
    pairs, inputs = find_pairs(model, example_args)
    for name, module in targets:
        kind, w = _matrix(module)  # type: ignore[misc]
        m, n = w.shape
        bias = getattr(module, "bias", None)
        nb = bias.numel() if bias is not None else 0
        before = m * n + nb
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and module.groups != 1:
            report.layers.append(LayerResult(name, kind, (m, n), None, before, before, None,
                                             f"skipped: grouped conv (groups={module.groups})"))
            continue
        partner = pairs.get(name)
        if partner is not None and not include_pairs:
            report.layers.append(LayerResult(
                name, kind, (m, n), None, before, before, None,
                f"skipped: already a low-rank pair with {partner[0]} (rank {partner[1]})", pair_with=partner[0]))
            continue
        randomized = m * n > randomized_above
        if energy is not None:
            s = torch.linalg.svdvals(w.double())
        else:
            s = torch.empty(0)
        r = choose_rank(s, m, n, rank, fraction, energy)
        if r * (m + n) >= m * n:
            report.layers.append(LayerResult(
                name, kind, (m, n), r, before, before, None,
                f"skipped: rank {r} saves nothing (break-even {m * n / (m + n):.0f})",
                pair_with=partner[0] if partner else None))
            continue
        pair, err = _factor(module, kind, w, r, randomized)
        out_err, measured = err, False
        if name in inputs:
            with torch.no_grad():
                out_err, measured = _rel(pair(*inputs[name]), module(*inputs[name])), True
        _replace(model, name, pair)
        report.layers.append(LayerResult(name, kind, (m, n), r, before, r * (m + n) + nb, err, None, out_err,
                                         measured, partner[0] if partner else None))
    over = sorted((r for r in report.layers if r.output_rel_error is not None and r.output_rel_error > warn_error),
                  key=lambda r: -(r.output_rel_error or 0.0))
    if over:
        how = "measured on the example inputs" if over[0].output_error_measured else "estimated from the weights"
        worst = ", ".join(f"{r.name} {r.output_rel_error:.1%} (rank {r.rank} of {min(r.shape)})" for r in over[:3])
        more = f" and {len(over) - 3} more" if len(over) > 3 else ""
        report.warnings.append(f"{len(over)} layer(s) with output error above {warn_error:.0%} ({how}): {worst}{more}; "
                               "raise the rank (--rank/--fraction/--energy) or --exclude them")
    return report


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def output_error(original: nn.Module, factorized: nn.Module, args: Sequence[torch.Tensor]) -> float:
    """Relative L2 error of the factorized model's outputs against the original's."""
    with torch.no_grad():
        a = torch.utils._pytree.tree_flatten(original(*args))[0]
        b = torch.utils._pytree.tree_flatten(factorized(*args))[0]
    num = sum(float(torch.linalg.norm((x - y).double()) ** 2) for x, y in zip(a, b) if x.is_floating_point())
    den = sum(float(torch.linalg.norm(x.double()) ** 2) for x in a if x.is_floating_point())
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)
