"""Typed launch operations on a running QEMU: over a QMP socket (sevhook.monitor.qmp) or through
libvirt (sevhook.monitor.libvirt_monitor). Import the submodule you need; each pulls in its own
transport only, so nothing heavy loads by importing this package."""
