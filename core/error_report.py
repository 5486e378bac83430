"""Where the quantization error comes from: a per-layer error report for any quantized graph
(every recipe; the one-layer-at-a-time ranking is ``layer_sensitivity``).

**Error report** (``error_report``). One pass over the data runs the graph node by node three ways
at once, one batch at a time (values are freed after their last use: no activation is kept whole):

* *float*: every quantizer off (the float model; after RepQ-ViT's reparameterization this is the
  reparameterized float model, which computes the same function);
* *quantized*: the quantizers as compiled — a node's *accumulated* error is its quantized value
  against its float value (the error of everything upstream plus its own);
* *local*: at each quantized site, its own quantization applied to the **float** inputs — an
  activation quantizer on its float input, a Linear/Conv with its input quantizer and its quantized
  weight on float activations, an attention matmul on its quantized float operands.

Per site the float64 sums ``Σr²``, ``Σ(r − t)²``, ``Σr·t``, ``Σt²`` stream over batches and give
SQNR (dB) ``10·log10(Σr² / Σ(r − t)²)``, cosine similarity and relative L2 ``‖r − t‖ / ‖r‖``.
Sites: activation quantizers, weights (static), Linear/Conv outputs, attention matmuls, softmax
outputs, transformer-block outputs and the logits. Per LayerNorm (float run) the per-channel
minimum and maximum of its output are kept too ([C] each): the channel spread that RepQ-ViT
reparameterizes away.

"""

from __future__ import annotations

import base64
import html
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import fx
from tqdm.auto import tqdm

from . import distributed, match
from .batches import graph_inputs, limit_images
from .graph import ensure_shapes, logits_of
from .quant import FakeQuantize, QuantConv2d, QuantLinear, quantizer_state


@dataclass
class ErrorStats:
    """Streamed error sums of a test tensor ``t`` against a reference ``r`` (float64)."""

    ref2: float = 0.0
    err2: float = 0.0
    dot: float = 0.0
    test2: float = 0.0
    elements: int = 0

    def update(self, ref: torch.Tensor, test: torch.Tensor) -> None:
        r, t = ref.detach().double(), test.detach().double()
        self.ref2 += float((r * r).sum())
        self.err2 += float(((r - t) ** 2).sum())
        self.dot += float((r * t).sum())
        self.test2 += float((t * t).sum())
        self.elements += r.numel()

    def merge(self, other: "ErrorStats") -> "ErrorStats":
        """Add another stream's sums (the same float64 additions as ``update``)."""
        self.ref2 += other.ref2
        self.err2 += other.err2
        self.dot += other.dot
        self.test2 += other.test2
        self.elements += other.elements
        return self

    @property
    def sqnr_db(self) -> float:
        return math.inf if self.err2 == 0 else 10.0 * math.log10(max(self.ref2, 1e-300) / self.err2)

    @property
    def cosine(self) -> float:
        return self.dot / math.sqrt(max(self.ref2 * self.test2, 1e-300))

    @property
    def rel_l2(self) -> float:
        return math.sqrt(self.err2 / max(self.ref2, 1e-300))

    def summary(self) -> dict[str, float]:
        return {"sqnr_db": round(self.sqnr_db, 3) if math.isfinite(self.sqnr_db) else None,
                "cosine": round(self.cosine, 6), "rel_l2": round(self.rel_l2, 6)}


@dataclass
class _BatchErrors:
    """One batch's contribution to a report: ``(local, accumulated)`` sums per site node name, the
    logits' sums, LayerNorm channel ``(min, max)`` per node name and the image count."""

    sites: dict[str, tuple[ErrorStats | None, ErrorStats]]
    logits: ErrorStats = field(default_factory=lambda: ErrorStats())
    ln: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    images: int = 0


@dataclass
class Site:
    """One place of the graph the report measures."""

    node: str
    kind: str  # act_quant | weight | linear | conv | matmul | softmax | block | logits
    module: str  # FQN of the module (or the enclosing module) it belongs to
    order: int  # position in graph order
    spec: str = ""
    local: ErrorStats | None = None
    accumulated: ErrorStats | None = None

    def to_dict(self) -> dict:
        return {"node": self.node, "kind": self.kind, "module": self.module, "order": self.order, "spec": self.spec,
                "local": self.local.summary() if self.local else None,
                "accumulated": self.accumulated.summary() if self.accumulated else None}


