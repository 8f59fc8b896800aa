"""`sevhook-qemu`, the attesting emulator wrapper (docs/emulator.md). Keep this file free of imports:
it is on the path of every QEMU capability probe libvirt runs."""
