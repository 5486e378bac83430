"""Exception types. Every message names the node, module or option at fault and says what to do."""

from __future__ import annotations


class FxQuantError(Exception):
    """Base class of every error fxquant raises on purpose."""


class ConfigError(FxQuantError, ValueError):
    """An invalid option, recipe, pass name or quantizer spec."""


class TraceError(FxQuantError):
    """The model could not be captured as an FX graph."""


class CalibrationError(FxQuantError):
    """Calibration data is empty, malformed, or produced non-finite values."""


class PassError(FxQuantError):
    """A pass failed or its preconditions were not met."""


class ArtifactError(FxQuantError):
    """A saved artifact does not match the model it is loaded into."""


class ArtifactWarning(UserWarning):
    """A saved artifact loads but cannot be checked (an old format without digests)."""
