"""Granularity vocabulary: which elements of a tensor share one set of quantization parameters.

A granularity maps a tensor shape to a *parameter shape*: a shape with the same number of
dimensions where dimension ``d`` holds either 1 (one parameter shared along ``d``), ``shape[d]``
(one parameter per index) or ``shape[d] // group_size`` (one parameter per contiguous group).
Quantization parameters are always stored in that shape, so ``expand_params`` can broadcast them
against the tensor with no further bookkeeping.

Activations and weights differ in one way only: for an activation every dimension that does not
carry parameters is a *sample* dimension (batch, tokens) and may change size between calls, so its
parameter extent is 1. For a weight the output-channel axis 0 always keeps its own parameters
under ``PerGroup`` (the torchao convention: groups run along the input dimension of each row).

======================  ========================  ==========================
granularity             activation [B, N, C]      weight [O, I]
======================  ========================  ==========================
``PerTensor()``         [1, 1, 1]                 [1, 1]
``PerAxis(-1)``         [1, 1, C]                 [1, I]
``PerAxis(0)``          [B, 1, 1] (rarely useful)  [O, 1]
``PerGroup(g)``         [1, 1, C // g]            [O, I // g]
``InstanceGroups(G)``   [G] (see below)           (activations only)
``Dynamic("token")``    [B, N, 1] per call        (activations only)
``Dynamic("token", g)`` [B, N, C // g] per call   (activations only)
``Dynamic("tensor")``   [B, 1, 1] per call        (activations only)
======================  ========================  ==========================

``InstanceGroups`` (docs/methods.md, IGQ-ViT) is the one granularity whose parameters are not tied
to fixed positions: it stores ``G`` static (scale, zero point) pairs, and *per input instance*
each slice along ``axis`` (a channel, or an attention row) is assigned to the narrowest group whose
quantization range covers the slice's own ``[min, max]`` (``group_params.instance_groups``).

``Dynamic`` is the one granularity with no stored parameters: its ranges are the ``[min, max]`` of
each input *at run time* (per image, per token, or per token and channel group), turned into
``(scale, zero point)`` by the same rule as calibrated ranges (``affine.choose_qparams``;
``group_params.dynamic_qparams``). Its parameter shape is that of one call's input; nothing is
calibrated.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True)
class Granularity:
    """Base class; use one of the subclasses."""

    def param_shape(self, shape: tuple[int, ...], *, weight: bool) -> tuple[int, ...]:
        raise NotImplementedError

    def to_dict(self) -> dict:
        return {"type": type(self).__name__, **{k: v for k, v in self.__dict__.items()}}

    @staticmethod
    def from_dict(d: dict) -> "Granularity":
        kinds = {c.__name__: c for c in (PerTensor, PerAxis, PerGroup, InstanceGroups, Dynamic)}
        d = dict(d)
        kind = d.pop("type")
        if kind not in kinds:
            raise ConfigError(f"unknown granularity {kind!r}; known: {sorted(kinds)}")
        return kinds[kind](**d)


def _norm_axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise ConfigError(f"granularity axis {axis} is out of range for a {ndim}-D tensor")
    return axis % ndim


@dataclass(frozen=True)
class PerTensor(Granularity):
    """One scale and zero point for the whole tensor."""

    def param_shape(self, shape, *, weight):
        return tuple(1 for _ in shape)


@dataclass(frozen=True)
class PerAxis(Granularity):
    """One scale and zero point per index along ``axis`` (weights: 0 = output channel;
    activations: -1 = channel of a ``[..., C]`` tensor, statistics over all other dimensions)."""

    axis: int = -1

    def param_shape(self, shape, *, weight):
        a = _norm_axis(self.axis, len(shape))
        return tuple(s if d == a else 1 for d, s in enumerate(shape))


@dataclass(frozen=True)
class PerGroup(Granularity):
    """One scale and zero point per contiguous group of ``group_size`` elements along ``axis``.

    For weights the output axis 0 also keeps its own parameters (groups run along each row's
    input dimension), as in torchao. ``PerGroup(1)`` on an activation equals ``PerAxis(axis)``
    and ``PerGroup(C)`` equals ``PerTensor()``.
    """

    group_size: int = 128
    axis: int = -1

    def __post_init__(self):
        if self.group_size < 1:
            raise ConfigError(f"PerGroup.group_size must be >= 1, got {self.group_size}")

    def param_shape(self, shape, *, weight):
        a = _norm_axis(self.axis, len(shape))
        if shape[a] % self.group_size:
            raise ConfigError(
                f"PerGroup(group_size={self.group_size}) does not divide dimension {a} of size "
                f"{shape[a]} (tensor shape {tuple(shape)}); pick a group size that divides it"
            )
        out = []
        for d, s in enumerate(shape):
            if d == a:
                out.append(s // self.group_size)
            elif weight and d == 0:
                out.append(s)
            else:
                out.append(1)
        return tuple(out)


@dataclass(frozen=True)
class InstanceGroups(Granularity):
    """IGQ-ViT's instance-aware groups (activations only).

    ``num_groups`` static uniform quantizers (parameters of shape ``[G]``, calibrated by k-means
    over the per-instance ranges of the calibration data). At run time, for every *instance*
    (an index over the first ``instance_dims`` dimensions: the image for ``[B, N, C]``, the
    (image, head) pair for attention ``[B, H, N, N]``) and every slice along ``axis``, the slice's
    range ``[min, max]`` is taken over all the remaining dimensions and the slice is quantized by
    the narrowest group whose range ``[l_g, u_g]`` covers it (within half a step), else by the
    group that clips it least (``group_params.instance_groups``).

    * channels of a Linear input: ``InstanceGroups(G)`` (axis -1, statistics over tokens);
    * rows of a softmax output: ``InstanceGroups(G, axis=-2, instance_dims=2)`` (statistics over
      keys; per-row scales factor out of ``A·v``).
    """

    num_groups: int = 8
    axis: int = -1
    instance_dims: int = 1

    def __post_init__(self):
        if self.num_groups < 1:
            raise ConfigError(f"InstanceGroups.num_groups must be >= 1, got {self.num_groups}")
        if self.instance_dims < 0:
            raise ConfigError(f"InstanceGroups.instance_dims must be >= 0, got {self.instance_dims}")

    def param_shape(self, shape, *, weight):
        if weight:
            raise ConfigError("InstanceGroups groups activation channels per input instance; weights use PerAxis(0) "
                              "or PerGroup")
        a = _norm_axis(self.axis, len(shape))
        if a < self.instance_dims:
            raise ConfigError(f"InstanceGroups(axis={self.axis}, instance_dims={self.instance_dims}) groups an instance "
                              f"dimension of a {len(shape)}-D tensor; the grouped axis must come after the instance dims")
        return (self.num_groups,)

    def stat_dims(self, ndim: int) -> tuple[int, ...]:
        """The dimensions a slice's range is taken over (all but the instance dims and ``axis``)."""
        a = _norm_axis(self.axis, ndim)
        return tuple(d for d in range(self.instance_dims, ndim) if d != a)


