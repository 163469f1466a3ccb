"""The shared conformance suite (moerun.testing) run against every in-tree backend."""

from moerun.testing import BackendConformance


class TestTorchConformance(BackendConformance):
    backend_name = "torch"
    parity_atol = 1e-4


class TestLlamaCppConformance(BackendConformance):
    backend_name = "llamacpp"
    precision = "f32"
    parity_atol = 1e-4
    load_options = {"type_k": "f32", "type_v": "f32", "flash_attn": False}


class TestOnnxRuntimeConformance(BackendConformance):
    backend_name = "onnxruntime"
    parity_atol = 1e-4


class TestOnnxRuntimeContribConformance(BackendConformance):
    backend_name = "onnxruntime-contrib"
    parity_atol = 1e-4
