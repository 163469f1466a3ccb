"""moerun's conformance suite against this backend: the whole test file."""

from moerun.testing import BackendConformance


class TestNumpyBackend(BackendConformance):
    backend_name = "numpy"
    parity_atol = 1e-4