@dataclass
class ErrorReport:
    """The per-site errors of one quantized graph (``error_report``)."""

    label: str
    sites: list[Site]
    ln_ranges: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # LN node -> {"min": [C], "max": [C]}
    images: int = 0

    def layers(self) -> list[Site]:
        """The Linear/Conv sites in graph order (the depth axis of the plots)."""
        return [s for s in self.sites if s.kind in ("linear", "conv")]

    def to_dict(self) -> dict:
        spread = {n: _spread(r) for n, r in self.ln_ranges.items()}
        return {"label": self.label, "images": self.images, "sites": [s.to_dict() for s in self.sites],
                "layer_norm_channel_spread": spread, "layer_norm_ranges": self.ln_ranges}


def _spread(r: dict[str, list[float]]) -> dict[str, float]:
    width = torch.tensor(r["max"]) - torch.tensor(r["min"])
    med = float(width.median())
    return {"max_over_median_range": round(float(width.max()) / max(med, 1e-12), 3), "channels": len(width)}


# ---------------------------------------------------------------------------------------------
# Running a graph three ways
# ---------------------------------------------------------------------------------------------


def _module_quantizers(gm: fx.GraphModule) -> dict[str, list[FakeQuantize]]:
    out = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            out[n.target] = [m for m in gm.get_submodule(n.target).modules() if isinstance(m, FakeQuantize)]
    return out


