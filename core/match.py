"""Structural graph matching shared by every pass.

Nodes are classified by *what they compute* (an equivalence table over ``call_module`` types,
``call_function`` targets at torch and ATen level, and ``call_method`` names), never by module
names: timm graphs hold ``q_norm``/``norm``/``ls1`` Identity modules and HF graphs hold
ATen ops, and a pass must see through both.

Kinds:
  * ``linear``, ``conv``, ``layer_norm``, ``softmax``, ``matmul``, ``add``, ``gelu``, ``relu``;
  * ``passthrough``: the value is unchanged (Identity, eval Dropout, DropPath, contiguous, clone,
    dtype-preserving ``to``);
  * ``reshuffle``: elements move but values are unchanged and no element is invented (view,
    reshape, permute, transpose, flatten, squeeze, select/slice/getitem, unbind, chunk, roll...);
  * ``pad``: adds constant elements (e.g. Swin pads windows after ``norm1``);
  * ``quantize``: an fxquant fake quantizer (value approximately preserved).
"""

from __future__ import annotations

import fnmatch
import operator
from collections import deque
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import fx, nn

from .quant.modules import FakeQuantize

aten = torch.ops.aten

_MODULE_KINDS: list[tuple[type, str]] = [
    (FakeQuantize, "quantize"),
    (nn.Linear, "linear"),
    (nn.Conv2d, "conv"),
    (nn.LayerNorm, "layer_norm"),
    (nn.Softmax, "softmax"),
    (nn.GELU, "gelu"),
    (nn.ReLU, "relu"),
    (nn.Identity, "passthrough"),
    (nn.Dropout, "passthrough"),
    (nn.Flatten, "reshuffle"),
    (DropPath, "passthrough"),  # timm's DropPath is the identity in eval mode
]


def _ops(*names: str) -> list:
    out = []
    for n in names:
        packet, _, overload = n.partition(".")
        op = getattr(aten, packet, None)
        if op is not None:
            out.append(getattr(op, overload or "default", None))
    return [o for o in out if o is not None]


_FUNCTION_KINDS: dict = {}
for _fn, _kind in [
    (F.linear, "linear"), (F.conv2d, "conv"), (F.layer_norm, "layer_norm"),
    (F.softmax, "softmax"), (torch.softmax, "softmax"),
    (torch.matmul, "matmul"), (operator.matmul, "matmul"), (torch.bmm, "matmul"),
    (operator.add, "add"), (torch.add, "add"), (F.gelu, "gelu"),
    (F.relu, "relu"), (torch.relu, "relu"),
    (F.dropout, "passthrough"), (torch.clone, "passthrough"),
    (torch.reshape, "reshuffle"), (torch.permute, "reshuffle"), (torch.transpose, "reshuffle"),
    (torch.flatten, "reshuffle"), (torch.squeeze, "reshuffle"), (torch.unsqueeze, "reshuffle"),
    (torch.roll, "reshuffle"), (torch.unbind, "reshuffle"), (torch.chunk, "reshuffle"),
    (torch.split, "reshuffle"), (torch.select, "reshuffle"), (torch.narrow, "reshuffle"),
    (F.pad, "pad"),
]:
    _FUNCTION_KINDS[_fn] = _kind
for _kind, _names in {
    "linear": ["linear"], "conv": ["conv2d", "convolution"], "layer_norm": ["layer_norm"],
    "softmax": ["softmax.int", "_softmax"], "matmul": ["matmul", "bmm"], "add": ["add.Tensor"],
    "gelu": ["gelu"], "relu": ["relu"], "passthrough": ["dropout", "clone", "contiguous", "alias", "detach"],
    "reshuffle": ["view", "reshape", "_unsafe_view", "permute", "transpose.int", "t", "flatten.using_ints",
                  "unflatten.int", "squeeze.dim", "unsqueeze", "select.int", "slice.Tensor", "unbind.int",
                  "split.Tensor", "chunk", "roll", "expand", "narrow"],
    "pad": ["constant_pad_nd", "pad"],
}.items():
    for _op in _ops(*_names):
        _FUNCTION_KINDS[_op] = _kind

_METHOD_KINDS = {
    "softmax": "softmax", "matmul": "matmul", "add": "add", "relu": "relu",
    "contiguous": "passthrough", "clone": "passthrough",
    **{m: "reshuffle" for m in ("view", "reshape", "permute", "transpose", "flatten", "unflatten", "squeeze",
                                "unsqueeze", "unbind", "chunk", "split", "roll", "expand", "narrow", "select",
                                "view_as", "reshape_as", "mT", "t")},
}


