"""``Calibrate``: stream calibration data through the observers and set every quantizer's
parameters (torch.ao "calibrate" + "convert" to fake-quant mode).

Weight quantizers are set from the weights themselves (exact statistics, no data). Activation
quantizers stream statistics, compute their parameters with their range estimator and switch to
fake quantization. Two orders:

* ``parallel``: one pass over the data; every quantizer observes the float model.
* ``sequential``: quantizers are calibrated stage by stage in graph order (a stage = quantizers
  with no quantizer between them), each stage observing the model with all earlier stages
  already quantizing and later ones off. This is what RepQ-ViT's lazily initialised quantizers
  do within its single calibration forward; it costs one pass over the data per stage.
A NaN/Inf in a batch stops calibration with the name of the first graph node that produced it.

Dynamic activation quantizers (``QuantSpec.dynamic``: ranges from each input at run time) have
nothing to fit: they observe nothing and switch on with their stage (in ``parallel`` order, after
the one pass over the data, so the static quantizers still observe the float model). A model whose
activation quantizers are all dynamic needs no calibration data.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx
from tqdm.auto import tqdm

from fxquant.core import distributed
from fxquant.core.batches import call_model
from fxquant.core.calibration import Calibration, locate_nonfinite
from fxquant.core.errors import CalibrationError, ConfigError
from fxquant.core.pipeline import Pass, PassContext, PassResult, register_pass
from fxquant.core.quant import FakeQuantize, QuantConv2d, QuantLinear, quantizer_state
from fxquant.core.quant.modules import NonFiniteInput


def weight_quantized_layers(gm: fx.GraphModule):
    return [(n, m) for n, m in gm.named_modules() if isinstance(m, (QuantLinear, QuantConv2d))]


def act_quantizers(gm: fx.GraphModule) -> list[tuple[str, FakeQuantize]]:
    """Every activation quantizer as ``(qualified name, module)``, static and dynamic."""
    return [(n, m) for n, m in gm.named_modules() if isinstance(m, FakeQuantize) and not m.weight]


def calibrate_weights(gm: fx.GraphModule, only: set[str] | None = None) -> int:
    """(Re)compute weight-quantizer parameters from the current weights."""
    n = 0
    for name, layer in weight_quantized_layers(gm):
        if only is not None and name not in only:
            continue
        layer.weight_fake_quant.calibrate_from(layer.weight)
        layer.weight_fake_quant.fake_quant_enabled = True
        n += 1
    return n


def observe(gm: fx.GraphModule, quantizers: list[FakeQuantize], calib: Calibration, max_images: int | None = None) -> int:
    """Stream ``calib`` with ``quantizers`` observing; other quantizers keep their state. Returns
    the number of batches.

    Under ``torch.distributed`` the batches are sharded (``Calibration.fold_batches``) and the
    observers end equal to the single-process ones bit for bit: histogram/min-max observers
    (``order_free``: their merge is exact and independent of order) accumulate on each rank and are
    merged once at the end; the others (BitLog2's float sums, IGQ's instance ranges, whose result
    depends on the order of the batches) hand over one observer per batch, folded on every rank in
    batch order. A forward loop (``calib`` callable) runs whole on every rank."""
    for q in quantizers:
        q.observer = None
    with quantizer_state(quantizers, fake_quant=False, observe=True):
        if calib.is_loop:  # the loop owns its batches: the error can name the quantizer, not the node
            try:
                return calib.run(gm, max_images=max_images)
            except NonFiniteInput as e:
                raise CalibrationError(_nonfinite_message(gm, None, e, "?")) from None
        folded: dict[int, object] = {}
        seen = [0]

        def compute(batch):
            try:
                call_model(gm, batch)
            except NonFiniteInput as e:
                return _NonFinite(gm, batch, e)
            per_batch = []
            for q in quantizers:
                if q.observer is not None and not q.observer.order_free:
                    per_batch.append(q.observer)
                    q.observer = None
                else:
                    per_batch.append(None)
            return per_batch

        def fold(result):
            if isinstance(result, _NonFinite):  # raised on every rank, in batch order
                raise CalibrationError(result.message(seen[0]))
            for q, ob in zip(quantizers, result):
                if ob is not None:
                    folded[id(q)] = ob if id(q) not in folded else folded[id(q)].merge(ob)
            seen[0] += 1

        batches = calib.fold_batches(compute, fold, max_images=max_images)
        for q in quantizers:
            if id(q) in folded:
                q.observer = folded[id(q)]
        _merge_across_ranks([q for q in quantizers if id(q) not in folded])
        return batches


def _merge_across_ranks(quantizers: list[FakeQuantize]) -> None:
    """Merge the ranks' order-free observers in rank order (exact: see ``Observer``)."""
    if distributed.world_size() == 1 or not quantizers:
        return
    for q, states in zip(quantizers, zip(*distributed.all_gather_objects([q.observer for q in quantizers]))):
        merged = None
        for ob in states:
            if ob is not None:
                merged = ob if merged is None else merged.merge(ob)
        q.observer = merged


