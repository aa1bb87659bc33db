"""Scope: `doit deploy:<one>` contacts that device only (plus, on a store miss, one designated
builder of its class). Twelve identical simulated Orins, logins counted in their own sshd logs."""
from __future__ import annotations

import pytest

from test_fleet import fleet_project, retrain

DEVICES = [f"orin-{i:02d}" for i in range(12)]


@pytest.fixture
def twelve_orins(new_fleet):
    sim = new_fleet()
    for name in DEVICES:
        sim.add_device(name, "orin-jp5")
    sim.start()
    return sim


def releases(sim) -> dict[str, str]:
    return {n: (sim.srv(n) / "kiln/tiny/current").resolve().name for n in DEVICES}


def logins(sim) -> dict[str, int]:
    return {n: sim.logins(n) for n in DEVICES}


def contacted(sim, before: dict[str, int]) -> set[str]:
    return {n for n, count in logins(sim).items() if count != before[n]}


def test_deploying_one_device_contacts_that_device_only(tmp_path, twelve_orins):
    sim = twelve_orins
    p = fleet_project(tmp_path, sim, {n: {"groups": ["line-1"]} for n in DEVICES})
    p.doit("-n", "4", "deploy")
    assert sum(len(sim.builds(n)) for n in DEVICES) == 1
    first = releases(sim)
    assert len(set(first.values())) == 1

    # new weights: a new ONNX, so a store miss; the device builds its own engine
    retrain(p, 0.01)
    before, builds_before = logins(sim), {n: len(sim.builds(n)) for n in DEVICES}
    run = p.doit("deploy:orin-07")
    assert contacted(sim, before) == {"orin-07"}, run.out
    assert sim.logins("orin-07") - before["orin-07"] == 1  # one connection for probe, build and deploy
    assert {n for n in DEVICES if len(sim.builds(n)) != builds_before[n]} == {"orin-07"}
    after = releases(sim)
    assert after["orin-07"] != first["orin-07"]
    assert {n: r for n, r in after.items() if n != "orin-07"} == {n: r for n, r in first.items() if n != "orin-07"}
    assert run.ran() == {"fingerprint:orin-07", "export:tiny", "deploy:orin-07"} or \
        run.ran() == {"export:tiny", "deploy:orin-07"}, run.out

    # the next device of the class: a store hit, nobody builds, only it is contacted
    before = logins(sim)
    run = p.doit("deploy:orin-03")
    assert contacted(sim, before) == {"orin-03"}, run.out
    assert "cache hit" in run.out and sum(len(sim.builds(n)) for n in DEVICES) == 2


def test_a_store_miss_builds_on_the_designated_builder_of_the_class(tmp_path, twelve_orins):
    sim = twelve_orins
    p = fleet_project(tmp_path, sim, {n: {"builder": n == "orin-00"} for n in DEVICES})
    p.doit("-n", "4", "deploy")
    first = releases(sim)
    retrain(p, 0.02)
    before, builds_before = logins(sim), {n: len(sim.builds(n)) for n in DEVICES}
    run = p.doit("deploy:orin-05")
    assert contacted(sim, before) == {"orin-05", "orin-00"}, run.out
    assert {n for n in DEVICES if len(sim.builds(n)) != builds_before[n]} == {"orin-00"}
    after = releases(sim)
    assert after["orin-05"] != first["orin-05"] and after["orin-00"] == first["orin-00"]  # built, not deployed
    assert "on orin-00" in run.out

    # a builder that changed since it was recorded is not trusted with the class's engine
    sim.upgrade("orin-00", "orin-jp6")
    retrain(p, 0.03)
    run = p.doit("deploy:orin-06")
    assert len(sim.builds("orin-06")) == 1, run.out  # fell back to the device being deployed
    assert "orin-00 is recorded in class" in run.out and "not building on it" in run.out, run.out