DYNAMIC_LEVELS: tuple[str, ...] = ("tensor", "token")


@dataclass(frozen=True)
class Dynamic(Granularity):
    """Ranges computed from each input at run time (dynamic activation quantization; activations only).

    * ``level="tensor"``: one range per input *instance*, i.e. per index of the first dimension
      (the image of a ``[B, N, C]`` or ``[B, C, H, W]`` tensor), so that an image's codes never
      depend on the other images of its batch (a range over the whole batch would);
    * ``level="token"``: one range per token, i.e. per index of every dimension but the last
      (``[B, N, C]`` → ``B·N`` ranges over ``C`` channels each);
    * ``group_size=g > 0`` (``"token"`` only): the channels of each token split into contiguous
      groups of ``g``, one range per token and group (``g`` must divide ``C``).

    The range ``[min, max]`` becomes ``(scale, zero point)`` by ``affine.choose_qparams``, the rule
    calibrated ranges use (``group_params.dynamic_qparams``), so only ``MinMax`` applies: there is
    no distribution to search over at run time. The cost is the metadata: one scale and zero point
    per token (and group) travel with the codes, and one min/max reduction per token at run time."""

    level: str = "token"
    group_size: int = 0

    def __post_init__(self):
        if self.level not in DYNAMIC_LEVELS:
            raise ConfigError(f"Dynamic.level must be one of {list(DYNAMIC_LEVELS)}, got {self.level!r}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 0:
            raise ConfigError(f"Dynamic.group_size must be a whole number >= 0 (0: one group per token), "
                              f"got {self.group_size!r}")
        if self.group_size and self.level != "token":
            raise ConfigError(f"Dynamic.group_size={self.group_size} splits each token's channels; it applies to "
                              f"level='token', not {self.level!r}")

    def param_shape(self, shape, *, weight):
        """The parameter shape of one call with input ``shape`` (``[B, 1, .., 1]``, ``[.., 1]`` or ``[.., C // g]``)."""
        if weight:
            raise ConfigError("Dynamic ranges are computed from each activation at run time; weights are static "
                              "(use PerAxis(0) or PerGroup)")
        shape = tuple(shape)
        if not shape:
            return ()
        if self.level == "tensor":
            return (shape[0],) + (1,) * (len(shape) - 1) if len(shape) > 1 else (1,)
        c = shape[-1]
        if not self.group_size:
            return shape[:-1] + (1,)
        if c % self.group_size:
            raise ConfigError(f"Dynamic(group_size={self.group_size}) does not divide the {c} channels of a tensor of "
                              f"shape {shape}; pick a group size that divides {c}")
        return shape[:-1] + (c // self.group_size,)
