"""Capture: turn a model into a ``torch.fx.GraphModule`` that passes can rewrite.

* timm and plain ``nn.Module`` models: ``torch.fx`` symbolic tracing with timm's registered leaf
  modules and autowrapped functions, after switching fused attention off so that q·kᵀ, softmax
  and A·v are separate nodes. Forward arguments beyond ``example_inputs`` that have defaults
  (timm's ``attn_mask=None``, ``is_causal=False``) are specialised to their defaults.
* Hugging Face ``transformers`` models: ``torch.export(..., strict=False)`` with eager attention
  (softmax visible) and a dynamic batch dimension, then ``ExportedProgram.module()``.

Both paths are then canonicalised: every ``linear``/``conv2d`` call on constant weights becomes a
``call_module`` of an ``nn.Linear``/``nn.Conv2d`` that owns those same parameters, so passes see
one representation of a layer. The user's model is never modified (a deep copy is traced).
"""

from __future__ import annotations

import copy
import inspect
import sys
import warnings
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from timm.layers import _fx as timm_fx
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .batches import graph_inputs
from .errors import TraceError
from .match import op_kind, tensor_shape
from .meta import CAPTURE, SUBGRAPH_INPUTS
from .quant import FakeQuantize, QuantConv2d, QuantLinear, quantizer_state


def _timm_fx_registry() -> tuple[set[type], set]:
    return set(getattr(timm_fx, "_leaf_modules", set())), set(getattr(timm_fx, "_autowrap_functions", set()))


class _Tracer(fx.Tracer):
    """FX tracer that honours timm's leaf modules / autowrap functions and remembers which module
    was being traced when tracing failed (for the error message)."""

    def __init__(self, leaf_types: Sequence[type], autowrap_functions: Iterable):
        super().__init__(autowrap_functions=tuple(autowrap_functions))
        self.leaf_types = tuple(leaf_types)
        self.stack: list[tuple[str, str]] = []
        self.failed_at: list[tuple[str, str]] | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.leaf_types) or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        try:
            name = self.path_of_module(m)
        except NameError:
            name = type(m).__name__
        self.stack.append((name, type(m).__name__))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_at is None:
                self.failed_at = list(self.stack)
            raise
        finally:
            self.stack.pop()


def _disable_fused_attention(model: nn.Module) -> int:
    n = 0
    for m in model.modules():
        if isinstance(getattr(m, "fused_attn", None), bool):
            m.fused_attn = False
            n += 1
    return n


def is_hf_model(model: nn.Module) -> bool:
    """Whether ``model`` is a Hugging Face ``transformers`` model (captured with torch.export)."""
    # transformers is heavy (seconds to import): a model can only be one of its models once it is imported
    if "transformers" not in sys.modules:
        return False
    try:
        from transformers import PreTrainedModel
    except Exception:  # pragma: no cover
        return False
    return isinstance(model, PreTrainedModel)


def _concrete_args_for(model: nn.Module, n_inputs: int, given: dict | None) -> dict:
    """Specialise forward parameters that are not traced inputs to their defaults."""
    out = dict(given or {})
    params = list(inspect.signature(model.forward).parameters.values())
    for p in params[n_inputs:]:
        if p.name in out or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is not inspect.Parameter.empty:
            out[p.name] = p.default
    return out


def _symbolic_trace(model: nn.Module, n_inputs: int, leaf_modules: Sequence[type], concrete_args: dict | None) -> fx.GraphModule:
    timm_leaves, timm_wrapped = _timm_fx_registry()
    # fxquant's own modules stay opaque if a model that already holds them is traced again
    own = (FakeQuantize, QuantLinear, QuantConv2d)
    tracer = _Tracer(tuple(timm_leaves) + own + tuple(leaf_modules), timm_wrapped)
    cargs = _concrete_args_for(model, n_inputs, concrete_args)
    try:
        graph = tracer.trace(model, concrete_args=cargs or None)
    except Exception as e:
        where = tracer.failed_at[-1] if tracer.failed_at else ("<top level>", type(model).__name__)
        raise TraceError(
            f"torch.fx could not trace {type(model).__name__}: tracing module '{where[0]}' ({where[1]}) failed with "
            f"{type(e).__name__}: {e}\nFix: pass fxquant.trace(..., leaf_modules=[{where[1]}]) to keep that module "
            f"opaque (it will not be quantized inside), or concrete_args={{...}} to specialise the Python control "
            f"flow on its inputs."
        ) from e
    name = type(model).__name__
    return fx.GraphModule(tracer.root, graph, name)


