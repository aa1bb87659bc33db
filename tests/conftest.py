"""Shared fixtures.

Simulated fleet (tests/fleet/sim.py): real OpenSSH servers on loopback, one per
device, each with its own files (mount namespace). They need root and sshd;
without them the tests that use these fixtures are skipped with the reason.

- `fleet` (session): the standard devices of `tests.fleet.sim.STANDARD_DEVICES`
  (orin-01, orin-02: JetPack 5.1.2 AGX Orins; orin-jp6; xavier-01; cpu-01;
  bastion; hidden-orin reached via ProxyJump bastion), started once. Tests must
  not change it (no upgrade/stop/freeze): use `new_fleet` for that.
- `new_fleet(**kwargs) -> Fleet`: a fresh, empty Fleet per call (add_device(),
  then start()); stopped at the end of the test.
- `fleet_supported`: skips the test unless simulated devices can run here.
"""
from __future__ import annotations

import pytest

from tests.fleet.sim import Fleet, standard_fleet, unsupported_reason
from tests.s3server import aws_env_scrubbed, moto_s3, slowdown_s3  # noqa: F401  (S3 fixtures, one server per session)


@pytest.fixture(scope="session")
def fleet_supported() -> None:
    reason = unsupported_reason()
    if reason:
        pytest.skip(f"simulated SSH fleet unavailable: {reason}")


@pytest.fixture(scope="session")
def fleet(fleet_supported, tmp_path_factory) -> Fleet:
    sim = standard_fleet(tmp_path_factory.mktemp("fleet"))
    try:
        sim.start()
        yield sim
    finally:
        sim.stop()


@pytest.fixture
def new_fleet(fleet_supported, tmp_path):
    made: list[Fleet] = []

    def make(**kwargs) -> Fleet:
        sim = Fleet(tmp_path / f"fleet{len(made)}", **kwargs)
        made.append(sim)
        return sim

    try:
        yield make
    finally:
        for sim in made:
            sim.stop()
