"""Monitor interposition: run a real QEMU behind private monitor sockets and relay its callers' QMP,
intercepting chosen commands. Shared by the software platform's stand-in (sevhook/sim/proxy.py) and
the attesting emulator wrapper (sevhook/wrapper)."""
