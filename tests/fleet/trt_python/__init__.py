"""Simulated `tensorrt` Python package (the bindings of python3-libnvinfer), installed by
tests/fleet/sim.py into each simulated Jetson's /usr/lib/python3/dist-packages/tensorrt/.

One module per area, imported here: builder.py (Builder, OnnxParser, IBuilderConfig, INT8
calibrators), refit.py (Runtime, ICudaEngine, Refitter, OnnxParserRefitter), onnx_reader.py (the
ONNX reading they share). sim.py rewrites the two marked lines below per device: `__version__` stays a literal, as in the real package (the cheap probe reads
it without importing), and `_SIM` holds the device's identity (state folder, compute
capability, GPU, the trtexec simulator whose plan format is shared). An import is logged in
state/trt_invocations.log: on a real device it loads libnvinfer and CUDA.
"""
import json as _json
import os as _os
import sys as _sys
import time as _time

__version__ = "0.0.0"  # kiln-sim: version
_SIM = {}  # kiln-sim: identity

if _SIM.get("state"):
    try:
        _os.makedirs(_SIM["state"], exist_ok=True)
        with open(_os.path.join(_SIM["state"], "trt_invocations.log"), "a") as _f:
            _f.write(_json.dumps({"tool": "python", "python": _sys.executable, "argv": _sys.argv,
                                  "ts": round(_time.time(), 3)}, sort_keys=True) + "\n")
    except OSError:
        pass

from .builder import *  # noqa: E402,F401,F403
from .refit import *  # noqa: E402,F401,F403
