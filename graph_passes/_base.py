"""The one shape of lrexport's graph passes: a :class:`GraphPass` records typed :class:`Match` records and
returns a :class:`GraphPassResult` that says whether the model changed.

**What a match is** (the same in every pass): a site the pass's rules *accepted* (the pattern matched and
every safety check passed), whatever the pass then decided: rewrite it (``rewritten=True``), or keep it
as it is because that is already best (a low-rank pair that saves work and has no inner bias to fold).
Everything else a pass reports (refused sites, what a survey finds left over, an opset skip, cleanup
counts) is a record with ``matched=False`` and, for refusals, a ``reason``; it does not count.
``GraphPass.matches`` is the number of records with ``matched=True``.

**Rules** are module-level ``RewriteRuleSet`` objects, usable as they are with stock
``onnxscript.rewriter.rewrite(model, pattern_rewrite_rules=RULES)``. A rule reports a site with
:func:`record` and reads its options with :func:`rule_options`; both go through the collector that
:func:`collecting` installs (``GraphPass.call`` installs one around ``run``). Without a collector, records
are dropped and the options are the defaults, so a stock rewrite needs nothing threaded through. A rule
may carry its plan from ``check`` to ``rewrite`` on the instance (onnxscript calls ``rewrite`` right after
a successful ``check``): one rule set runs on one thread at a time.

**Migrating a pass** that still overrides ``call`` and appends dicts to ``self.details`` (it keeps working:
a dict is read as a record, ``"counts": False`` meaning not matched, the keys beyond kind/action/nodes/
reason going to ``info``):

1. ``call`` -> ``run(self, model) -> bool`` (the model changed); drop the ``opset_too_old`` call (the
   template does it; set ``min_opset = 0`` if the pass emits nothing opset-sensitive) and return a bool.
2. Rule constructors lose their ``records`` argument; ``self.records.append({...})`` in a rule becomes
   ``record(Match(kind, action, nodes, rewritten=True, info={...}))``; options such as ``chunk_size``
   come from ``rule_options()``. Build the rules once at module level:
   ``RULES = orp.RewriteRuleSet([...])`` and call ``self.apply_rules(model, RULES)`` in ``run``.
3. A survey of what is left returns ``Match(kind, "left", nodes, reason=..., matched=False)``; ``run``
   calls ``record(m)`` for each (the collector is active for all of ``run``, so records keep their order).
4. A pass with no rewriter (an onnx-ir walk) calls ``record(Match(...))`` from ``run`` directly.
5. Name what no rule accepted ``left`` (not ``kept``: "kept" is a decision on a match), e.g. causal_chunked's
   survey of large CumSums and normalizers the chunked rules did not take.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Iterator

import onnx_ir as ir
from onnxscript.rewriter import pattern as orp

from graph_passes._util import cleanup_unused


@dataclass
class PassOptions:
    chunk_size: int = 64
    merge_threshold: float = 1.0  # merge a pair into one dense weight when r*(m+n) >= threshold*m*n
    check_atol: float = 1e-4
    check_rtol: float = 1e-3
    fold_inner_bias: bool = True  # fold the inner bias of a kept pair into the outer one
    sibling_min_group: int = 2  # concatenate first factors when at least this many pairs share an input
    flops_shapes: dict[str, tuple[int, ...]] | None = None  # input shapes to count FLOPs at
    linear_attention: str = "portable"  # how lrexport.LinearAttention nodes are lowered (linear_attention.py)
    max_positions: int | None = None  # the longest sequence the model serves (sizes loop-free forms)


_FIELDS = ("kind", "action", "nodes", "reason", "matched", "rewritten")


@dataclass
class Match:
    """One site a pass looked at: what it is, what the pass did there, and why."""

    kind: str  # what was found: "lowrank-pair", "einsum", "sequence-projection", ...
    action: str  # what the pass did: "merged", "kept", "lowered (2 operands)", "refused", "left", ...
    nodes: list[str] = field(default_factory=list)  # node labels, in graph order
    reason: str | None = None  # why the pass refused, left or kept the site (None when it rewrote it)
    rewritten: bool = False  # the graph changed at this site
    matched: bool = True  # the rules accepted the site: counts in GraphPass.matches
    info: dict[str, Any] = field(default_factory=dict)  # kind-specific numbers (m, r, n, equation, ...)

    def to_dict(self) -> dict[str, Any]:
        """The report's detail entry: the fields, then ``info`` flattened (the JSON keys readers use)."""
        return {"kind": self.kind, "action": self.action, "nodes": list(self.nodes), "reason": self.reason,
                "matched": self.matched, "rewritten": self.rewritten, **self.info}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Match:
        """A record from an unmigrated pass's dict (``"counts": False`` marks a non-match; legacy passes
        counted only what they rewrote)."""
        matched = bool(d.get("counts", d.get("matched", True)))
        info = {k: v for k, v in d.items() if k not in _FIELDS and k != "counts"}
        return cls(str(d.get("kind", "?")), str(d.get("action", "")), list(d.get("nodes", [])),
                   d.get("reason"), bool(d.get("rewritten", matched)), matched, info)


