"""APHQ-ViT's Average Perturbation Hessian (APH): how sensitive the loss is to each element of an
intermediate value (docs/methods.md, APHQ-ViT). Not the one-layer KL ranking (``layer_sensitivity``).

For a node ``O`` of a float graph (a block output, or the residual add an MLP feeds) the *tail* is
the graph from ``O`` to the logits: ``graph.extract_subgraph`` from ``O``, the other values that
are still live after ``O`` (e.g. an attention mask computed before the blocks) and the graph
inputs it reads. With ``z = tail(O)`` and ``T = 20``::

    g± = ∂/∂O  KL(softmax(z/T) ‖ softmax(tail(O ± ε·d)/T))          (ε = 1e-6)
    H̄  = mean over images of |g⁺ − g⁻| / (2ε)                       shape [N, C] (per token, channel)

The KL's gradient vanishes at ``O``, so ``g⁺ − g⁻ ≈ 2ε·H·d``. The paper's direction is ``d = 1``
(every element perturbed at once): ``H̄`` then measures the *row sums* ``|H·1|`` of the loss
Hessian, which equal ``diag(H)`` only under the paper's independence assumption (no cross terms).

**``d = 1`` measures zero in pre-LN transformers.** LayerNorm is invariant to adding the same
constant to every channel of a token, and in a pre-LN ViT (timm ViT/DeiT/Swin, HF ViT) the
residual stream reaches the logits only through LayerNorms and residual adds, so
``tail(O + c·1) = tail(O)`` exactly and ``H·1 = 0``: in float64 ``H̄`` is roundoff (~1e-14 on
``fxquant.core.testing.tiny_vit``). The reference's fp32 values are not zero only because fp32 rounding
makes the perturbation non-uniform (next paragraph). ``direction="rademacher"`` perturbs along a
seeded random ±1 pattern ``r`` (one draw of ``O``'s shape per batch, in batch order, from
``torch.Generator().manual_seed(seed)``): ``H̄ ≈ mean |H·r|``, which LayerNorm does not
annihilate and which, like ``|H·1|``, equals ``|diag(H)|`` when the Hessian is diagonal (the
off-diagonal terms add with random signs instead of coherently).

Numerics: in float32 ``O + 1e-6`` is ``O`` plus one ulp for ``|O| ≥ 8`` and ``O`` itself for
``|O| ≥ 32`` (half an ulp is 1.9e-6 there), so a float32 APH is distorted or exactly zero on large
residual-stream values (the reference code's trap). ``average_perturbation_hessian`` therefore
runs the perturbed tail in **float64**, on a float64 copy of the tail (the model is untouched);
``dtype=torch.float32`` is only there to demonstrate the trap.

Streaming: the prefix (graph inputs → ``O`` and the other live values) runs in the graph's own
dtype on one calibration batch at a time; only ``Σ|g⁺ − g⁻|`` ([N, C], float64) and an image count
are kept, never per-image values.
"""

from __future__ import annotations

import copy
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import fx
from tqdm.auto import tqdm

from .batches import batch_size
from .calibration import Calibration
from .errors import CalibrationError, ConfigError, PassError
from .graph import extract_subgraph, input_values, subgraph_args

APH_EPS = 1e-6
APH_TEMPERATURE = 20.0
APH_DIRECTIONS = ("ones", "rademacher")


def logits_node(gm: fx.GraphModule) -> fx.Node:
    """The node whose value is the graph's logits: the output itself, or its ``logits`` entry /
    first entry when the graph returns a tuple, list or dict (``graph.logits_of`` on nodes)."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    val: Any = out.args[0]
    while not isinstance(val, fx.Node):
        if isinstance(val, dict) and val:
            val = val.get("logits", next(iter(val.values())))
        elif isinstance(val, (tuple, list)) and val:
            val = val[0]
        else:
            raise PassError(f"cannot find the logits among the graph outputs {out.args[0]!r}")
    return val


def live_values(gm: fx.GraphModule, node: fx.Node) -> list[fx.Node]:
    """``node`` followed by every other value computed before it that a later node still reads
    (graph order; placeholders and ``get_attr`` excluded: subgraphs read those themselves)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    at = order[node]
    live = [n for n in gm.graph.nodes
            if order[n] < at and n.op not in ("placeholder", "get_attr", "output") and any(order[u] > at for u in n.users)]
    return [node, *live]


def tail_graph(gm: fx.GraphModule, node: fx.Node) -> fx.GraphModule:
    """The graph from ``node`` (and the other live values, and graph inputs it reads) to the
    logits; its inputs are named in ``tail.meta[SUBGRAPH_INPUTS]``, ``node`` first."""
    return extract_subgraph(gm, live_values(gm, node), [logits_node(gm)])


