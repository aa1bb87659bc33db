"""Real devices over SSH, simulated: real sshd per device, each with its own Jetson files and a
trtexec that follows the real CLI. doit runs for real against them."""
from __future__ import annotations

import json
import re
import sys

import pytest

from kiln_project import Project


def fleet_project(tmp_path, sim, devices: dict[str, dict], extra_models: str = "") -> Project:
    """A project whose targets are the simulated devices (TensorRT backend over SSH)."""
    sim.write_known_hosts(sim.known_hosts_path)
    sim.write_ssh_config()
    p = Project(tmp_path)
    text = p.fleet.read_text().split("[targets.local]")[0] + extra_models
    for name, opts in devices.items():
        fields = {"transport": "ssh", "backend": "tensorrt", "host": name, "models": ["tiny"],
                  "install_dir": "/srv/kiln", "ssh_config": str(sim.ssh_config_path),
                  "known_hosts": str(sim.known_hosts_path), "connect_timeout": 3,
                  # the agent checks TensorRT outputs with numpy (a Jetson's python3-numpy);
                  # the host's python3 the simulated devices share has none, this one does
                  "python": sys.executable, **opts}
        text += f"\n[targets.{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in fields.items())
    p.fleet.write_text(text)
    return p


def builds(sim, names) -> int:
    return sum(len(sim.builds(n)) for n in names)


ORINS = ["orin-a", "orin-b", "orin-c"]


@pytest.fixture
def jetsons(new_fleet):
    sim = new_fleet()
    for name in ORINS:
        sim.add_device(name, "orin-jp5")
    sim.add_device("xavier", "xavier-jp5")
    sim.start()
    return sim


def test_identical_devices_share_one_build_and_a_second_run_does_nothing(tmp_path, jetsons):
    p = fleet_project(tmp_path, jetsons, {n: {"groups": ["jetsons"]} for n in ORINS + ["xavier"]})
    first = p.doit("-n", "4", "deploy")
    assert builds(jetsons, ORINS + ["xavier"]) == 2, first.out   # counted on the devices
    assert list(first.engines().values()) == ["publish", "publish"], first.out
    assert first.ran_group("deploy") >= {f"deploy:{n}" for n in ORINS + ["xavier"]}
    for name in ORINS + ["xavier"]:
        current = jetsons.srv(name) / "kiln/tiny/current"
        assert current.is_symlink() and (current / "model.plan").exists()
        manifest = json.loads((current / "manifest.json").read_text())
        assert manifest["smoke_test"]["latency_ms"]["p99"] > 0
        # from trtexec's --exportTimes file; JetPack 5's TensorRT 8.5 prints no device memory
        assert manifest["smoke_test"]["latency_source"].startswith("trtexec --exportTimes (")
        assert manifest["smoke_test"]["device_memory_bytes"] is None
    orin_release = {(jetsons.srv(n) / "kiln/tiny/current").resolve().name for n in ORINS}
    assert len(orin_release) == 1
    # each engine checked once per device: a builder's deploy takes its build's verification
    assert {n: len(jetsons.loads(n)) for n in ORINS + ["xavier"]} == {n: 1 for n in ORINS + ["xavier"]}
    code, report, _ = p.doit_json("cache-check", "--json")  # the profile, as trtexec measured it
    assert code == 0 and all(r["profile"]["throughput_qps"] > 0 and r["profile"]["latency_ms"]["p99"] > 0
                             and r["profile"]["measured_on"] in ORINS + ["xavier"] for r in report["engines"])
    loads_before = sum(len(jetsons.loads(n)) for n in ORINS + ["xavier"])
    logins_before = {n: jetsons.logins(n) for n in ORINS + ["xavier"]}

    second = p.doit("-n", "4", "deploy")
    assert second.ran() == set(), second.out
    assert builds(jetsons, ORINS + ["xavier"]) == 2
    assert sum(len(jetsons.loads(n)) for n in ORINS + ["xavier"]) == loads_before  # nothing transferred or run
    for n in ORINS + ["xavier"]:
        assert jetsons.wait_logins(n, logins_before[n] + 1) - logins_before[n] == 1  # one connection per device