def _execute(gm: fx.GraphModule, node: fx.Node, env: dict[fx.Node, Any]) -> Any:
    args = fx.node.map_arg(node.args, lambda a: env[a])
    kwargs = fx.node.map_arg(node.kwargs, lambda a: env[a])
    if node.op == "call_module":
        return gm.get_submodule(node.target)(*args, **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    if node.op == "get_attr":
        obj = gm
        for part in node.target.split("."):
            obj = getattr(obj, part)
        return obj
    raise ValueError(f"cannot execute node {node.name} ({node.op})")


def _is_fq(node: Any, modules: dict) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_module" and isinstance(modules.get(node.target), FakeQuantize)


def _sites(gm: fx.GraphModule, modules: dict) -> dict[fx.Node, Site]:
    blocks = {b.output: b.fqn for b in match.find_blocks(gm, modules)}
    out: dict[fx.Node, Site] = {}
    for i, n in enumerate(gm.graph.nodes):
        kind = match.op_kind(n, modules)
        mod = modules.get(n.target) if n.op == "call_module" else None
        fqn = str(n.target) if n.op == "call_module" else match.node_fqn(n)
        if isinstance(mod, FakeQuantize):
            out[n] = Site(n.name, "act_quant", fqn, i, mod.spec.short(), ErrorStats(), ErrorStats())
        elif kind in ("linear", "conv"):
            quantized = isinstance(mod, (QuantLinear, QuantConv2d)) or any(_is_fq(a, modules) for a in n.all_input_nodes)
            spec = mod.weight_fake_quant.spec.short() if isinstance(mod, (QuantLinear, QuantConv2d)) else ""
            out[n] = Site(n.name, kind, fqn, i, spec, ErrorStats() if quantized else None, ErrorStats())
        elif kind == "matmul":
            quantized = any(_is_fq(a, modules) for a in n.all_input_nodes)
            out[n] = Site(n.name, "matmul", fqn, i, "", ErrorStats() if quantized else None, ErrorStats())
        elif kind == "softmax":
            out[n] = Site(n.name, "softmax", fqn, i, "", None, ErrorStats())
        elif n in blocks:
            out[n] = Site(n.name, "block", blocks[n], i, "", None, ErrorStats())
    return out


def error_report(gm: fx.GraphModule, batches: Iterable, *, label: str = "", example_inputs: tuple = (),
                 progress: bool = True, max_images: int | None = None) -> ErrorReport:
    """Per-site local and accumulated errors of ``gm`` (module docstring), streamed over ``batches``
    (tensors or ``(images, labels)``), at most ``max_images`` images. Under ``torch.distributed``
    each rank measures its share of the batches and every rank returns the single-process report
    (per-batch sums added in batch order, ``distributed.ordered_fold``)."""
    batches = iter(batches)
    first = next(batches, None)
    if first is None:
        raise ValueError("error_report: the data is empty")
    ensure_shapes(gm, tuple(example_inputs) or tuple(graph_inputs(gm, first)))
    batches = itertools.chain([first], batches)
    modules = match.modules_of(gm)
    sites = _sites(gm, modules)
    mod_q = _module_quantizers(gm)
    nodes = list(gm.graph.nodes)
    last_use = {}
    for n in nodes:
        for a in n.all_input_nodes:
            last_use[a] = n
    output = next(n for n in nodes if n.op == "output")
    logits_site = Site("output", "logits", "", len(nodes), "", None, ErrorStats())
    weight_sites = [Site(f"{fqn}.weight", "weight", fqn, sites[n].order if n in sites else 0,
                         m.weight_fake_quant.spec.short(), ErrorStats(), None)
                    for n in nodes if n.op == "call_module" and isinstance(m := modules.get(n.target), (QuantLinear, QuantConv2d))
                    for fqn in [str(n.target)] if m.weight_fake_quant.fake_quant_enabled]
    ln_nodes = [n for n in nodes if match.op_kind(n, modules) == "layer_norm"]
    ln_min: dict[fx.Node, torch.Tensor] = {}
    ln_max: dict[fx.Node, torch.Tensor] = {}
    site_list = list(sites.items())
    images = 0
    gm.eval()
    with quantizer_state(gm) as enabled, torch.no_grad():
        for ws in weight_sites:
            m = gm.get_submodule(ws.module)
            ws.local.update(m.weight, m.weight_fake_quant(m.weight))

        def mode(node: fx.Node, on: bool) -> None:
            for q in mod_q.get(node.target, ()) if node.op == "call_module" else ():
                q.fake_quant_enabled = on and enabled[q]

        def measure(batch) -> _BatchErrors:
            """One batch's error sums (fresh ``ErrorStats`` per site) and LayerNorm channel ranges."""
            part = _BatchErrors({n.name: (ErrorStats() if s.local is not None else None, ErrorStats()) for n, s in site_list})
            inputs = graph_inputs(gm, batch)
            part.images = next((x.shape[0] for x in inputs if isinstance(x, torch.Tensor) and x.dim()), 1)
            fp: dict[fx.Node, Any] = {}
            q: dict[fx.Node, Any] = {}
            loc: dict[fx.Node, Any] = {}  # a fake quantizer's output on its float input
            placeholders = iter(inputs)
            for n in nodes:
                if n.op == "placeholder":  # inputs beyond the batch's take their defaults (fx's concrete_args)
                    fp[n] = q[n] = next(placeholders, n.args[0] if n.args else None)
                    continue
                if n.op == "output":
                    ref, test = logits_of(fx.node.map_arg(n.args[0], lambda a: fp[a])), \
                        logits_of(fx.node.map_arg(n.args[0], lambda a: q[a]))
                    part.logits.update(ref, test)
                    break
                mode(n, False)
                fp[n] = _execute(gm, n, fp)
                mode(n, True)
                q[n] = _execute(gm, n, q)
                site = sites.get(n)
                local, accumulated = part.sites.get(n.name, (None, None))
                if local is not None:
                    if site.kind == "act_quant":
                        loc[n] = _execute(gm, n, fp)
                        local.update(fp[n], loc[n])
                    else:
                        mixed = {a: (loc[a] if a in loc else fp[a]) for a in n.all_input_nodes}
                        local.update(fp[n], _execute(gm, n, mixed))
                if accumulated is not None and isinstance(fp[n], torch.Tensor):
                    accumulated.update(fp[n], q[n])
                if n in ln_nodes:
                    flat = fp[n].detach().reshape(-1, fp[n].shape[-1]).float()
                    part.ln[n.name] = (flat.amin(0), flat.amax(0))
                for a in n.all_input_nodes:  # free values after their last use
                    if last_use.get(a) is n and a is not output:
                        fp.pop(a, None), q.pop(a, None), loc.pop(a, None)
            return part

        by_name = {n.name: n for n in ln_nodes}
        bar = tqdm(desc=f"report {label}".strip(), disable=not progress or not distributed.is_main(), leave=False,
                   unit="img")

        def fold(part: _BatchErrors) -> None:
            nonlocal images
            for n, s in site_list:
                local, accumulated = part.sites[n.name]
                if local is not None:
                    s.local.merge(local)
                s.accumulated.merge(accumulated)
            logits_site.accumulated.merge(part.logits)
            for name, (mn, mx) in part.ln.items():
                n = by_name[name]
                ln_min[n] = mn if n not in ln_min else torch.minimum(ln_min[n], mn)
                ln_max[n] = mx if n not in ln_max else torch.maximum(ln_max[n], mx)
            images += part.images
            bar.update(part.images)

        # sharded across torch.distributed ranks; every batch's sums are added in batch order
        with bar:
            distributed.ordered_fold(limit_images(batches, max_images), measure, fold)
    ordered = sorted([*sites.values(), *weight_sites], key=lambda s: (s.order, s.kind != "weight"))
    # keyed by the LayerNorm's module (blocks.0.norm1) where the graph records it, else the node name
    ranges = {(str(n.target) if n.op == "call_module" else match.node_fqn(n)) or n.name:
              {"min": ln_min[n].tolist(), "max": ln_max[n].tolist()} for n in ln_nodes if n in ln_min}
    return ErrorReport(label, ordered + [logits_site], ranges, images)


# ---------------------------------------------------------------------------------------------
# Output: table, plots, HTML
# ---------------------------------------------------------------------------------------------


def _fmt(v: float | None) -> str:
    return "-" if v is None else ("inf" if not math.isfinite(v) else f"{v:.1f}")


def report_table(reports: list[ErrorReport]) -> str:
    """Per Linear/Conv layer: local and accumulated SQNR (dB) of each report, plus the logits."""
    names = [s.module for s in reports[0].layers()]
    head = ["layer"] + [f"{r.label} {w}" for r in reports for w in ("local", "accum")]
    rows = []
    for i, name in enumerate(names):
        row = [name]
        for r in reports:
            s = r.layers()[i] if i < len(r.layers()) else None
            row += [_fmt(s.local.sqnr_db if s and s.local else None), _fmt(s.accumulated.sqnr_db if s else None)]
        rows.append(row)
    rows.append(["logits"] + [c for r in reports for c in ("", _fmt(r.sites[-1].accumulated.sqnr_db))])
    widths = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths)))
             for row in [head, *rows]]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _pyplot():
    # matplotlib is imported only when figures are drawn, with the file-only backend
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_sqnr(reports: list[ErrorReport], path: Path) -> Path:
    """Local (dashed) and accumulated (solid) SQNR of every Linear/Conv across depth, one colour per report."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(8, 0.3 * len(reports[0].layers())), 4.5))
    for i, r in enumerate(reports):
        layers = r.layers()
        xs = range(len(layers))
        colour = f"C{i}"
        ax.plot(xs, [s.accumulated.sqnr_db for s in layers], "-o", ms=3, color=colour, label=f"{r.label} accumulated")
        ax.plot(xs, [s.local.sqnr_db if s.local else float("nan") for s in layers], "--", color=colour, alpha=0.7,
                label=f"{r.label} local")
    names = [s.module for s in reports[0].layers()]
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_ylabel("SQNR (dB)")
    ax.set_title("Linear/Conv output SQNR (local: on float inputs; accumulated: in the quantized model)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_layer_norm_ranges(report: ErrorReport, path: Path) -> Path:
    """Per LayerNorm output, the per-channel [min, max] over the data (float run): outlier channels stand out."""
    plt = _pyplot()
    sites = list(report.ln_ranges.items())
    cols = min(4, max(1, len(sites)))
    rows = math.ceil(len(sites) / cols) if sites else 1
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.3 * rows), squeeze=False)
    for ax, (name, r) in zip(axes.flat, sites):
        mn, mx = torch.tensor(r["min"]), torch.tensor(r["max"])
        ch = range(len(mn))
        ax.vlines(ch, mn, mx, linewidth=0.8)
        ax.set_title(f"{name}  (max/median range {_spread(r)['max_over_median_range']:.0f}x)", fontsize=8)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(sites):]:
        ax.axis("off")
    fig.suptitle(f"{report.label}: LayerNorm output, per-channel range (channel on x)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(reports: list[ErrorReport], out_dir: str | Path, *, meta: dict | None = None) -> dict[str, Path]:
    """``report.json``, ``sqnr.png``, ``ln_ranges_<label>.png`` per report and a self-contained
    ``report.html`` (table + figures inlined) in ``out_dir``; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "sqnr": plot_sqnr(reports, out / "sqnr.png")}
    for r in reports:
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in r.label) or "model"
        paths[f"ln_{r.label}"] = plot_layer_norm_ranges(r, out / f"ln_ranges_{safe}.png")
    paths["json"].write_text(json.dumps({"meta": meta or {}, "reports": [r.to_dict() for r in reports]}, indent=1) + "\n")
    figures = "".join(f'<h2>{html.escape(p.stem)}</h2><img alt="{html.escape(p.stem)}" src="data:image/png;base64,'
                      f'{base64.b64encode(p.read_bytes()).decode()}"/>' for k, p in paths.items() if k != "json")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>fxquant error report</title>"
            f"<style>body{{font-family:sans-serif;margin:2em}} pre{{font-size:12px}} img{{max-width:100%}}</style></head>"
            f"<body><h1>fxquant error report</h1><pre>{html.escape(json.dumps(meta or {}, indent=1))}</pre>"
            f"<h2>SQNR per layer (dB)</h2><pre>{html.escape(report_table(reports))}</pre>{figures}</body></html>")
    paths["html"] = out / "report.html"
    paths["html"].write_text(page)
    return paths


__all__ = ["ErrorStats", "Site", "ErrorReport", "error_report", "report_table", "plot_sqnr", "plot_layer_norm_ranges",
           "write_report"]
