"""``InsertQuantizers``: the surgery for annotated specs (torch.ao "prepare").

* A Linear/Conv with a weight spec becomes ``QuantLinear``/``QuantConv2d`` (same parameters,
  plus a ``weight_fake_quant`` child), so state-dict keys keep the model's names.
* Each annotated input edge gets a ``FakeQuantize`` ``call_module`` node. Edges that read the same
  producer with an equal spec share one quantizer (HF's q/k/v Linears on one LayerNorm output
  then see identical codes, which RepQ-ViT's reparameterization needs).

Quantizers are inserted disabled (the graph still computes the float function) under the
``quantizers`` submodule; ``Calibrate`` turns them on.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx, nn

from fxquant.core import match
from fxquant.core.errors import PassError
from fxquant.core.meta import QUANTIZER, ROLE, input_specs, weight_spec
from fxquant.core.pipeline import Pass, PassContext, PassResult, register_pass
from fxquant.core.quant import FakeQuantize, QuantConv2d, QuantLinear

QUANTIZER_ROOT = "quantizers"


def _set_module(gm: fx.GraphModule, path: str, mod: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, leaf, mod)


def quantizer_name(consumer: fx.Node, arg: int) -> str:
    fqn = match.node_fqn(consumer).replace(".", "_")
    base = consumer.name if consumer.op == "call_module" or not fqn or consumer.name.startswith(fqn) else f"{fqn}_{consumer.name}"
    return f"{base}_in{arg}"


@register_pass
@dataclass(frozen=True)
class InsertQuantizers(Pass):
    """Insert the quantizers that earlier passes annotated."""

    name = "insert_quantizers"
    requires = ("annotated",)
    provides = ("quantizers_inserted",)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        modules = match.modules_of(gm)
        if QUANTIZER_ROOT not in modules:
            gm.add_submodule(QUANTIZER_ROOT, nn.Module())
        n_w = n_a = n_shared = 0
        for node in gm.graph.nodes:
            spec = weight_spec(node)
            if spec is None or node.op != "call_module":
                continue
            mod = modules[node.target]
            if isinstance(mod, (QuantLinear, QuantConv2d)):
                continue
            if isinstance(mod, nn.Linear):
                new = QuantLinear.from_float(mod, spec, label=str(node.target))
            elif isinstance(mod, nn.Conv2d):
                new = QuantConv2d.from_float(mod, spec, label=str(node.target))
            else:
                raise PassError(f"insert_quantizers: node '{node.name}' ({type(mod).__name__}) has a weight spec "
                                f"but is not a Linear or Conv2d")
            _set_module(gm, node.target, new)
            n_w += 1

        groups: dict[tuple[fx.Node, object], list[tuple[fx.Node, int]]] = {}
        for node in gm.graph.nodes:
            for arg, spec in sorted(input_specs(node).items()):
                src = node.args[arg]
                if not isinstance(src, fx.Node):
                    raise PassError(f"insert_quantizers: input {arg} of node '{node.name}' is not a tensor node; remove its spec")
                if src.op == "call_module" and isinstance(modules.get(src.target), FakeQuantize):
                    continue  # already quantized (pipeline replayed or pass run twice)
                groups.setdefault((src, spec), []).append((node, arg))
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        existing = set(dict(gm.named_modules()))
        for (src, spec), uses in groups.items():
            uses.sort(key=lambda u: order[u[0]])
            first, first_arg = uses[0]
            qname = quantizer_name(first, first_arg)
            target = f"{QUANTIZER_ROOT}.{qname}"
            if target in existing:
                raise PassError(f"insert_quantizers: a quantizer named '{target}' already exists")
            existing.add(target)
            gm.add_submodule(target, FakeQuantize(spec, label=qname))
            with gm.graph.inserting_before(first):
                qnode = gm.graph.call_module(target, (src,))
            # shape of the producer, module of the consumer (the quantizer belongs to the layer it feeds)
            qnode.meta.update({k: v for k, v in src.meta.items() if k in ("val", "tensor_meta")})
            if "nn_module_stack" in first.meta:
                qnode.meta["nn_module_stack"] = dict(first.meta["nn_module_stack"])
            qnode.meta[QUANTIZER] = {"uses": [(u.name, a) for u, a in uses], "spec": spec, "role": first.meta.get(ROLE)}
            for user, arg in uses:
                args = list(user.args)
                args[arg] = qnode
                user.args = tuple(args)
            n_a += 1
            n_shared += len(uses) > 1
        return PassResult(gm, summary=f"{n_w} weight and {n_a} activation quantizers ({n_shared} shared)",
                          record={"weight_quantizers": n_w, "act_quantizers": n_a})
