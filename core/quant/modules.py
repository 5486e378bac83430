"""``nn.Module`` wrappers around the quantizer math: the fake-quantizer node, quantized-weight
Linear/Conv2d (torch.ao QAT convention: the float module plus a ``weight_fake_quant`` child) and
QwT's compensation Linear. Passes create these modules; they are defined here, where they run."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CalibrationError, ConfigError
from .adaround import adaround_fake_quantize, adaround_init, adaround_regularizer
from .dispatch import fake_quantize
from .granularity import PerAxis
from .observers import NonFiniteError, Observer, exact_distribution_qparams, make_observer
from .spec import QuantSpec

COMPUTE_DTYPES = {"float16": torch.float16, "float32": torch.float32}


class NonFiniteInput(CalibrationError):
    """Raised by a quantizer that observes NaN/Inf; the calibration pass turns it into an error
    naming the first graph node that produced a non-finite value."""

    def __init__(self, label: str):
        super().__init__(f"quantizer '{label}' observed NaN or Inf")
        self.label = label


def version_key(*tensors: torch.Tensor) -> tuple | None:
    """What identifies the contents of ``tensors`` without reading them: storage, in-place version
    counter, dtype and shape of each. None when one is an inference tensor (made under
    ``torch.inference_mode``: it has no version counter)."""
    if any(t.is_inference() for t in tensors):
        return None
    return tuple((t.data_ptr(), t._version, t.dtype, tuple(t.shape)) for t in tensors)


def cached_by_version(owner: object, attr: str, tensors: tuple[torch.Tensor, ...], compute: Callable[[], Any]) -> Any:
    """``compute()``, kept in ``owner.<attr>`` as ``(version_key(tensors), value)`` and recomputed only
    when one of ``tensors`` changes (new storage or an in-place write); not kept for inference tensors."""
    key = version_key(*tensors)
    cache = getattr(owner, attr, None)
    if key is not None and cache is not None and cache[0] == key:
        return cache[1]
    value = compute()
    setattr(owner, attr, (key, value) if key is not None else None)
    return value


class FakeQuantize(nn.Module):
    """Observes and/or fake-quantizes the tensor passing through it.

    States (set explicitly by passes, never on first call):
      * ``observer_enabled``: stream statistics into ``observer``;
      * ``fake_quant_enabled``: return ``dequantize(quantize(x))`` with the stored parameters.
    With both off the module is the identity. Scale and zero point are buffers in the
    granularity's parameter layout, so they travel in the state dict (safetensors).

    ``drop_prob`` (QDrop, Wei et al. 2022; used by block reconstruction, 0 otherwise): while fake
    quantizing, each element keeps its quantized value with probability ``drop_prob`` and its float
    value otherwise (``torch.rand``: seed the global generator for a reproducible run). With a
    scale that requires grad (learned activation scales), gradients reach it through the
    straight-through rounding (LSQ).

    A ``Dynamic`` spec (``spec.dynamic``) stores no parameters: each call computes them from its
    input (``group_params.dynamic_qparams``), so the quantizer is ``calibrated`` from the start,
    never observes, and needs only ``fake_quant_enabled``.
    """

    def __init__(self, spec: QuantSpec, *, weight: bool = False, label: str = ""):
        super().__init__()
        if weight:
            spec.check_weight(f"quantizer '{label}'")
        self.spec = spec
        self.weight = weight
        self.label = label
        self.register_buffer("scale", torch.empty(0))
        self.register_buffer("zero_point", torch.empty(0))
        self.observer_enabled = False
        self.fake_quant_enabled = False
        self.observer: Observer | None = None
        self.drop_prob = 0.0
        self._weight_cache: tuple[tuple, torch.Tensor] | None = None

    @property
    def calibrated(self) -> bool:
        """Whether the quantizer can fake-quantize: it holds parameters, or computes them per call (dynamic)."""
        return self.spec.dynamic or self.scale.numel() > 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer_enabled and not self.spec.dynamic:  # a dynamic quantizer has nothing to fit
            if self.observer is None:
                self.observer = make_observer(self.spec, weight=self.weight)
            try:
                self.observer.update(x)
            except NonFiniteError:
                raise NonFiniteInput(self.label) from None
        if self.fake_quant_enabled:
            if not self.calibrated:
                raise CalibrationError(
                    f"quantizer '{self.label}' is enabled but has no scale; run calibration "
                    f"(fxquant.compile(..., calib=...)) before evaluating the model"
                )
            ste = torch.is_grad_enabled() and (x.requires_grad or self.scale.requires_grad)
            if self.weight and not ste and self.drop_prob == 0.0:
                return self._cached_weight(x)
            out = fake_quantize(x, self.scale, self.zero_point, self.spec, ste=ste)
            if self.drop_prob > 0.0:
                out = torch.where(torch.rand_like(x) < self.drop_prob, out, x)
            return out
        return x

    def _cached_weight(self, w: torch.Tensor) -> torch.Tensor:
        """The fake-quantized weight, recomputed only when the weight or the parameters change
        (``cached_by_version``): inference then costs no per-call weight rounding, at the price of
        one weight-sized tensor per layer."""
        return cached_by_version(self, "_weight_cache", (w, self.scale, self.zero_point),
                                 lambda: fake_quantize(w, self.scale, self.zero_point, self.spec))

    # -- parameters ---------------------------------------------------------------------
    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Store ``(scale, zero point)`` in the granularity's layout (static specs only)."""
        if self.spec.dynamic:
            raise ConfigError(f"quantizer '{self.label}' ({self.spec.short()}) computes its parameters from each input; "
                              f"it stores none")
        self.scale = scale.detach().float().clone()
        self.zero_point = zero_point.detach().float().clone()

    def compute_qparams(self, *, keep_observer: bool = False) -> None:
        """Parameters from the streamed statistics (activation quantizers); nothing for a dynamic one."""
        if self.spec.dynamic:
            return
        if self.observer is None or self.observer.empty:
            raise CalibrationError(
                f"quantizer '{self.label}' saw no data during calibration: the calibration data never reached it "
                f"(check that calib batches go through this part of the model)"
            )
        self.set_qparams(*self.observer.compute_qparams())
        if not keep_observer:
            self.observer = None

    def calibrate_from(self, tensor: torch.Tensor) -> None:
        """Parameters from a whole tensor with exact statistics (weight quantizers)."""
        self.set_qparams(*exact_distribution_qparams(tensor, self.spec, weight=self.weight))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # Parameters take the saved shape (the layout is only known after calibration).
        for name in ("scale", "zero_point"):
            key = prefix + name
            if key in state_dict:
                setattr(self, name, torch.empty_like(state_dict[key]))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        state = "+".join(s for s, on in (("observe", self.observer_enabled), ("quant", self.fake_quant_enabled)) if on) or "off"
        params = "per call" if self.spec.dynamic else tuple(self.scale.shape)
        return f"{self.spec.short()}, {state}, params={params}"