def modules_of(gm: fx.GraphModule) -> dict[str, nn.Module]:
    return dict(gm.named_modules())


def op_kind(node: fx.Node, modules: dict[str, nn.Module] | None = None) -> str | None:
    """The kind of computation a node performs (see module docstring), or None."""
    if node.op == "call_module":
        mod = (modules or {}).get(node.target)
        if mod is None:
            return None
        if isinstance(mod, nn.Dropout) and mod.training:
            return None
        for typ, kind in _MODULE_KINDS:
            if isinstance(mod, typ):
                return kind
        return None
    if node.op == "call_function":
        target = node.target
        if target is operator.getitem:
            src = node.args[0]
            # getitem on a tensor (slicing / token selection) or on unbind/chunk/split results
            return "reshuffle" if isinstance(src, fx.Node) and _is_tensor_node(src) else None
        kind = _FUNCTION_KINDS.get(target)
        if kind == "passthrough" and target in _ops("dropout") + [F.dropout]:
            train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", node.kwargs.get("training", False))
            return "passthrough" if train is False else None
        if kind is None and target in _ops("to.dtype", "_to_copy"):
            return "passthrough"
        return kind
    if node.op == "call_method":
        if node.target == "to":
            return "passthrough"
        return _METHOD_KINDS.get(node.target)
    return None


def _is_tensor_node(node: fx.Node) -> bool:
    """False for nodes that produce shapes/sizes (``x.shape``, ``size()``) rather than tensors."""
    if _is_shape_query(node):
        return False
    val = node.meta.get("val", node.meta.get("tensor_meta"))
    if val is not None and not isinstance(val, (torch.Tensor, list, tuple)) and not hasattr(val, "shape"):
        return False
    return True


def tensor_input(node: fx.Node) -> fx.Node | None:
    """The data input of a single-input op (its first Node argument)."""
    for a in node.args:
        if isinstance(a, fx.Node):
            return a
    return None


def producer(node: fx.Node, modules: dict, *, through: Iterable[str] = ("passthrough",)) -> fx.Node:
    """Walk up from ``node`` while it is one of the ``through`` kinds; return the first other node."""
    through = set(through)
    while op_kind(node, modules) in through:
        nxt = tensor_input(node)
        if nxt is None:
            break
        node = nxt
    return node


@dataclass(frozen=True)
class Use:
    """A consumer reached from a producer: ``node`` reads the value at ``arg`` (positional index)
    after it went through ``path`` (the skipped through-nodes, in order)."""

    node: fx.Node
    arg: int
    path: tuple[fx.Node, ...]


def consumers(node: fx.Node, modules: dict, *, through: Iterable[str] = ("passthrough",)) -> list[Use]:
    """Every first non-``through`` consumer of ``node``'s value, walking down through ``through`` ops."""
    through = set(through)
    out: list[Use] = []
    queue = deque([(node, ())])
    seen = set()
    while queue:
        cur, path = queue.popleft()
        for user in cur.users:
            if (user, cur) in seen:
                continue
            seen.add((user, cur))
            kind = op_kind(user, modules)
            if kind in through and tensor_input(user) is cur:
                queue.append((user, path + (user,)))
            else:
                idx = next((i for i, a in enumerate(user.args) if a is cur), -1)
                out.append(Use(user, idx, path))
    return out


def node_fqn(node: fx.Node) -> str:
    """Qualified name of the module a node belongs to ('' for top-level code)."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        fqn = list(stack.values())[-1]
        fqn = fqn[0] if isinstance(fqn, tuple) else str(fqn)
        return fqn.replace("L__self__.", "").replace("L__self__", "")
    return ""


def module_stack(node: fx.Node) -> list[tuple[str, str]]:
    """``[(fqn, type name), ...]`` from outermost to innermost module that produced the node."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for v in stack.values():
        fqn, typ = v if isinstance(v, tuple) else (str(v), "")
        typ = typ if isinstance(typ, str) else f"{typ.__module__}.{typ.__qualname__}"
        out.append((fqn, typ))
    return out


def nodes_of_kind(gm: fx.GraphModule, kind: str, modules: dict | None = None) -> list[fx.Node]:
    modules = modules if modules is not None else modules_of(gm)
    return [n for n in gm.graph.nodes if op_kind(n, modules) == kind]


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionMatch:
    """``qk = matmul(q, kᵀ)`` → (scale/mask) → ``softmax`` → [dropout] → ``av = matmul(A, v)``."""

    qk: fx.Node
    softmax: fx.Node
    av: fx.Node

    @property
    def name(self) -> str:
        return node_fqn(self.softmax) or self.softmax.name


