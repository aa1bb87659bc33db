"""trtexec builder: argv per TensorRT version, parsing of real-format output, failure reasons.

Output samples are verbatim from docs/trtexec.md §4 and §5.
"""
from __future__ import annotations

import json
import py_compile
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kiln.backends import trt_config as tc, trtexec as tx, trtexec_output as txo
from kiln.backends.trt_config import TrtBuildConfig
from kiln.errors import BuildError, ConfigError

T = "/usr/src/tensorrt/bin/trtexec"

SUMMARY_JP5 = """[02/26/2024-10:43:06] [I] === Performance summary ===
[02/26/2024-10:43:06] [I] Throughput: 97.8649 qps
[02/26/2024-10:43:06] [I] Latency: min = 10.642 ms, max = 10.9861 ms, mean = 10.7971 ms, median = 10.7972 ms, percentile(90%) = 10.9329 ms, percentile(95%) = 10.949 ms, percentile(99%) = 10.9744 ms
[02/26/2024-10:43:06] [I] Total Host Walltime: 3.0348 s
[02/26/2024-10:43:06] [I] Total GPU Compute Time: 3.02418 s
&&&& PASSED TensorRT.trtexec [TensorRT v8502] # trtexec --onnx=./yolox_s_leaky.onnx --saveEngine=./fp16.trt --fp16
"""
BUILD_LINES = """[I] Engine built in 111.4 sec.
[I] Created engine with size: 101.811 MiB
[I] [TRT] Engine generation completed in 10.6392 seconds.
[I] Selected Device: Xavier
[I] Compute Capability: 7.2
"""
E_PLUGIN = ('[E] [TRT] ModelImporter.cpp:773: ERROR: builtin_op_importers.cpp:5404 In function importFallbackPluginImporter:\n'
            '[8] UNSUPPORTED_NODE: Assertion failed: creator && "Plugin not found, are the plugin name, version, and namespace correct?"')
E_MAGIC = ("[E] Error Code 1: Serialization (Serialization assertion magicTagRead == kMAGIC_TAG failed.Magic tag does not match)\n"
           "[E] Error Code 4: Internal Error (Engine deserialization failed.)")
E_VERSION_8 = "[E] 6: The engine plan file is not compatible with this version of TensorRT, expecting library version 8.6.1.6 got 8.6.0.12, please rebuild."
E_VERSION_10 = ("[E] IRuntime::deserializeCudaEngine: Error Code 6: API Usage Error (The engine plan file is not compatible "
                "with this version of TensorRT, expecting library version 10.3.0.30 got 10.8.0.43, please rebuild.)")
E_DEVICE = "[E] The engine plan file is generated on an incompatible device, expecting compute 7.2 got compute 5.3, please rebuild."
E_OOM = "[E] Error Code 2: OutOfMemory (Requested size was 4294967296 bytes.)"
E_UNKNOWN = "[E] Unknown option: --workspace 2048"


# ------------------------------------------------------------------ config validation

def test_config_defaults_and_canonical_dict():
    cfg = TrtBuildConfig()
    assert cfg.precision == "fp16" and cfg.timing_cache is True
    cfg = TrtBuildConfig(shapes={"z": {"min": [1, 3], "opt": [2, 3], "max": [4, 3]},
                                 "a": {"min": "1x8", "opt": "1x8", "max": "2x8"}})
    assert [r.name for r in cfg.shapes] == ["a", "z"]
    assert cfg.to_dict()["shapes"]["a"] == {"min": [1, 8], "opt": [1, 8], "max": [2, 8]}
    hash(cfg)  # frozen and hashable
    json.dumps(cfg.to_dict())


