"""Build leases (kiln.stores.lease) on a folder store and on moto's S3 server: one holder at a
time, an expired lease goes to exactly one of several takers, only the owner releases."""
from __future__ import annotations

import json
import threading
import time
import uuid

import pytest

from kiln.stores import lease as leases
from kiln.stores.base import lease_entry
from kiln.stores.local import LocalStore
from tests.racing import race

KEY = "5e" * 32
NAME = lease_entry(KEY)


@pytest.fixture(params=["local", "moto"])
def make_store(request, tmp_path):
    """A factory of store instances sharing one store (each racer gets its own, like controllers)."""
    if request.param == "local":
        return lambda: LocalStore(tmp_path / "store")
    server = request.getfixturevalue("moto_s3")
    from kiln.stores.s3 import S3Store
    url = f"s3://{server.new_bucket()}/t-{uuid.uuid4().hex[:8]}"
    return lambda: S3Store.from_url(url, endpoint_url=server.endpoint, max_attempts=3)


def owner(name: str) -> dict:
    return leases.new_owner(name)



def test_exclusive_create_one_holder_among_racers(make_store):
    owners = [owner(f"run{i}") for i in range(5)]
    stores = [make_store() for _ in owners]
    got = race(5, lambda i: leases.acquire(stores[i], NAME, owners[i], ttl=60))
    holders = [i for i, (ours, _held) in enumerate(got) if ours is not None]
    assert len(holders) == 1, got
    winner = owners[holders[0]]
    for i, (ours, held) in enumerate(got):
        if i != holders[0]:
            assert ours is None and held.owner == winner  # the losers see who builds
    record = json.loads(stores[0].read_record(NAME)[0])
    assert record["owner"] == winner and record["expires"] - record["created"] == 60


def test_expired_lease_goes_to_exactly_one_taker(make_store):
    dead = owner("dead")
    first, _ = leases.acquire(make_store(), NAME, dead, ttl=10, clock=lambda: 1000.0)
    assert first is not None
    # still valid at t=1005: nobody takes it
    ours, held = leases.acquire(make_store(), NAME, owner("early"), ttl=10, clock=lambda: 1005.0)
    assert ours is None and held.owner == dead
    takers = [owner(f"taker{i}") for i in range(5)]
    stores = [make_store() for _ in takers]
    got = race(5, lambda i: leases.acquire(stores[i], NAME, takers[i], ttl=10, clock=lambda: 1011.0))
    won = [i for i, (ours, _held) in enumerate(got) if ours is not None]
    assert len(won) == 1, got
    assert got[won[0]][0].taken_over == dead
    for i, (ours, held) in enumerate(got):
        if i != won[0]:
            assert held.owner == takers[won[0]]   # the others now wait on the new owner
    record = json.loads(stores[0].read_record(NAME)[0])
    assert record["owner"] == takers[won[0]] and record["took_over_from"] == dead


def test_only_the_owner_releases(make_store):
    store = make_store()
    old, _ = leases.acquire(store, NAME, owner("old"), ttl=10, clock=lambda: 1000.0)
    new, _ = leases.acquire(store, NAME, owner("new"), ttl=10, clock=lambda: 2000.0)  # old one expired
    assert new is not None and new.taken_over == old.owner
    assert leases.release(store, old) is False           # the slow old owner finishes: not its lease any more
    assert leases.read(store, NAME).owner == new.owner
    assert leases.release(store, new) is True
    assert leases.read(store, NAME) is None
    again, _ = leases.acquire(store, NAME, owner("next"), ttl=10)
    assert again is not None


def test_waiter_takes_the_holders_result_and_builds_when_the_holder_gives_up(tmp_path):
    store = LocalStore(tmp_path / "store")
    published: dict = {}
    holder, _ = leases.acquire(store, NAME, owner("holder"), ttl=60)
    seen: list = []

    def publish_later():
        time.sleep(0.3)
        published["v"] = "engine-from-holder"
        leases.release(store, holder)
    threading.Thread(target=publish_later).start()
    built = []
    outcome = leases.build_once(store, NAME, owner("waiter"), 60, ready=lambda: published.get("v"),
                                build=lambda: built.append(1) or "ours",
                                waiting=lambda held, s: seen.append((held.owner["run"], s)), poll=0.05)
    assert outcome.value == "engine-from-holder" and not outcome.built and built == []
    assert outcome.holder == holder.owner and outcome.waited >= 0.2
    assert seen and {run for run, _ in seen} == {"holder"}
    assert leases.read(store, NAME) is None

    # a holder that fails releases without publishing: the waiter then builds, under its own lease
    failed, _ = leases.acquire(store, NAME, owner("failing"), ttl=60)
    threading.Timer(0.2, lambda: leases.release(store, failed)).start()
    during = []
    outcome = leases.build_once(store, NAME, owner("waiter2"), 60, ready=lambda: None,
                                build=lambda: during.append(leases.read(store, NAME).owner["run"]) or "ours",
                                poll=0.05)
    assert outcome.value == "ours" and outcome.built and during == ["waiter2"]
    assert leases.read(store, NAME) is None  # released after the build


