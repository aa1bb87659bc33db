"""The simulated TensorRT Python API (tests/fleet/trt_python, installed on simulated Jetsons as
`tensorrt`) run by kiln's real on-device build script (kiln/device_side/trt_api_build.py) with the
device's system python3: a plan the simulated trtexec loads, and TensorRT's real refusal of an
INT8 build that has neither a calibrator nor Q/DQ nodes."""
from __future__ import annotations

import json

import numpy as np
import pytest

from kiln.backends.trtexec import TRT_API_BUILD_SCRIPT

SYSTEM_PYTHON = "/usr/bin/python3"   # the device's python3 with python3-libnvinfer (no numpy)


@pytest.fixture(scope="module")
def device(fleet_supported, tmp_path_factory):
    from tests.fleet.sim import Fleet
    sim = Fleet(tmp_path_factory.mktemp("trt-python"))
    sim.add_device("jp5", "orin-jp5")
    sim.add_device("jp6", "orin-jp6")
    try:
        yield sim.start()
    finally:
        sim.stop()


def _tiny_onnx(path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    w = numpy_helper.from_array(np.full((4, 4), 0.5, np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "tiny",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def _api_build(sim, name, tmp_path, **args):
    folder = sim.srv(name) / "api"
    folder.mkdir(exist_ok=True)
    _tiny_onnx(folder / "m.onnx")
    t = sim.transport(name)
    payload = {"onnx": "/srv/api/m.onnx", "engine": "/srv/api/m.plan", **args}
    result = t.run([SYSTEM_PYTHON, str(TRT_API_BUILD_SCRIPT), json.dumps(payload)], check=False)
    return result, json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", ["jp5", "jp6"])
def test_api_build_makes_a_plan_the_simulated_trtexec_loads(device, name, tmp_path):
    before = len(device.builds(name))
    result, answer = _api_build(device, name, tmp_path, precision="fp16")
    assert result.exit_code == 0 and answer["ok"], result.stdout + result.stderr
    assert answer["tensorrt"] == {"jp5": "8.5.2.2", "jp6": "10.3.0"}[name]
    builds = device.builds(name)[before:]
    assert [(b["tool"], b["precision"]) for b in builds] == [("python-api", "fp16")]
    load = device.transport(name).run(["/usr/src/tensorrt/bin/trtexec", "--loadEngine=/srv/api/m.plan"], check=False)
    assert load.exit_code == 0 and "&&&& PASSED" in load.stdout, load.stdout + load.stderr


@pytest.mark.parametrize("name", ["jp5", "jp6"])
def test_int8_without_calibrator_or_qdq_fails_with_tensorrts_calibration_failure(device, name, tmp_path):
    result, answer = _api_build(device, name, tmp_path, precision="int8")
    assert result.exit_code == 1 and not answer["ok"]
    assert "Calibration failure occurred with no scaling factors detected" in result.stderr, result.stderr
    assert ("IBuilder::buildSerializedNetwork: Error Code 4" in result.stderr) == (name == "jp6")
