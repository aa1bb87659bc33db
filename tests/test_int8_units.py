"""INT8 pieces without devices: calibration as a first-class TensorRT setting (TrtBuildConfig, argv
builders), the calibration data set's digest (stat-cached) and batch file, the int8 tolerances."""
from __future__ import annotations

import textwrap
import zipfile

import numpy as np
import pytest

from kiln.backends.tensorrt import trt_tolerances
from kiln.backends.trt_config import BuildConfigError, TrtBuildConfig
from kiln.backends.trtexec import api_build_argv, build_argv
from kiln.calibration import dataset_digest, write_batches
from kiln.config import load_fleet
from kiln.device_side.trt_api_build import read_npz_batches
from kiln.errors import BuildError, ConfigError
from kiln.keys import HashCache

DATA = "a" * 64


def test_calibration_is_a_setting_of_int8_builds_and_enters_the_key_only_when_set():
    plain = TrtBuildConfig(precision="int8").to_dict()
    assert "calibration" not in plain                      # engine keys without calibration as before
    assert TrtBuildConfig(precision="int8", calibration=DATA).to_dict()["calibration"] == DATA
    with pytest.raises(BuildConfigError, match="used by int8 or best builds, not fp16"):
        TrtBuildConfig(precision="fp16", calibration=DATA)
    with pytest.raises(BuildConfigError, match="--calib is not passed through"):
        TrtBuildConfig(precision="int8", extra_flags=("--calib=x.cache",))


def test_argv_builders_pass_the_calibration_cache():
    cfg = TrtBuildConfig(precision="int8", calibration=DATA)
    argv = build_argv("/usr/src/tensorrt/bin/trtexec", "m.onnx", "m.plan", cfg, "8.5.2", calibration_cache="c.cache")
    assert "--int8" in argv and "--calib=c.cache" in argv
    with pytest.raises(BuildConfigError, match="needs its calibration cache"):
        build_argv("trtexec", "m.onnx", "m.plan", cfg, "8.5.2")
    api = api_build_argv("python3", "s.py", onnx="m.onnx", engine="m.plan", cfg=cfg, calibration_cache="c.cache",
                         calibration_batches="b.npz")
    assert '"calibration": {"batches": "b.npz", "cache": "c.cache"}' in api[-1]
    assert "--calib" not in " ".join(build_argv("t", "m.onnx", "m.plan", TrtBuildConfig(precision="int8"), "8.5.2"))


def test_int8_engines_get_the_int8_tolerances():
    verify = {"rtol": 1e-3, "atol": 1e-4, "trt_rtol": 1e-2, "trt_atol": 1e-2, "int8_rtol": 0.05, "int8_atol": 0.07}
    assert trt_tolerances({**verify, "engine_precision": "fp16"}) == (1e-2, 1e-2)
    assert trt_tolerances({**verify, "engine_precision": "int8"}) == (0.05, 0.07)
    assert trt_tolerances({**verify, "engine_precision": "best"}) == (0.05, 0.07)


FLEET = """
[models.det]
factory = "examples.tiny_detector:build_model"
checkpoint = "det.pt"
inputs = { pixel_values = [1, 3, 8, 8] }
outputs = ["logits"]
[models.det.calibration]
data = "calib"
{extra}

[targets.local]
models = ["det"]
install_dir = "deploy"
"""


def _fleet(tmp_path, extra="", make=True):
    if make:
        (tmp_path / "calib").mkdir(exist_ok=True)
    (tmp_path / "targets.toml").write_text(textwrap.dedent(FLEET.replace("{extra}", extra)))
    return load_fleet(tmp_path / "targets.toml", tmp_path / "artifacts")


def test_the_data_sets_digest_is_stat_cached_and_follows_the_content(tmp_path):
    fleet = _fleet(tmp_path)
    for i in range(3):
        np.save(tmp_path / "calib" / f"b{i}.npy", np.full((1, 3, 8, 8), i, np.float32))
    hashes = HashCache(tmp_path / "hashes.json")
    first = dataset_digest(fleet.models["det"], hashes)
    assert hashes.bytes_read > 0
    again = HashCache(tmp_path / "hashes.json")
    assert dataset_digest(fleet.models["det"], again) == first and again.bytes_read == 0   # no-op: 0 bytes
    np.save(tmp_path / "calib" / "b1.npy", np.full((1, 3, 8, 8), 9, np.float32))
    assert dataset_digest(fleet.models["det"], again) != first
    limited = _fleet(tmp_path, "batches = 2")
    assert dataset_digest(limited.models["det"], again) != dataset_digest(fleet.models["det"], again)


