"""Fixtures for the wrapper tests (the worlds themselves: tests/wrapper/world.py)."""

from tests.monitor.qemu_process import short_dir  # noqa: F401