def _cast_copy(sub: fx.GraphModule, dtype: torch.dtype) -> fx.GraphModule:
    """A deep copy of ``sub`` whose floating parameters, buffers and tensor constants are ``dtype``,
    and whose explicit float32 dtype arguments (e.g. Hugging Face's ``softmax(..., torch.float32)``
    and ``to(torch.float32)``) name ``dtype`` instead."""
    out = copy.deepcopy(sub).to(dtype)

    def retype(a):
        return dtype if a is torch.float32 else a

    for n in out.graph.nodes:
        n.args = fx.node.map_aggregate(n.args, retype)
        n.kwargs = fx.node.map_aggregate(n.kwargs, retype)
    out.recompile()
    for n in out.graph.nodes:
        if n.op != "get_attr":
            continue
        owner_path, _, attr = str(n.target).rpartition(".")
        owner = out.get_submodule(owner_path) if owner_path else out
        val = getattr(owner, attr, None)
        if isinstance(val, torch.Tensor) and not isinstance(val, torch.nn.Parameter) and val.is_floating_point() \
                and attr not in owner._buffers:
            setattr(owner, attr, val.to(dtype))
    return out


def _cast(v: Any, dtype: torch.dtype) -> Any:
    return v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v


def _kl_sum(p_log: torch.Tensor, q_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Σ over images (and any other leading positions) of KL(p ‖ softmax(q_logits/T)) over the last dim."""
    q_log = F.log_softmax(q_logits / temperature, dim=-1)
    return (p_log.exp() * (p_log - q_log)).sum()


def average_perturbation_hessian(
    gm: fx.GraphModule,
    node: fx.Node | str,
    calib: Iterable | Calibration,
    *,
    max_images: int | None = None,
    eps: float = APH_EPS,
    temperature: float = APH_TEMPERATURE,
    dtype: torch.dtype = torch.float64,
    direction: str = "ones",
    seed: int = 0,
    progress: bool = False,
) -> torch.Tensor:
    """The Average Perturbation Hessian ``H̄`` of the value of ``node`` (see module docstring).

    Args:
        gm: a float graph (its modules are not modified; the tail is copied and cast to ``dtype``).
        node: the node (or its name) whose value ``O`` is perturbed, e.g. a block output.
        calib: calibration batches (an iterable of batches or a ``Calibration``; not a forward loop).
        max_images: at most this many images are used (None: all the batches).
        eps: the perturbation ε added to (and subtracted from) every element of ``O``.
        temperature: the softmax temperature T of the KL.
        dtype: the tail's dtype. Keep float64: in float32 ``O ± 1e-6`` rounds to ``O`` for |O| ≥ 32.
        direction: ``"ones"`` (the paper: ``|H·1|``, zero in pre-LN transformers) or
            ``"rademacher"`` (``|H·r|`` with a seeded random ±1 pattern ``r``).
        seed: seeds the ``"rademacher"`` patterns.

    Returns:
        ``H̄`` of shape ``O.shape[1:]`` (``[N, C]`` for a token sequence), float64: the mean over
        images of ``|g⁺ − g⁻|/(2ε)``, which estimates ``|H·d|`` per element. The reference takes the
        KL as a batch mean; here each image's KL counts once (a sum over the batch), so the result
        does not depend on how the images are batched.

    Raises:
        CalibrationError: no calibration batches, or a forward loop instead of batches.
    """
    if direction not in APH_DIRECTIONS:
        raise ConfigError(f"APH direction must be one of {APH_DIRECTIONS}, got {direction!r}")
    if isinstance(node, str):
        found = [n for n in gm.graph.nodes if n.name == node]
        if not found:
            raise PassError(f"the graph has no node named {node!r}")
        node = found[0]
    cal = calib if isinstance(calib, Calibration) else Calibration(calib, progress=False)
    if cal.is_loop:
        raise CalibrationError("the Average Perturbation Hessian needs calibration batches (it runs the graph in pieces "
                               "itself), not a forward_loop callable")
    live = live_values(gm, node)
    prefix = extract_subgraph(gm, [], live)
    tail = _cast_copy(tail_graph(gm, node), dtype)
    gen = torch.Generator().manual_seed(seed)
    total: torch.Tensor | None = None
    images = 0
    for batch in tqdm(cal.limited(max_images), desc=f"APH {node.name}", disable=not progress, leave=False):
        values = input_values(gm, batch)
        with torch.no_grad():
            xs = prefix(*subgraph_args(prefix, values))
        xs = xs if isinstance(xs, tuple) else (xs,)
        values.update(zip((n.name for n in live), xs))
        args = [_cast(v, dtype) for v in subgraph_args(tail, values)]
        o, rest = args[0], args[1:]
        with torch.no_grad():
            z = tail(o, *rest)
        if z.dtype != dtype:
            raise PassError(f"the tail of '{node.name}' returns {z.dtype} in a {dtype} copy (an op casts explicitly); "
                            f"the APH cannot be computed at {dtype}")
        p_log = F.log_softmax(z / temperature, dim=-1)
        if direction == "ones":
            step = torch.full_like(o, eps)
        else:
            step = (torch.randint(0, 2, o.shape, generator=gen) * 2 - 1).to(o.dtype) * eps
        grads = []
        with torch.enable_grad():
            for sign in (1.0, -1.0):
                op = (o + sign * step).requires_grad_(True)
                loss = _kl_sum(p_log, tail(op, *rest), temperature)
                grads.append(torch.autograd.grad(loss, op)[0])
        diff = (grads[0] - grads[1]).abs().double().sum(0) / (2 * eps)
        total = diff if total is None else total + diff
        images += batch_size(batch) or o.shape[0]
    if total is None or images == 0:
        raise CalibrationError("the calibration data is empty (no batches); the APH needs at least one image")
    return total / images
