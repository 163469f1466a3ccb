"""llama.cpp backend plugin (llama-cpp-python's low-level API, GGUF via the gguf package)."""

from moerun.toolkit import hookimpl


@hookimpl
def moerun_register_backends(registry):
    from .backend import LlamaCppBackend

    registry.add(LlamaCppBackend)
