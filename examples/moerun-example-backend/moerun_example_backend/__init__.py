"""moerun plugin: registers the NumPy example backend (imports nothing heavy)."""

from moerun.toolkit import hookimpl


@hookimpl
def moerun_register_backends(registry):
    from .backend import NumpyBackend

    registry.add(NumpyBackend)
