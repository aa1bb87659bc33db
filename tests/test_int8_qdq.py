"""Explicit INT8 quantization: `export.quantize = "qdq"` writes Quantize/DequantizeLinear nodes into
the ONNX at export (ONNX Runtime's quantize_static with the model's calibration data set), the
TensorRT build takes the scales from the graph (`--int8`, no `--calib`, no calibration on any
device), and the engine passes the int8 accuracy gate against PyTorch's fp32 reference."""
from __future__ import annotations

import numpy as np
import onnx

from test_fleet import fleet_project
from test_int8 import SYSTEM_PYTHON, _calibration_data

CLASSIFIER = '''
import torch
from torch import nn


def build():
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
'''


def use_the_classifier(tmp_path, text: str) -> str:
    """Writes CLASSIFIER (qdq_models.py) and its calibration data set (calib/) into the project at
    tmp_path; returns the fleet text `text` with model "tiny" made of it (one output, logits)."""
    (tmp_path / "qdq_models.py").write_text(CLASSIFIER)
    _calibration_data(tmp_path / "calib")
    text = text.replace('factory = "examples.tiny_detector:build_model"', 'factory = "qdq_models:build"')
    return text.replace('outputs = ["logits", "pred_boxes"]', 'outputs = ["logits"]')


def test_qdq_export_builds_int8_from_the_graphs_own_scales(tmp_path, new_fleet):
    sim = new_fleet()
    sim.add_device("orin-a", "orin-jp5")
    sim.start()
    p = fleet_project(tmp_path, sim, {"orin-a": {"tensorrt_python": SYSTEM_PYTHON}})
    text = use_the_classifier(tmp_path, p.fleet.read_text())
    head, rest = text.split("[targets.", 1)
    p.fleet.write_text(head + '[models.tiny.export]\nquantize = "qdq"\n[models.tiny.build]\nprecision = "int8"\n'
                       '[models.tiny.calibration]\ndata = "calib"\n\n[targets.' + rest)
    p.doit("deploy:orin-a")
    graph = onnx.load(str(p.artifacts / "onnx" / "tiny.onnx")).graph
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in graph.node}
    scales = [i for i in graph.initializer if i.name.endswith("_scale")]
    zero_points = [onnx.numpy_helper.to_array(i) for i in graph.initializer if i.name.endswith("_zero_point")]
    assert scales and zero_points and all(not z.any() for z in zero_points)          # symmetric INT8, as TensorRT wants
    (build,) = sim.builds("orin-a")
    assert build["precision"] == "int8" and build["int8"] == "qdq" and not any(a.startswith("--calib") for a in build["argv"])
    assert sim.calibrations("orin-a") == []
    assert (sim.srv("orin-a") / "kiln/tiny/current/model.plan").exists()

    # the scales come from the calibration data: new data, new ONNX (and engine)
    first = (p.artifacts / "onnx" / "tiny.onnx").read_bytes()
    np.savez(tmp_path / "calib" / "batch09.npz", pixel_values=np.full((1, 3, 32, 32), 3.0, np.float32))
    again = p.doit("deploy:orin-a")
    assert "export:tiny" in again.ran() and (p.artifacts / "onnx" / "tiny.onnx").read_bytes() != first
    assert len(sim.builds("orin-a")) == 2 and sim.calibrations("orin-a") == []