def test_upgrading_one_device_rebuilds_for_its_new_class_only(tmp_path, jetsons):
    p = fleet_project(tmp_path, jetsons, {n: {} for n in ORINS})
    p.doit("deploy")
    assert builds(jetsons, ORINS) == 1
    before = {n: (jetsons.srv(n) / "kiln/tiny/current").resolve().name for n in ORINS}
    jetsons.upgrade("orin-c", "orin-jp6")
    run = p.doit("deploy")
    assert builds(jetsons, ORINS) == 2 and len(jetsons.builds("orin-c")) >= 1
    assert run.ran_group("deploy") == {"deploy:orin-c"}, run.out
    after = {n: (jetsons.srv(n) / "kiln/tiny/current").resolve().name for n in ORINS}
    assert after["orin-a"] == before["orin-a"] and after["orin-b"] == before["orin-b"]
    assert after["orin-c"] != before["orin-c"]
    smoke = json.loads((jetsons.srv("orin-c") / "kiln/tiny/current/manifest.json").read_text())["smoke_test"]
    assert smoke["device_memory_bytes"] > 0  # TensorRT 10.3 prints the execution context's device memory
    status = p.doit("status")
    assert re.search(r"TensorRT 8\.5\.2 → 10\.3\.0", status.out), status.out
    probe = [e for e in p.events() if e["event"] == "probe" and e["target"] == "orin-c"][-1]
    assert "TensorRT 8.5.2 → 10.3.0" in probe["why"]


def test_an_unreachable_device_fails_alone(tmp_path, jetsons):
    p = fleet_project(tmp_path, jetsons, {n: {"groups": ["line-1"]} for n in ORINS})
    jetsons.make_unreachable("orin-b")
    run = p.doit("-n", "3", "deploy:line-1", check=False)
    assert run.returncode != 0
    assert {"deploy:orin-a", "deploy:orin-c"} <= run.ran()
    failed = [l for l in run.out.splitlines() if l.startswith("  FAILED  ") and "not run: depends on" not in l]
    assert len(failed) == 1 and failed[0].startswith("  FAILED  fingerprint:orin-b: cannot probe orin-b"), run.out
    assert "  FAILED  deploy:orin-b: not run: depends on failed fingerprint:orin-b" in run.out, run.out
    assert (jetsons.srv("orin-a") / "kiln/tiny/current").exists()
    assert not (jetsons.srv("orin-b") / "kiln/tiny/current").exists()
    # deploying another target is not spoiled by the offline one
    assert p.doit("deploy:orin-c").returncode == 0
    # asking for the offline device's fingerprint by name fails
    probe = p.doit("fingerprint:orin-b", check=False)
    assert probe.returncode != 0 and "orin-b" in probe.out
    # status asks the devices themselves, one command each: a release switched by hand on orin-a
    # is reported, the offline device is unreachable, and orin-c is as deployed
    model_dir = jetsons.srv("orin-a") / "kiln/tiny"
    (model_dir / "releases" / ("ab" * 32)).mkdir()
    (model_dir / "by-hand").symlink_to(f"releases/{'ab' * 32}")
    (model_dir / "by-hand").rename(model_dir / "current")
    logins = {n: jetsons.logins(n) for n in ("orin-a", "orin-c")}
    code, report, stderr = p.doit_json("status", "--json")
    rows = {r["target"]: r for r in report["rows"]}
    assert code == 0 and report["source"] == "devices", stderr
    assert rows["orin-a"]["state"] == "differs from wanted" and rows["orin-a"]["active"] == "ab" * 32, rows
    assert rows["orin-b"]["state"] == "unreachable" and rows["orin-c"]["state"] == "up to date", rows
    assert rows["orin-c"]["latency_ms"] > 0 and rows["orin-c"]["deployed_at"]
    for n in ("orin-a", "orin-c"):
        assert jetsons.wait_logins(n, logins[n] + 1) - logins[n] == 1


def test_unknown_host_key_is_refused(tmp_path, jetsons):
    p = fleet_project(tmp_path, jetsons, {"orin-a": {}})
    jetsons.known_hosts_path.write_text("")  # nobody vouched for orin-a's key
    run = p.doit("deploy", check=False)
    assert run.returncode != 0
    assert "host key" in run.out.lower() and "orin-a" in run.out
    assert jetsons.builds("orin-a") == []


