"""Range search over a (possibly binned) distribution, one row per quantization-parameter block.

A ``Distribution`` describes the values seen by a quantizer as bins: ``left``/``width``/``count``
of shape ``[P, K]`` (P parameter blocks, K bins). Exact data (a weight tensor) is the special case
width = 0, count = 1, left = the sorted values, and then quantiles and MSE are exact (the
quantile equals ``torch.quantile(..., interpolation="linear")``). Streamed activations arrive as
histograms (observers.py); a value inside a bin is placed uniformly within it for quantiles and at
the bin centre for the MSE, so both are accurate to one bin width.

All candidate ranges are scored with ``dispatch.fake_quantize``: the search never re-implements
a rounding rule. The estimators that name a search (``spec.estimator``) are the configs of
``estimators.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .affine import choose_qparams
from .dispatch import fake_quantize
from .estimators import OMSE, Estimator, JointGrid, MinMax, PctMSE, Percentile, SigmaClip
from .spec import QuantSpec


@dataclass
class Distribution:
    left: torch.Tensor  # [P, K] float64
    width: torch.Tensor  # [P, K] or [P, 1] float64
    count: torch.Tensor  # [P, K] float64 (integers)
    vmin: torch.Tensor  # [P] exact minimum
    vmax: torch.Tensor  # [P] exact maximum

    @staticmethod
    def exact(rows: torch.Tensor) -> "Distribution":
        """Exact distribution of each row of a ``[P, M]`` tensor."""
        v = rows.detach().double().sort(dim=1).values
        return Distribution(v, torch.zeros(v.shape[0], 1, dtype=torch.float64), torch.ones_like(v), v[:, 0], v[:, -1])

    @property
    def total(self) -> torch.Tensor:
        return self.count.sum(dim=1)

    def _value_at_rank(self, rank: torch.Tensor) -> torch.Tensor:
        cum = self.count.cumsum(dim=1)
        k = torch.searchsorted(cum, rank.unsqueeze(1), right=True).clamp(max=cum.shape[1] - 1)
        c = self.count.gather(1, k)
        before = cum.gather(1, k) - c
        width = self.width.expand_as(self.left).gather(1, k)
        val = self.left.gather(1, k) + (rank.unsqueeze(1) - before + 0.5) / c.clamp(min=1) * width
        return val.squeeze(1)

    def quantile(self, p: float) -> torch.Tensor:
        """Linear-interpolated quantile per row (rank ``p·(n-1)``), clamped to the exact extrema."""
        n = self.total
        rank = p * (n - 1)
        r0 = rank.floor()
        r1 = torch.minimum(r0 + 1, n - 1)
        v0 = self._value_at_rank(r0)
        v1 = self._value_at_rank(r1)
        return (v0 + (rank - r0) * (v1 - v0)).clamp(self.vmin, self.vmax)

    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and Bessel-corrected standard deviation per row (``torch.std``'s default; bins at
        their centres)."""
        centers = self.left + 0.5 * self.width
        n = self.total
        mean = (centers * self.count).sum(dim=1) / n.clamp(min=1)
        var = (((centers - mean.unsqueeze(1)) ** 2) * self.count).sum(dim=1) / (n - 1).clamp(min=1)
        return mean, var.sqrt()

    def mse(self, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
        """Mean squared quantization error per row for per-row parameters ``[P]``."""
        centers = (self.left + 0.5 * self.width).float()
        xq = fake_quantize(centers, scale.view(-1, 1), zero_point.view(-1, 1), spec)
        err = (centers.double() - xq.double()) ** 2
        return (err * self.count).sum(dim=1) / self.total.clamp(min=1)


def _candidates(dist: Distribution, spec: QuantSpec) -> list[tuple[torch.Tensor, torch.Tensor]]:
    est = spec.estimator
    if isinstance(est, MinMax):
        return [(dist.vmin, dist.vmax)]
    if isinstance(est, Percentile):
        return [(dist.quantile(1.0 - est.p), dist.quantile(est.p))]
    if isinstance(est, PctMSE):
        return [(dist.quantile(1.0 - p), dist.quantile(p)) for p in est.percentiles]
    if isinstance(est, OMSE):
        return [(dist.vmin * a, dist.vmax * a) for a in torch.arange(1, est.grid + 1, dtype=torch.float64) / est.grid]
    if isinstance(est, JointGrid):
        return _joint_grid(dist, spec, est)
    if isinstance(est, SigmaClip):
        mean, std = dist.mean_std()
        return [(torch.maximum(dist.vmin, mean - est.num_std * std), torch.minimum(dist.vmax, mean + est.num_std * std))]
    raise TypeError(f"unknown estimator {est!r}")


def _joint_grid(dist: Distribution, spec: QuantSpec, est: JointGrid) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(lo, hi) ranges whose ``choose_qparams`` are the (scale, zero point) pairs of the joint grid:
    ``lo = (qmin - z)·s``, ``hi = (qmax - z)·s`` map back to exactly ``s`` and the integer ``z``."""
    levels = spec.qmax - spec.qmin
    if spec.symmetric:
        zps = [0.0]
    else:
        num_zp = min(est.max_zp, 2**spec.bits)
        centre = spec.qmin + 2 ** (spec.bits - 1)
        zps = [float(min(max(centre - num_zp // 2 + j, spec.qmin), spec.qmax)) for j in range(num_zp)]
        zps = list(dict.fromkeys(zps))
    n_scales = max(est.candidates // len(zps), 1)
    lo_w = (dist.quantile(est.hi_q) - dist.quantile(est.lo_q)).clamp(min=0)
    hi_w = dist.vmax - dist.vmin
    out = [(dist.vmin, dist.vmax)]  # the "+1": the min-max pair
    for i in range(n_scales):
        t = i / max(n_scales - 1, 1)
        width = lo_w + t * (hi_w - lo_w)
        if spec.symmetric:
            out.append((-width / 2, width / 2))
            continue
        s = width / levels
        for z in zps:
            out.append(((spec.qmin - z) * s, (spec.qmax - z) * s))
    return out


def estimate_qparams(dist: Distribution, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per row ``[P]`` chosen by ``spec.estimator``."""
    cands = _candidates(dist, spec)
    params = [choose_qparams(lo, hi, spec) for lo, hi in cands]
    if len(params) == 1:
        return params[0]
    errs = torch.stack([dist.mse(s, z, spec) for s, z in params])  # [C, P]
    best = errs.argmin(dim=0)  # first minimum wins ties (strict <)
    scale = torch.stack([s for s, _ in params]).gather(0, best.unsqueeze(0)).squeeze(0)
    zp = torch.stack([z for _, z in params]).gather(0, best.unsqueeze(0)).squeeze(0)
    return scale, zp


def _sq_dist(pts: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """``[n, G]`` squared distances of 2-D points (broadcast: ``torch.cdist`` is 10× slower here)."""
    return (pts[:, None, 0] - centres[None, :, 0]) ** 2 + (pts[:, None, 1] - centres[None, :, 1]) ** 2


def kmeans_ranges(points: torch.Tensor, num_groups: int, *, iters: int = 100,
                  estimator: Estimator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Group ranges for IGQ-ViT's instance-aware groups: k-means (Lloyd) over ``[n, 2]`` points
    ``(min, max)``, one per slice and calibration instance (squared Euclidean distance: slices of
    similar range share a cluster); then each group's range from its members: ``MinMax`` (or None)
    the envelope ``[min of mins, max of maxes]``, ``Percentile(p)`` ``[Q(mins, 1-p), Q(maxes, p)]``.
    The k-means centre alone would clip half the members' peaks; with ranges that cover their
    members, ``group_params.instance_groups``' run-time rule (the narrowest covering group) sends a
    slice like the calibration's to its own cluster's group or a narrower one that still fits.

    Deterministic: the initial centres are the points at the quantiles ``(i + ½)/G`` of the range
    width ``max - min``; an empty cluster is re-seeded with the point farthest from its centre.
    Returns ``(lo, hi)`` of shape ``[G]`` (float64), sorted by width, narrowest first."""
    pts = points.detach().double().reshape(-1, 2)
    n = pts.shape[0]
    if n == 0:
        raise ValueError("kmeans_ranges needs at least one point")
    order = torch.argsort(pts[:, 1] - pts[:, 0], stable=True)
    init = order[((torch.arange(num_groups, dtype=torch.float64) + 0.5) * n / num_groups).long().clamp(max=n - 1)]
    centres = pts[init].clone()
    assign = None
    for _ in range(iters):
        d = _sq_dist(pts, centres)
        new = d.argmin(dim=1)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        counts = torch.bincount(assign, minlength=num_groups)
        sums = torch.zeros(num_groups, 2, dtype=torch.float64).index_add_(0, assign, pts)
        filled = counts > 0
        centres[filled] = sums[filled] / counts[filled, None]
        if not filled.all():  # re-seed empty clusters with the worst-fitted points
            far = d.gather(1, assign[:, None]).squeeze(1).argsort(descending=True, stable=True)
            for k, g in enumerate(torch.nonzero(~filled).flatten().tolist()):
                centres[g] = pts[far[k % n]]
    assign = _sq_dist(pts, centres).argmin(dim=1)
    p = estimator.p if isinstance(estimator, Percentile) else 1.0
    for g in range(num_groups):
        members = pts[assign == g]
        if len(members):
            centres[g, 0] = torch.quantile(members[:, 0], 1.0 - p)
            centres[g, 1] = torch.quantile(members[:, 1], p)
    width = centres[:, 1] - centres[:, 0]
    centres = centres[torch.argsort(width, stable=True)]
    return centres[:, 0], centres[:, 1]