class AdaRoundWeight(nn.Module):
    """A weight quantizer with learned rounding (AdaRound), standing in for a ``FakeQuantize`` of
    the same spec and parameters during block reconstruction: ``forward(w)`` is the soft
    (``h(α)``) or hard (``[α ≥ 0]``) rounding of ``w`` on the quantizer's grid; ``alpha`` starts at
    ``adaround_init`` (soft output = ``w`` clamped to the grid range, hard output = round-to-nearest).
    ``hardened(w)`` is the final weight: on the grid, so the original ``FakeQuantize`` then
    reproduces it exactly."""

    def __init__(self, quantizer: FakeQuantize, weight: torch.Tensor):
        super().__init__()
        if not quantizer.calibrated:
            raise CalibrationError(f"AdaRound needs the calibrated weight quantizer '{quantizer.label}'; run calibrate first")
        self.spec = quantizer.spec
        self.label = quantizer.label
        self.register_buffer("scale", quantizer.scale.detach().clone())
        self.register_buffer("zero_point", quantizer.zero_point.detach().clone())
        self.alpha = nn.Parameter(adaround_init(weight.detach().float(), self.scale))
        self.hard = False

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return adaround_fake_quantize(w, self.scale, self.zero_point, self.spec, self.alpha, hard=self.hard)

    def regularizer(self, beta: float) -> torch.Tensor:
        return adaround_regularizer(self.alpha, beta)

    @torch.no_grad()
    def hardened(self, w: torch.Tensor) -> torch.Tensor:
        return adaround_fake_quantize(w, self.scale, self.zero_point, self.spec, self.alpha, hard=True).to(w.dtype)


