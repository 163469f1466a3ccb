"""The engine-neutral ONNX decoder builder shared by the ONNX Runtime and TensorRT backends."""
