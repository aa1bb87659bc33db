"""A fleet of simulated devices for the test suite: real OpenSSH servers on loopback.

See `fleet.sim` (Fleet, PROFILES) and the fixtures in tests/conftest.py.
"""