class _WeightQuantized:
    """Mixin: a float layer subclass whose weight passes through a ``weight_fake_quant`` child."""

    weight_fake_quant: FakeQuantize

    @classmethod
    def from_float(cls, float_mod: nn.Module, spec: QuantSpec, label: str = ""):
        """An instance sharing ``float_mod``'s parameters (same state-dict names) plus a weight quantizer."""
        new = cls.__new__(cls)
        new.__dict__ = dict(float_mod.__dict__)
        new._parameters = dict(float_mod._parameters)
        new._buffers = dict(float_mod._buffers)
        new._modules = dict(float_mod._modules)
        new.weight_fake_quant = FakeQuantize(spec, weight=True, label=f"{label}.weight")
        return new


class QuantLinear(_WeightQuantized, nn.Linear):
    """``nn.Linear`` whose weight passes through ``weight_fake_quant``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_fake_quant(self.weight), self.bias)


class QuantConv2d(_WeightQuantized, nn.Conv2d):
    """``nn.Conv2d`` whose weight passes through ``weight_fake_quant``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight_fake_quant(self.weight), self.bias)


class CompensationLinear(nn.Linear):
    """QwT's compensation layer (created by ``fxquant.passes.qwt``): ``linear(x, W, b)`` computed in
    ``compute_dtype`` (QwT runs it in fp16); with ``weight_bits`` the weight is fake-quantized per
    output row, symmetric."""

    def __init__(self, c_in: int, c_out: int, compute_dtype: str = "float16", weight_bits: int | None = None):
        super().__init__(c_in, c_out, bias=True, dtype=COMPUTE_DTYPES[compute_dtype])
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)
        self.compute_dtype = compute_dtype
        self.weight_fake_quant = FakeQuantize(QuantSpec(bits=weight_bits, symmetric=True, granularity=PerAxis(0)),
                                              weight=True, label="qwt.weight") if weight_bits else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = COMPUTE_DTYPES[self.compute_dtype]
        w = self.weight_fake_quant(self.weight) if self.weight_fake_quant is not None else self.weight
        return F.linear(x.to(dt), w.to(dt), self.bias.to(dt)).to(x.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", compute_dtype={self.compute_dtype}" + (
            f", weight_bits={self.weight_fake_quant.spec.bits}" if self.weight_fake_quant is not None else "")


def quantizers(module: nn.Module):
    """All ``FakeQuantize`` submodules as ``(qualified name, module)``."""
    return [(n, m) for n, m in module.named_modules() if isinstance(m, FakeQuantize)]


@contextmanager
def quantizer_state(module: nn.Module | Iterable[FakeQuantize], *, fake_quant: bool | None = None,
                    observe: bool | None = None) -> Iterator[dict[FakeQuantize, bool]]:
    """Set every ``FakeQuantize`` of ``module`` (or the given quantizers) for the duration of a
    ``with`` block, then restore each one's ``fake_quant_enabled`` and ``observer_enabled``.

    ``fake_quant``/``observe``: the state on entry (``None``: leave as is). Yields ``{quantizer:
    fake_quant_enabled as it was}``, so a caller can switch single quantizers back on ("only this
    layer quantized"). The one rule for "these quantizers off, then restore" that passes and
    analyses use, so a failure inside the block never leaves a model half-switched."""
    qs = [m for m in module.modules() if isinstance(m, FakeQuantize)] if isinstance(module, nn.Module) else list(module)
    saved = {q: (q.fake_quant_enabled, q.observer_enabled) for q in qs}
    try:
        for q in qs:
            if fake_quant is not None:
                q.fake_quant_enabled = fake_quant
            if observe is not None:
                q.observer_enabled = observe
        yield {q: s[0] for q, s in saved.items()}
    finally:
        for q, (fq, obs) in saved.items():
            q.fake_quant_enabled, q.observer_enabled = fq, obs