def _nearest_matmul_above(node: fx.Node, modules: dict, max_depth: int = 6) -> fx.Node | None:
    queue = deque([(node, 0)])
    seen = {node}
    while queue:
        cur, depth = queue.popleft()
        if depth > 0 and op_kind(cur, modules) == "matmul":
            return cur
        if depth >= max_depth:
            continue
        for a in cur.all_input_nodes:
            if a not in seen and a.op not in ("placeholder", "get_attr"):
                seen.add(a)
                queue.append((a, depth + 1))
    return None


def find_attention(gm: fx.GraphModule, modules: dict | None = None) -> list[AttentionMatch]:
    """Every softmax whose output is the first operand of a matmul (A·v) and whose input derives
    from a matmul (q·kᵀ), with scale, mask or bias ops in between."""
    modules = modules if modules is not None else modules_of(gm)
    out = []
    for sm in nodes_of_kind(gm, "softmax", modules):
        avs = [u for u in consumers(sm, modules, through=("passthrough", "quantize"))
               if op_kind(u.node, modules) == "matmul" and u.arg == 0]
        if len(avs) != 1:
            continue
        qk = _nearest_matmul_above(sm, modules)
        if qk is None:
            continue
        out.append(AttentionMatch(qk=qk, softmax=sm, av=avs[0].node))
    return out


# ---------------------------------------------------------------------------------------------
# Stem and head
# ---------------------------------------------------------------------------------------------


def stem_layers(gm: fx.GraphModule, modules: dict | None = None) -> list[fx.Node]:
    """Linear/Conv nodes whose input is a graph input (through passthrough/reshuffle ops): the
    patch embedding."""
    modules = modules if modules is not None else modules_of(gm)
    out = []
    for n in gm.graph.nodes:
        if op_kind(n, modules) in ("linear", "conv"):
            src = producer(n.args[0], modules, through=("passthrough", "reshuffle", "quantize"))
            if src.op == "placeholder":
                out.append(n)
    return out


def head_layers(gm: fx.GraphModule, modules: dict | None = None) -> list[fx.Node]:
    """Linear nodes from which the graph output is reached without another Linear, Conv or
    matmul: the classifier head(s) (two for distilled DeiT)."""
    modules = modules if modules is not None else modules_of(gm)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    heads, seen = [], set()
    queue = deque(output.all_input_nodes)
    while queue:
        cur = queue.popleft()
        if cur in seen:
            continue
        seen.add(cur)
        kind = op_kind(cur, modules)
        if kind == "linear":
            heads.append(cur)
            continue
        if kind in ("conv", "matmul"):
            continue
        queue.extend(cur.all_input_nodes)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return sorted(heads, key=order.__getitem__)


# ---------------------------------------------------------------------------------------------
# LayerNorm -> Linear sites (RepQ-ViT scale reparameterization)
# ---------------------------------------------------------------------------------------------


def tensor_shape(node: fx.Node) -> tuple[int, ...] | None:
    """Static shape recorded on a node (``val`` from torch.export or ``tensor_meta`` from
    ShapeProp); symbolic sizes become -1."""
    val = node.meta.get("val")
    if val is not None and hasattr(val, "shape"):
        return tuple(int(s) if isinstance(s, int) or str(s).isdigit() else -1 for s in val.shape)
    tm = node.meta.get("tensor_meta")
    if tm is not None and hasattr(tm, "shape"):
        return tuple(int(s) for s in tm.shape)
    return None


def layer_norm_channels(node: fx.Node, modules: dict) -> int | None:
    if node.op == "call_module":
        shape = getattr(modules[node.target], "normalized_shape", None)
    else:
        shape = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
    if shape is None or len(tuple(shape)) != 1:
        return None
    return int(tuple(shape)[0])


def _is_shape_query(node: fx.Node) -> bool:
    """``x.shape`` / ``x.size()`` / ``sym_size``: reads metadata, not values."""
    if node.op == "call_function" and node.target is getattr:
        return True
    if node.op == "call_method" and node.target in ("size", "dim"):
        return True
    return node.op == "call_function" and "sym_size" in str(node.target)


@dataclass(frozen=True)
class LayerNormSite:
    """A LayerNorm and the Linear layers that read its output through channel-preserving ops.

    ``legal`` is False when folding would change the model: ``reason`` says why."""

    ln: fx.Node
    linears: tuple[fx.Node, ...]
    path: tuple[fx.Node, ...]
    legal: bool
    reason: str = ""

    @property
    def name(self) -> str:
        return node_fqn(self.ln) or self.ln.name


