"""Exception hierarchy. The CLI prints one line for any MoerunError (exit code 2)."""

from __future__ import annotations


class MoerunError(Exception):
    """Root of every error moerun raises on purpose."""


class ConfigError(MoerunError, ValueError):
    """A model spec, study file, option or argument is invalid."""


class PluginLoadError(MoerunError):
    """A plugin could not be imported or registered."""


class DuplicateRegistrationError(PluginLoadError):
    """Two plugins registered the same backend or preset name."""


class UnknownBackendError(MoerunError, KeyError):
    """No backend of that name; the message lists what exists and why some are unavailable."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class UnknownModelError(MoerunError, KeyError):
    """No preset, twin or checkpoint of that name."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class BackendUnavailableError(MoerunError):
    """The backend's engine or device is missing here; the message says how to get it."""


class UnsupportedError(MoerunError):
    """The backend runs here but not this precision, family or setting."""


class BackendRuntimeError(MoerunError):
    """The engine failed while preparing, loading or running a model."""


class CheckpointError(MoerunError):
    """A checkpoint or artifact file is missing, truncated or corrupt."""