def test_trtexec_failure_and_health_check_keep_the_previous_release(tmp_path, jetsons):
    p = fleet_project(tmp_path, jetsons, {"orin-a": {"health_check": "test -e /srv/kiln/tiny/current/model.plan"}})
    p.doit("deploy")
    first = (jetsons.srv("orin-a") / "kiln/tiny/current").resolve().name
    # a build that fails on the device: clear error, nothing published, release unchanged
    jetsons.upgrade("orin-a", sim_env={"KILN_SIM_FAIL": "oom"})
    from test_pipeline import save_weights
    save_weights(p, f"k = next(k for k in sd if k.endswith('weight')); sd[k] = sd[k] + 0.01;"
                    f"torch.save(sd, {str(p.checkpoint())!r})")
    run = p.doit("deploy", check=False)
    assert run.returncode != 0, run.out
    assert "building tiny for" in run.out and "on orin-a failed" in run.out and "OutOfMemory" in run.out, run.out
    assert (jetsons.srv("orin-a") / "kiln/tiny/current").resolve().name == first
    # a health check that fails after activation: rolled back
    jetsons.upgrade("orin-a", sim_env={})
    text = p.fleet.read_text().replace('"test -e /srv/kiln/tiny/current/model.plan"', '"exit 7"')
    p.fleet.write_text(text)
    run = p.doit("deploy", check=False)
    assert run.returncode != 0 and "health check failed on orin-a" in run.out, run.out
    assert (jetsons.srv("orin-a") / "kiln/tiny/current").resolve().name == first
    assert any(e["event"] == "rollback" and e["target"] == "orin-a" for e in p.events())


def retrain(p: Project, delta: float) -> None:
    from test_pipeline import save_weights
    save_weights(p, f"k = next(k for k in sd if k.endswith('weight')); sd[k] = sd[k] + {delta};"
                    f"torch.save(sd, {str(p.checkpoint())!r})")


def test_designated_builder_builds_and_the_timing_cache_is_reused(tmp_path, jetsons):
    p = fleet_project(tmp_path, jetsons, {"orin-a": {}, "orin-b": {"builder": True}})
    p.doit("deploy")
    assert len(jetsons.builds("orin-b")) == 1 and jetsons.builds("orin-a") == []
    assert jetsons.builds("orin-b")[0]["timing_cache_loaded"] is False
    caches = list((p.artifacts / "store/entries/timing-caches").rglob("*.cache"))
    assert len(caches) == 1
    retrain(p, 0.02)
    p.doit("deploy")
    assert len(jetsons.builds("orin-b")) == 2 and jetsons.builds("orin-a") == []
    assert jetsons.builds("orin-b")[1]["timing_cache_loaded"] is True
    build_log = sorted((p.artifacts / "logs/builds").glob("*.log"), key=lambda f: f.stat().st_mtime)[-1]
    assert "&&&& PASSED TensorRT.trtexec [TensorRT v8502]" in build_log.read_text()


def test_changed_host_key_is_refused_and_the_release_keeps_serving(tmp_path, jetsons):
    p = fleet_project(tmp_path, jetsons, {"orin-a": {}})
    p.doit("deploy")
    release = (jetsons.srv("orin-a") / "kiln/tiny/current").resolve().name
    jetsons.rotate_host_key("orin-a")   # known_hosts still has the old key
    retrain(p, 0.03)
    run = p.doit("deploy", check=False)
    assert run.returncode != 0
    assert "host key" in run.out.lower() and "changed" in run.out.lower(), run.out
    assert (jetsons.srv("orin-a") / "kiln/tiny/current").resolve().name == release


def test_remote_arguments_are_quoted(tmp_path, jetsons):
    hostile = "/srv/kiln dir/$(touch /tmp/kiln-pwned);'x\"`id`"
    p = fleet_project(tmp_path, jetsons, {"orin-a": {"install_dir": hostile}})
    p.doit("deploy")
    assert not (jetsons.srv("orin-a").parent / "kiln-pwned").exists()
    import os
    assert not os.path.exists("/tmp/kiln-pwned")
    literal = jetsons.srv("orin-a") / hostile[len("/srv/"):]
    assert (literal / "tiny/current/model.plan").exists()


