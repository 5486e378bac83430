"""AdaRound (Nagel et al., 2020): learned up/down rounding of weights."""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .layout import expand_params
from .spec import QuantSpec

ADAROUND_ZETA, ADAROUND_GAMMA = 1.1, -0.1


def rectified_sigmoid(alpha: torch.Tensor) -> torch.Tensor:
    """``h(α) = clamp(σ(α)·(ζ - γ) + γ, 0, 1)`` with ζ = 1.1, γ = -0.1: the soft rounding offset."""
    return (torch.sigmoid(alpha) * (ADAROUND_ZETA - ADAROUND_GAMMA) + ADAROUND_GAMMA).clamp(0.0, 1.0)


def adaround_init(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``α`` with ``h(α) = frac(w / s)``: soft rounding starts at the exact value ``w / s``, and
    hard rounding (``α ≥ 0``) starts as round-to-nearest (ties up)."""
    x = w / expand_params(scale, w.shape)
    frac = (x - torch.floor(x)).clamp(0.0, 1.0)
    return -torch.log((ADAROUND_ZETA - ADAROUND_GAMMA) / (frac - ADAROUND_GAMMA) - 1.0)


def adaround_fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec,
                           alpha: torch.Tensor, *, hard: bool = False) -> torch.Tensor:
    """Uniform fake quantization with rounding ``floor(w / s) + h``: ``h = h(α)`` (soft, differentiable
    in ``α``) or ``h = [α ≥ 0]`` (hard: the codes are integers and the result lies on the grid, so
    ``fake_quantize`` of it returns it unchanged). ``w`` is a constant; codes clamp as in ``quantize``."""
    if spec.scheme != "uniform":
        raise ConfigError(f"AdaRound learns uniform rounding; got a {spec.scheme!r} weight quantizer")
    s = expand_params(scale, w.shape)
    z = expand_params(zero_point, w.shape)
    h = (alpha >= 0).to(w.dtype) if hard else rectified_sigmoid(alpha)
    q = torch.clamp(torch.floor(w.detach() / s) + h + z, spec.qmin, spec.qmax)
    return (q - z) * s


def adaround_regularizer(alpha: torch.Tensor, beta: float) -> torch.Tensor:
    """``Σ 1 - |2h(α) - 1|^β``: zero when every offset is 0 or 1; β is annealed from large (only
    offsets near 0/1 are pulled) to small (all are pulled)."""
    return (1.0 - (2.0 * rectified_sigmoid(alpha) - 1.0).abs().pow(beta)).sum()
