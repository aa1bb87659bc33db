"""The trtexec simulator (tests/fleet/trtexec_sim.py) run as a real subprocess, its output
parsed with kiln's own parse_trtexec_output: sim output must parse like real output."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kiln.backends import trtexec as tx, trtexec_output as txo
from kiln.backends.trt_config import TrtBuildConfig

SIM = Path(__file__).resolve().parent / "fleet" / "trtexec_sim.py"
PREFIXED = re.compile(r"^\[\d\d/\d\d/\d{4}-\d\d:\d\d:\d\d\] \[([IWE])\] ")
ONNX_BYTES = b"\x08\x08\x12\x07pytorch" + b"Conv Relu " * 50   # starts like a ModelProto (ir_version tag)


class Sim:
    def __init__(self, tmp: Path, **ident: str) -> None:
        self.tmp = tmp
        self.state = tmp / "state"
        self.env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "KILN_SIM_STATE": str(self.state),
                    "KILN_SIM_BUILD_SECONDS": "0.05", **{f"KILN_SIM_{k.upper()}": v for k, v in ident.items()}}

    def run(self, argv: list[str], shebang: bool = False,
            **env: str) -> tuple[subprocess.CompletedProcess, txo.TrtexecReport]:
        # through this interpreter by default (the pyenv shim behind `env python3` is slow)
        cmd = [str(SIM), *argv] if shebang else [sys.executable, str(SIM), *argv]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                              env={**self.env, **env}, cwd=self.tmp)
        return proc, txo.parse_trtexec_output(proc.stdout + "\n" + proc.stderr)

    def builds(self) -> list[dict]:
        log = self.state / "builds.log"
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.fixture()
def onnx(tmp_path) -> Path:
    path = tmp_path / "model.onnx"
    path.write_bytes(ONNX_BYTES)
    return path


def assert_stream_split(proc):
    """INFO on stdout, W/E on stderr, every log line prefixed like the real tool."""
    for line in proc.stdout.splitlines():
        m = PREFIXED.match(line)
        assert m is None or m.group(1) == "I", line
    for line in proc.stderr.splitlines():
        assert PREFIXED.match(line).group(1) in "WE", line


@pytest.mark.parametrize("version,banner", [("8.5.2", "[TensorRT v8502]"), ("8.6.2", "[TensorRT v8602]"),
                                            ("10.3.0", "[TensorRT v100300]"), ("10.8.0.43", "[TensorRT v100800] [b43]")])
def test_build_with_kiln_argv_round_trip(tmp_path, onnx, version, banner):
    sim = Sim(tmp_path, trt_version=version, compute="8.7", gpu="Orin")
    cfg = TrtBuildConfig(precision="fp16", workspace_mib=1024, builder_optimization_level=3,
                         shapes={"images": {"min": [1, 3, 64, 64], "opt": [2, 3, 64, 64], "max": [4, 3, 64, 64]}})
    engine = tmp_path / "model.plan"
    argv = tx.build_argv(str(SIM), str(onnx), str(engine), cfg, version, timing_cache=str(tmp_path / "tc.cache"))
    proc, report = sim.run(argv[1:])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].startswith(f"&&&& RUNNING TensorRT.trtexec {banner} # ")
    assert_stream_split(proc)
    assert report.passed and report.tensorrt_version == ".".join(version.split(".")[:3])
    assert report.build_seconds is not None and report.build_seconds >= 0.04
    assert (report.engine_size_mib is not None) == version.startswith("10.")
    assert report.latency_ms == {}          # build only: no inference summary
    assert engine.read_bytes()[:4] == b"ftrt"
    builds = sim.builds()
    assert len(builds) == 1 and builds[0]["precision"] == "fp16" and builds[0]["engine"] == str(engine)
    assert (tmp_path / "tc.cache").exists()


def test_load_prints_realistic_summary(tmp_path, onnx):
    sim = Sim(tmp_path, trt_version="8.5.2", compute="8.7", gpu="Orin")
    engine = tmp_path / "e.plan"
    proc, _ = sim.run(tx.build_argv(str(SIM), str(onnx), str(engine), TrtBuildConfig(), "8.5.2")[1:])
    assert proc.returncode == 0
    proc, report = sim.run(tx.load_argv(str(SIM), str(engine), warmup_ms=10, iterations=5)[1:])
    assert proc.returncode == 0 and report.passed, proc.stderr
    assert set(report.latency_ms) == {"min", "max", "mean", "median", "p90", "p95", "p99"}
    lat = report.latency_ms
    assert lat["min"] <= lat["median"] <= lat["max"] and lat["p90"] <= lat["p99"]
    assert report.throughput_qps == pytest.approx(1000 / lat["mean"], rel=1e-3)
    assert report.gpu_compute_ms["mean"] < lat["mean"]
    assert (report.selected_device, report.compute_capability) == ("Orin", "8.7")
    assert (tmp_path / "state" / "loads.log").read_text().count("\n") == 1
    # a build with inference (no --buildOnly) also prints the summary
    proc, report = sim.run([f"--onnx={onnx}", "--fp16"])
    assert report.passed and report.latency_ms["mean"] > 0 and len(sim.builds()) == 2


EXPORT_TIMES_FIELDS = ["startEnqMs", "endEnqMs", "startH2dMs", "endH2dMs", "startComputeMs", "endComputeMs",
                       "startD2hMs", "endD2hMs", "h2dMs", "computeMs", "d2hMs", "latencyMs"]  # docs/trtexec.md §4


@pytest.mark.parametrize("version,memory", [("8.5.2", False), ("10.3.0", True)])
def test_load_exports_times_whose_statistics_are_the_summarys(tmp_path, onnx, version, memory):
    """--exportTimes in exportJSONTrace's layout, timed iterations only (8.5+), and the agent's
    statistics of it equal the text summary's (trtexec computes both from one trace)."""
    from kiln.device_side.agent import trtexec_latency
    sim = Sim(tmp_path, trt_version=version, compute="8.7", gpu="Orin")
    engine = tmp_path / "e.plan"
    assert sim.run(tx.build_argv(str(SIM), str(onnx), str(engine), TrtBuildConfig(), version)[1:])[0].returncode == 0
    proc, report = sim.run(tx.load_argv(str(SIM), str(engine), iterations=50, percentile=99,
                                        export_times="times.json")[1:])
    assert proc.returncode == 0 and report.passed, proc.stderr
    text = (tmp_path / "times.json").read_text()
    lines = text.splitlines()
    assert lines[0] == "[" and lines[-1] == "]" and lines[1].startswith('  { "startEnqMs" : ')
    assert all(line.startswith(', { "startEnqMs" : ') and line.endswith(" }") for line in lines[2:-1])
    records = json.loads(text)
    assert len(records) >= 50 and all(list(r) == EXPORT_TIMES_FIELDS for r in records)
    assert min(r["startComputeMs"] for r in records) >= 200      # warm-ups (default 200 ms) left out
    latency = trtexec_latency(str(tmp_path / "times.json"))
    assert latency["iterations"] == len(records) and latency["source"] == "trtexec --exportTimes"
    assert {"min", "max", "median", "p99"} <= set(report.latency_ms)   # --percentile=99: that one only
    for stat in report.latency_ms:
        assert latency[stat] == pytest.approx(report.latency_ms[stat], rel=2e-5), stat
    assert latency["p99"] > latency["median"]
    assert (report.device_memory_mib is not None and report.device_memory_mib > 0) == memory


