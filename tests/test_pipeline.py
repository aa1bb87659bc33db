"""The whole chain on the embedded default, for real: doit, torch export, ONNX Runtime, local deploy."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from kiln_project import REPO, Project, doit_watching_imports, python


@pytest.fixture
def project(tmp_path):
    p = Project(tmp_path)
    first = p.doit("deploy:local")
    assert {"export:tiny", "deploy:local", "fingerprint:local", "checkpoint:tiny"} <= first.ran()
    assert len(first.engines()) == 1
    return p


def save_weights(p: Project, code: str) -> None:
    """Change the checkpoint with torch in a subprocess (`sd` is the state_dict)."""
    python(f"import torch; sd = torch.load({str(p.checkpoint())!r}, weights_only=True); {code}")


def test_second_run_is_a_noop_and_imports_neither_torch_nor_onnxruntime(project):
    first_release = project.active()
    assert first_release and (project.root / "deploy/tiny/releases" / first_release / "manifest.json").exists()
    proc, heavy = doit_watching_imports(project.env, ["deploy:local"], ("torch", "onnx", "onnxruntime", "transformers"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert heavy == set(), proc.stdout
    lines = [l for l in proc.stdout.splitlines() if l.startswith(("-- ", ".  "))]
    assert lines and all(l.startswith("-- ") for l in lines), proc.stdout
    assert project.active() == first_release


def test_an_export_runs_torch_in_a_child_process_only(project):
    """Retrained weights: the run exports, but torch and onnx load in the export's child process,
    never in doit's (their import and ~0.8 s of interpreter teardown stay off the run)."""
    save_weights(project, f"sd[next(iter(sd))] += 0.01; torch.save(sd, {str(project.checkpoint())!r})")
    proc, heavy = doit_watching_imports(project.env, ["deploy:local"], ("torch", "onnx"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert ".  export:tiny" in proc.stdout and heavy == set(), proc.stdout
    assert [e["event"] for e in project.events() if e["task"] == "export:tiny"][-1] == "export"


def test_touching_the_checkpoint_rebuilds_nothing(project):
    os.utime(project.checkpoint(), (time.time() + 5, time.time() + 5))
    run = project.doit("deploy:local")
    assert run.ran() == set(), run.out
    assert {"export:tiny", "deploy:local"} <= run.uptodate()


def test_changed_weights_rebuild_export_engine_and_switch_release(project):
    before = project.active()
    save_weights(project, f"k = next(k for k in sd if k.endswith('weight')); sd[k] = sd[k] + 0.01;"
                          f"torch.save(sd, {str(project.checkpoint())!r})")
    run = project.doit("deploy:local")
    assert "export:tiny" in run.ran() and "deploy:local" in run.ran()
    assert len(run.engines()) == 1
    after = project.active()
    assert after and after != before
    assert project.previous() == before  # kept for rollback
    assert len(project.store_engines()) == 2
    deploys = [e for e in project.events() if e["event"] == "deploy"]
    assert deploys[-1]["key"] == after and before[:12] in deploys[-1]["why"]


def test_resaved_identical_weights_reexport_but_nothing_downstream(project):
    before = project.active()
    old_bytes = project.checkpoint().read_bytes()
    # same weights, different file bytes: wrapped in {"state_dict": ...}
    save_weights(project, f"torch.save({{'state_dict': sd}}, {str(project.checkpoint())!r})")
    assert project.checkpoint().read_bytes() != old_bytes
    run = project.doit("deploy:local")
    assert "export:tiny" in run.ran(), run.out
    assert not run.engines() and "deploy:local" not in run.ran(), run.out
    assert "same ONNX bytes" in run.out
    assert project.active() == before


def test_build_option_of_one_model_rebuilds_only_its_engine(tmp_path):
    p = Project(tmp_path, models={"tiny": 1, "other": 2})
    p.doit("deploy:local")
    text = p.fleet.read_text().replace('[models.other]\n', '[models.other]\nbuild = { ort_optimization = "extended" }\n')
    p.fleet.write_text(text)
    run = p.doit("deploy:local")
    assert {t.split("@")[0] for t in run.engines("publish")} == {"engine:other"}, run.out
    assert "export:other" not in run.ran() and "export:tiny" not in run.ran()
    assert "deploy:local" in run.ran()


def test_corrupt_checkpoint_fails_clearly_and_keeps_the_release(project):
    before = project.active()
    project.checkpoint().write_bytes(b"this is not a checkpoint")
    run = project.doit("deploy:local", check=False)
    assert run.returncode != 0
    assert "cannot load checkpoint" in run.out and "model=tiny" in run.out
    assert project.active() == before
    assert len(project.store_engines()) == 1


def test_factory_that_raises_is_named(tmp_path):
    p = Project(tmp_path)
    (tmp_path / "broken_factory.py").write_text("def build():\n    raise RuntimeError('no GPU weights here')\n")
    p.fleet.write_text(p.fleet.read_text().replace("examples.tiny_detector:build_model", "broken_factory:build"))
    env = {**p.env, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "doit", "deploy:local"], cwd=REPO, env=env,
                          capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "factory broken_factory:build raised RuntimeError: no GPU weights here" in out
    assert "model=tiny" in out
    assert p.active() is None and p.store_engines() == []


def test_engine_that_disagrees_with_the_reference_is_not_published(project):
    before = project.active()
    save_weights(project, f"k = next(k for k in sd if k.endswith('weight')); sd[k] = sd[k] * 2;"
                          f"torch.save(sd, {str(project.checkpoint())!r})")
    project.doit("export:tiny")
    # falsify the reference outputs behind the pipeline's back
    python("import sys; sys.path.insert(0, '.'); from kiln.device_side import agent;"
           f"p = {str(project.artifacts / 'onnx/tiny.reference.npz')!r}; a = agent.load_arrays(p);"
           "a['output.pred_boxes'] = a['output.pred_boxes'] + 0.5; agent.save_arrays(p, a)")
    # make the store serve the falsified reference as well (its sha is re-recorded like a real publish)
    record = json.loads((project.artifacts / "onnx/tiny.json").read_text())
    python("import sys, hashlib; sys.path.insert(0, '.'); from kiln.stores.local import LocalStore; from kiln.stores.base import reference_entry;"
           f"s = LocalStore({str(project.artifacts / 'store')!r}); n = reference_entry({record['onnx_sha256']!r});"
           f"p = {str(project.artifacts / 'onnx/tiny.reference.npz')!r}; s.put_file(n, p, overwrite=True)")
    record["reference_sha256"] = python(
        f"import hashlib; print(hashlib.sha256(open({str(project.artifacts / 'onnx/tiny.reference.npz')!r}, 'rb').read()).hexdigest())").strip()
    (project.artifacts / "onnx/tiny.json").write_text(json.dumps(record))
    run = project.doit("deploy:local", check=False)
    assert run.returncode != 0
    assert "engine outputs differ from the reference" in run.out and "pred_boxes" in run.out
    assert len(project.store_engines()) == 1
    assert project.active() == before


def test_failing_smoke_test_keeps_the_previous_release(project):
    """A bad engine in the store (here: another model's engine) is caught on the device before activation."""
    before = project.active()
    save_weights(project, f"k = next(k for k in sd if k.endswith('weight')); sd[k] = sd[k] + 0.05;"
                          f"torch.save(sd, {str(project.checkpoint())!r})")
    project.doit("engine")  # builds and publishes the new engine
    new = json.loads(next((project.artifacts / "engines").glob("tiny@*.json")).read_text())
    assert new["key"] != before
    # make the new key's manifest name the old engine's bytes (a "poisoned" cache entry: valid
    # bytes of another engine, published as a blob under their own sha256) and sign it with the
    # controller's own key (a trusted controller's mistake: an unsigned one is refused before
    # any device sees it, tests/test_signing.py)
    code = ("import sys, json; sys.path.insert(0, '.'); from kiln.stores.local import LocalStore;"
            "from kiln.stores.base import blob_entry, engine_manifest_entry as m; from kiln.files import sha256_file;"
            f"from kiln.signing import Trust; t = Trust({str(project.artifacts / 'keys' / 'signing.key')!r});"
            f"s = LocalStore({str(project.artifacts / 'store')!r}); old = {str(project.root / 'deploy/tiny/releases' / before / 'model.ort.onnx')!r};"
            f"sha = sha256_file(old); s.put_file(blob_entry(sha), old, sha256=sha); k = {new['key']!r};"
            "s.put_bytes(m(k), json.dumps(t.sign({**json.loads(s.get_bytes(m(k))), 'sha256': sha, 'blob': blob_entry(sha)},"
            " say=lambda _: None)).encode(), overwrite=True);"
            "print(sha)")
    poisoned_sha = python(code).strip()
    record_file = next((project.artifacts / "engines").glob("tiny@*.json"))
    record_file.write_text(json.dumps({**new, "sha256": poisoned_sha}))
    (project.artifacts / "cache/engines" / new["key"]).unlink(missing_ok=True)
    run = project.doit("deploy:local", check=False)
    assert run.returncode != 0
    assert "smoke test of tiny release" in run.out and "previous release stays active" in run.out
    assert project.active() == before
    assert not list((project.root / "deploy/tiny/releases").glob(".staging-*"))


def test_killing_a_run_midway_leaves_nothing_half_written(project):
    save_weights(project, f"k = next(k for k in sd if k.endswith('weight')); sd[k] = sd[k] - 0.02;"
                          f"torch.save(sd, {str(project.checkpoint())!r})")
    for delay in (1.0, 2.0, 2.6, 3.2):
        proc = subprocess.Popen([sys.executable, "-m", "doit", "deploy:local"], cwd=REPO, env=project.env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert_store_consistent(project)
        assert_active_release_complete(project)
        (project.root / "deploy/.kiln/lock").exists() and subprocess.run(["rm", "-rf", str(project.root / "deploy/.kiln/lock")])
    project.doit("deploy:local")
    assert_store_consistent(project)
    assert_active_release_complete(project)


def assert_store_consistent(p: Project) -> None:
    import hashlib
    entries = p.artifacts / "store" / "entries"
    for path in entries.rglob("*"):
        if path.is_symlink():
            assert not path.name.startswith("."), f"temporary entry visible: {path}"
            data = path.read_bytes()
            assert hashlib.sha256(data).hexdigest() == os.path.basename(os.readlink(path)), path


def assert_active_release_complete(p: Project) -> None:
    import hashlib
    release = p.active()
    assert release, "no release active"
    folder = p.root / "deploy/tiny/releases" / release
    manifest = json.loads((folder / "manifest.json").read_text())
    engine = (folder / manifest["engine_file"]).read_bytes()
    assert hashlib.sha256(engine).hexdigest() == manifest["engine_sha256"]


def test_dynamo_exporter_raising_the_opset_is_refused(tmp_path):
    p = Project(tmp_path, extra='\n[models.tiny.export]\nexporter = "dynamo"\nopset = 17\n')
    run = p.doit("export:tiny", check=False)
    assert run.returncode != 0
    assert "has opset 18, but opset 17 was asked for" in run.out and "model=tiny" in run.out
    assert not (p.artifacts / "onnx" / "tiny.json").exists()


def test_doit_list_shows_the_contract_groups_without_heavy_imports(tmp_path):
    p = Project(tmp_path)
    proc, heavy = doit_watching_imports(p.env, ["list"], ("torch", "onnx", "onnxruntime", "boto3", "paramiko"))
    groups = {line.split()[0] for line in proc.stdout.splitlines() if line.strip() and not line.startswith("IMPORTED")}
    assert {"export", "fingerprint", "engine", "deploy", "cache-check", "status"} <= groups, proc.stdout
    assert heavy == set(), proc.stdout
    assert not (p.artifacts / "fingerprints").exists()  # listing probes nothing


def test_events_explain_every_decision(project):
    events = project.events()
    kinds = {e["event"] for e in events}
    assert {"probe", "export", "build", "publish", "deploy"} <= kinds
    for e in events:
        assert set(e) >= {"ts", "task", "event", "key", "target", "why", "seconds"}
        assert e["why"]
    build = next(e for e in events if e["event"] == "build")
    assert build["target"] == "local" and "no engine in the store" in build["why"]


def _ci_step(name: str) -> str:
    import yaml  # PyYAML comes with the pinned dev dependencies
    workflow = yaml.safe_load((REPO / "examples/ci/github-actions.yml").read_text())
    steps = [s for job in workflow["jobs"].values() for s in job["steps"]]
    return next(s["run"] for s in steps if s.get("name") == name)


def test_cache_check_and_status_follow_the_store(project):
    code, report, _ = project.doit_json("cache-check", "--json")
    assert code == 0 and report["ok"] and [r["status"] for r in report["engines"]] == ["hit"]
    profile = report["engines"][0]["profile"]  # measured on the builder when it was verified
    assert profile["engine_bytes"] > 0 and 0 < profile["latency_ms"]["p50"] <= profile["latency_ms"]["p99"]
    assert profile["measured_on"] == "local" and profile["throughput_qps"] is None  # ORT reports none
    assert report["engines"][0]["targets"] == ["local"]
    save_weights(project, f"k = next(k for k in sd if k.endswith('weight')); sd[k] = sd[k] + 0.03;"
                          f"torch.save(sd, {str(project.checkpoint())!r})")
    project.doit("export")
    code, report, stderr = project.doit_json("cache-check", "--json", "--junit", str(project.root / "junit.xml"))
    assert code == 1, stderr  # 1: something is missing (2 would be: could not check)
    assert not report["ok"] and report["engines"][0]["status"] == "miss"
    assert "1 engine(s) missing" in stderr
    assert 'failures="1"' in (project.root / "junit.xml").read_text()
    # the CI example's own command, as written, leaves a file that is one JSON document
    step = _ci_step("Is every engine in the store?")
    assert "sed" not in step and "> cache-check.json" in step
    command = step.replace(".venv/bin/doit", f"{sys.executable} -m doit -f {REPO / 'dodo.py'}").replace(
        "--junit cache-check.xml", f"--junit {project.root / 'ci.xml'}")  # doit runs in the dodo's folder
    ci = subprocess.run(["bash", "-c", command], cwd=project.root, env=project.env, capture_output=True, text=True)
    assert ci.returncode == 1, ci.stderr
    assert json.loads((project.root / "cache-check.json").read_text())["engines"][0]["status"] == "miss"
    status = project.doit("status")
    assert "engine for class" in status.out and "not built yet" in status.out
    for args in (["status", "--json"], ["status", "--offline", "--json"]):
        code, document, _ = project.doit_json(*args)
        assert code == 0 and document["rows"][0]["state"] == "pending", document
    project.doit("engine")
    assert project.doit("cache-check").returncode == 0
    status = project.doit("status")
    assert "a newer engine is waiting to be deployed" in status.out


def test_a_flipped_byte_in_a_stored_engine_is_caught_and_rebuilt(project):
    before = project.active()
    save_weights(project, f"k = next(k for k in sd if k.endswith('weight')); sd[k] = sd[k] + 0.06;"
                          f"torch.save(sd, {str(project.checkpoint())!r})")
    project.doit("engine")
    key = json.loads(next((project.artifacts / "engines").glob("tiny@*.json")).read_text())["key"]
    sha = json.loads((project.artifacts / "store/entries/engines" / key[:2] / key / "manifest.json").read_text())["sha256"]
    blob = (project.artifacts / "store/entries/blobs" / sha[:2] / sha).resolve()
    assert blob.stat().st_mode & 0o777 == 0o444  # read-only once written
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01
    os.chmod(blob, 0o644)
    blob.write_bytes(bytes(data))
    (project.artifacts / "cache/engines" / key).unlink(missing_ok=True)
    run = project.doit("deploy:local", check=False)
    assert run.returncode != 0 and "is corrupt in the store" in run.out, run.out
    assert project.active() == before
    quarantined = project.artifacts / "store/quarantine/blobs" / sha[:2] / sha
    assert quarantined.read_bytes() == bytes(data)  # moved aside, not deleted
    assert "own sha256" in (quarantined.parent / f"{sha}.reason.json").read_text()
    again = project.doit("deploy:local")
    assert len(again.engines()) == 1 and "deploy:local" in again.ran()
    assert project.active() == key
    assert_store_consistent(project)


def test_a_deploy_in_progress_locks_the_device(project):
    before = project.active()
    lock = project.root / "deploy/.kiln/lock"
    lock.mkdir(parents=True)
    (lock / "owner").write_text(json.dumps({"owner": "another-run", "since": time.time()}))
    save_weights(project, f"k = next(k for k in sd if k.endswith('weight')); sd[k] = sd[k] + 0.07;"
                          f"torch.save(sd, {str(project.checkpoint())!r})")
    run = project.doit("deploy:local", check=False)
    assert run.returncode != 0 and "locked by another deploy (another-run" in run.out, run.out
    assert project.active() == before and lock.exists()
    # a lock older than the staleness limit is taken over
    (lock / "owner").write_text(json.dumps({"owner": "died", "since": time.time() - 7 * 3600}))
    project.doit("deploy:local")
    assert project.active() != before and not lock.exists()
