"""The device agent's TensorRT helpers: raw --loadInputs files, parsing trtexec's
--exportOutput JSON, and comparing it with the reference (kiln/device_side/agent.py)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kiln.device_side import agent
from kiln.backends import trt_config as tc, trtexec as tx, trtexec_output as txo

AGENT = Path(agent.__file__)

# As written by trtexec's exportJSONOutput (samples/common/sampleReporting.cpp, 8.5.2 .. v10.16):
# layout, key names, "dimensions" as a string, %g values, non-finite values unquoted.
EXPORTED = """[
  { "name" : "logits"
  , "dimensions" : "1x2x3"
  , "values" : [ 0.0435101, -1.5, 2, 3.25e-05, 4, 5 ]
  }
, { "name" : "pred_boxes"
  , "dimensions" : "1x2x4"
  , "values" : [ 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8 ]
  }
]
"""


def reference(tmp_path, **outputs) -> Path:
    rng = np.random.default_rng(0)
    arrays = {"input.images": rng.random((1, 3, 4, 4), dtype=np.float32),
              "input.scale": np.array([[2.0]], dtype=np.float64)}
    arrays.update({f"output.{k}": v for k, v in outputs.items()})
    path = tmp_path / "reference.npz"
    agent.save_arrays(str(path), arrays)
    return path


def expected():
    return {"logits": np.array([0.0435101, -1.5, 2, 3.25e-05, 4, 5], np.float32).reshape(1, 2, 3),
            "pred_boxes": np.arange(1, 9, dtype=np.float32).reshape(1, 2, 4) / 10}


def run_agent(*args) -> tuple[int, dict]:
    proc = subprocess.run([sys.executable, str(AGENT), *args], capture_output=True, text=True, timeout=60)
    return proc.returncode, json.loads(proc.stdout.strip().splitlines()[-1])


def test_parse_real_export_format():
    out = agent.parse_trt_outputs(EXPORTED)
    assert sorted(out) == ["logits", "pred_boxes"]
    assert out["logits"].shape == (1, 2, 3) and out["pred_boxes"].shape == (1, 2, 4)
    np.testing.assert_allclose(out["logits"], expected()["logits"], rtol=1e-6)
    assert out["pred_boxes"][0, 1, 3] == pytest.approx(0.8)


def test_parse_scalar_nonfinite_and_bad_dimensions():
    text = ('[\n  { "name" : "s"\n  , "dimensions" : ""\n  , "values" : [ 7 ]\n  }\n'
            ', { "name" : "v"\n  , "dimensions" : "4"\n  , "values" : [ nan, -inf, inf, -nan ]\n  }\n]\n')
    out = agent.parse_trt_outputs(text)
    assert out["s"].shape == () and out["s"] == 7
    assert np.isnan(out["v"][0]) and out["v"][1] == -np.inf and out["v"][2] == np.inf and np.isnan(out["v"][3])
    # samplesCommon's "(1, 2)" form is read too
    assert agent.parse_trt_outputs('[{"name": "x", "dimensions": "(1, 2)", "values": [1, 2]}]')["x"].shape == (1, 2)
    with pytest.raises(ValueError, match="x has 3 values for dimensions 1x2"):
        agent.parse_trt_outputs('[{"name": "x", "dimensions": "1x2", "values": [1, 2, 3]}]')


def test_raw_inputs_writes_trtexec_files(tmp_path):
    ref = reference(tmp_path, **expected())
    code, out = run_agent("raw-inputs", "--root", str(tmp_path), "--reference", str(ref), "--out-dir", str(tmp_path / "in"))
    assert code == 0, out
    assert out["files"] == {"images": "input0.bin", "scale": "input1.bin"}
    assert out["shapes"] == {"images": [1, 3, 4, 4], "scale": [1, 1]}
    data = agent.load_arrays(str(ref))
    images = np.fromfile(tmp_path / "in/input0.bin", dtype="<f4").reshape(1, 3, 4, 4)
    assert np.array_equal(images, data["input.images"])
    scale = tmp_path / "in/input1.bin"      # float64 -> float32: TensorRT has no double I/O
    assert scale.stat().st_size == 4 and np.fromfile(scale, dtype="<f4")[0] == 2.0
    assert out["load_inputs"] == [f"images:{tmp_path}/in/input0.bin", f"scale:{tmp_path}/in/input1.bin"]
    # the controller's argv for those files
    argv = tx.load_argv("trtexec", "/e.plan", load_inputs=out["files"], export_output="outputs.json",
                        shapes=out["shapes"])
    assert argv == ["trtexec", "--loadEngine=/e.plan", "--shapes=images:1x3x4x4,scale:1x1",
                    "--loadInputs=images:input0.bin,scale:input1.bin", "--exportOutput=outputs.json"]


def test_raw_plan_tells_what_raw_inputs_writes_without_writing(tmp_path):
    """The controller plans a verification's trtexec runs from its own copy of the reference
    (agent.raw_plan) and sends them in the same batch as raw-inputs: the plan must be the names
    and shapes raw-inputs writes, for a static reference and for shape points."""
    static = reference(tmp_path, **expected())
    written = agent.raw_inputs(str(static), str(tmp_path / "s"))
    assert agent.raw_plan(str(static)) == {"files": written["files"], "shapes": written["shapes"]}
    points = tmp_path / "points.npz"
    agent.save_arrays(str(points), {f"point.{p}.input.images": np.zeros((n, 3, 4, 4), np.float32)
                                    for p, n in (("min", 1), ("opt", 2), ("max", 4))})
    before = set(tmp_path.iterdir())
    plan = agent.raw_plan(str(points))
    assert set(tmp_path.iterdir()) == before  # nothing written
    written = agent.raw_inputs(str(points), str(tmp_path / "p"))
    assert plan["order"] == written["order"] == ["min", "opt", "max"]
    assert plan["points"]["max"] == {"files": {"images": "input0.bin"}, "shapes": {"images": [4, 3, 4, 4]}}
    assert all(plan["points"][p] == {k: written["points"][p][k] for k in ("files", "shapes")} for p in plan["order"])


def test_run_answers_with_the_programs_exit_and_output_and_stays_inside_root(tmp_path):
    """`run` (a trtexec load inside a verification batch): exit code and output in the answer, not
    on the agent's stdout; ok only for exit 0; a timeout says so; a folder outside --root is refused."""
    (tmp_path / "work").mkdir()
    code, out = run_agent("run", "--root", str(tmp_path), "--cwd", str(tmp_path / "work"), "--",
                          "sh", "-c", "pwd; echo oops >&2; exit 4")
    assert code == 3 and out["ok"] is False and out["exit_code"] == 4
    assert out["stdout"].strip() == str(tmp_path / "work") and out["stderr"].strip() == "oops"
    code, out = run_agent("run", "--root", str(tmp_path), "--cwd", str(tmp_path / "work"), "--", "true")
    assert code == 0 and out["ok"] is True and out["exit_code"] == 0
    code, out = run_agent("run", "--root", str(tmp_path), "--cwd", str(tmp_path), "--timeout", "0.3", "--",
                          "sleep", "5")
    assert code == 3 and out["timed_out"] is True and "did not finish in 0.3 s" in out["reason"]
    proc = subprocess.run([sys.executable, str(AGENT), "run", "--root", str(tmp_path / "work"), "--cwd", str(tmp_path),
                           "--", "true"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == agent.ESCAPE_EXIT, proc.stdout + proc.stderr


def test_raw_inputs_int64_as_int32(tmp_path):
    path = tmp_path / "r.npz"
    agent.save_arrays(str(path), {"input.ids": np.array([[1, 2, 3]], dtype=np.int64)})
    out = agent.raw_inputs(str(path), str(tmp_path / "a"))
    assert (tmp_path / "a/input0.bin").stat().st_size == 24
    out = agent.raw_inputs(str(path), str(tmp_path / "b"), int64_as_int32=True)
    assert out["inputs"][0]["dtype"] == "int32"
    assert np.fromfile(tmp_path / "b/input0.bin", dtype="<i4").tolist() == [1, 2, 3]


def test_trt_compare_passes_within_tolerance(tmp_path):
    exp = expected()
    ref = reference(tmp_path, **exp)
    (tmp_path / "out.json").write_text(EXPORTED)
    code, report = run_agent("trt-compare", "--reference", str(ref), "--outputs", str(tmp_path / "out.json"),
                             "--rtol", "1e-3", "--atol", "1e-4")
    assert code == 0 and report["ok"], report
    assert set(report["max_abs_diff"]) == {"logits", "pred_boxes"} and report["max_abs_diff"]["logits"] < 1e-6
    assert report["outputs"] == {"logits": [1, 2, 3], "pred_boxes": [1, 2, 4]}
    assert (report["rtol"], report["atol"]) == (1e-3, 1e-4)


def test_trt_compare_fails_naming_the_output(tmp_path):
    exp = expected()
    exp["pred_boxes"] = exp["pred_boxes"] + np.float32(0.05)
    ref = reference(tmp_path, **exp)
    (tmp_path / "out.json").write_text(EXPORTED)
    code, report = run_agent("trt-compare", "--reference", str(ref), "--outputs", str(tmp_path / "out.json"),
                             "--rtol", "0.01", "--atol", "0.01", "--strict-order")
    assert code == 3 and not report["ok"]
    assert "pred_boxes (max abs diff 0.05)" in report["reason"] and "logits" not in report["reason"]
    assert "rtol=0.01 atol=0.01" in report["reason"]


def test_trt_compare_reports_missing_or_unreadable_outputs(tmp_path):
    ref = reference(tmp_path, **expected(), extra=np.zeros((2,), np.float32))
    (tmp_path / "out.json").write_text(EXPORTED)
    code, report = run_agent("trt-compare", "--reference", str(ref), "--outputs", str(tmp_path / "out.json"))
    assert code == 3 and report["reason"] == "missing outputs: extra"
    code, report = run_agent("trt-compare", "--reference", str(ref), "--outputs", str(tmp_path / "absent.json"))
    assert code == 3 and "cannot read trtexec's exported outputs" in report["reason"]


def test_trtexec_latency_follows_trtexecs_own_rules(tmp_path):
    """findMedian / findPercentile of sampleReporting.cpp: p90 of 1..10 ms is 9 (float32: int((1-0.9f)*10)
    = 1 excluded), not 10 as double arithmetic would give; warm-ups (compute before 200 ms, as 8.4 and
    older export them) are left out; no file = None; another format = ValueError."""
    def record(start, latency):
        return ('{ "startEnqMs" : %g, "endEnqMs" : %g, "startH2dMs" : %g, "endH2dMs" : %g, "startComputeMs" : %g, '
                '"endComputeMs" : %g, "startD2hMs" : %g, "endD2hMs" : %g, "h2dMs" : 0, "computeMs" : %g, '
                '"d2hMs" : 0, "latencyMs" : %g }' % ((start,) * 6 + (start + latency,) * 2 + (latency, latency)))
    rows = [record(50.0 + i, 100.0) for i in range(3)] + [record(200.0 + 20 * i, i) for i in (3, 1, 2, 10, 5, 4, 9, 6, 8, 7)]
    path = tmp_path / "times.json"
    path.write_text("[\n  " + "\n, ".join(rows) + "\n]\n")
    got = agent.trtexec_latency(str(path))
    assert got["iterations"] == 10 and (got["min"], got["max"], got["median"]) == (1, 10, 5.5)
    assert (got["p90"], got["p95"], got["p99"]) == (9, 10, 10) and got["mean"] == 5.5
    assert agent.trtexec_latency(str(tmp_path / "absent.json")) is None
    path.write_text('[{"name": "logits", "values": [1]}]')
    with pytest.raises(ValueError):
        agent.trtexec_latency(str(path))


def test_load_inputs_spec_quoting_and_refusals():
    argv = tx.load_argv("t", "/e", load_inputs={"images": "C:/data/in.bin"})
    assert argv[-1] == "--loadInputs='images':C:/data/in.bin"      # ':' in the file: quote the name
    for bad in ({"images": "a,b.bin"}, {"images": "it's.bin"}, {"a:b": "x.bin"}, {"images": ""}):
        with pytest.raises(tc.BuildConfigError):
            tx.load_argv("t", "/e", load_inputs=bad)


def test_sim_round_trip_through_onnx(tmp_path):
    """trtexec_sim runs the embedded ONNX on --loadInputs and exports the real format."""
    pytest.importorskip("onnxruntime")
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 1), torch.nn.ReLU())
    onnx = tmp_path / "m.onnx"
    x = torch.rand(1, 3, 4, 4)
    torch.onnx.export(model, (x,), str(onnx), input_names=["images"], output_names=["y"], dynamo=False)
    with torch.no_grad():
        y = model(x).numpy()
    ref = tmp_path / "ref.npz"
    agent.save_arrays(str(ref), {"input.images": x.numpy(), "output.y": y})
    sim = Path(__file__).resolve().parent / "fleet" / "trtexec_sim.py"
    env = {"PATH": "/usr/bin:/bin", "KILN_SIM_BUILD_SECONDS": "0", "KILN_SIM_TRT_VERSION": "10.3.0"}
    plan = tmp_path / "m.plan"
    subprocess.run([sys.executable, str(sim), f"--onnx={onnx}", f"--saveEngine={plan}", "--fp16",
                    "--skipInference"], check=True, capture_output=True, env=env)
    files = agent.raw_inputs(str(ref), str(tmp_path))
    argv = tx.load_argv(str(sim), str(plan), iterations=5, shapes=files["shapes"],
                        load_inputs={k: str(tmp_path / v) for k, v in files["files"].items()},
                        export_output=str(tmp_path / "out.json"))
    for extra, ok in (({}, True), ({"KILN_SIM_WRONG_OUTPUTS": "1"}, False)):
        proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env={**env, **extra})
        assert proc.returncode == 0 and txo.parse_trtexec_output(proc.stdout).latency_ms, proc.stderr
        text = (tmp_path / "out.json").read_text()
        assert text.startswith('[\n  { "name" : "y"\n  , "dimensions" : "1x2x4x4"\n  , "values" : [ ')
        report = agent.trt_compare(str(ref), str(tmp_path / "out.json"), 1e-2, 1e-2, True)
        assert report["ok"] is ok, report
    # a wrong-sized input file is refused like trtexec does
    (tmp_path / "input0.bin").write_bytes(b"\0" * 8)
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env)
    assert proc.returncode == 1 and "Unexpected file size for input file" in proc.stderr
