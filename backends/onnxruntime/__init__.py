"""ONNX Runtime backend plugin: two backends, one per MoE formulation, on the shared builder."""

from moerun.toolkit import hookimpl


@hookimpl
def moerun_register_backends(registry):
    from .backend import OnnxRuntimeBackend, OnnxRuntimeContribBackend

    registry.add(OnnxRuntimeBackend)
    registry.add(OnnxRuntimeContribBackend)
