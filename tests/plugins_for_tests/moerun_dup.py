"""Registers a backend name the torch plugin already owns."""

from moerun import hookimpl
from moerun.backends.torch.backend import TorchBackend


class AnotherTorch(TorchBackend):
    name = "torch"
    aliases = ()


@hookimpl
def moerun_register_backends(registry):
    registry.add(AnotherTorch)