def test_load_refuses_other_version_and_compute(tmp_path, onnx):
    engine = tmp_path / "e.plan"
    Sim(tmp_path, trt_version="10.3.0.30", compute="8.7", gpu="Orin").run(
        [f"--onnx={onnx}", f"--saveEngine={engine}", "--skipInference"])

    proc, report = Sim(tmp_path, trt_version="10.8.0.43", compute="8.7").run([f"--loadEngine={engine}"])
    assert proc.returncode == 1 and report.status == "FAILED"
    assert_stream_split(proc)
    reason = txo.explain_failure(report, proc.returncode)
    assert "plan says 10.3.0.30" in reason and "device runs 10.8.0.43" in reason

    proc, report = Sim(tmp_path, trt_version="10.3.0.30", compute="7.2", gpu="Xavier").run([f"--loadEngine={engine}"])
    assert proc.returncode == 1
    assert "built for compute capability 8.7 but this GPU is 7.2" in txo.explain_failure(report, 1)

    proc, report = Sim(tmp_path, trt_version="10.3.0.30", compute="8.7", gpu="Orin NX").run([f"--loadEngine={engine}"])
    assert proc.returncode == 0 and report.passed
    assert any("different models of devices" in w for w in report.warnings)


def test_load_refuses_bad_magic_and_missing_file(tmp_path):
    bad = tmp_path / "bad.plan"
    bad.write_bytes(b"\x00" * 64)
    sim = Sim(tmp_path, trt_version="8.6.2")
    proc, report = sim.run([f"--loadEngine={bad}"])
    assert proc.returncode == 1 and "bad magic tag" in txo.explain_failure(report, 1)
    assert any("Magic tag does not match" in e for e in report.errors)
    proc, report = sim.run([f"--loadEngine={tmp_path / 'nope.plan'}"])
    assert proc.returncode == 1 and report.status == "FAILED"


