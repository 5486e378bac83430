"""Namespaced ``node.meta`` keys: passes *decide* by writing frozen specs here and *act* on them
in a separate pass (pt2e's annotate → prepare split). Later passes read specs, never re-decide."""

from __future__ import annotations

from torch import fx

from .quant import QuantSpec

INPUT_SPECS = "fxq.input_specs"  # on a consumer node: {positional arg index: QuantSpec}
WEIGHT_SPEC = "fxq.weight_spec"  # on a linear/conv call_module node: QuantSpec of its weight
ROLE = "fxq.role"  # on annotated nodes: "stem", "head", "linear", "attn.qk", "attn.av"
QUANTIZER = "fxq.quantizer"  # on inserted quantizer nodes: {"uses": [(consumer, arg)], "spec": QuantSpec}


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
    if spec is None:
        node.meta.pop(WEIGHT_SPEC, None)
    else:
        node.meta[WEIGHT_SPEC] = spec


def weight_spec(node: fx.Node) -> QuantSpec | None:
    return node.meta.get(WEIGHT_SPEC)
