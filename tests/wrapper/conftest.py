"""Fixtures for the wrapper tests (the simulated world itself: sevhook/sim/world.py)."""

from tests.monitor.qemu_process import short_dir  # noqa: F401
