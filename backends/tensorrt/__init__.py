"""TensorRT backend plugin (UNVERIFIED: no TensorRT on the machines this project runs on)."""

from moerun.toolkit import hookimpl


@hookimpl
def moerun_register_backends(registry):
    from .backend import TensorRTBackend

    registry.add(TensorRTBackend)
