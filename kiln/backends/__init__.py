"""Engine backends: ONNX Runtime, TensorRT (trtexec argv and output parsing)."""
