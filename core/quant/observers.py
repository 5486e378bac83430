"""Streaming, mergeable observers.

An observer's memory is fixed once it has seen its first batch: running extrema per parameter
block plus, when the estimator needs the distribution (percentile, PctMSE, OMSE), a histogram of
``bins`` bins per block. It never keeps activations.

The histogram uses *power-of-two aligned* bins: bin ``j`` of a row covers
``[(o + j)·2^e, (o + j + 1)·2^e)`` for an integer origin ``o`` and exponent ``e``. When new values
fall outside, ``e`` grows and every pair (or 2^d-tuple) of old bins merges *exactly* into one new
bin, so rebinning never interpolates, the result does not depend on batch order beyond the final
extrema, and two observers merge exactly (``merge``), e.g. across ``torch.distributed`` ranks.
Resolution is always within 2× of ``(max - min) / bins``.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .affine import choose_qparams
from .estimators import MinMax
from .granularity import InstanceGroups
from .group_params import slice_ranges
from .layout import to_rows
from .logcodes import bitlog2_codes_from_int, bitlog2_delta, bitlog2_input, bitlog2_levels
from .range_search import Distribution, estimate_qparams, kmeans_ranges
from .spec import QuantSpec

# Histogram budget: bins per row = clamp(_HIST_BUDGET / rows, 256, 16384), a power of two.
_HIST_BUDGET = 2**20
_CHUNK = 2**22  # elements binned per step, bounds temporary memory


def _bins_for(rows: int) -> int:
    b = max(256, min(16384, _HIST_BUDGET // max(rows, 1)))
    return 1 << (b.bit_length() - 1)


class NonFiniteError(ValueError):
    """An observer saw NaN or Inf (the calibration pass localizes the first graph node)."""


def _finite(x: torch.Tensor) -> torch.Tensor:
    """``x`` detached; every observer refuses NaN/Inf (calibration then names the node that made it)."""
    if not torch.isfinite(x).all():
        raise NonFiniteError("non-finite value observed")
    return x.detach()


class Observer:
    """Streams statistics of the tensors passed to ``update`` for one quantizer.

    Args:
        spec: the quantizer spec (granularity and estimator decide what is kept).
        weight: whether the observed tensor is a weight (granularity's weight layout).

    ``order_free``: extrema and integer bin counts, with the bin grid a function of the final
    extrema only, so any split of the data into observers merged in any order gives the very same
    state as one observer that saw it all (sharded calibration relies on it).
    """

    order_free = True

    def __init__(self, spec: QuantSpec, *, weight: bool = False):
        self.spec = spec
        self.weight = weight
        self.param_shape: tuple[int, ...] | None = None
        self.vmin: torch.Tensor | None = None
        self.vmax: torch.Tensor | None = None
        self.needs_hist = not isinstance(spec.estimator, MinMax)
        self.bins = 0
        self.counts: torch.Tensor | None = None  # [P, B] int64
        self.exp: torch.Tensor | None = None  # [P] int64, bin width = 2^exp
        self.origin: torch.Tensor | None = None  # [P] int64
        self.num_updates = 0

    # -- streaming ------------------------------------------------------------------------
    def update(self, x: torch.Tensor) -> None:
        x = _finite(x)
        pshape = tuple(self.spec.granularity.param_shape(tuple(x.shape), weight=self.weight))
        if self.param_shape is None:
            self.param_shape = pshape
        elif pshape != self.param_shape:
            raise ValueError(
                f"observer got a tensor of shape {tuple(x.shape)} whose parameter layout {pshape} differs "
                f"from the earlier {self.param_shape}; per-axis/per-group quantizers need a fixed channel size"
            )
        rows = to_rows(x.float(), pshape)
        mn, mx = rows.amin(dim=1), rows.amax(dim=1)
        self.vmin = mn if self.vmin is None else torch.minimum(self.vmin, mn)
        self.vmax = mx if self.vmax is None else torch.maximum(self.vmax, mx)
        if self.needs_hist:
            self._hist_update(rows)
        self.num_updates += 1

    def merge(self, other: "Observer") -> "Observer":
        """Fold another observer of the same quantizer into this one (exact)."""
        if other.param_shape is None:
            return self
        if self.param_shape is None:
            self.__dict__.update({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in other.__dict__.items()})
            return self
        if other.param_shape != self.param_shape or other.needs_hist != self.needs_hist:
            raise ValueError("cannot merge observers of different parameter layouts or estimators")
        self.vmin = torch.minimum(self.vmin, other.vmin)
        self.vmax = torch.maximum(self.vmax, other.vmax)
        if self.needs_hist:
            exp, origin = self._fit(self.vmin.double(), self.vmax.double(), torch.maximum(self.exp, other.exp))
            mine = self._rebin(self.counts, self.exp, self.origin, exp, origin)
            theirs = self._rebin(other.counts, other.exp, other.origin, exp, origin)
            self.counts, self.exp, self.origin = mine + theirs, exp, origin
        self.num_updates += other.num_updates
        return self

    # -- results --------------------------------------------------------------------------
    @property
    def empty(self) -> bool:
        return self.param_shape is None

    def distribution(self) -> Distribution:
        if self.empty:
            raise ValueError("observer has seen no data")
        if not self.needs_hist:
            return Distribution(self.vmin.double()[:, None], torch.zeros(self.vmin.numel(), 1, dtype=torch.float64),
                                torch.ones(self.vmin.numel(), 1, dtype=torch.float64), self.vmin.double(), self.vmax.double())
        width = torch.exp2(self.exp.double())[:, None]
        left = (self.origin[:, None] + torch.arange(self.bins)).double() * width
        return Distribution(left, width, self.counts.double(), self.vmin.double(), self.vmax.double())

    def compute_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point in the granularity's parameter layout."""
        scale, zp = estimate_qparams(self.distribution(), self.spec)
        return scale.float().reshape(self.param_shape), zp.float().reshape(self.param_shape)

    def state_bytes(self) -> int:
        ts = [self.vmin, self.vmax, self.counts, self.exp, self.origin]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    # -- histogram internals --------------------------------------------------------------
    def _fit(self, lo: torch.Tensor, hi: torch.Tensor, min_exp: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Smallest exponent (>= min_exp) whose aligned bins cover [lo, hi] in ``bins`` bins."""
        span = (hi - lo).clamp(min=0)
        mag = torch.maximum(lo.abs(), hi.abs())
        span = torch.maximum(span, torch.maximum(mag * 2.0**-20, torch.full_like(mag, 2.0**-100)))
        exp = torch.ceil(torch.log2(span / (self.bins - 1))).long()
        if min_exp is not None:
            exp = torch.maximum(exp, min_exp)
        for _ in range(4):  # guard against log2 rounding at exact powers of two
            w = torch.exp2(exp.double())
            need = torch.floor(hi / w) - torch.floor(lo / w) + 1
            bad = need > self.bins
            if not bad.any():
                break
            exp = exp + bad.long()
        origin = torch.floor(lo / torch.exp2(exp.double())).long()
        return exp, origin

    @staticmethod
    def _rebin(counts, exp, origin, new_exp, new_origin) -> torch.Tensor:
        p, b = counts.shape
        shift = (new_exp - exp).clamp(min=0)
        idx = torch.div(origin[:, None] + torch.arange(b), (2**shift)[:, None], rounding_mode="floor") - new_origin[:, None]
        nz = counts > 0
        if nz.any() and ((idx[nz] < 0) | (idx[nz] >= b)).any():  # pragma: no cover - invariant
            raise RuntimeError("histogram rebin out of range")
        idx = idx.clamp(0, b - 1) + torch.arange(p)[:, None] * b
        out = torch.zeros(p * b, dtype=counts.dtype)
        return out.index_add_(0, idx.flatten(), counts.flatten()).view(p, b)

    def _hist_update(self, rows: torch.Tensor) -> None:
        p = rows.shape[0]
        if self.counts is None:
            self.bins = _bins_for(p)
            self.exp, self.origin = self._fit(self.vmin.double(), self.vmax.double(), None)
            self.counts = torch.zeros(p, self.bins, dtype=torch.int64)
        else:
            exp, origin = self._fit(self.vmin.double(), self.vmax.double(), self.exp)
            if not (torch.equal(exp, self.exp) and torch.equal(origin, self.origin)):
                self.counts = self._rebin(self.counts, self.exp, self.origin, exp, origin)
                self.exp, self.origin = exp, origin
        inv_w = torch.exp2(-self.exp.double())[:, None]
        base = (torch.arange(p) * self.bins)[:, None] - self.origin[:, None]
        m = rows.shape[1]
        step = max(1, _CHUNK // max(p, 1))
        flat = torch.zeros(p * self.bins, dtype=torch.int64)
        for start in range(0, m, step):
            chunk = rows[:, start:start + step]
            idx = torch.floor(chunk.double() * inv_w).long() + base
            flat += torch.bincount(idx.flatten(), minlength=p * self.bins)
        self.counts += flat.view(p, self.bins)


class BitLog2Observer:
    """Streams the sufficient statistics of BitLog2's closed-form δ: ``ΣxD``, ``ΣD²``, ``Σx²``
    and ``max D`` (``D`` depends on ``x`` only, not on δ). Constant memory, exact merge.
    ``order_free`` is False: float sums depend on the order they are added in."""

    order_free = False

    def __init__(self, spec: QuantSpec, *, weight: bool = False):
        if weight:
            raise ValueError("BitLog2 quantizes attention probabilities, not weights")
        self.spec = spec
        self.sum_xd = self.sum_dd = self.sum_xx = 0.0
        self.max_level = 0
        self.count = 0
        self.num_updates = 0

    def update(self, x: torch.Tensor) -> None:
        x = _finite(x)
        v = self.spec.bitlog2_variant
        d = bitlog2_levels(bitlog2_codes_from_int(bitlog2_input(x, v), v), v).double()
        xd = x.double()
        self.sum_xd += float((xd * d).sum())
        self.sum_dd += float((d * d).sum())
        self.sum_xx += float((xd * xd).sum())
        self.max_level = max(self.max_level, int(d.max()) if d.numel() else 0)
        self.count += x.numel()
        self.num_updates += 1

    def merge(self, other: "BitLog2Observer") -> "BitLog2Observer":
        self.sum_xd += other.sum_xd
        self.sum_dd += other.sum_dd
        self.sum_xx += other.sum_xx
        self.max_level = max(self.max_level, other.max_level)
        self.count += other.count
        self.num_updates += other.num_updates
        return self

    @property
    def empty(self) -> bool:
        return self.count == 0

    def delta(self) -> int:
        return bitlog2_delta(self.sum_xd, self.sum_dd, self.sum_xx, self.max_level, self.spec.bitlog2_variant)

    def compute_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor(float(self.delta())), torch.tensor(0.0)

    def state_bytes(self) -> int:
        return 6 * 8


class GroupRangeObserver:
    """Observer of an ``InstanceGroups`` quantizer (IGQ-ViT): keeps the ``(min, max)`` of every
    slice (channel or attention row) of every calibration instance, 8 bytes each (a ViT-S
    ``fc2`` input: 1536 channels, 12 KB per image), and turns them into ``G`` group quantizers
    by k-means plus the spec's estimator over each group's members (``range_search.kmeans_ranges``)
    and ``choose_qparams``. Memory grows with the
    number of calibration instances: this is the data k-means clusters (IGQ-ViT calibrates on 32
    images). Merging concatenates the points, so it is exact; the order of the points matters to
    k-means, so it is not ``order_free``."""

    order_free = False

    def __init__(self, spec: QuantSpec, *, weight: bool = False):
        if weight or not isinstance(spec.granularity, InstanceGroups):
            raise ValueError("GroupRangeObserver observes InstanceGroups activation quantizers")
        self.spec = spec
        self.chunks: list[torch.Tensor] = []
        self.num_updates = 0

    def update(self, x: torch.Tensor) -> None:
        x = _finite(x)
        g = self.spec.granularity
        g.param_shape(tuple(x.shape), weight=False)  # validates the axis against the shape
        mn, mx = slice_ranges(x, g)
        self.chunks.append(torch.stack([mn.flatten(), mx.flatten()], dim=1))
        self.num_updates += 1

    def merge(self, other: "GroupRangeObserver") -> "GroupRangeObserver":
        self.chunks += other.chunks
        self.num_updates += other.num_updates
        return self

    @property
    def empty(self) -> bool:
        return not self.chunks

    def points(self) -> torch.Tensor:
        """All observed ``(min, max)`` pairs, ``[n, 2]``."""
        return torch.cat(self.chunks)

    def compute_qparams(self, num_groups: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``[G]`` scales and zero points (``num_groups`` overrides the spec's G, for allocation)."""
        lo, hi = kmeans_ranges(self.points(), num_groups or self.spec.granularity.num_groups,
                               estimator=self.spec.estimator)
        scale, zp = choose_qparams(lo.float(), hi.float(), self.spec)
        return scale.float(), zp.float()

    def state_bytes(self) -> int:
        return sum(c.numel() * c.element_size() for c in self.chunks)


def make_observer(spec: QuantSpec, *, weight: bool = False):
    """The observer a quantizer spec needs (a dynamic spec needs none: it fits nothing)."""
    if spec.dynamic:
        raise ConfigError(f"{spec.short()} computes its ranges from each input at run time; there is nothing to observe")
    if isinstance(spec.granularity, InstanceGroups):
        return GroupRangeObserver(spec, weight=weight)
    if spec.scheme == "bitlog2":
        return BitLog2Observer(spec, weight=weight)
    return Observer(spec, weight=weight)


def exact_distribution_qparams(x: torch.Tensor, spec: QuantSpec, *, weight: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantization parameters from a whole tensor with exact quantiles (weights)."""
    pshape = tuple(spec.granularity.param_shape(tuple(x.shape), weight=weight))
    rows = to_rows(x.detach().float(), pshape)
    scale, zp = estimate_qparams(Distribution.exact(rows), spec)
    return scale.float().reshape(pshape), zp.float().reshape(pshape)


__all__ = ["Observer", "BitLog2Observer", "GroupRangeObserver", "make_observer", "NonFiniteError", "exact_distribution_qparams"]
