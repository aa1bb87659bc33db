"""The device agent: output comparison, deterministic reference files, release links."""
from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest

from kiln.device_side import agent


def detections(rng, rows=10, classes=5):
    return {"logits": rng.standard_normal((1, rows, classes)).astype(np.float32),
            "pred_boxes": rng.random((1, rows, 4), dtype=np.float32)}


def test_identical_outputs_pass_without_permutation():
    ref = detections(np.random.default_rng(0))
    report = agent.compare_outputs(ref, {k: v.copy() for k, v in ref.items()}, 1e-3, 1e-4)
    assert report["ok"] and not report["permuted"]


def test_permuted_rows_pass_only_when_allowed():
    ref = detections(np.random.default_rng(1))
    order = [3, 0, 1, 2, 4, 5, 6, 7, 9, 8]
    got = {k: v[:, order] for k, v in ref.items()}
    assert agent.compare_outputs(ref, got, 1e-3, 1e-4, rows_may_permute=True) == \
        {"ok": True, "max_abs_diff": pytest.approx(agent.compare_outputs(ref, got, 1e-3, 1e-4)["max_abs_diff"]),
         "permuted": True}
    strict = agent.compare_outputs(ref, got, 1e-3, 1e-4, rows_may_permute=False)
    assert not strict["ok"] and "logits" in strict["reason"]


def test_a_changed_value_fails_even_with_permutation():
    ref = detections(np.random.default_rng(2))
    got = {k: v[:, ::-1].copy() for k, v in ref.items()}
    got["pred_boxes"][0, 4, 2] += 0.01
    report = agent.compare_outputs(ref, got, 1e-3, 1e-4)
    assert not report["ok"] and "pred_boxes" in report["reason"]


def test_rows_are_matched_across_outputs_together():
    """Swapping boxes between two rows whose logits tie must fail: a row is logits+box together."""
    ref = detections(np.random.default_rng(3))
    ref["logits"][0, 1] = ref["logits"][0, 0]
    got = {k: v.copy() for k, v in ref.items()}
    got["pred_boxes"][0, [0, 1]] = got["pred_boxes"][0, [1, 0]]
    got["pred_boxes"][0, 0, 0] += 0.3  # and not merely swapped: one box is different
    assert not agent.compare_outputs(ref, got, 1e-3, 1e-4)["ok"]


def test_shape_and_missing_outputs_are_reported():
    ref = detections(np.random.default_rng(4))
    assert "missing outputs: pred_boxes" in agent.compare_outputs(ref, {"logits": ref["logits"]}, 1, 1)["reason"]
    bad = {**ref, "logits": ref["logits"][:, :5]}
    assert "shape" in agent.compare_outputs(ref, bad, 1, 1)["reason"]


