"""Fixtures for the simulator tests (defined in sim_support, which the tests also import helpers from)."""

from tests.sim.sim_support import platform, short_dir, sim_state, stand_ins  # noqa: F401
