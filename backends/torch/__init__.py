"""PyTorch backend plugin: the numerical reference (fp32) and an eager/compiled engine."""

from moerun.toolkit import hookimpl


@hookimpl
def moerun_register_backends(registry):
    from .backend import TorchBackend

    registry.add(TorchBackend)
