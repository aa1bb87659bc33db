"""DLA on Jetson Xavier/Orin: `dla_core` (and `dla_gpu_fallback`) as build settings, usually per
target (`[targets.<t>.build]`); trtexec `--useDLACore=N --allowGPUFallback` or the Python API's
DeviceType.DLA; part of the engine key; refused on a class without that DLA core."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kiln.backends.trt_config import BuildConfigError, TrtBuildConfig
from kiln.backends.trtexec import api_build_argv, build_argv, load_argv
from kiln.pipeline.context import Context
from kiln.devices.nvidia import jetson_dla_cores
from kiln.errors import ConfigError
from test_fleet import fleet_project
from tests.fleet.sim import PROFILES

SIM = Path(__file__).resolve().parent / "fleet" / "trtexec_sim.py"
#: an Orin Nano devkit on JetPack 6.2: the AGX Orin JP6 profile with the Nano's device tree and no DLA
#: (kept out of sim.PROFILES: tests/samples/sim-probe-baseline.json records those profiles only)
ORIN_NANO_JP6 = dataclasses.replace(
    PROFILES["orin-jp6"], name="orin-nano-jp6", description="Orin Nano devkit, JetPack 6.2 (no DLA)",
    board_model="NVIDIA Jetson Orin Nano Developer Kit",
    compatible=("nvidia,p3768-0000+p3767-0005", "nvidia,p3767-0005", "nvidia,tegra234"), dla_cores=0)
ONNX_MAGIC = b"\x08\x07"   # enough of a ModelProto for the sim's build (it reads no weights without --exportOutput)


# -- settings, argv, the DLA table -------------------------------------------------------------

def test_dla_settings_become_trtexec_and_api_flags_and_gpu_engines_keep_their_keys():
    cfg = TrtBuildConfig.from_mapping({"precision": "fp16", "dla_core": 1, "dla_gpu_fallback": True})
    argv = build_argv("trtexec", "m.onnx", "e.plan", cfg, "8.5.2")
    assert argv[argv.index("--fp16") + 1:] == ["--useDLACore=1", "--allowGPUFallback", "--buildOnly"]
    strict = TrtBuildConfig.from_mapping({"precision": "int8", "dla_core": 0, "dla_gpu_fallback": False})
    assert "--allowGPUFallback" not in build_argv("trtexec", "m.onnx", "e.plan", strict, "10.3.0")
    assert load_argv("trtexec", "e.plan", dla_core=1)[:3] == ["trtexec", "--loadEngine=e.plan", "--useDLACore=1"]
    api = json.loads(api_build_argv("python3", "b.py", onnx="m", engine="e", cfg=cfg)[-1])
    assert (api["dla_core"], api["dla_gpu_fallback"]) == (1, True)
    # the key: DLA settings only in DLA engines' settings; a GPU engine's settings are as before
    gpu = TrtBuildConfig.from_mapping({"precision": "fp16", "dla_gpu_fallback": True}).to_dict()
    assert "dla_core" not in gpu and "dla_gpu_fallback" not in gpu
    assert cfg.to_dict()["dla_core"] == 1 and strict.to_dict() != cfg.to_dict()


@pytest.mark.parametrize("build, field, words", [
    ({"precision": "fp32", "dla_core": 0}, "precision", "FP16 or INT8"),
    ({"dla_core": -1}, "dla_core", "DLA core number"),
    ({"extra_flags": ["--useDLACore=0"]}, "extra_flags", "dla_core = <core>"),
])
def test_bad_dla_settings_are_refused(build, field, words):
    with pytest.raises(BuildConfigError) as info:
        TrtBuildConfig.from_mapping(build)
    assert info.value.context["field"] == field and words in str(info.value)


def test_a_target_override_with_fp32_is_a_config_error_at_its_line(tmp_path):
    (tmp_path / "targets.toml").write_text("""
[models.det]
factory = "examples.tiny_detector:build_model"
checkpoint = "det.pt"
inputs = { pixel_values = [1, 3, 32, 32] }
outputs = ["logits", "pred_boxes"]
[models.det.build]
precision = "fp32"