def test_expired_lease_of_a_dead_owner_is_taken_over_while_waiting(tmp_path):
    store = LocalStore(tmp_path / "store")
    dead, _ = leases.acquire(store, NAME, owner("dead"), ttl=0.3)
    start = time.time()
    outcome = leases.build_once(store, NAME, owner("waiter"), 60, ready=lambda: None,
                                build=lambda: "rebuilt", poll=0.05)
    assert outcome.built and outcome.value == "rebuilt" and outcome.taken_over == dead.owner
    assert time.time() - start >= 0.25  # it waited for the expiry, not less


# -- two controllers, one store, real doit runs against simulated Jetsons ----------------------

PER_CONTROLLER = 5   # 2 x 5 devices of one class (10 in all); see README "Many controllers, one store"
BUILD_SECONDS = "2"  # long enough that the second controller reaches the engine while the first builds


def test_two_controllers_racing_build_once(tmp_path, new_fleet):
    import subprocess
    import sys

    from kiln.signing import create_private_key
    from kiln_project import REPO, Run
    from test_fleet import fleet_project

    sim = new_fleet()
    groups = {"line-a": [f"orin-a{i}" for i in range(PER_CONTROLLER)],
              "line-b": [f"orin-b{i}" for i in range(PER_CONTROLLER)]}
    devices = [d for names in groups.values() for d in names]
    for name in devices:
        sim.add_device(name, "orin-jp5", sim_env={"KILN_SIM_BUILD_SECONDS": BUILD_SECONDS})
    sim.start()
    key = tmp_path / "shared" / "signing.key"
    create_private_key(key)  # CI runners share the signing key (a secret), so each trusts the other's builds
    shared = f'\n[store]\nurl = "file://{tmp_path / "shared" / "store"}"\n\n[signing]\nkey = "{key}"\n'
    projects = {}
    for group in groups:
        (tmp_path / group).mkdir()
        p = fleet_project(tmp_path / group, sim, {n: {"groups": [g for g, ns in groups.items() if n in ns]}
                                                  for n in devices})
        p.fleet.write_text(p.fleet.read_text() + shared)
        projects[group] = p

    procs = {g: subprocess.Popen([sys.executable, "-m", "doit", "-n", "4", f"deploy:{g}"], cwd=REPO, env=p.env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for g, p in projects.items()}
    runs = {g: Run(proc.wait(timeout=240), proc.stdout.read()) for g, proc in procs.items()}
    for g, run in runs.items():
        assert run.returncode == 0, f"{g}:\n{run.out}"

    assert sum(len(sim.builds(n)) for n in devices) == 1, {g: r.out for g, r in runs.items()}  # on the devices
    for name in devices:  # both controllers deployed all of their devices, with the one engine
        assert (sim.srv(name) / "kiln/tiny/current/model.plan").exists(), name
    assert len({(sim.srv(n) / "kiln/tiny/current/model.plan").read_bytes() for n in devices}) == 1

    engine_events = {g: [e for e in p.events() if e["task"].startswith("engine:") or e["event"] in ("build", "publish")]
                     for g, p in projects.items()}
    published = [g for g, evs in engine_events.items() if any(e["event"] == "publish" for e in evs)]
    assert len(published) == 1, engine_events
    other = next(g for g in groups if g not in published)
    hits = [e for e in engine_events[other] if e["event"] == "cache-hit"]
    assert hits and not any(e["event"] == "build" for e in engine_events[other]), engine_events
    if "waited" in hits[0]:  # it reached the engine while the other built: it said whom it waited for
        assert "waiting for run " in runs[other].out and "'s build of " in runs[other].out, runs[other].out
    assert not list((tmp_path / "shared" / "store" / "records" / "leases").rglob("*.json"))  # released