def test_engine_that_fails_to_load_is_not_activated(tmp_path, jetsons):
    p = fleet_project(tmp_path, jetsons, {"orin-a": {}})
    p.doit("deploy")
    release = (jetsons.srv("orin-a") / "kiln/tiny/current").resolve().name
    retrain(p, 0.04)
    p.doit("engine")
    record_file = next((p.artifacts / "engines").glob("tiny@*.json"))
    record = json.loads(record_file.read_text())
    # the store now serves a broken plan under the new key (sha recorded like a real publish)
    garbage = tmp_path / "garbage.plan"
    garbage.write_bytes(b"not a TensorRT plan" * 100)
    # published as a blob and named by a manifest signed with the controller's own key (a trusted
    # controller's mistake: the device must still refuse to activate it)
    from kiln.keys import sha256_file
    from kiln.signing import Trust
    from kiln.stores.base import blob_entry, engine_manifest_entry
    from kiln.stores.local import LocalStore
    store, sha = LocalStore(p.artifacts / "store"), sha256_file(garbage)
    store.put_file(blob_entry(sha), garbage, sha256=sha)
    manifest = json.loads(store.get_bytes(engine_manifest_entry(record["key"])))
    signed = Trust(p.artifacts / "keys" / "signing.key").sign({**manifest, "sha256": sha, "blob": blob_entry(sha)},
                                                            say=lambda _: None)
    store.put_bytes(engine_manifest_entry(record["key"]), json.dumps(signed).encode(), overwrite=True)
    record_file.write_text(json.dumps({**record, "sha256": sha}))
    (p.artifacts / "cache/engines" / record["key"]).unlink(missing_ok=True)
    run = p.doit("deploy", check=False)
    assert run.returncode != 0
    assert "smoke test of tiny" in run.out and "does not load on orin-a" in run.out, run.out
    assert "Magic tag does not match" in run.out or "magic" in run.out.lower()
    assert (jetsons.srv("orin-a") / "kiln/tiny/current").resolve().name == release