def test_the_batch_file_is_deterministic_and_readable_without_numpy_on_the_device(tmp_path):
    fleet = _fleet(tmp_path)
    rng = np.random.default_rng(0)
    for i in range(2):
        np.savez(tmp_path / "calib" / f"b{i}.npz", pixel_values=rng.random((1, 3, 8, 8)))   # float64: sent as float32
    assert write_batches(fleet.models["det"], tmp_path / "a.npz") == 2
    write_batches(fleet.models["det"], tmp_path / "b.npz")
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    batches = read_npz_batches(str(tmp_path / "a.npz"))          # the device script's own reader
    shape, raw = batches[1]["pixel_values"]
    expected = np.load(tmp_path / "calib" / "b1.npz")["pixel_values"].astype(np.float32)
    assert shape == (1, 3, 8, 8) and np.frombuffer(raw, np.float32).tolist() == expected.ravel().tolist()
    assert zipfile.ZipFile(tmp_path / "a.npz").namelist() == ["batch00000.pixel_values.npy",
                                                              "batch00001.pixel_values.npy"]


def test_batches_of_the_wrong_shape_or_no_batches_are_refused(tmp_path):
    fleet = _fleet(tmp_path)
    with pytest.raises(ConfigError, match="holds no .npz or .npy files"):
        write_batches(fleet.models["det"], tmp_path / "x.npz")
    np.save(tmp_path / "calib" / "b0.npy", np.zeros((1, 3, 16, 16), np.float32))
    with pytest.raises(BuildError, match=r"input pixel_values has shape \[1, 3, 16, 16\], the engine calibrates at \[1, 3, 8, 8\]"):
        write_batches(fleet.models["det"], tmp_path / "x.npz")


@pytest.mark.parametrize("extra, words", [
    ('function = "calib_data:batches"', "needs exactly one of data and function"),
    ('precision = "int8"', "unknown key"),
])
def test_bad_calibration_tables_are_refused_at_their_line(tmp_path, extra, words):
    with pytest.raises(ConfigError, match=words):
        _fleet(tmp_path, extra)


def test_a_missing_calibration_folder_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="models.det.calibration.data: folder 'calib'"):
        _fleet(tmp_path, make=False)


def test_metric_needs_its_threshold(tmp_path):
    with pytest.raises(ConfigError, match="metric and metric_threshold go together"):
        _fleet(tmp_path, '[models.det.verify]\nmetric = "m:f"')


def test_qdq_quantization_is_symmetric_and_byte_for_byte_deterministic(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from kiln.calibration import quantize_qdq
    fleet = _fleet(tmp_path)
    rng = np.random.default_rng(1)
    for i in range(3):
        np.save(tmp_path / "calib" / f"b{i}.npy", rng.random((1, 3, 8, 8), dtype=np.float32))
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["pixel_values", "w"], ["logits"])], "g",
                              [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4, 6, 6])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "fp32.onnx")
    a = quantize_qdq(fleet.models["det"], tmp_path / "fp32.onnx", tmp_path / "a.onnx")
    b = quantize_qdq(fleet.models["det"], tmp_path / "fp32.onnx", tmp_path / "b.onnx")
    assert a.read_bytes() == b.read_bytes()
    q = onnx.load(str(a)).graph
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in q.node}
    zero_points = [numpy_helper.to_array(i) for i in q.initializer if i.name.endswith("_zero_point")]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)


CALIB_FUNCTION = '''
import numpy as np


def batches():
    rng = np.random.default_rng({seed})
    for _ in range(3):
        yield rng.random((1, 3, 8, 8))          # one-input model: an array per batch
'''


def test_a_calibration_function_is_keyed_by_its_module_and_yields_the_batches(tmp_path):
    (tmp_path / "int8_calib_fn.py").write_text(CALIB_FUNCTION.format(seed=1))
    text = textwrap.dedent(FLEET.replace("{extra}", "")).replace('data = "calib"', 'function = "int8_calib_fn:batches"\nbatches = 2')
    (tmp_path / "targets.toml").write_text(text)
    model = load_fleet(tmp_path / "targets.toml", tmp_path / "artifacts").models["det"]
    hashes = HashCache(tmp_path / "hashes.json")
    first = dataset_digest(model, hashes)
    assert write_batches(model, tmp_path / "b.npz") == 2                  # `batches = 2` of the three
    shape, raw = read_npz_batches(str(tmp_path / "b.npz"))[0]["pixel_values"]
    expected = np.random.default_rng(1).random((1, 3, 8, 8)).astype(np.float32)
    assert shape == (1, 3, 8, 8) and np.frombuffer(raw, np.float32).tolist() == expected.ravel().tolist()
    (tmp_path / "int8_calib_fn.py").write_text(CALIB_FUNCTION.format(seed=2))
    assert dataset_digest(model, HashCache(tmp_path / "hashes.json")) != first