def _export_hf(model: nn.Module, example_inputs: tuple) -> fx.GraphModule:
    if hasattr(model, "set_attn_implementation"):
        try:
            model.set_attn_implementation("eager")
        except Exception:  # pragma: no cover - older transformers
            model.config._attn_implementation = "eager"
    elif hasattr(model, "config"):
        model.config._attn_implementation = "eager"
    if not example_inputs:
        raise TraceError(f"capturing the Hugging Face model {type(model).__name__} needs example_inputs (e.g. (pixel_values,))")
    dyn = tuple({0: torch.export.Dim.AUTO} if isinstance(x, torch.Tensor) and x.dim() > 0 else None for x in example_inputs)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ep = torch.export.export(model, tuple(example_inputs), dynamic_shapes=dyn, strict=False)
    except Exception as e:
        raise TraceError(
            f"torch.export could not capture {type(model).__name__}: {type(e).__name__}: {e}\n"
            f"Fix: check that the example inputs match the model's forward signature; for data-dependent control "
            f"flow see torch.export's documentation (torch.cond, or specialising the input)."
        ) from e
    exported = ep.module()
    # A plain GraphModule over the same graph: ExportedProgram.module() forbids .eval()/.train(),
    # which passes and evaluation need; the graph (with its pytree in/out codegen) is unchanged.
    return fx.GraphModule(exported, exported.graph, type(model).__name__)


def _owner(gm: nn.Module, target: str) -> tuple[nn.Module, str, str]:
    path, _, attr = target.rpartition(".")
    return (gm.get_submodule(path) if path else gm), path, attr


def _modularize(gm: fx.GraphModule) -> int:
    """Turn ``linear``/``conv2d`` calls on constant weights into ``call_module`` nodes."""
    modules = dict(gm.named_modules())
    changed = 0
    for node in list(gm.graph.nodes):
        kind = op_kind(node, modules)
        if node.op != "call_function" or kind not in ("linear", "conv"):
            continue
        args = list(node.args) + [None] * 7
        x, w, b = args[0], args[1], args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if not (isinstance(w, fx.Node) and w.op == "get_attr" and len(w.users) == 1):
            continue
        if b is not None and not (isinstance(b, fx.Node) and b.op == "get_attr" and len(b.users) == 1):
            continue
        owner, path, wattr = _owner(gm, w.target)
        weight = getattr(owner, wattr)
        bias = getattr(*_owner(gm, b.target)[::2]) if b is not None else None
        if kind == "linear":
            if weight.dim() != 2:
                continue
            mod = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        else:
            if weight.dim() != 4 or node.target not in (F.conv2d, torch.ops.aten.conv2d.default):
                continue
            stride, padding, dilation, groups = (args[3] or 1), (args[4] or 0), (args[5] or 1), (args[6] or 1)
            if isinstance(padding, str):
                continue
            mod = nn.Conv2d(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), stride=stride,
                            padding=padding, dilation=dilation, groups=groups, bias=bias is not None, device="meta")
        mod.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            mod.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)
        # Register at the weight owner's path when the owner holds nothing else, so state-dict keys keep
        # the model's names (vit.encoder...query.weight); otherwise beside it.
        plain_owner = type(owner) is nn.Module and set(owner._parameters) <= {wattr, "bias"} and not owner._modules \
            and not owner._buffers and path
        target = path if plain_owner else f"{path + '.' if path else ''}{node.name}_module"
        if plain_owner:
            parent, _, leaf = path.rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, leaf, mod)
        else:
            gm.add_submodule(target, mod)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(target, (x,))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        for attr_node in (w, b):
            if attr_node is not None and not attr_node.users:
                gm.graph.erase_node(attr_node)
        changed += 1
    gm.graph.lint()
    gm.recompile()
    return changed