def test_devices_use_presigned_urls_with_an_s3_store(tmp_path, jetsons, moto_s3):
    """Devices hold no credentials: they download ONNX/engines and upload engines through
    short-lived presigned URLs; uploads land in staging/ and are promoted after verification."""
    import os
    bucket = moto_s3.new_bucket()
    p = fleet_project(tmp_path, jetsons, {"orin-a": {}, "orin-b": {}})
    p.fleet.write_text(f'[store]\nurl = "s3://{bucket}/fleet"\n' + p.fleet.read_text())
    os.environ["KILN_S3_ENDPOINT_URL"] = moto_s3.endpoint
    try:
        p.doit("deploy")
    finally:
        del os.environ["KILN_S3_ENDPOINT_URL"]
    publish = [e for e in p.events() if e["event"] == "publish"]
    assert len(publish) == 1 and "promoted after verification" in publish[0]["why"]
    keys = [o["Key"] for o in moto_s3.client().list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert not [k for k in keys if "/staging/" in k], keys
    assert any("/blobs/" in k for k in keys)
    for name in ("orin-a", "orin-b"):
        assert (jetsons.srv(name) / "kiln/tiny/current/model.plan").exists()
        creds = [f for f in (jetsons.srv(name) / "kiln").rglob("*") if f.is_file() and b"kiln-fake-secret" in f.read_bytes()]
        assert creds == []


def test_tensorrt_outputs_are_compared_numerically_on_the_device(tmp_path, jetsons):
    """trtexec --loadInputs/--exportOutput on the device, compared with PyTorch's outputs there."""
    p = fleet_project(tmp_path, jetsons, {"orin-a": {}})
    p.doit("deploy")
    current = jetsons.srv("orin-a") / "kiln/tiny/current"
    smoke = json.loads((current / "manifest.json").read_text())["smoke_test"]
    assert set(smoke["max_abs_diff"]) == {"logits", "pred_boxes"}, smoke
    # fp16 engine: not bit-exact, within the TensorRT tolerances (trt_rtol/trt_atol defaults)
    assert 0 < max(smoke["max_abs_diff"].values()) < 1e-2 and (smoke["rtol"], smoke["atol"]) == (1e-2, 1e-2)
    assert smoke["latency_ms"]["p99"] > 0
    load = jetsons.loads("orin-a")[-1]["argv"]
    assert any(a.startswith("--loadInputs=pixel_values:") for a in load) and "--exportOutput=outputs.json" in load
    built = json.loads(next((p.artifacts / "store/entries/engines").rglob("manifest.json")).read_text())
    assert set(built["verification"]["max_abs_diff"]) == {"logits", "pred_boxes"}
    assert not list((jetsons.srv("orin-a") / "kiln/.kiln/verify").glob("*"))     # scratch files removed
    assert not (current / "input0.bin").exists()


def test_wrong_tensorrt_outputs_fail_the_build_and_nothing_is_published(tmp_path, jetsons):
    p = fleet_project(tmp_path, jetsons, {"orin-a": {}})
    p.doit("deploy")
    first = (jetsons.srv("orin-a") / "kiln/tiny/current").resolve().name
    engines_before = sorted((p.artifacts / "store/entries/engines").rglob("engine"))
    jetsons.upgrade("orin-a", sim_env={"KILN_SIM_WRONG_OUTPUTS": "1"})
    retrain(p, 0.05)
    run = p.doit("deploy", check=False)
    assert run.returncode != 0, run.out
    assert "building tiny for" in run.out and "on orin-a failed" in run.out, run.out
    assert "TensorRT engine outputs differ from the reference on orin-a" in run.out, run.out
    assert re.search(r"rtol=0\.01 atol=0\.01: logits \(max abs diff [\d.e+-]+\)", run.out), run.out
    assert sorted((p.artifacts / "store/entries/engines").rglob("engine")) == engines_before
    assert len([e for e in p.events() if e["event"] == "publish"]) == 1
    assert (jetsons.srv("orin-a") / "kiln/tiny/current").resolve().name == first


def test_devices_stage_the_engine_while_its_builder_verifies_it_and_activate_only_what_it_published(
        tmp_path, jetsons, moto_s3):
    """`doit -n N` with an S3 store: a deploy waiting for its class's engine takes it from the
    store's staging as soon as the builder uploaded it, and stages and smoke-tests it while the
    builder verifies it; it activates only the engine that was then published. When the builder's
    verification fails, every device keeps its release: no new release folder, staging folder or
    staged upload is left anywhere."""
    import os
    bucket = moto_s3.new_bucket()
    jetsons.upgrade("orin-a", sim_env={"KILN_SIM_BUILD_SECONDS": "1"})
    p = fleet_project(tmp_path, jetsons, {"orin-a": {"builder": True}, "orin-b": {}, "orin-c": {}})
    p.fleet.write_text(f'[store]\nurl = "s3://{bucket}/fleet"\n' + p.fleet.read_text())
    client = moto_s3.client()

    def stored() -> list[str]:
        return [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]

    def releases(name: str) -> list[str]:
        return sorted(f.name for f in (jetsons.srv(name) / "kiln/tiny/releases").iterdir())

    os.environ["KILN_S3_ENDPOINT_URL"] = moto_s3.endpoint
    try:
        run = p.doit("-n", "3", "deploy")
        early = set(re.findall(r"(orin-[abc]): staging tiny release \w+ while orin-a verifies it", run.out))
        # the deploys that waited for the build (one of the three runs it, on orin-a); orin-a's own
        # deploy takes the engine its build verified there
        assert early and early <= {"orin-b", "orin-c"}, run.out
        manifest = json.loads(client.get_object(Bucket=bucket, Key=next(
            k for k in stored() if k.endswith("manifest.json") and "/engines/" in k))["Body"].read())
        for name in ORINS:
            release = json.loads((jetsons.srv(name) / "kiln/tiny/current/manifest.json").read_text())
            assert release["engine_sha256"] == manifest["sha256"] and release["engine_key"] == manifest["key"]
        assert builds(jetsons, ORINS) == 1 and not [k for k in stored() if "/staging/" in k]
        # the lock went with the deploy's last agent call
        assert not [n for n in ORINS if (jetsons.srv(n) / "kiln/.kiln/lock").exists()]

        first = {name: (jetsons.srv(name) / "kiln/tiny/current").resolve().name for name in ORINS}
        before = {name: releases(name) for name in ORINS}
        blobs = sorted(k for k in stored() if "/blobs/" in k)
        jetsons.upgrade("orin-a", sim_env={"KILN_SIM_BUILD_SECONDS": "1", "KILN_SIM_WRONG_OUTPUTS": "1"})
        retrain(p, 0.05)
        run = p.doit("-n", "3", "deploy", check=False)
    finally:
        del os.environ["KILN_S3_ENDPOINT_URL"]
    assert run.returncode != 0, run.out
    assert "TensorRT engine outputs differ from the reference on orin-a" in run.out, run.out
    for name in ORINS:
        assert (jetsons.srv(name) / "kiln/tiny/current").resolve().name == first[name], name
        assert releases(name) == before[name], (name, run.out)   # nothing committed, no .staging-* left
    assert not [k for k in stored() if "/staging/" in k] and sorted(k for k in stored() if "/blobs/" in k) == blobs