@dataclass
class GraphPassResult(ir.passes.PassResult):
    """``modified`` says whether the model changed; ``matches`` lists every record of the pass."""

    matches: list[Match] = field(default_factory=list)


@dataclass
class _Collector:
    options: PassOptions
    records: dict[object, Match] = field(default_factory=dict)
    weak: set[object] = field(default_factory=set)  # keys whose record is weak (see record())


_ACTIVE: ContextVar[_Collector | None] = ContextVar("lrexport_pass_collector", default=None)


@contextmanager
def collecting(options: PassOptions | None = None) -> Iterator[list[Match]]:
    """Collect what rules :func:`record` inside the block; the yielded list is filled when it exits."""
    collector = _Collector(options or PassOptions())
    token = _ACTIVE.set(collector)
    found: list[Match] = []
    try:
        yield found
    finally:
        _ACTIVE.reset(token)
        found.extend(collector.records.values())


def record(match: Match, key: object = None, *, weak: bool = False) -> None:
    """Report a site to the active collector (a no-op under a stock rewrite). A rule's check may run
    more than once on the same nodes (commuted variants, overlapping patterns): records sharing a
    ``key`` keep the last one, in the place of the first. A ``weak`` record (a refusal that another
    rule of the set may still overrule by taking the site) never replaces a record that is not weak, and a
    record of no rewrite never replaces one of a rewrite: rules applied again (a stock rewrite runs its rule
    set to a fixed point) see the nodes their own rewrite left, which are that rewrite's site."""
    collector = _ACTIVE.get()
    if collector is None:
        return
    key = object() if key is None else key
    if weak and key in collector.records and key not in collector.weak:
        return
    if not match.rewritten and key in collector.records and collector.records[key].rewritten:
        return
    collector.records[key] = match
    if weak:
        collector.weak.add(key)
    else:
        collector.weak.discard(key)


def recorded() -> dict[object, Match]:
    """The active collector's records by key (empty without one): a pass may revise them at the end of
    ``run``, e.g. drop those whose sites a later rewrite consumed."""
    collector = _ACTIVE.get()
    return collector.records if collector is not None else {}


def rule_options() -> PassOptions:
    """The options of the pass running the rules (defaults under a stock rewrite)."""
    collector = _ACTIVE.get()
    return collector.options if collector is not None else PassOptions()


class GraphPass(ir.passes.InPlacePass):
    """One rewrite family: ``call`` refuses a too-old opset, runs :meth:`run` under a collector and returns
    a :class:`GraphPassResult`; ``details`` holds the records (dicts from unmigrated passes too)."""

    name: str = "?"
    min_opset: int = 13  # rewrites emit ReduceSum/Squeeze/Split with axes as inputs

    def __init__(self, options: PassOptions | None = None) -> None:
        super().__init__()
        self.options = options or PassOptions()
        self.details: list[Match | dict[str, Any]] = []

    @property
    def records(self) -> list[Match]:
        return [d if isinstance(d, Match) else Match.from_dict(d) for d in self.details]

    @property
    def matches(self) -> int:
        return sum(1 for m in self.records if m.matched)

    def run(self, model: ir.Model) -> bool:
        """Transform ``model`` in place; True when it changed."""
        raise NotImplementedError

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if self.opset_too_old(model):
            return self.pass_result(model, False)
        with collecting(self.options) as found:
            changed = self.run(model)
        self.details.extend(found)
        return self.pass_result(model, changed)

    def pass_result(self, model: ir.Model, modified: bool) -> GraphPassResult:
        """What ``call`` returns (a pass with more to say returns a subclass)."""
        return GraphPassResult(model, modified, matches=self.records)

    def opset_too_old(self, model: ir.Model) -> bool:
        """True (and a record saying so) when the default-domain opset predates what the rewrites emit."""
        version = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
        if version < self.min_opset:
            self.details.append(Match("skipped", f"opset {version} < {self.min_opset}", matched=False,
                              reason="the rewrites emit ops of a newer opset"))
            return True
        return False

    def apply_rules(self, model: ir.Model, rules: orp.RewriteRuleSet | list, commute: bool = False) -> int:
        """Apply a rule set; when anything matched, drop the nodes the rewrites left without users."""
        if not isinstance(rules, orp.RewriteRuleSet):
            if not rules:
                return 0
            rules = orp.RewriteRuleSet(rules, commute=commute)
        count = rules.apply_to_model(model)
        if count:
            cleanup_unused(model)
        return count