@pytest.mark.parametrize("kwargs,field", [
    ({"precision": "fp8"}, "precision"),
    ({"workspace_mib": 0}, "workspace_mib"),
    ({"workspace_mib": "2G"}, "workspace_mib"),
    ({"workspace_mib": True}, "workspace_mib"),
    ({"builder_optimization_level": 6}, "builder_optimization_level"),
    ({"shapes": {"x": {"min": [1], "opt": [2]}}}, "shapes"),
    ({"shapes": {"x": {"min": [2], "opt": [1], "max": [3]}}}, "shapes"),
    ({"shapes": {"x": {"min": [1, 2], "opt": [1], "max": [1]}}}, "shapes"),
    ({"shapes": {"in:0": {"min": [1], "opt": [1], "max": [1]}}}, "shapes"),
    ({"shapes": {"x": {"min": [0], "opt": [1], "max": [1]}}}, "shapes"),
    ({"extra_flags": ("--saveEngine=/tmp/x",)}, "extra_flags"),
    ({"extra_flags": ("--workspace=10",)}, "extra_flags"),
    ({"extra_flags": ("--noTF32=1",)}, "extra_flags"),
    ({"extra_flags": ("--useDLACore",)}, "extra_flags"),
    ({"extra_flags": "--noTF32"}, "extra_flags"),
    ({"timing_cache": "yes"}, "timing_cache"),
])
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(tc.BuildConfigError) as err:
        TrtBuildConfig(**kwargs)
    assert err.value.context["field"] == field
    assert isinstance(err.value, ConfigError) and isinstance(err.value, BuildError)


def test_from_mapping_accepts_fleet_file_names():
    cfg = TrtBuildConfig.from_mapping({"precision": "fp16", "workspace_mib": 2048, "optimization_level": 4,
                                       "timing_cache": False, "ort_optimization": "all",
                                       "extra_flags": ["--noTF32"]})
    assert (cfg.workspace_mib, cfg.builder_optimization_level, cfg.timing_cache) == (2048, 4, False)
    assert cfg.extra_flags == ("--noTF32",)


# ------------------------------------------------------------------ argv per version

CFG = TrtBuildConfig(precision="fp16", workspace_mib=2048, builder_optimization_level=4,
                     shapes={"images": {"min": [1, 3, 640, 640], "opt": [4, 3, 640, 640], "max": [8, 3, 640, 640]}})
SHAPES = ["--minShapes=images:1x3x640x640", "--optShapes=images:4x3x640x640", "--maxShapes=images:8x3x640x640"]


def test_argv_8_5_2(caplog):
    argv = tx.build_argv(T, "/m.onnx", "/e.plan", CFG, "8.5.2", timing_cache="/tc.cache")
    assert argv == [T, "--onnx=/m.onnx", "--saveEngine=/e.plan", "--fp16", "--memPoolSize=workspace:2048",
                    *SHAPES, "--timingCacheFile=/tc.cache", "--buildOnly"]
    assert "builder_optimization_level=4 ignored" in caplog.text


def test_argv_8_6_2():
    argv = tx.build_argv(T, "/m.onnx", "/e.plan", CFG, "8.6.2.3", timing_cache="/tc.cache")
    assert argv == [T, "--onnx=/m.onnx", "--saveEngine=/e.plan", "--fp16", "--memPoolSize=workspace:2048",
                    *SHAPES, "--builderOptimizationLevel=4", "--timingCacheFile=/tc.cache", "--skipInference"]


@pytest.mark.parametrize("version", ["10.3.0", "10.8.0"])
def test_argv_10_x(version):
    cfg = TrtBuildConfig(precision="best", workspace_mib=512, extra_flags=("--noTF32", "--stripWeights"))
    argv = tx.build_argv(T, "m.onnx", "e.plan", cfg, version)
    assert argv == [T, "--onnx=m.onnx", "--saveEngine=e.plan", "--best", "--memPoolSize=workspace:512",
                    "--noTF32", "--stripWeights", "--skipInference"]
    assert not any(a.startswith("--workspace") or a == "--buildOnly" for a in argv)


def test_argv_old_trt_uses_workspace_and_fp32_has_no_precision_flag():
    argv = tx.build_argv(T, "m.onnx", "e.plan", TrtBuildConfig(precision="fp32", workspace_mib=1024), "8.2.1")
    assert argv == [T, "--onnx=m.onnx", "--saveEngine=e.plan", "--workspace=1024", "--buildOnly"]


def test_argv_timing_cache_off_and_version_gated_flags():
    cfg = TrtBuildConfig(timing_cache=False)
    assert not any("timingCache" in a for a in tx.build_argv(T, "m", "e", cfg, "10.3.0", timing_cache="/tc"))
    cfg = TrtBuildConfig(extra_flags=("--stripWeights",))
    with pytest.raises(tc.BuildConfigError, match="not available in TensorRT 8.6.2"):
        tx.build_argv(T, "m", "e", cfg, "8.6.2")
    with pytest.raises(tc.BuildConfigError, match="not a TensorRT version"):
        tx.build_argv(T, "m", "e", TrtBuildConfig(), "latest")


