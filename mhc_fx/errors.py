"""Exceptions raised by mhc_fx. Each message names the problem and the fix."""


class MHCError(Exception):
    """Base class of every error mhc_fx raises on purpose."""


class ConfigError(MHCError, ValueError):
    """An invalid :class:`~mhc_fx.MHCConfig` field (the message names the field and why)."""


class CaptureError(MHCError, RuntimeError):
    """No capture method could turn the model into a graph (each attempt is listed)."""


class ConversionError(MHCError, RuntimeError):
    """The model cannot be converted (no residual, already converted, or a failed check)."""