[targets.orin]
transport = "ssh"
backend = "tensorrt"
install_dir = "/opt/kiln"
models = ["det"]
[targets.orin.build]
dla_core = 0
""")
    with pytest.raises(ConfigError) as info:
        Context.load(tmp_path / "targets.toml", tmp_path / "a")   # what every run does first
    assert "dla_core needs precision fp16" in str(info.value) and "targets.toml:" in str(info.value)


def test_which_jetson_modules_have_dla_cores():
    assert [jetson_dla_cores(m) for m in ("p3701-0005", "p2888-0001", "p3668-0001", "p3767-0000",
                                          "p3767-0001", "p3767-0005", "p3767-0003", "p3450-0000")] \
        == [2, 2, 2, 2, 1, 0, 0, 0]
    assert jetson_dla_cores("p9999-0000") is None and jetson_dla_cores(None) is None


# -- the trtexec simulator --------------------------------------------------------------------------

def _sim(tmp_path: Path, cores: int, *args: str):
    env = {**os.environ, "KILN_SIM_TRT_VERSION": "10.3.0", "KILN_SIM_BUILD_SECONDS": "0.01",
           "KILN_SIM_DLA_CORES": str(cores), "KILN_SIM_STATE": str(tmp_path / "state")}
    return subprocess.run([sys.executable, str(SIM), *args], capture_output=True, text=True, env=env)


def _sim_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("trtexec_sim_for_dla", SIM)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trtexec_sim_builds_for_a_dla_core_it_has_and_refuses_one_it_lacks(tmp_path):
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(ONNX_MAGIC)
    ok = _sim(tmp_path, 2, f"--onnx={onnx}", f"--saveEngine={tmp_path / 'e.plan'}", "--useDLACore=1",
              "--allowGPUFallback", "--skipInference")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    built = json.loads((tmp_path / "state/builds.log").read_text().splitlines()[-1])
    # trtexec turns FP16 on for DLA when neither --fp16 nor --int8 is given
    assert (built["dla_core"], built["gpu_fallback"], built["precision"]) == (1, True, "fp16")
    meta, _ = _sim_module().read_engine_meta((tmp_path / "e.plan").read_bytes())
    assert (meta["dla_core"], meta["gpu_fallback"]) == (1, True)     # the plan's JSON line
    # an Orin Nano: no DLA
    nano = _sim(tmp_path, 0, f"--onnx={onnx}", "--saveEngine=x.plan", "--useDLACore=0", "--fp16", "--skipInference")
    assert nano.returncode == 1 and "Cannot create DLA engine, 0 not available" in nano.stderr
    assert "&&&& FAILED TensorRT.trtexec" in nano.stdout and not (tmp_path / "x.plan").exists()
    # a load on a DLA core is recorded as such
    load = _sim(tmp_path, 2, f"--loadEngine={tmp_path / 'e.plan'}", "--useDLACore=1")
    assert load.returncode == 0, load.stdout + load.stderr
    loaded = json.loads((tmp_path / "state/loads.log").read_text().splitlines()[-1])
    assert (loaded["dla_core"], loaded["plan_dla_core"]) == (1, 1)


# -- the simulated fleet ------------------------------------------------------------------------------

def test_dla_per_target_on_simulated_orins_and_refused_on_an_orin_nano(tmp_path, new_fleet):
    sim = new_fleet()
    sim.add_device("orin-dla", "orin-jp6")
    sim.add_device("orin-gpu", "orin-jp6")
    sim.add_device("nano", ORIN_NANO_JP6)
    sim.start()
    p = fleet_project(tmp_path, sim, {"orin-dla": {}, "orin-gpu": {}, "nano": {}})
    text = p.fleet.read_text().replace('[targets.orin-gpu]', '[targets.orin-dla.build]\ndla_core = 1\n\n[targets.orin-gpu]')
    p.fleet.write_text(text)

    run = p.doit("deploy:orin-dla", "deploy:orin-gpu")
    [dla] = sim.builds("orin-dla")
    [gpu] = sim.builds("orin-gpu")
    # one class, two engines: the DLA one built with the DLA flags, the GPU one without
    assert {"--useDLACore=1", "--allowGPUFallback"} <= set(dla["argv"]) and dla["dla_core"] == 1, dla
    assert not any(a.startswith("--useDLACore") for a in gpu["argv"]) and gpu["dla_core"] is None
    # verification and smoke test load the engine on its DLA core
    assert {load["dla_core"] for load in sim.loads("orin-dla")} == {1}
    assert {load["dla_core"] for load in sim.loads("orin-gpu")} == {None}
    keys = {name: (sim.srv(name) / "kiln/tiny/current").resolve().name for name in ("orin-dla", "orin-gpu")}
    assert keys["orin-dla"] != keys["orin-gpu"], run.out
    manifest = json.loads((sim.srv("orin-dla") / "kiln/tiny/current/manifest.json").read_text())
    assert manifest["smoke_test"]["max_abs_diff"], manifest

    # another core is another engine (the key holds the core), built once
    p.fleet.write_text(p.fleet.read_text().replace("dla_core = 1", "dla_core = 0"))
    p.doit("deploy:orin-dla")
    assert [b["dla_core"] for b in sim.builds("orin-dla")] == [1, 0]
    assert (sim.srv("orin-dla") / "kiln/tiny/current").resolve().name != keys["orin-dla"]

    # the Orin Nano has no DLA: refused before anything is built, naming the class and the module
    p.fleet.write_text(p.fleet.read_text() + "\n[targets.nano.build]\ndla_core = 0\n")
    bad = p.doit("deploy:nano", check=False)
    assert bad.returncode != 0
    assert "dla_core = 0 asked for hardware class" in bad.out and "p3767-0005" in bad.out and "has no DLA" in bad.out, bad.out
    assert sim.builds("nano") == [] and not (sim.srv("nano") / "kiln/tiny/current").exists()

    # the Python API builder (build_tool = "python-api") on the same devices: DeviceType.DLA on the core
    # asked for, GPU fallback as a builder flag; the Orin Nano's builder has no DLA core to give
    from test_trt_python_sim import _api_build
    result, answer = _api_build(sim, "orin-dla", tmp_path, precision="fp16", dla_core=1, dla_gpu_fallback=True)
    assert result.exit_code == 0 and answer["ok"], result.stdout + result.stderr
    api = sim.builds("orin-dla")[-1]
    assert (api["tool"], api["dla_core"]) == ("python-api", 1) and "GPU_FALLBACK" in api["flags"], api
    result, answer = _api_build(sim, "nano", tmp_path, precision="fp16", dla_core=0)
    assert result.exit_code == 1 and answer["error"].startswith("Cannot create DLA engine, 0 not available"), answer