def test_tied_tiny_model_is_accepted_by_onnxruntime(tmp_path):
    """The real case: a model with exact top-k ties, exported and run by ONNX Runtime."""
    import onnxruntime as ort
    import torch

    from examples import tiny_detector
    model = tiny_detector.build_model(ties=True)
    x = tiny_detector.example_input(0)
    with torch.no_grad():
        expected = dict(zip(["logits", "pred_boxes"], (t.numpy() for t in model(x))))
    path = tmp_path / "tied.onnx"
    torch.onnx.export(model, (x,), str(path), input_names=["pixel_values"], output_names=["logits", "pred_boxes"],
                      opset_version=17, dynamo=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = dict(zip(["logits", "pred_boxes"], session.run(None, {"pixel_values": x.numpy()})))
    assert not agent.compare_outputs(expected, got, 1e-3, 1e-4, rows_may_permute=False)["ok"]  # the ties bite
    assert agent.compare_outputs(expected, got, 1e-3, 1e-4, rows_may_permute=True)["ok"]


def test_reference_files_are_byte_deterministic(tmp_path):
    arrays = detections(np.random.default_rng(5))
    a, b = str(tmp_path / "a.npz"), str(tmp_path / "b.npz")
    agent.save_arrays(a, arrays)
    os.utime(a, (0, 0))
    agent.save_arrays(b, dict(reversed(list(arrays.items()))))
    assert hashlib.sha256(open(a, "rb").read()).digest() == hashlib.sha256(open(b, "rb").read()).digest()
    loaded = agent.load_arrays(a)
    assert set(loaded) == set(arrays) and all(np.array_equal(loaded[k], arrays[k]) for k in arrays)


def test_activate_rollback_and_prune(tmp_path):
    model_dir = tmp_path / "det"
    root = str(tmp_path)
    for key in ("k1", "k2", "k3"):
        (model_dir / "releases" / key).mkdir(parents=True)
    with pytest.raises(SystemExit):
        agent.activate(str(model_dir), "missing", root)
    assert agent.activate(str(model_dir), "k1", root) == {"active": "k1", "previous": None}
    assert agent.activate(str(model_dir), "k2", root) == {"active": "k2", "previous": "k1"}
    assert os.readlink(model_dir / "current") == "releases/k2"
    assert os.readlink(model_dir / "previous") == "releases/k1"
    assert agent.prune(str(model_dir), [], root)["removed"] == ["k3"]
    assert agent.rollback(str(model_dir), root) == {"active": "k1"}
    assert os.readlink(model_dir / "current") == "releases/k1" and not (model_dir / "previous").exists()
    assert agent.state(str(tmp_path), ["det", "other"]) == {"active": {"det": "k1", "other": None}}


def test_release_subcommands_stay_inside_the_root(tmp_path):
    root, model_dir = tmp_path / "install", tmp_path / "install" / "det"
    (model_dir / "releases" / "k1").mkdir(parents=True)
    (tmp_path / "elsewhere" / "releases" / "k1").mkdir(parents=True)
    for call in (lambda: agent.activate(str(tmp_path / "elsewhere"), "k1", str(root)),
                 lambda: agent.activate(str(model_dir), "../../elsewhere/releases/k1", str(root)),
                 lambda: agent.activate(str(model_dir), "k1", None),
                 lambda: agent.rollback(str(tmp_path / "elsewhere"), str(root)),
                 lambda: agent.prune(str(tmp_path / "elsewhere"), [], str(root))):
        with pytest.raises(SystemExit):
            call()
    assert sorted(p.name for p in (tmp_path / "elsewhere").rglob("*")) == ["k1", "releases"]
    assert not os.path.lexists(model_dir / "current")


def test_inside_resolves_links_that_stay_inside_and_names_the_one_that_leads_out(tmp_path):
    root = tmp_path / "r"
    (root / "a").mkdir(parents=True)
    (root / "b").symlink_to("a")
    (root / "out").symlink_to(tmp_path)
    assert agent.inside(str(root), str(root / "b" / "x")) == os.path.realpath(root / "a" / "x")
    assert agent.inside(str(root), str(root)) == os.path.realpath(root)
    with pytest.raises(SystemExit, match="is a symlink to .*outside the install_dir"):
        agent.inside(str(root), str(root / "out" / "x"))
    with pytest.raises(SystemExit, match="outside the install_dir"):
        agent.inside(str(root), str(root / ".." / "x"))


def test_presigned_urls_are_read_from_stdin_and_a_missing_one_is_an_error():
    import io
    assert agent.read_url(io.StringIO("https://bucket/x?X-Amz-Signature=s\nrest\n")) == \
        "https://bucket/x?X-Amz-Signature=s"
    with pytest.raises(SystemExit, match="presigned URL on the first line of stdin"):
        agent.read_url(io.StringIO(""))


def test_fetch_never_writes_through_a_planted_temp_link(tmp_path):
    """A link at the download's temp name is replaced, not written through."""
    src = tmp_path / "src"
    src.write_bytes(b"data")
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    root = tmp_path / "root"
    root.mkdir()
    out = root / "file"
    (root / ("file.%d.part" % os.getpid())).symlink_to(victim)
    sha = hashlib.sha256(b"data").hexdigest()
    assert agent.fetch(src.as_uri(), str(out), sha, root=str(root)) == {"sha256": sha, "size": 4}
    assert out.read_bytes() == b"data" and victim.read_text() == "untouched"


def test_fetch_if_absent_makes_its_folder_and_keeps_the_bytes_already_there(tmp_path):
    """`fetch --if-absent` (a builder's inputs in one call): the folder is made inside root, a file
    holding the wanted bytes is not downloaded again, one holding other bytes is replaced."""
    src = tmp_path / "src"
    src.write_bytes(b"data")
    sha = hashlib.sha256(b"data").hexdigest()
    root = tmp_path / "root"
    root.mkdir()
    out = root / ".kiln" / "inputs" / f"{sha}.onnx"
    assert agent.fetch(src.as_uri(), str(out), sha, root=str(root), if_absent=True) == {"sha256": sha, "size": 4}
    src.unlink()  # nothing to download from now: only what is there can answer
    assert agent.fetch(src.as_uri(), str(out), sha, root=str(root), if_absent=True)["present"] is True
    out.write_bytes(b"tampered")
    with pytest.raises(OSError):
        agent.fetch(src.as_uri(), str(out), sha, root=str(root), if_absent=True)
    (root / "link").symlink_to(tmp_path)
    with pytest.raises(agent.Escape):
        agent.fetch(src.as_uri(), str(root / "link" / "x" / "f"), sha, root=str(root), if_absent=True)


# ---------------------------------------------------------------- cleanup and the lock (agent side)

def test_clean_inputs_keeps_what_releases_use_young_files_and_scripts(tmp_path):
    root = tmp_path / "install"
    inputs = root / ".kiln" / "inputs"
    inputs.mkdir(parents=True)
    rel = root / "det" / "releases" / "k1"
    rel.mkdir(parents=True)
    (root / "det" / "current").symlink_to("releases/k1")
    (rel / "manifest.json").write_text('{"onnx_sha256": "aa", "inputs": ["bb.npz"]}')
    kept = "ee" + agent.VERIFIED_SUFFIX  # an engine a build kept that no deploy took
    names = ["aa.onnx", "bb.npz", "cc.onnx", "cc.npz", "agent.py", ".x.part", "young.onnx", kept]
    for n in names:
        (inputs / n).write_bytes(b"x")
        if n != "young.onnx":
            os.utime(inputs / n, (1, 1))
    out = agent.clean_inputs(str(root), ["det", "missing"], [], str(root))
    assert out == {"removed": [".x.part", "cc.npz", "cc.onnx", kept]}
    assert sorted(p.name for p in inputs.iterdir()) == ["aa.onnx", "agent.py", "bb.npz", "young.onnx"]


def test_copy_with_move_checks_the_sha256_and_stays_inside_the_root(tmp_path):
    root = tmp_path / "install"
    (root / "staging").mkdir(parents=True)
    built = root / "built.engine"
    built.write_bytes(b"engine")
    sha = hashlib.sha256(b"engine").hexdigest()
    with pytest.raises(SystemExit, match="does not match sha256"):  # changed since it was verified
        agent.copy(str(built), str(root / "staging" / "model.plan"), "0" * 64, str(root), move=True)
    assert built.exists() and not (root / "staging" / "model.plan").exists()
    outside = tmp_path / "outside.engine"
    outside.write_bytes(b"engine")
    with pytest.raises(SystemExit, match="outside the install_dir"):  # never moves a file in from elsewhere
        agent.copy(str(outside), str(root / "staging" / "model.plan"), sha, str(root), move=True)
    assert outside.exists()
    out = agent.copy(str(built), str(root / "staging" / "model.plan"), sha, str(root), move=True)
    assert out["sha256"] == sha and not built.exists()
    assert (root / "staging" / "model.plan").read_bytes() == b"engine"


def test_lock_staleness_rules(tmp_path):
    import json
    import time
    lock = tmp_path / "lock"
    lock.mkdir()
    now = time.time()
    assert agent.lock_stale(str(lock), None, 3600, 60) is None              # ownerless, young: wait
    assert "no owner" in agent.lock_stale(str(lock), None, 3600, 60, now=now + 61)
    assert "old" in agent.lock_stale(str(lock), {"since": now - 7200}, 3600, 60)
    assert agent.lock_stale(str(lock), {"since": now, "pid": os.getpid(), "host": agent.host_id()}, 3600, 60) is None
    assert agent.lock_stale(str(lock), {"since": now, "pid": 2 ** 22 + 12345, "host": "another-machine/x"}, 3600, 60) is None
    assert "gone" in agent.lock_stale(str(lock), {"since": now, "pid": 2 ** 22 + 12345, "host": agent.host_id()}, 3600, 60)
    (lock / "owner").write_text(json.dumps({"token": "t"}))
    assert agent.lock_release(str(lock), "other", str(tmp_path)) == {"released": False, "held": {"token": "t"}}
    assert agent.lock_release(str(lock), "t", str(tmp_path)) == {"released": True} and not lock.exists()


def test_batch_runs_steps_in_order_with_their_own_stdin_and_stops_at_the_first_failure(tmp_path):
    import json
    import subprocess
    import sys
    root = tmp_path / "install"
    (root / "det" / "releases" / ".staging-k1").mkdir(parents=True)
    steps = [{"argv": ["write", "--root", str(root), "--path", str(root / "det/releases/.staging-k1/manifest.json")],
              "stdin": '{"engine_key": "k1"}\n'},
             {"argv": ["stage-commit", "--root", str(root), "--model-dir", str(root / "det"), "--release", "k1"]},
             {"argv": ["activate", "--root", str(root), "--model-dir", str(root / "det"), "--release", "k1"]}]

    def run(steps):
        return subprocess.run([sys.executable, agent.__file__, "batch"], input=json.dumps(steps) + "\n",
                              capture_output=True, text=True)
    done = run(steps)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout.splitlines()[-1])
    assert answer["ok"] and len(answer["results"]) == 3
    assert json.loads((root / "det" / "current" / "manifest.json").read_text()) == {"engine_key": "k1"}
    # a refusal ends the batch as it would end the step alone: nothing after it runs
    outside = tmp_path / "outside"
    outside.mkdir()
    refused = run([{"argv": ["write", "--root", str(root), "--path", str(outside / "x")], "stdin": "x"},
                   {"argv": ["write", "--root", str(root), "--path", str(root / "after")], "stdin": "y"}])
    assert refused.returncode == agent.ESCAPE_EXIT and "outside the install_dir" in refused.stderr
    assert not (outside / "x").exists() and not (root / "after").exists()