def propagate_shapes(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> None:
    """Record ``tensor_meta`` (shape, dtype) on every node by running ``example_inputs``.

    Runs with every quantizer passing its input through (fake quant and observers off, restored
    after): shapes do not depend on quantization, observers must not see the example inputs, and a
    replayed artifact's quantizers are switched on before their saved parameters are loaded."""
    with torch.no_grad(), quantizer_state(gm, fake_quant=False, observe=False):
        ShapeProp(gm).propagate(*example_inputs)


def shapes_missing(gm: fx.GraphModule) -> bool:
    """Whether some module call of ``gm`` has no recorded shape (a pass inserted it after the last
    ``propagate_shapes``)."""
    return any(n.op == "call_module" and tensor_shape(n) is None for n in gm.graph.nodes)


def ensure_shapes(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> bool:
    """Shapes on every node, propagated again only when a module call lacks one (``shapes_missing``)
    and there are example inputs to run. The one rule behind the pass manager's ``SHAPES`` fact.
    Returns whether it propagated."""
    if example_inputs and shapes_missing(gm):
        propagate_shapes(gm, example_inputs)
        return True
    return False


def extract_subgraph(gm: fx.GraphModule, inputs: Sequence[fx.Node], outputs: Sequence[fx.Node]) -> fx.GraphModule:
    """A GraphModule computing ``outputs`` from ``inputs`` (a backward slice of ``gm``).

    Graph placeholders that the slice needs and that are not in ``inputs`` are appended as further
    inputs, in graph order; ``sub.meta[SUBGRAPH_INPUTS]`` names the node of ``gm`` behind each input.
    Submodules are shared with ``gm`` (not copied), so switching a quantizer on or off affects both."""
    inputs = list(inputs)
    needed: set[fx.Node] = set()
    stack = list(outputs)
    while stack:
        n = stack.pop()
        if n in needed:
            continue
        needed.add(n)
        if n not in inputs:
            stack.extend(n.all_input_nodes)
    extra = [n for n in gm.graph.nodes if n.op == "placeholder" and n in needed and n not in inputs]
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for i, n in enumerate(inputs + extra):
        env[n] = g.placeholder(f"in{i}_{n.name}")
    for n in gm.graph.nodes:
        if n in needed and n not in env:
            env[n] = g.node_copy(n, lambda a: env[a])
    g.output(env[outputs[0]] if len(outputs) == 1 else tuple(env[o] for o in outputs))
    sub = fx.GraphModule(gm, g, "Subgraph")
    sub.meta[SUBGRAPH_INPUTS] = [n.name for n in inputs + extra]
    return sub


def input_values(gm: fx.GraphModule, batch: Any) -> dict[str, Any]:
    """One batch's graph inputs by placeholder node name (``batches.graph_inputs``), the names that
    ``SUBGRAPH_INPUTS`` uses; passes add the values they compute under their node names."""
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    return dict(zip(placeholders, graph_inputs(gm, batch)))


def subgraph_args(sub: fx.GraphModule, values: dict[str, Any]) -> list[Any]:
    """The arguments of a subgraph made by ``extract_subgraph``, from values by source node name."""
    return [values[n] for n in sub.meta[SUBGRAPH_INPUTS]]


def logits_of(out: Any) -> torch.Tensor:
    """The logits tensor of a model output (tensor, HF ModelOutput, dict or tuple)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict) or hasattr(out, "keys"):
        if "logits" in out:
            return out["logits"]
        return next(iter(out.values()))
    if isinstance(out, (tuple, list)):
        return logits_of(out[0])
    raise TypeError(f"cannot find logits in model output of type {type(out).__name__}")


def trace(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor | None = None,
    *,
    leaf_modules: Sequence[type] = (),
    concrete_args: dict | None = None,
    check: bool = True,
) -> fx.GraphModule:
    """Capture ``model`` as a canonical ``GraphModule`` (see module docstring).

    Args:
        model: a timm / torchvision / plain ``nn.Module`` or a Hugging Face ``PreTrainedModel``.
        example_inputs: a tensor or tuple of tensors; required for Hugging Face models. When
            given and ``check`` is True, the graph's output is compared with the model's.
        leaf_modules: module types to keep opaque (not traced into, not quantized inside).
        concrete_args: forward arguments to specialise (``torch.fx.symbolic_trace`` semantics).

    Raises:
        TraceError: naming the module that failed and what to do about it.
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs or ())
    was_training = model.training
    m = copy.deepcopy(model).eval()
    fused_off = _disable_fused_attention(m)
    hf = is_hf_model(m)
    if hf:
        gm = _export_hf(m, example_inputs)
    else:
        gm = _symbolic_trace(m, max(1, len(example_inputs)), leaf_modules, concrete_args)
    modularized = _modularize(gm)
    gm.eval()
    gm.meta[CAPTURE] = {
        "method": "torch.export(strict=False)" if hf else "torch.fx.symbolic_trace",
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "fused_attention_disabled": fused_off,
        "modularized_layers": modularized,
    }
    if check and example_inputs:
        with torch.no_grad():
            ref = logits_of(m(*example_inputs))
            got = logits_of(gm(*example_inputs))
        err = (ref - got).abs().max().item() / max(ref.abs().max().item(), 1e-12)
        gm.meta[CAPTURE]["check_rel_err"] = err
        if err > 1e-4:
            raise TraceError(
                f"the captured graph of {type(model).__name__} does not reproduce the model (relative error {err:.2e}); "
                f"some Python control flow was specialised wrongly. Pass concrete_args or leaf_modules for the "
                f"module whose behaviour depends on its inputs."
            )
    model.train(was_training)
    return gm