def test_load_argv():
    assert tx.load_argv(T, "/e.plan") == [T, "--loadEngine=/e.plan"]
    argv = tx.load_argv(T, "/e.plan", warmup_ms=200, iterations=50, percentile=99.9, shapes={"images": [1, 3, 64, 64]})
    assert argv == [T, "--loadEngine=/e.plan", "--warmUp=200", "--iterations=50", "--percentile=99.9",
                    "--shapes=images:1x3x64x64"]
    with pytest.raises(tc.BuildConfigError):
        tx.load_argv(T, "/e.plan", percentile=150)
    with pytest.raises(tc.BuildConfigError):
        tx.load_argv(T, "/e.plan", iterations=-1)


# ------------------------------------------------------------------ output parsing

def test_parse_fact_sheet_summary():
    r = txo.parse_trtexec_output(SUMMARY_JP5)
    assert r.status == "PASSED" and r.passed
    assert r.tensorrt_version == "8.5.2" and r.tensorrt_build is None
    assert r.command == "trtexec --onnx=./yolox_s_leaky.onnx --saveEngine=./fp16.trt --fp16"
    assert r.throughput_qps == pytest.approx(97.8649)
    assert r.latency_ms == {"min": 10.642, "max": 10.9861, "mean": 10.7971, "median": 10.7972,
                            "p90": 10.9329, "p95": 10.949, "p99": 10.9744}
    assert r.errors == []


def test_latency_is_anchored():
    text = ("[02/26/2024-10:43:06] [I] H2D Latency: min = 0.1 ms, max = 0.2 ms, mean = 0.15 ms, median = 0.15 ms, "
            "percentile(90%) = 0.19 ms, percentile(95%) = 0.19 ms, percentile(99%) = 0.2 ms\n"
            "[02/26/2024-10:43:06] [I] D2H Latency: min = 0.3 ms, max = 0.4 ms, mean = 0.35 ms, median = 0.35 ms\n")
    assert txo.parse_trtexec_output(text).latency_ms == {}
    after = txo.parse_trtexec_output(SUMMARY_JP5.replace("Total Host", "H2D Latency: min = 0.1 ms\n[I] Total Host"))
    assert after.latency_ms["min"] == 10.642


def test_parse_build_lines_and_10x_banner():
    text = "&&&& RUNNING TensorRT.trtexec [TensorRT v100800] [b43] # trtexec --onnx=m.onnx\n" + BUILD_LINES
    r = txo.parse_trtexec_output(text)
    assert (r.tensorrt_version, r.tensorrt_build, r.status) == ("10.8.0", "43", "unknown")
    assert r.build_seconds == 111.4 and r.engine_size_mib == 101.811
    assert (r.selected_device, r.compute_capability) == ("Xavier", "7.2")
    only_trt = txo.parse_trtexec_output("[I] [TRT] Engine generation completed in 10.6392 seconds.\n")
    assert only_trt.build_seconds == 10.6392


def test_dump_profile_without_summary():
    text = "[I] === Profile (309 iterations ) ===\n&&&& PASSED TensorRT.trtexec [TensorRT v100300] # trtexec\n"
    r = txo.parse_trtexec_output(text)
    assert r.passed and r.latency_ms == {} and r.throughput_qps is None


# ------------------------------------------------------------------ failures

def failed(lines: str) -> txo.TrtexecReport:
    return txo.parse_trtexec_output(
        "&&&& RUNNING TensorRT.trtexec [TensorRT v8502] # trtexec\n"
        "[I] [TRT] No importer registered for op: GridSample. Attempting to import as plugin.\n"
        + lines + "\n[E] Engine set up failed\n&&&& FAILED TensorRT.trtexec [TensorRT v8502] # trtexec\n")


def test_errors_collected():
    r = failed(E_MAGIC)
    assert r.status == "FAILED"
    assert r.errors[0].startswith("Error Code 1: Serialization")
    assert r.errors[-1] == "Engine set up failed"


