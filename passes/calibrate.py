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
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx
from tqdm.auto import tqdm

from fxquant.calibration import Calibration, locate_nonfinite
from fxquant.errors import CalibrationError, ConfigError
from fxquant.pipeline import Pass, PassContext, PassResult, register_pass
from fxquant.quant import FakeQuantize, QuantConv2d, QuantLinear
from fxquant.quant.modules import NonFiniteInput


def weight_quantized_layers(gm: fx.GraphModule):
    return [(n, m) for n, m in gm.named_modules() if isinstance(m, (QuantLinear, QuantConv2d))]


def act_quantizers(gm: fx.GraphModule) -> list[tuple[str, FakeQuantize]]:
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
    """Stream ``calib`` with ``quantizers`` observing; other quantizers keep their state."""
    saved = {id(q): q.fake_quant_enabled for q in quantizers}
    for q in quantizers:
        q.observer_enabled, q.fake_quant_enabled, q.observer = True, False, None
    current: dict = {}
    try:
        return calib.run(gm, on_batch=lambda i, b: current.update(i=i, batch=b), max_images=max_images)
    except NonFiniteInput as e:
        where = locate_nonfinite(gm, current["batch"]) if "batch" in current else None
        at = f"node '{where[0]}' ({where[1]})" if where else f"quantizer '{e.label}'"
        raise CalibrationError(
            f"calibration batch {current.get('i', '?')} produced NaN/Inf, first at {at}; "
            f"check the input data (normalisation, corrupt images) or the model's numerics"
        ) from None
    finally:
        for q in quantizers:
            q.observer_enabled = False
            q.fake_quant_enabled = saved[id(q)]


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
        acts = [q for _, q in act_quantizers(gm) if not (self.only_uncalibrated and q.calibrated)]
        if ctx.replay:  # parameters come from the saved tensors
            for _, layer in weight_quantized_layers(gm):
                layer.weight_fake_quant.fake_quant_enabled = True
            for q in acts:
                q.fake_quant_enabled = True
            return PassResult(gm, modified=False, summary="replayed (parameters from artifact)")
        n_w = calibrate_weights(gm)
        batches = 0
        stages = [acts] if self.order == "parallel" else quantizer_stages(gm, acts)
        if acts:
            calib = ctx.require_calib(self.name)
            for q in acts:  # later stages stay off while earlier ones are observed
                q.fake_quant_enabled = False
            for i, stage in enumerate(tqdm(stages, desc="calibration stages", disable=not ctx.progress or len(stages) == 1,
                                           leave=False)):
                batches = observe(gm, stage, calib, self.max_images)
                for q in stage:
                    q.compute_qparams()
                    q.fake_quant_enabled = True
        return PassResult(gm, modified=False,
                          summary=f"{n_w} weight + {len(acts)} activation quantizers from {batches} batches"
                                  + (f" ({len(stages)} sequential stages)" if self.order == "sequential" else ""),
                          record={"batches": batches, "stages": len(stages)})
