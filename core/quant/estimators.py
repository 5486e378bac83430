"""Range estimators (what range to quantize): the frozen, validated configs that name a range
search, their JSON form and their names on the command line. The search itself lives in
``range_search.py``; ``QuantSpec.estimator`` holds one of these.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..errors import ConfigError


@dataclass(frozen=True)
class Estimator:
    """Base class of range estimators."""

    def to_dict(self) -> dict:
        d = {"type": type(self).__name__}
        for f in fields(self):
            v = getattr(self, f.name)
            d[f.name] = list(v) if isinstance(v, tuple) else v
        return d

    @staticmethod
    def from_dict(d: dict) -> "Estimator":
        kinds = {c.__name__: c for c in (MinMax, Percentile, PctMSE, OMSE, JointGrid, SigmaClip)}
        d = dict(d)
        kind = d.pop("type")
        if kind not in kinds:
            raise ConfigError(f"unknown range estimator {kind!r}; known: {sorted(kinds)}")
        return kinds[kind](**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass(frozen=True)
class MinMax(Estimator):
    """Range = observed [min, max] (exact running extrema)."""


@dataclass(frozen=True)
class Percentile(Estimator):
    """Range = [Q(1 - p), Q(p)] with linear-interpolated quantiles."""

    p: float = 0.9999

    def __post_init__(self):
        if not 0.5 < self.p <= 1.0:
            raise ConfigError(f"Percentile.p must be in (0.5, 1], got {self.p}")


@dataclass(frozen=True)
class PctMSE(Estimator):
    """RepQ-ViT's search: for each ``p`` take [Q(1-p), Q(p)] and keep the one with the smallest
    mean squared quantization error (strict ``<``: the earlier ``p`` wins ties)."""

    percentiles: tuple[float, ...] = (0.999, 0.9999, 0.99999)

    def __post_init__(self):
        if not self.percentiles or any(not 0.5 < p <= 1.0 for p in self.percentiles):
            raise ConfigError(f"PctMSE.percentiles must be non-empty values in (0.5, 1], got {self.percentiles}")


@dataclass(frozen=True)
class OMSE(Estimator):
    """Optimal-MSE clipping: shrink [min, max] by ``alpha`` on a grid of ``grid`` values in
    (0, 1] and keep the range with the smallest mean squared error (Choukroun et al., 2019)."""

    grid: int = 100

    def __post_init__(self):
        if self.grid < 1:
            raise ConfigError(f"OMSE.grid must be >= 1, got {self.grid}")


@dataclass(frozen=True)
class JointGrid(Estimator):
    """APHQ-ViT's joint (scale, zero point) grid (docs/methods.md, APHQ-ViT, stage B): ``num_zp = min(max_zp, 2^b)``
    integer zero points centred on ``2^(b-1)`` times ``candidates // num_zp`` scales whose range
    width ``s·(2^b - 1)`` runs linearly from ``Q(hi_q) - Q(lo_q)`` to ``max - min``, plus the min-max
    pair; the pair with the smallest mean squared quantization error wins (first wins ties).
    Symmetric specs have one zero point (0), so all ``candidates`` go to scales."""

    candidates: int = 128
    max_zp: int = 16
    lo_q: float = 0.1
    hi_q: float = 0.9

    def __post_init__(self):
        if self.candidates < 1 or self.max_zp < 1:
            raise ConfigError(f"JointGrid.candidates and max_zp must be >= 1, got {self.candidates}, {self.max_zp}")
        if not 0.0 <= self.lo_q < self.hi_q <= 1.0:
            raise ConfigError(f"JointGrid needs 0 <= lo_q < hi_q <= 1, got lo_q={self.lo_q}, hi_q={self.hi_q}")


@dataclass(frozen=True)
class SigmaClip(Estimator):
    """Range = the mean ± ``num_std`` standard deviations (Bessel-corrected, ``torch.std``),
    intersected with [min, max]: clipping to ``μ ± kσ`` and then taking the min-max range of the
    clipped values, as OQFV, LoftQ and QLoRA's uniform baselines quantize weights (docs/methods.md, OQFV)."""

    num_std: float = 2.0

    def __post_init__(self):
        if not self.num_std > 0:
            raise ConfigError(f"SigmaClip.num_std must be > 0, got {self.num_std}")


ESTIMATOR_NAMES = ("minmax", "percentile[:p]", "pctmse", "omse[:grid]", "grid[:candidates]", "sigma[:num_std]")


def estimator_from_name(name: str | Estimator) -> Estimator:
    """Parse ``"minmax"``, ``"percentile"``/``"percentile:0.999"``, ``"pctmse"``, ``"omse"``/``"omse:200"``,
    ``"grid"``/``"grid:128"`` (APHQ-ViT's joint scale/zero-point grid), ``"sigma"``/``"sigma:3"`` (μ ± kσ clipping)."""
    if isinstance(name, Estimator):
        return name
    kind, _, arg = str(name).lower().partition(":")
    try:
        if kind == "minmax" and not arg:
            return MinMax()
        if kind == "percentile":
            return Percentile(float(arg)) if arg else Percentile()
        if kind == "pctmse" and not arg:
            return PctMSE()
        if kind == "omse":
            return OMSE(int(arg)) if arg else OMSE()
        if kind == "grid":
            return JointGrid(int(arg)) if arg else JointGrid()
        if kind == "sigma":
            return SigmaClip(float(arg)) if arg else SigmaClip()
    except ValueError:
        pass
    raise ConfigError(f"unknown range estimator {name!r}; use one of {list(ESTIMATOR_NAMES)}")
