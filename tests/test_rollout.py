"""Rollouts over real sshd devices: canaries first, waves gated, stopped by a slow canary or by
too many failures, nothing touched beyond the stop."""
from __future__ import annotations

import pytest

from kiln.pipeline.rollout import plan_waves
from test_fleet import fleet_project
from test_pipeline import save_weights

LINE = ["orin-a", "orin-b", "orin-c", "orin-d"]
POLICY = '\n[groups.line]\nrollout = { canary = 1, waves = ["50%", "100%"], max_fail_percentage = 0 }\n'


def active(sim, name):
    link = sim.srv(name) / "kiln/tiny/current"
    return link.resolve().name if link.is_symlink() else None


@pytest.fixture
def line(new_fleet):
    sim = new_fleet()
    for name in LINE:
        sim.add_device(name, "orin-jp5")
    sim.start()
    return sim


def rollout_project(tmp_path, sim):
    p = fleet_project(tmp_path, sim, {n: {"groups": ["line"]} for n in LINE})
    p.fleet.write_text(p.fleet.read_text() + POLICY)
    return p


def test_waves_are_cumulative_shares_after_the_canaries():
    members = [f"d{i}" for i in range(10)]
    policy = {"canary": 1, "waves": ["10%", "50%", "100%"]}
    assert plan_waves(members, policy) == [["d0"], ["d1"], members[2:5], members[5:]]
    assert plan_waves(members[:3], {"canary": 0, "waves": ["10%", "100%"]}) == [["d0"], ["d1", "d2"]]
    assert plan_waves(members[:1], {"canary": 2, "waves": ["100%"]}) == [["d0"]]


def test_a_slow_canary_stops_the_rollout_and_no_other_device_is_touched(tmp_path, line):
    p = rollout_project(tmp_path, line)
    first = p.doit("deploy:line")
    assert "line: canary: orin-a" in first.out and "rollout done" in first.out, first.out
    v1 = {n: active(line, n) for n in LINE}
    assert len(set(v1.values())) == 1 and None not in v1.values()
    loads = {n: len(line.loads(n)) for n in LINE}

    line.upgrade("orin-a", sim_env={"KILN_SIM_LATENCY_MS": "40"})  # the canary runs the new engine 4x slower
    save_weights(p, f"k = next(k for k in sd if k.endswith('weight')); sd[k] = sd[k] + 0.01;"
                    f"torch.save(sd, {str(p.checkpoint())!r})")
    run = p.doit("deploy:line", check=False)
    assert run.returncode == 1 and "latency gate on orin-a" in run.out, run.out
    assert "not touched: orin-b, orin-c, orin-d" in run.out, run.out
    assert {n: active(line, n) for n in LINE} == v1  # the canary was never switched; nobody else was
    assert all(len(line.loads(n)) == loads[n] for n in LINE[1:])  # nothing ran on the others
    assert any(e.get("action") == "latency-gate" and e["target"] == "orin-a" for e in p.events())


def test_a_failing_wave_over_max_fail_percentage_stops_the_rest(tmp_path, line):
    line.upgrade("orin-b", sim_env={"KILN_SIM_WRONG_OUTPUTS": "1"})  # its engine fails the accuracy gate
    p = rollout_project(tmp_path, line)
    run = p.doit("deploy", check=False)  # the whole fleet: the rollout takes the members' deploys
    assert run.returncode == 1, run.out
    assert "1 of 2 devices failed" in run.out and "not touched: orin-c, orin-d" in run.out, run.out
    assert active(line, "orin-a") and active(line, "orin-b") is None
    assert active(line, "orin-c") is None and active(line, "orin-d") is None
    assert "orin-c: deployed by the rollout of deploy:line" in run.out