def layer_norm_sites(gm: fx.GraphModule, modules: dict | None = None) -> list[LayerNormSite]:
    """Every LayerNorm with its consumers, and whether per-channel scales can be folded into it.

    Legal when every (non shape-query) consumer of the LN output, reached through passthrough and
    reshuffle ops that keep the channel as the last dimension (token selection, reshape, window
    partition, zero-size padding), is a Linear reading it as its input. Fake quantizers on the
    way are walked through (``path`` then holds them).
    """
    modules = modules if modules is not None else modules_of(gm)
    sites = []
    for ln in nodes_of_kind(gm, "layer_norm", modules):
        channels = layer_norm_channels(ln, modules)
        linears: list[fx.Node] = []
        path: list[fx.Node] = []
        reason = "" if channels else "normalizes over more than one dimension"
        stack = [ln]
        seen = set()
        while stack and not reason:
            cur = stack.pop()
            for user in cur.users:
                if user in seen or _is_shape_query(user):
                    continue
                seen.add(user)
                kind = op_kind(user, modules)
                is_extra = kind == "quantize"
                shape = tensor_shape(user)
                if kind == "linear" and user.args[0] is cur:
                    if getattr(modules.get(user.target), "in_features", None) != channels:
                        reason = f"'{user.name}' does not read the {channels} LayerNorm channels"
                    linears.append(user)
                elif kind in ("passthrough", "reshuffle", "pad") or is_extra:
                    if tensor_input(user) is not cur:
                        reason = f"'{user.name}' ({kind}) combines the LayerNorm output with other tensors"
                    elif shape is None and kind != "passthrough" and not is_extra:
                        reason = f"no shape recorded on '{user.name}' (run shape propagation with example inputs)"
                    elif shape is not None and shape[-1] != channels:
                        reason = f"'{user.name}' ({kind}) moves the channel dimension"
                    elif kind == "pad" and tensor_shape(cur) is not None and tensor_shape(cur) != shape:
                        reason = f"'{user.name}' pads zero tokens for this input size; folding would change outputs"
                    else:
                        path.append(user)
                        stack.append(user)
                else:
                    what = f"{user.op} {getattr(user.target, '__name__', user.target)}"
                    reason = f"its output also feeds '{user.name}' ({what}), not only Linear layers"
        if not linears and not reason:
            reason = "its output reaches no Linear layer"
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        sites.append(LayerNormSite(ln, tuple(sorted(linears, key=order.__getitem__)), tuple(path), not reason, reason))
    return sites


# ---------------------------------------------------------------------------------------------
# Transformer blocks (QwT compensation regions)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """A transformer block as a graph region: the nodes of one module instance, the residual
    stream entering it (``input``), other tensors it reads from outside (``extra_inputs``, e.g. a
    shared attention mask) and the single node whose value leaves it (``output``)."""

    fqn: str
    nodes: tuple[fx.Node, ...]
    input: fx.Node
    extra_inputs: tuple[fx.Node, ...]
    output: fx.Node


def _stack_fqns(node: fx.Node) -> list[str]:
    return [fqn for fqn, _ in module_stack(node)] + ([str(node.target)] if node.op == "call_module" else [])


def _region(gm: fx.GraphModule, fqn: str) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr") and fqn in _stack_fqns(n)]


def block_region(gm: fx.GraphModule, fqn: str, modules: dict | None = None) -> Block | None:
    """The region of module ``fqn`` as a ``Block``, or None when it is not a single-output region
    with a residual-stream input of the output's shape."""
    region = module_region(gm, fqn)
    if region is None:
        return None
    ins = [region.input, *region.extra_inputs]
    out_shape = tensor_shape(region.output)
    stream = [a for a in ins if tensor_shape(a) is not None and tensor_shape(a) == out_shape]
    if len(stream) != 1:
        return None
    return Block(fqn, region.nodes, stream[0], tuple(a for a in ins if a is not stream[0]), region.output)


def modules_matching(gm: fx.GraphModule, globs: Iterable[str]) -> list[str]:
    """FQNs of the modules called in ``gm`` that match any of the FQN ``globs``, in graph order."""
    globs = tuple(globs)
    fqns: list[str] = []
    for n in gm.graph.nodes:
        for fqn, _ in module_stack(n):
            if fqn not in fqns and any(fnmatch.fnmatchcase(fqn, g) for g in globs):
                fqns.append(fqn)
    return fqns