def _nonfinite_message(gm: fx.GraphModule, batch, e: NonFiniteInput, index) -> str:
    where = locate_nonfinite(gm, batch) if batch is not None else None
    at = f"node '{where[0]}' ({where[1]})" if where else f"quantizer '{e.label}'"
    return (f"calibration batch {index} produced NaN/Inf, first at {at}; "
            f"check the input data (normalisation, corrupt images) or the model's numerics")


class _NonFinite:
    """A batch's NaN/Inf, located on the rank that ran it and raised on every rank when folded."""

    def __init__(self, gm: fx.GraphModule, batch, e: NonFiniteInput):
        self.text = _nonfinite_message(gm, batch, e, "{index}")

    def message(self, index: int) -> str:
        return self.text.replace("{index}", str(index), 1)


def quantizer_stages(gm: fx.GraphModule, quantizers: list[FakeQuantize]) -> list[list[FakeQuantize]]:
    """Group activation quantizers into dependency stages (topological levels over quantizers)."""
    wanted = {id(q) for q in quantizers}
    modules = dict(gm.named_modules())
    depth: dict[fx.Node, int] = {}
    stages: dict[int, list[FakeQuantize]] = {}
    for node in gm.graph.nodes:
        d = max((depth.get(a, 0) for a in node.all_input_nodes), default=0)
        mod = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(mod, FakeQuantize) and id(mod) in wanted:
            d += 1
            if mod not in stages.get(d, []):
                stages.setdefault(d, []).append(mod)
        depth[node] = d
    return [stages[k] for k in sorted(stages)]


@register_pass
@dataclass(frozen=True)
class Calibrate(Pass):
    """Set quantizer parameters: weights from the weights, activations from calibration data.

    Args:
        order: ``"parallel"`` or ``"sequential"`` (see module docstring).
        only_uncalibrated: leave quantizers that already have parameters alone (so a later
            ``Calibrate`` in a pipeline only handles newly inserted quantizers).
        max_images: use at most this many calibration images (None: all), e.g. RepQ's 32 when the
            same data also feeds QwT's 512.
    """

    name = "calibrate"
    requires = ("quantizers_inserted",)
    provides = ("calibrated",)
    order: str = "parallel"
    only_uncalibrated: bool = True
    max_images: int | None = None

    def __post_init__(self):
        if self.order not in ("parallel", "sequential"):
            raise ConfigError(f"calibrate: order must be 'parallel' or 'sequential', got {self.order!r}")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        everything = [q for _, q in act_quantizers(gm)]
        acts = [q for q in everything if not q.spec.dynamic and not (self.only_uncalibrated and q.calibrated)]
        # dynamic quantizers fit nothing; the ones not switched on yet (just inserted) join the stages to switch on
        dynamic = [q for q in everything if q.spec.dynamic and not (self.only_uncalibrated and q.fake_quant_enabled)]
        if ctx.replay:  # parameters come from the saved tensors
            for _, layer in weight_quantized_layers(gm):
                layer.weight_fake_quant.fake_quant_enabled = True
            for q in acts + dynamic:
                q.fake_quant_enabled = True
            return PassResult(gm, modified=False, summary="replayed (parameters from artifact)")
        n_w = calibrate_weights(gm)
        batches = 0
        switched = acts + dynamic
        stages = [switched] if self.order == "parallel" else quantizer_stages(gm, switched)
        if switched:
            calib = ctx.require_calib(self.name) if acts else None
            for q in switched:  # later stages stay off while earlier ones are observed
                q.fake_quant_enabled = False
            for i, stage in enumerate(tqdm(stages, desc="calibration stages", disable=not ctx.progress or len(stages) == 1,
                                           leave=False)):
                static = [q for q in stage if not q.spec.dynamic]
                if static:
                    batches = observe(gm, static, calib, self.max_images)
                for q in stage:
                    q.compute_qparams()  # a dynamic quantizer's is a no-op
                    q.fake_quant_enabled = True
        return PassResult(gm, modified=False,
                          summary=f"{n_w} weight + {len(acts)} activation quantizers from {batches} batches"
                                  + (f", {len(dynamic)} dynamic (ranges per input, nothing to fit)" if dynamic else "")
                                  + (f" ({len(stages)} sequential stages)" if self.order == "sequential" else ""),
                          record={"batches": batches, "stages": len(stages)})
