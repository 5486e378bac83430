"""Passes and the pass manager: the one place the pipeline runs.

A pass is a frozen dataclass with a ``name``, the graph facts it ``requires`` and ``provides``
and one ``run(gm, ctx) -> PassResult``. The manager checks requirements, runs the passes in
order, lints and recompiles the graph after each, measures what changed, and collects the
summaries into a ``PipelineReport`` that the user can print.

Facts are strings. Most are provided by a pass (``annotate_uniform`` provides ``"annotated"``);
a few the manager establishes itself whenever a pass requires them (``MANAGER_FACTS``), so no pass
repeats the set-up: ``SHAPES`` (every module call has a recorded output shape).

A pass whose decisions depend on data (e.g. which blocks QwT compensates) returns them in
``PassResult.record`` (JSON-serialisable). Loading a saved artifact replays the pipeline with
``ctx.replay = True`` and the saved records: passes then rebuild the graph structure without
calibration data and the saved tensors fill in the values.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from typing import Any, Callable, ClassVar

import torch
from torch import fx

from .errors import ConfigError, FxQuantError, PassError
from .graph import ensure_shapes
from .quant import QuantSpec

PASS_REGISTRY: dict[str, type["Pass"]] = {}

SHAPES = "shapes"
"""Fact: every module call of the graph has a recorded output shape (``tensor_meta``), from
``ctx.example_inputs``. The manager establishes it before each pass that requires it
(``graph.ensure_shapes``: propagated again only when a module call lacks a shape, i.e. after a pass
inserted one); without example inputs the pass runs without it, as it always has."""

MANAGER_FACTS: dict[str, Callable[[fx.GraphModule, "PassContext"], None]] = {
    SHAPES: lambda gm, ctx: ensure_shapes(gm, ctx.example_inputs),
}
"""Facts the manager establishes itself when a pass requires them: ``{fact: establish(gm, ctx)}``."""


def register_pass(cls: type["Pass"]) -> type["Pass"]:
    """Class decorator: make a pass constructible by name (CLI, artifacts)."""
    if cls.name in PASS_REGISTRY and PASS_REGISTRY[cls.name] is not cls:
        raise ConfigError(f"a pass named {cls.name!r} is already registered ({PASS_REGISTRY[cls.name].__qualname__})")
    PASS_REGISTRY[cls.name] = cls
    return cls


@dataclass
class PassResult:
    gm: fx.GraphModule
    modified: bool = True
    summary: str = ""
    record: dict = field(default_factory=dict)


@dataclass
class PassContext:
    """State shared by the passes of one pipeline run.

    Attributes:
        calib: the calibration data (``Calibration``) or None.
        example_inputs: inputs used for capture checks and shape propagation.
        seed: seed for anything random (sampling); passes must be deterministic given it.
        progress: show tqdm progress bars.
        facts: graph facts established so far (``requires``/``provides``).
        replay: rebuilding from an artifact: no data, values come from the saved tensors.
        records: per-pass records of a replayed pipeline, in pass order.
    """

    calib: Any = None
    example_inputs: tuple = ()
    seed: int = 0
    progress: bool = True
    facts: set[str] = field(default_factory=set)
    replay: bool = False
    records: list[dict] = field(default_factory=list)
    _index: int = 0

    def record(self) -> dict:
        """The saved record of the pass being replayed ({} when not replaying)."""
        if not self.replay or self._index >= len(self.records):
            return {}
        return self.records[self._index]

    def nested(self) -> "PassContext":
        """The context of a sub-pipeline that a pass runs through a ``PassManager`` of its own on a
        trial copy of its graph (mixed precision's per-width trials): the same data, example inputs
        and seed; its own copy of the facts; no progress bars; never replaying."""
        return replace(self, progress=False, facts=set(self.facts), replay=False, records=[], _index=0)

    def require_calib(self, pass_name: str):
        if self.calib is None:
            raise PassError(
                f"pass '{pass_name}' needs calibration data: call fxquant.compile(model, ..., calib=<iterable of "
                f"batches or forward_loop(model)>)"
            )
        return self.calib


@dataclass(frozen=True)
class Pass:
    """Base class of graph passes. Subclasses are frozen dataclasses whose fields are options."""

    name: ClassVar[str] = "pass"
    requires: ClassVar[tuple[str, ...]] = ()
    provides: ClassVar[tuple[str, ...]] = ()

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def config(self) -> dict:
        """JSON-serialisable options."""
        return {f.name: _to_json(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_config(cls, cfg: dict) -> "Pass":
        return cls(**{f.name: _from_json(f.type, cfg[f.name]) for f in fields(cls) if f.name in cfg})


def _to_json(v: Any) -> Any:
    if hasattr(v, "to_dict"):
        return v.to_dict()
    if is_dataclass(v):
        return asdict(v)
    if isinstance(v, tuple):
        return [_to_json(x) for x in v]
    return v


def _from_json(typ: Any, v: Any) -> Any:
    if isinstance(v, dict) and "bits" in v and "scheme" in v:
        return QuantSpec.from_dict(v)
    if isinstance(v, list):
        return tuple(_from_json(None, x) for x in v)
    return v


def pass_from_config(name: str, cfg: dict) -> Pass:
    if name not in PASS_REGISTRY:
        raise ConfigError(f"unknown pass {name!r}; known passes: {sorted(PASS_REGISTRY)}")
    return PASS_REGISTRY[name].from_config(cfg)


@dataclass
class PassRecord:
    name: str
    seconds: float
    nodes_added: int
    nodes_removed: int
    modules_changed: int
    modified: bool
    summary: str
    record: dict


@dataclass
class PipelineReport:
    passes: list[PassRecord] = field(default_factory=list)

    def __str__(self) -> str:
        rows = [("pass", "seconds", "+nodes", "-nodes", "modules", "summary")]
        for r in self.passes:
            rows.append((r.name, f"{r.seconds:.2f}", str(r.nodes_added), str(r.nodes_removed), str(r.modules_changed), r.summary))
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        lines = []
        for i, row in enumerate(rows):
            lines.append("  ".join(c.ljust(w) for c, w in zip(row[:5], widths)) + "  " + row[5])
            if i == 0:
                lines.append("-" * (sum(widths) + 2 * 5 + 7))
        return "\n".join(lines)

    def to_dict(self) -> list[dict]:
        return [asdict(r) for r in self.passes]

    def __getitem__(self, name: str) -> PassRecord:
        for r in self.passes:
            if r.name == name:
                return r
        raise KeyError(f"no pass named {name!r} ran; ran: {[r.name for r in self.passes]}")


def _module_fingerprint(gm: fx.GraphModule) -> dict[str, int]:
    return {n: id(m) for n, m in gm.named_modules()}


class PassManager:
    """Runs passes in order with requirement checks, lint + recompile after each, and a report."""

    def __init__(self, passes: list[Pass], *, on_pass_end: Callable[[PassRecord], None] | None = None):
        for p in passes:
            if not isinstance(p, Pass):
                raise ConfigError(
                    f"{p!r} is not a pass: passes are fxquant.core.pipeline.Pass instances, e.g. "
                    f"fxquant.passes.InsertQuantizers(); known: {sorted(PASS_REGISTRY)}"
                )
        self.passes = list(passes)
        self.on_pass_end = on_pass_end

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> tuple[fx.GraphModule, PipelineReport]:
        report = PipelineReport()
        done: list[str] = []
        for i, p in enumerate(self.passes):
            missing = [f for f in p.requires if f not in ctx.facts and f not in MANAGER_FACTS]
            if missing:
                providers = sorted({q.name for q in PASS_REGISTRY.values() for f in missing if f in q.provides})
                raise PassError(
                    f"pass '{p.name}' requires {missing}, which no earlier pass provided (ran: {done or 'none'}); "
                    f"add one of {providers} before it"
                )
            before_nodes = set(gm.graph.nodes)
            before_mods = _module_fingerprint(gm)
            ctx._index = i
            t0 = time.perf_counter()
            try:
                with torch.no_grad():
                    for fact in p.requires:
                        if fact in MANAGER_FACTS:
                            MANAGER_FACTS[fact](gm, ctx)
                    result = p.run(gm, ctx)
                gm = result.gm
                gm.graph.lint()
                gm.recompile()
            except FxQuantError:
                raise
            except Exception as e:
                raise PassError(f"pass '{p.name}' failed (passes already run: {done or 'none'}): {type(e).__name__}: {e}") from e
            secs = time.perf_counter() - t0
            after_nodes = set(gm.graph.nodes)
            after_mods = _module_fingerprint(gm)
            changed = sum(1 for k, v in after_mods.items() if before_mods.get(k) != v)
            rec = PassRecord(p.name, secs, len(after_nodes - before_nodes), len(before_nodes - after_nodes), changed,
                             result.modified, result.summary, result.record)
            report.passes.append(rec)
            ctx.facts.update(p.provides)
            done.append(p.name)
            if self.on_pass_end:
                self.on_pass_end(rec)
        return gm, report