def module_region(gm: fx.GraphModule, fqn: str) -> Block | None:
    """The region of module ``fqn`` as a ``Block`` whose input may have any shape (a patch
    embedding, a classifier head, Swin's PatchMerging), or None when the region has no nodes,
    several outputs or no tensor input. ``input`` is the first outside tensor it reads, in graph
    order; the others are ``extra_inputs``."""
    nodes = _region(gm, fqn)
    if not nodes:
        return None
    inside = set(nodes)
    outs = [n for n in nodes if any(u not in inside and not _is_shape_query(u) for u in n.users)]
    if len(outs) != 1:
        return None
    ins = []
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in inside and a.op != "get_attr" and not _is_shape_query(a) and a not in ins:
                ins.append(a)
    if not ins:
        return None
    return Block(fqn, tuple(nodes), ins[0], tuple(ins[1:]), outs[0])


def find_blocks(gm: fx.GraphModule, modules: dict | None = None) -> list[Block]:
    """Transformer blocks found from structure and module hierarchy, in graph order: for each
    attention (softmax → A·v), the innermost enclosing module whose region holds exactly one
    attention, an MLP activation (GELU, or ReLU after ``mlp_reconstruct``) and at least four Linear
    layers, and has one output.
    Finds timm ViT/DeiT ``blocks.i``, Swin ``layers.i.blocks.j`` and HF ``ViTLayer`` without
    naming any of them. Needs shapes on nodes (``graph.propagate_shapes``)."""
    modules = modules if modules is not None else modules_of(gm)
    softmaxes = {a.softmax for a in find_attention(gm, modules)}
    blocks, seen = [], set()
    for sm in [n for n in gm.graph.nodes if n in softmaxes]:
        for fqn in reversed([f for f, _ in module_stack(sm)]):
            if not fqn or fqn in seen:
                continue
            region = _region(gm, fqn)
            kinds = [op_kind(n, modules) for n in region]
            if sum(n in softmaxes for n in region) != 1:
                break  # enclosing modules only get more attention layers
            if kinds.count("linear") >= 4 and ("gelu" in kinds or "relu" in kinds):
                blk = block_region(gm, fqn, modules)
                if blk is not None:
                    blocks.append(blk)
                    seen.add(fqn)
                break
    return blocks


# ---------------------------------------------------------------------------------------------
# MLPs (APHQ-ViT MLP reconstruction)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MLPMatch:
    """``fc1`` (Linear) → ``act`` (the activation, GELU unless asked otherwise) → ``fc2`` (Linear) →
    ``residual`` (the add the MLP output enters) inside ``block``, stepping through passthrough ops
    (eval Dropout, Identity norm and LayerScale). ``legal`` is False when the activation's neighbourhood is not that shape:
    ``reason`` says why (the other fields are then None where unknown)."""

    block: Block
    act: fx.Node
    fc1: fx.Node | None
    fc2: fx.Node | None
    residual: fx.Node | None
    legal: bool
    reason: str = ""


def find_mlps(gm: fx.GraphModule, modules: dict | None = None, blocks: list[Block] | None = None,
              acts: Iterable[str] = ("gelu",)) -> list[MLPMatch]:
    """Every ``acts``-kind activation node inside a transformer block (``find_blocks``) with its
    two Linear layers and the residual add, in graph order (see ``MLPMatch``)."""
    modules = modules if modules is not None else modules_of(gm)
    blocks = blocks if blocks is not None else find_blocks(gm, modules)
    acts = set(acts)
    out = []
    for blk in blocks:
        inside = set(blk.nodes)
        for act in [n for n in blk.nodes if op_kind(n, modules) in acts]:
            src = tensor_input(act)
            fc1 = producer(src, modules) if src is not None else None
            fc2 = residual = None
            reason = ""
            uses = consumers(act, modules)
            if fc1 is None or op_kind(fc1, modules) != "linear" or fc1 not in inside:
                reason = f"its input comes from '{getattr(fc1, 'name', None)}', not a Linear of the block"
            elif len(uses) != 1 or op_kind(uses[0].node, modules) != "linear" or uses[0].arg != 0:
                reason = f"its output feeds {[u.node.name for u in uses]}, not exactly one Linear"
            else:
                fc2 = uses[0].node
                outs = consumers(fc2, modules)
                if len(outs) != 1 or op_kind(outs[0].node, modules) != "add" or outs[0].node not in inside:
                    reason = f"the output of '{fc2.name}' feeds {[u.node.name for u in outs]}, not one residual add"
                else:
                    residual = outs[0].node
            out.append(MLPMatch(blk, act, fc1, fc2, residual, not reason, reason))
    return out
