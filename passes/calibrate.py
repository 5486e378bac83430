"""``Calibrate``: stream calibration data through the observers and set every quantizer's
parameters (torch.ao "calibrate" + "convert" to fake-quant mode).

Weight quantizers are set from the weights themselves (exact statistics, no data). Activation
quantizers observe the float model ("parallel" calibration: every quantizer sees float inputs),
then compute their parameters with their range estimator and switch to fake quantization.
A NaN/Inf in a batch stops calibration with the name of the first graph node that produced it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from fxquant.calibration import Calibration, locate_nonfinite
from fxquant.errors import CalibrationError
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


def observe(gm: fx.GraphModule, quantizers: list[FakeQuantize], calib: Calibration) -> int:
    """Stream ``calib`` with ``quantizers`` observing; other quantizers keep their state."""
    saved = {id(q): q.fake_quant_enabled for q in quantizers}
    for q in quantizers:
        q.observer_enabled, q.fake_quant_enabled, q.observer = True, False, None
    current: dict = {}
    try:
        return calib.run(gm, on_batch=lambda i, b: current.update(i=i, batch=b))
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


@register_pass
@dataclass(frozen=True)
class Calibrate(Pass):
    """Set quantizer parameters: weights from the weights, activations from calibration data.

    Args:
        only_uncalibrated: leave quantizers that already have parameters alone (so a later
            ``Calibrate`` in a pipeline only handles newly inserted quantizers).
    """

    name = "calibrate"
    requires = ("quantizers_inserted",)
    provides = ("calibrated",)
    only_uncalibrated: bool = True

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
        if acts:
            calib = ctx.require_calib(self.name)
            batches = observe(gm, acts, calib)
            for q in acts:
                q.compute_qparams()
                q.fake_quant_enabled = True
        return PassResult(gm, modified=False, summary=f"{n_w} weight + {len(acts)} activation quantizers from {batches} batches",
                          record={"batches": batches})