@pytest.mark.parametrize("lines,words", [
    (E_PLUGIN, ["GridSample", "plugin", "opset"]),
    (E_MAGIC, ["not a TensorRT engine plan", "corrupt"]),
    (E_VERSION_8, ["plan says 8.6.0.12", "device runs 8.6.1.6", "rebuild"]),
    (E_VERSION_10, ["plan says 10.8.0.43", "device runs 10.3.0.30"]),
    (E_DEVICE, ["built for compute capability 7.2", "this GPU is 5.3"]),
    (E_OOM, ["out of memory", "4096.0 MiB", "workspace_mib"]),
    (E_UNKNOWN, ["does not know the option --workspace", "TensorRT 8.5.2"]),
    ("[E] Calibration failure occurred with no scaling factors detected.", ["INT8", "fp16"]),
    ("[E] Failed to parse onnx file", ["could not be parsed"]),
])
def test_explain_failure(lines, words):
    text = txo.explain_failure(failed(lines), 1)
    for w in words:
        assert w in text, text
    assert "Hint:" in text and "\n" not in text


def test_explain_signal_and_unknown():
    assert "signal 9" in txo.explain_failure(txo.TrtexecReport(), -9)
    assert "signal 9" in txo.explain_failure(txo.TrtexecReport(), 137)
    text = txo.explain_failure(failed("[E] Something new broke"), 1)
    assert "exit code 1" in text and "Engine set up failed" in text


def test_check_trtexec_result_raises_build_error():
    report = txo.check_trtexec_result(SUMMARY_JP5, 0)
    assert report.passed
    with pytest.raises(txo.TrtexecFailed) as err:
        txo.check_trtexec_result("&&&& RUNNING TensorRT.trtexec [TensorRT v8502] # x\n" + E_DEVICE
                                + "\n&&&& FAILED TensorRT.trtexec [TensorRT v8502] # x\n", 1, target="orin-01")
    e = err.value
    assert isinstance(e, BuildError) and e.exit_code == 1 and e.context["target"] == "orin-01"
    assert "compute capability 7.2" in e.message and e.hint.startswith("build on the target")


# ------------------------------------------------------------------ Python API build script

def run_script(*args):
    return subprocess.run([sys.executable, str(tx.TRT_API_BUILD_SCRIPT), *args], capture_output=True,
                          text=True, timeout=60)


def test_api_script_compiles():
    py_compile.compile(str(tx.TRT_API_BUILD_SCRIPT), doraise=True)


@pytest.mark.parametrize("arg,words", [
    ("not json", "not valid JSON"),
    ("[1]", "JSON object"),
    ('{"engine": "e"}', "onnx must be"),
    ('{"onnx": "m", "engine": "e", "precision": "fp8"}', "precision"),
    ('{"onnx": "m", "engine": "e", "workspace_mib": -1}', "workspace_mib"),
    ('{"onnx": "m", "engine": "e", "builder_optimization_level": 9}', "builder_optimization_level"),
    ('{"onnx": "m", "engine": "e", "shapes": {"x": {"min": [2], "opt": [1], "max": [3]}}}', "min <= opt"),
    ('{"onnx": "m", "engine": "e", "bogus": 1}', "unknown argument"),
])
def test_api_script_rejects_bad_args(arg, words):
    r = run_script(arg)
    assert r.returncode == 2
    result = txo.parse_api_build_output(r.stdout)
    assert result["ok"] is False and words in result["error"]


def test_api_script_valid_args_reach_tensorrt_import(tmp_path):
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"\x08\x07")
    cfg = TrtBuildConfig(workspace_mib=64, shapes={"x": {"min": [1, 3], "opt": [2, 3], "max": [4, 3]}})
    argv = tx.api_build_argv(sys.executable, str(tx.TRT_API_BUILD_SCRIPT), onnx=str(onnx),
                             engine=str(tmp_path / "e.plan"), cfg=cfg, timing_cache=str(tmp_path / "tc"))
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    result = txo.parse_api_build_output(r.stdout)
    # TensorRT cannot be installed here: the arguments were accepted, the import is what failed
    assert r.returncode == 3 and "tensorrt is not importable" in result["error"]
    assert not (tmp_path / "e.plan").exists()
    # also through an @file
    args_file = tmp_path / "args.json"
    args_file.write_text(argv[2])
    assert run_script(f"@{args_file}").returncode == 3


