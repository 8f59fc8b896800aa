"""Fixtures: real QEMU processes with QMP sockets (see qemu_process)."""

from tests.monitor.qemu_process import qemu, qemu_factory, short_dir  # noqa: F401
