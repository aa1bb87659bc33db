"""Large models: an ONNX whose weights live in an external data file (the layout of models over
2 GB), exported, hashed as one artifact, stored, sent to devices, built and verified; tested with
the tiny model forced into that layout (`export.external_data = true`)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kiln.errors import ExportError
from kiln.onnx_external import (DATA_SUFFIX, ExternalData, check_graph, graph_locations, pack_external_data)
from kiln_project import REPO, Project
from test_fleet import fleet_project

SIM = Path(__file__).resolve().parent / "fleet" / "trtexec_sim.py"
EXTERNAL = '\n[models.tiny.export]\nexternal_data = true\n'


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def external_project(root: Path, extra: str = "") -> Project:
    p = Project(root)
    p.fleet.write_text(p.fleet.read_text().split("[targets.local]")[0] + EXTERNAL + extra
                       + "[targets.local]" + p.fleet.read_text().split("[targets.local]")[1])
    return p


def hashed_by_a_run(p: Project, *args: str) -> tuple[int, str]:
    """(bytes the run's stat cache read to hash, its output), in-process like bench/bench_pipeline.py."""
    code = ("import sys; from doit.doit_cmd import DoitMain; from doit.cmd_base import DodoTaskLoader;"
            f"rc = DoitMain(DodoTaskLoader()).run({list(args)!r}); import dodo;"
            "print('BYTES', dodo.project.ctx.hashes.bytes_read); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=p.env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return int(proc.stdout.split("BYTES")[1].split()[0]), proc.stdout


# -- export, ONNX Runtime, the store, the device's inputs ----------------------------------------

def test_an_external_data_model_round_trips_on_onnx_runtime(tmp_path):
    p = external_project(tmp_path)
    p.doit("deploy:local")
    onnx_dir = p.artifacts / "onnx"
    record = json.loads((onnx_dir / "tiny.json").read_text())
    data = ExternalData.from_record(record)
    data_file = onnx_dir / data.location
    # one graph plus one data file named by its sha256; the graph's hash (the ONNX hash of every key)
    # covers the data because the graph names it by that digest
    assert data.location == f"{sha(data_file)}{DATA_SUFFIX}" and data.size == data_file.stat().st_size
    assert record["onnx_sha256"] == sha(onnx_dir / "tiny.onnx")
    assert graph_locations(onnx_dir / "tiny.onnx") == {data.location}
    assert data.size > (onnx_dir / "tiny.onnx").stat().st_size      # the weights left the graph
    # the store holds both parts, each by its own digest
    entries = p.artifacts / "store" / "entries" / "onnx"
    assert (entries / data.sha256[:2] / data.location).exists()
    assert (entries / record["onnx_sha256"][:2] / f"{record['onnx_sha256']}.onnx").exists()
    # on the device the data sits next to the graph under the name the graph gives it, and the
    # release keeps both while it is current
    inputs = tmp_path / "deploy" / ".kiln" / "inputs"
    assert sha(inputs / data.location) == data.sha256
    assert sha(inputs / f"{record['onnx_sha256']}.onnx") == record["onnx_sha256"]
    manifest = json.loads((tmp_path / "deploy/tiny/current/manifest.json").read_text())
    assert data.location in manifest["inputs"] and manifest["smoke_test"]["ok"] is not False
    assert max(manifest["smoke_test"]["max_abs_diff"].values()) < 1e-4
    assert graph_locations(tmp_path / "deploy/tiny/current/model.ort.onnx") == set()  # the engine is one file

    # no-op: nothing runs and nothing is hashed
    read, out = hashed_by_a_run(p, "deploy:local")
    assert read == 0 and ".  " not in out.split("enginekiln summary")[0], out

    # the local data file damaged (same name and size) and a build setting changed: the new engine
    # is built from the ONNX the store holds, fetched and checked again
    data_file.write_bytes(b"\0" * data.size)
    p.fleet.write_text(p.fleet.read_text().replace(EXTERNAL, EXTERNAL + '[models.tiny.build]\nort_optimization = "basic"\n'))
    run = p.doit("deploy:local")
    assert "publish" in run.engines().values(), run.out
    assert sha(data_file) == data.sha256
    # ONNX Runtime's basic level leaves initializers as they are: still, the engine holds them all
    assert graph_locations(tmp_path / "deploy/tiny/current/model.ort.onnx") == set()



def test_data_files_no_record_names_leave_artifacts_onnx(tmp_path):
    """After an export with new weights writes its record, the previous data file goes; one that
    another model's record still names stays."""
    from kiln.pipeline.export import _remove_unused_data_files
    old, new, shared = ("%064x%s" % (i, DATA_SUFFIX) for i in (1, 2, 3))
    for name in (old, new, shared):
        (tmp_path / name).write_bytes(b"w")
    (tmp_path / "det.json").write_text(json.dumps({"external_data": {"location": new}}))
    (tmp_path / "seg.json").write_text(json.dumps({"external_data": {"location": shared}}))
    (tmp_path / "det.provenance.json").write_text(json.dumps({"onnx_sha256": "x"}))
    _remove_unused_data_files(tmp_path)
    assert sorted(f.name for f in tmp_path.glob("*" + DATA_SUFFIX)) == sorted([new, shared])


def test_the_default_keeps_the_export_key_and_forcing_external_data_changes_it(tmp_path):
    from kiln.config import load_fleet
    from kiln.keys import HashCache
    from kiln.pipeline.export import export_inputs

    p = Project(tmp_path)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt/tiny.pt").write_bytes(b"weights")
    model = load_fleet(p.fleet, p.artifacts).models["tiny"]
    assert model.export["external_data"] == "auto"
    inputs = export_inputs(model, HashCache(tmp_path / "h.json"))
    assert "external_data" not in inputs["export"]   # "auto" keys as before the option existed
    (tmp_path / "forced/ckpt").mkdir(parents=True)
    forced = external_project(tmp_path / "forced")
    (tmp_path / "forced/ckpt/tiny.pt").write_bytes(b"weights")
    model = load_fleet(forced.fleet, forced.artifacts).models["tiny"]
    assert export_inputs(model, HashCache(tmp_path / "h.json"))["export"]["external_data"] is True


# -- the layout itself: packing, determinism, refused locations -----------------------------------

def _two_tensor_model(folder: Path, one_file: bool) -> Path:
    """A small graph saved as torch saves one over 2 GB: weights outside it, one file per tensor."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.arange(600, dtype=np.float32).reshape(20, 30) / 600, "w")
    b = numpy_helper.from_array(np.linspace(-1, 1, 30).astype(np.float32), "b")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y0"]), helper.make_node("Add", ["y0", "b"], ["y"])],
                              "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 20])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 30])], [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    folder.mkdir(parents=True)
    path = folder / "model.onnx"
    cwd = os.getcwd()
    os.chdir(folder)  # onnx checks `location` for an existing file relative to the working folder
    try:
        onnx.save_model(model, str(path), save_as_external_data=not one_file, all_tensors_to_one_file=False,
                        size_threshold=0)
    finally:
        os.chdir(cwd)
    return path


def _run(path: Path):
    import numpy as np
    import onnxruntime as ort
    x = np.linspace(0, 1, 40, dtype=np.float32).reshape(2, 20)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_per_tensor_files_are_packed_into_one_file_named_by_its_sha256(tmp_path):
    import numpy as np

    inline = _two_tensor_model(tmp_path / "inline", one_file=True)
    split = _two_tensor_model(tmp_path / "split", one_file=False)
    assert sorted(f.name for f in split.parent.iterdir()) == ["b", "model.onnx", "w"]
    graph, data = pack_external_data(split, tmp_path / "packed", threshold=0)
    assert sorted(f.name for f in graph.parent.iterdir()) == sorted(["model.onnx", data.location])
    assert data.sha256 == sha(graph.parent / data.location) and data.size % 4096 == 120  # aligned: b after w's page
    check_graph(graph, data)
    np.testing.assert_array_equal(_run(graph), _run(inline))
    # deterministic: packing the inline model gives the very same bytes
    again, same = pack_external_data(inline, tmp_path / "packed-again", threshold=0)
    assert same == data and again.read_bytes() == graph.read_bytes()
    # below the threshold everything stays in the graph: a single file
    small, none = pack_external_data(inline, tmp_path / "small", threshold=1 << 20)
    assert none is None and [f.name for f in small.parent.iterdir()] == ["model.onnx"]


def test_the_exporters_weights_outside_the_graph_are_packed_unless_external_data_is_false(tmp_path):
    """What torch writes past 2 GB (weights beside the graph) goes through the same packing with the
    default "auto"; `false` refuses it; `true` packs even a single file."""
    from types import SimpleNamespace

    from kiln.pipeline.export import _external_data_layout

    def layout(folder, option, one_file):
        graph = _two_tensor_model(folder, one_file=one_file)
        return _external_data_layout(folder, graph, SimpleNamespace(name="m", export={"external_data": option}))

    packed, data = layout(tmp_path / "auto", "auto", one_file=False)
    assert packed.parent.name == "packed" and graph_locations(packed) == {data.location}
    single, none = layout(tmp_path / "single", "auto", one_file=True)
    assert none is None and single.name == "model.onnx" and single.parent.name == "single"
    forced, data = layout(tmp_path / "forced", True, one_file=True)
    assert data is not None and (forced.parent / data.location).exists()
    with pytest.raises(ExportError, match="over 2 GB"):
        layout(tmp_path / "never", False, one_file=False)


@pytest.mark.parametrize("location", ["../" + "a" * 64 + DATA_SUFFIX, "sub/" + "a" * 64 + DATA_SUFFIX,
                                      "/etc/passwd", "weights.bin", "A" * 64 + DATA_SUFFIX])
def test_a_graph_naming_any_other_data_file_is_refused(tmp_path, location):
    import onnx

    graph, data = pack_external_data(_two_tensor_model(tmp_path / "m", one_file=True), tmp_path / "p", threshold=0)
    proto = onnx.load(str(graph), load_external_data=False)
    for entry in proto.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = location
    evil = tmp_path / "evil.onnx"
    onnx.save(proto, str(evil))
    with pytest.raises(ExportError) as info:
        check_graph(evil, data)
    assert repr(location) in str(info.value) or "names external data" in str(info.value)
    with pytest.raises(ExportError):
        ExternalData.from_record({"external_data": {"location": location, "sha256": "a" * 64, "size": 1}})
    with pytest.raises(ExportError):   # a "single file" whose graph names data anyway (found by a streamed scan)
        check_graph(evil, None)
    check_graph(tmp_path / "m" / "model.onnx", None)   # the weights inside: nothing named, nothing parsed


# -- trtexec reads the data next to the ONNX file ---------------------------------------------------

def _sim(tmp_path: Path, version: str, *args: str):
    env = {**os.environ, "KILN_SIM_TRT_VERSION": version, "KILN_SIM_BUILD_SECONDS": "0.01",
           "KILN_SIM_STATE": str(tmp_path / "state")}
    return subprocess.run([sys.executable, str(SIM), *args], capture_output=True, text=True, env=env)


def test_trtexec_sim_reads_external_weights_relative_to_the_onnx_file(tmp_path):
    import onnx

    graph, data = pack_external_data(_two_tensor_model(tmp_path / "m", one_file=True), tmp_path / "p", threshold=0)
    ok = _sim(tmp_path, "10.3.0", f"--onnx={graph}", f"--saveEngine={tmp_path / 'e.plan'}", "--skipInference")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    built = json.loads((tmp_path / "state/builds.log").read_text().splitlines()[-1])
    assert built["external_data"] == [data.location]
    # the same graph elsewhere, without its data: the parser's error, naming the path it tried
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    (lonely / "model.onnx").write_bytes(graph.read_bytes())
    missing = _sim(tmp_path, "8.5.2", f"--onnx={lonely / 'model.onnx'}", "--saveEngine=x.plan", "--buildOnly")
    assert missing.returncode == 1 and f"Failed to open file: {lonely / data.location}" in missing.stderr
    assert "&&&& FAILED TensorRT.trtexec" in missing.stdout
    # a location through ../ is refused by 10.x's parser
    proto = onnx.load(str(graph), load_external_data=False)
    for t in proto.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = "../" + data.location
    onnx.save(proto, str(lonely / "evil.onnx"))
    evil = _sim(tmp_path, "10.3.0", f"--onnx={lonely / 'evil.onnx'}", "--saveEngine=x.plan", "--skipInference")
    assert evil.returncode == 1 and "Relative paths to parent (../) are not allowed" in evil.stderr


# -- the simulated fleet: S3 store, presigned downloads, trtexec build and verification -------------

def test_an_external_data_model_deploys_to_a_simulated_jetson_through_s3(tmp_path, new_fleet, moto_s3):
    sim = new_fleet()
    sim.add_device("orin-a", "orin-jp6")
    sim.start()
    bucket = moto_s3.new_bucket()
    p = fleet_project(tmp_path, sim, {"orin-a": {}})
    text = p.fleet.read_text()
    head, tail = text.split("[targets.orin-a]")
    p.fleet.write_text(f'[store]\nurl = "s3://{bucket}/fleet"\n' + head + EXTERNAL + "[targets.orin-a]" + tail)
    os.environ["KILN_S3_ENDPOINT_URL"] = moto_s3.endpoint
    try:
        run = p.doit("deploy")
    finally:
        del os.environ["KILN_S3_ENDPOINT_URL"]
    record = json.loads((p.artifacts / "onnx/tiny.json").read_text())
    location = record["external_data"]["location"]
    keys = [o["Key"] for o in moto_s3.client().list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert f"fleet/onnx/{location[:2]}/{location}" in keys, keys
    [build] = sim.builds("orin-a")
    assert build["external_data"] == [location], build        # read next to the ONNX on the device
    # the TensorRT Python API builder (the device's python3 and its tensorrt bindings) on the same inputs:
    # parse_from_file reads the data next to the graph as well
    from kiln.backends.trtexec import TRT_API_BUILD_SCRIPT
    graph = f"/srv/kiln/.kiln/inputs/{record['onnx_sha256']}.onnx"
    args = json.dumps({"onnx": graph, "engine": "/srv/kiln/api.plan", "precision": "fp16"})
    result = sim.transport("orin-a").run(["/usr/bin/python3", str(TRT_API_BUILD_SCRIPT), args], check=False)
    assert result.exit_code == 0, result.stdout + result.stderr
    api = sim.builds("orin-a")[-1]
    assert (api["tool"], api["external_data"]) == ("python-api", [location]), api
    inputs = sim.srv("orin-a") / "kiln/.kiln/inputs"
    assert sha(inputs / location) == record["external_data"]["sha256"]
    manifest = json.loads((sim.srv("orin-a") / "kiln/tiny/current/manifest.json").read_text())
    assert location in manifest["inputs"], manifest["inputs"]
    assert 0 < max(manifest["smoke_test"]["max_abs_diff"].values()) < 1e-2, run.out   # fp16 plan vs PyTorch


def test_the_device_keeps_the_data_file_its_releases_use_and_removes_an_unused_one(tmp_path):
    from kiln.device_side import agent
    root = tmp_path / "install"
    inputs = root / ".kiln" / "inputs"
    inputs.mkdir(parents=True)
    used, unused = ("%064x%s" % (i, DATA_SUFFIX) for i in (1, 2))
    rel = root / "det" / "releases" / "k1"
    rel.mkdir(parents=True)
    (root / "det" / "current").symlink_to("releases/k1")
    (rel / "manifest.json").write_text(json.dumps({"onnx_sha256": "aa", "inputs": ["bb.npz", "aa.onnx", used]}))
    for name in ("aa.onnx", "bb.npz", used, unused):
        (inputs / name).write_bytes(b"x")
        os.utime(inputs / name, (1, 1))
    assert agent.clean_inputs(str(root), ["det"], [], str(root)) == {"removed": [unused]}
    assert sorted(p.name for p in inputs.iterdir()) == sorted(["aa.onnx", "bb.npz", used])


def test_every_tensor_that_may_hold_external_data_is_walked():
    """Initializers, attribute tensors, those of subgraphs (an If's branches) and of the model's
    functions: each once, initializers flagged, in a fixed order (the data file's layout)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from kiln.onnx_external import _all_tensors

    def const(name: str, value: float):
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array([value], np.float32), name))
    then_g = helper.make_graph([const("t_out", 2.0)], "then", [], [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, [1])])
    else_g = helper.make_graph([const("e_out", 3.0)], "else", [], [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, [1])])
    graph = helper.make_graph(
        [const("c", 1.0), helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g),
         helper.make_node("Twice", ["y"], ["z"], domain="local")], "g",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])], [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1])],
        initializer=[numpy_helper.from_array(np.array([0.5], np.float32), "w")])
    twice = helper.make_function("local", "Twice", ["x"], ["out"], [const("f", 4.0), helper.make_node("Mul", ["x", "f"], ["out"])],
                                 [helper.make_opsetid("", 17)])
    model = helper.make_model(graph, functions=[twice], opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)])
    walked = [(numpy_helper.to_array(t).item(), init) for t, init in _all_tensors(model)]
    assert walked[0] == (0.5, True) and sorted(walked[1:]) == [(1.0, False), (2.0, False), (3.0, False), (4.0, False)]
    assert walked[-1] == (4.0, False)  # the functions' tensors come last