def test_api_build_argv_refuses_trtexec_flags():
    with pytest.raises(tc.BuildConfigError, match="extra_flags"):
        tx.api_build_argv("python3", "s.py", onnx="m", engine="e", cfg=TrtBuildConfig(extra_flags=("--noTF32",)))
    with pytest.raises(BuildError, match="no result line"):
        txo.parse_api_build_output("Traceback ...\n")


def test_multiline_error_joined_but_help_text_is_not():
    r = failed(E_PLUGIN)
    assert any("importFallbackPluginImporter: [8] UNSUPPORTED_NODE: Assertion failed" in e for e in r.errors)
    r = txo.parse_trtexec_output(E_UNKNOWN + "\n=== Model Options ===\n  --onnx=<file>               ONNX model\n"
                                "&&&& FAILED TensorRT.trtexec [TensorRT v100300] # trtexec --workspace=2048\n")
    assert r.errors == ["Unknown option: --workspace 2048"]
    assert (r.status, r.tensorrt_version) == ("FAILED", "10.3.0")


# ------------------------------------------------------------------ the repo stands alone

REPO = Path(__file__).resolve().parent.parent
MINE = [*sorted((REPO / "kiln/backends").glob("*.py")), REPO / "kiln/device_side/trt_api_build.py",
        REPO / "kiln/device_side/agent.py", REPO / "tests/fleet/trtexec_sim.py", REPO / "docs/trtexec.md",
        *sorted(REPO.glob("tests/test_trtexec*.py")), REPO / "tests/test_agent_trt.py"]


def test_trtexec_facts_are_cited_from_the_repo_and_every_cited_section_exists():
    sections = {int(n) for n in re.findall(r"^## §(\d+) ", (REPO / "docs/trtexec.md").read_text(), re.M)}
    assert sections == set(range(1, len(sections) + 1)) and len(sections) >= 9
    cited = set()
    for path in MINE:
        text = path.read_text()
        assert "/work/" + "shared" not in text and "../" + "shared" not in text, path
        assert "facts " + "§" not in text, path
        cited |= {int(n) for n in re.findall(r"docs/trtexec\.md §(\d+)", text)}
    assert cited and cited <= sections, cited - sections


def test_backend_modules_stay_small_and_get_backend_loads_tensorrt_lazily():
    for path in (REPO / "kiln/backends").glob("*.py"):
        assert len(path.read_text().splitlines()) <= 400, path
    code = ("import sys; from kiln.backends.base import Backend, get_backend; "
            "b = get_backend('onnxruntime'); assert isinstance(b, Backend), b; "
            "assert not any(m.startswith(('kiln.backends.tensorrt', 'kiln.backends.trt')) for m in sys.modules); "
            "t = get_backend('tensorrt'); assert t.name == 'tensorrt'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr


def test_tensorrt_build_settings_are_validated_by_trt_build_config_only():
    from kiln.backends.tensorrt import TensorRTBackend
    settings = TensorRTBackend().build_settings({"precision": "fp16", "optimization_level": 4, "timing_cache": True,
                                                 "extra_flags": ["--noTF32"], "ort_optimization": "all"})
    assert settings == {"precision": "fp16", "workspace_mib": None, "shapes": None, "builder_optimization_level": 4,
                        "extra_flags": ["--noTF32"]}
    with pytest.raises(tc.BuildConfigError) as err:
        TensorRTBackend().build_settings({"precision": "fp16", "extra_flags": ["--workspace=64"]})
    assert err.value.context.get("field") == "extra_flags" and "allowed:" in (err.value.hint or "")
    cfg = TrtBuildConfig(extra_flags=("--stripAllWeights",))
    assert cfg.check_version("10.1.0") == (10, 1, 0)
    with pytest.raises(tc.BuildConfigError, match="not available in TensorRT 10.0.1"):
        cfg.check_version("10.0.1")
    cfg.check_tool("trtexec")
    with pytest.raises(tc.BuildConfigError, match="python-api builder cannot apply them"):
        cfg.check_tool("python-api")
