"""Engine backends. `base` (Backend contract, get_backend), `onnxruntime`, `tensorrt`;
the TensorRT helpers: `trt_config` (build settings and their validation), `trtexec`
(argv builders), `trtexec_output` (output parsing, failure explanations)."""
