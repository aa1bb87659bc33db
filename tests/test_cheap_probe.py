"""The cheap probe: a no-op probe reads files and starts nothing that loads TensorRT or CUDA on
the device; trtexec / `import tensorrt` run only when the cheap TensorRT sources are missing or
disagree, and the fingerprint says so. Counted on simulated devices (tests/fleet/sim.py logs every
trtexec start and every import of the device's `tensorrt` package in trt_invocations.log)."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from kiln.devices.fingerprint import fallback_reason, parse_probe_output, probe_remote
from kiln.devices.hwclass import hardware_class
from kiln.devices.probe_script import PROBE_SCRIPT, split_sections
from tests.fleet.sim import PROFILES

from test_fleet import fleet_project

SAMPLES = Path(__file__).parent / "samples"
BASELINE = json.loads((SAMPLES / "sim-probe-baseline.json").read_text())["profiles"]
TRT_PROFILES = sorted(name for name, p in PROFILES.items() if p.trt)
#: fields that depend on the host the simulated devices share, or say where a value came from
HOST_OR_SOURCE = {"arch", "cpu_model", "cpu_flags", "python", "onnxruntime", "onnxruntime_source",
                  "l4t_source", "tensorrt_source", "cuda_source", "cudnn_source", "probe_fallback",
                  "version_conflicts", "tensorrt_build"}

_JP5 = PROFILES["orin-jp5"]
#: libnvinfer deb only: no NvInferVersion.h, no python bindings -> trtexec --help decides
NO_HEADER = dataclasses.replace(_JP5, name="orin-jp5-noheader", hidden=(
    "/usr/include/aarch64-linux-gnu/NvInferVersion.h", "/usr/lib/python3/dist-packages/tensorrt/__init__.py"))
#: the deb says 8.6.1, header and bindings 8.5.2.2 -> `import tensorrt` decides
DISAGREE = dataclasses.replace(_JP5, name="orin-jp5-disagree", debs=tuple(
    (p, "8.6.1.6-1+cuda11.4" if p == "libnvinfer8" else v) for p, v in _JP5.debs))


@pytest.fixture(scope="module")
def devices(fleet_supported, tmp_path_factory):
    from tests.fleet.sim import Fleet
    sim = Fleet(tmp_path_factory.mktemp("cheap-probe"))
    for name in TRT_PROFILES + ["cpu"]:
        sim.add_device(name, name)
    sim.add_device("noheader", NO_HEADER)
    sim.add_device("disagree", DISAGREE)
    try:
        yield sim.start()
    finally:
        sim.stop()


def _same_as_baseline(profile: str, fp: dict) -> None:
    want = BASELINE[profile]
    assert hardware_class("tensorrt", fp).digest == want["class_digest"], profile
    got = {k: v for k, v in fp.items() if k not in HOST_OR_SOURCE}
    assert got == {k: v for k, v in want["fingerprint"].items() if k not in HOST_OR_SOURCE}, profile
    assert fp["tensorrt_build"] == want["fingerprint"]["tensorrt_build"], profile


@pytest.mark.parametrize("python", ["python3", sys.executable])
def test_no_op_probe_of_every_jetson_starts_no_tensorrt_and_keeps_fingerprint_and_class(devices, python):
    """python3: the device's system python, which has the tensorrt bindings (python3-libnvinfer);
    sys.executable: the interpreter the fleet tests give their targets (no bindings)."""
    for name in TRT_PROFILES:
        before = len(devices.trt_invocations(name))
        fp = probe_remote(devices.transport(name), python=python, backend="tensorrt")
        assert len(devices.trt_invocations(name)) == before, devices.trt_invocations(name)
        assert fp["probe_fallback"] is None and fp["tensorrt_source"] == "dpkg"
        assert (fp["cuda_source"], fp["cudnn_source"], fp["l4t_source"]) == (
            "version.json", "header", "nv_tegra_release")
        # the same fields and the same hardware class as the probe that ran trtexec and imported tensorrt
        _same_as_baseline(name, fp)
    assert [len(devices.trt_invocations(n)) for n in TRT_PROFILES] == [0] * len(TRT_PROFILES)


def test_the_expensive_path_gives_every_profile_the_same_class(devices):
    """Forcing the fallback (import tensorrt, else trtexec --help, which then decide) changes no
    simulated device's class: a cheap probe never moves today's devices to a new class."""
    for name in TRT_PROFILES:
        before = len(devices.trt_invocations(name))
        cheap = probe_remote(devices.transport(name))
        full = probe_remote(devices.transport(name), force_fallback="test: forced")
        assert full["probe_fallback"] == "test: forced" and full["tensorrt_source"] == "python"
        assert [r["tool"] for r in devices.trt_invocations(name)[before:]] == ["python"]
        assert hardware_class("tensorrt", cheap) == hardware_class("tensorrt", full)
        _same_as_baseline(name, full)


def test_missing_header_falls_back_to_trtexec_and_says_so(devices):
    fp = probe_remote(devices.transport("noheader"), backend="tensorrt")
    runs = devices.trt_invocations("noheader")
    assert [r["tool"] for r in runs] == ["trtexec"] and runs[0]["argv"] == ["--help"]
    assert fp["probe_fallback"] == "only dpkg says TensorRT 8.5.2; no second cheap source confirms it"
    assert fp["tensorrt"] == "8.5.2" and fp["tensorrt_source"] == "trtexec"
    # same class as a device with its headers: the answer agrees, only its source differs
    assert hardware_class("tensorrt", fp).digest == BASELINE["orin-jp5"]["class_digest"]


def test_disagreeing_cheap_sources_fall_back_to_import_tensorrt_which_decides(devices):
    fp = probe_remote(devices.transport("disagree"), backend="tensorrt")
    assert [r["tool"] for r in devices.trt_invocations("disagree")] == ["python"]
    assert fp["probe_fallback"] == "cheap TensorRT sources disagree: dpkg=8.6.1 header=8.5.2 python-file=8.5.2"
    assert fp["tensorrt"] == "8.5.2" and fp["tensorrt_build"] == "8.5.2.2" and fp["tensorrt_source"] == "python"
    assert "dpkg=8.6.1" in fp["version_conflicts"]


def test_onnxruntime_targets_never_fall_back_and_read_the_version_without_importing(devices):
    # a Jetson used as an ONNX Runtime target: its odd TensorRT files are no reason to load TensorRT
    before = len(devices.trt_invocations("noheader"))
    probe_remote(devices.transport("noheader"), python=sys.executable, backend="onnxruntime")
    assert len(devices.trt_invocations("noheader")) == before
    fp = probe_remote(devices.transport("cpu"), python=sys.executable, backend="onnxruntime")
    assert fp["onnxruntime_source"] == "python-file" and fp["probe_fallback"] is None
    imported = subprocess.run([sys.executable, "-c", "import onnxruntime; print(onnxruntime.__version__)"],
                              capture_output=True, text=True, check=True).stdout.strip()
    assert fp["onnxruntime"] == imported            # what the import-based probe recorded
    assert hardware_class("onnxruntime", fp) == hardware_class("onnxruntime", {**fp, "onnxruntime": imported})


def test_cheap_python_reader_finds_onnxruntime_by_dist_info_and_never_imports(tmp_path):
    """A package whose files name no version: METADATA answers; importing it would raise."""
    site = tmp_path / "site"
    (site / "onnxruntime").mkdir(parents=True)
    (site / "onnxruntime/__init__.py").write_text("raise RuntimeError('imported!')\n")
    (site / "onnxruntime_gpu-1.19.2.dist-info").mkdir()
    (site / "onnxruntime_gpu-1.19.2.dist-info/METADATA").write_text(
        "Metadata-Version: 2.1\nName: onnxruntime-gpu\nVersion: 1.19.2\n\nlong text\n")
    (site / "tensorrt").mkdir()
    (site / "tensorrt/__init__.py").write_text("raise RuntimeError('imported!')\n__version__ = '10.3.0'\n")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "KILN_PROBE_ROOT": str(tmp_path / "root")}
    out = subprocess.run(["sh", "-c", PROBE_SCRIPT, "kiln-probe", "", sys.executable], capture_output=True,
                         text=True, timeout=60, env=env).stdout
    s = split_sections(out)
    assert (s["onnxruntime"], s["onnxruntime_source"]) == ("1.19.2", "dist-info")
    assert s["python_tensorrt_file"] == "10.3.0" and s["python_tensorrt_spec"] == str(site / "tensorrt")
    assert "imported!" not in out
    # bindings found, no deb, no header: one cheap source is not enough
    assert fallback_reason(out) == "only python-file says TensorRT 10.3.0; no second cheap source confirms it"


def test_real_h200_sample_needs_no_fallback():
    """The real probe output of a GPU server without TensorRT (tests/samples): nothing could say
    more, so no fallback; every version says where it came from."""
    text = (SAMPLES / "dgpu-h200-probe-output.txt").read_text()
    assert fallback_reason(text) is None
    fp = parse_probe_output(text)
    assert fp["tensorrt"] is None and fp["tensorrt_source"] is None and fp["probe_fallback"] is None
    assert (fp["cuda"], fp["cuda_source"]) == ("13.0", "nvcc")
    assert (fp["cudnn"], fp["cudnn_source"]) == ("9.14.0", "header")
    # and the old probe's output (onnxruntime imported then) is marked as such
    assert (fp["onnxruntime"], fp["onnxruntime_source"]) == ("1.30.0", "import")


def test_no_op_deploy_starts_no_tensorrt_on_the_device(tmp_path, new_fleet):
    sim = new_fleet()
    sim.add_device("orin-a", "orin-jp5")
    sim.start()
    p = fleet_project(tmp_path, sim, {"orin-a": {}})
    p.doit("deploy")
    assert len(sim.builds("orin-a")) == 1
    assert len(sim.trt_invocations("orin-a")) >= 1       # the build and its checks did run trtexec
    before = sim.trt_invocations("orin-a")
    second = p.doit("deploy")
    assert second.ran() == set(), second.out
    assert sim.trt_invocations("orin-a") == before, sim.trt_invocations("orin-a")[len(before):]
    record = p.artifacts / "fingerprints" / "orin-a.json"
    fp = json.loads(record.read_text())
    assert fp["probe_fallback"] is None and fp["tensorrt_source"] == "dpkg"
    # a record written by the probe before this one (no *_source keys): re-recorded, same class,
    # nothing built, loaded or deployed again
    new_keys = {"l4t_source", "tensorrt_source", "cuda_source", "cudnn_source", "onnxruntime_source",
                "probe_fallback"}
    record.write_text(json.dumps({k: v for k, v in fp.items() if k not in new_keys}))
    third = p.doit("deploy")
    assert third.ran() == {"fingerprint:orin-a"}, third.out
    assert "fingerprint changed outside the class fields" in third.out
    assert sim.trt_invocations("orin-a") == before and len(sim.builds("orin-a")) == 1
    assert json.loads(record.read_text()) == fp