@pytest.mark.parametrize("version,argv,option", [
    ("10.3.0", ["--workspace=2048"], "--workspace"),
    ("10.3.0", ["--buildOnly"], "--buildOnly"),
    ("8.5.2", ["--skipInference"], "--skipInference"),
    ("8.5.2", ["--builderOptimizationLevel=3"], "--builderOptimizationLevel"),
    ("8.6.2", ["--foo"], "--foo"),
])
def test_unknown_options_like_the_real_cli(tmp_path, onnx, version, argv, option):
    proc, report = Sim(tmp_path, trt_version=version).run([f"--onnx={onnx}", *argv])
    assert proc.returncode == 1 and report.status == "FAILED"
    assert report.errors[0].startswith(f"Unknown option: {option}")
    assert "=== Build Options ===" in proc.stdout             # help text follows
    assert "does not know the option " + option in txo.explain_failure(report, 1)
    assert Sim(tmp_path).builds() == []


def test_help_banner_is_what_the_probe_reads(tmp_path):
    proc, report = Sim(tmp_path, trt_version="10.8.0.43").run(["--help"], shebang=True)  # as installed
    assert proc.returncode == 0 and report.status == "unknown"
    assert report.tensorrt_version == "10.8.0" and report.tensorrt_build == "43"
    assert "--workspace" not in proc.stdout


@pytest.mark.parametrize("content,words", [(b"", "could not be parsed"), (b"garbage", "could not be parsed")])
def test_invalid_onnx_fails_with_parser_errors(tmp_path, content, words):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(content)
    proc, report = Sim(tmp_path).run([f"--onnx={bad}", f"--saveEngine={tmp_path / 'e.plan'}", "--buildOnly"])
    assert proc.returncode == 1 and "Failed to parse onnx file" in report.errors
    assert words in txo.explain_failure(report, 1)
    assert not (tmp_path / "e.plan").exists()


@pytest.mark.parametrize("version", ["8.5.2", "10.3.0"])
def test_unsupported_op_and_oom(tmp_path, onnx, version):
    sim = Sim(tmp_path, trt_version=version)
    proc, report = sim.run([f"--onnx={onnx}", "--skipInference" if version.startswith("10.") else "--buildOnly"],
                           KILN_SIM_UNSUPPORTED_OPS="Relu")
    assert proc.returncode == 1
    assert "cannot import operator Relu" in txo.explain_failure(report, 1)
    proc, report = sim.run([f"--onnx={onnx}"], KILN_SIM_FAIL="oom")
    assert proc.returncode == 1 and "out of memory" in txo.explain_failure(report, 1)
    assert sim.builds() == []


def test_timing_cache_speeds_up_second_build_and_config_file(tmp_path, onnx):
    conf = tmp_path / "sim.json"
    conf.write_text(json.dumps({"trt_version": "10.3.0", "compute": "8.7", "gpu": "Orin", "build_seconds": 0.4}))
    sim = Sim(tmp_path)
    sim.env.pop("KILN_SIM_BUILD_SECONDS")
    args = [f"--onnx={onnx}", f"--saveEngine={tmp_path / 'e.plan'}", f"--timingCacheFile={tmp_path / 'tc'}",
            "--skipInference"]
    _, first = sim.run(args, KILN_SIM_CONFIG=str(conf))
    _, second = sim.run(args, KILN_SIM_CONFIG=str(conf))
    assert first.tensorrt_version == "10.3.0" and first.build_seconds >= 0.39
    assert second.build_seconds < first.build_seconds
    assert [b["timing_cache_loaded"] for b in sim.builds()] == [False, True]


def test_kiln_check_result_on_sim_output(tmp_path, onnx):
    proc, _ = Sim(tmp_path, trt_version="8.6.2").run([f"--onnx={onnx}", "--skipInference"])
    report = txo.check_trtexec_result(proc.stdout + proc.stderr, proc.returncode)
    assert report.passed
