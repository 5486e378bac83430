"""Every metadata key fxquant writes, in one place and under one prefix (``fxquant.``).

Node keys (``node.meta``): passes *decide* by writing frozen specs here and *act* on them in a
separate pass (pt2e's annotate → prepare split). Later passes read specs, never re-decide.

GraphModule keys (``gm.meta``): what capture and ``fxquant.compile`` attach to the result, read by
``fxquant.report``, artifacts and the exporters.
"""

from __future__ import annotations

from torch import fx

from .quant import QuantSpec

PREFIX = "fxquant."

# node.meta
INPUT_SPECS = PREFIX + "input_specs"  # on a consumer node: {positional arg index: QuantSpec}
WEIGHT_SPEC = PREFIX + "weight_spec"  # on a linear/conv call_module node: QuantSpec of its weight
ROLE = PREFIX + "role"  # on annotated nodes: "stem", "head", "linear", "attn.qk", "attn.av", "qwt"
QUANTIZER = PREFIX + "quantizer"  # on inserted quantizer nodes: {"uses": [(consumer, arg)], "spec": QuantSpec}
REPQ_SITE = PREFIX + "repq_site"  # on LayerNorm nodes annotate_repq will fold: {"linears": [node names]}

# gm.meta
CAPTURE = PREFIX + "capture"  # how the graph was captured (method, model class, check error)
REPORT = PREFIX + "report"  # the PipelineReport of fxquant.compile
PIPELINE = PREFIX + "pipeline"  # [{"pass": name, "config": {...}}] in run order
RECIPE = PREFIX + "recipe"  # Recipe.to_dict() or None
EXAMPLE_INPUTS = PREFIX + "example_inputs"  # [(shape, dtype)] of the capture inputs
ARTIFACT = PREFIX + "artifact"  # what an artifact recorded about itself (model, recipe, calibration)
SUBGRAPH_INPUTS = PREFIX + "subgraph_inputs"  # graph.extract_subgraph: the source node of each input


def set_input_spec(node: fx.Node, arg: int, spec: QuantSpec | None) -> None:
    specs = dict(node.meta.get(INPUT_SPECS, {}))
    if spec is None:
        specs.pop(arg, None)
    else:
        specs[arg] = spec
    node.meta[INPUT_SPECS] = specs


def input_specs(node: fx.Node) -> dict[int, QuantSpec]:
    return dict(node.meta.get(INPUT_SPECS, {}))


def set_weight_spec(node: fx.Node, spec: QuantSpec | None) -> None:
    if spec is not None:  # refused where it is decided, not at insertion
        spec.check_weight(f"node '{node.name}' (weight)")
    if spec is None:
        node.meta.pop(WEIGHT_SPEC, None)
    else:
        node.meta[WEIGHT_SPEC] = spec


def weight_spec(node: fx.Node) -> QuantSpec | None:
    return node.meta.get(WEIGHT_SPEC)
