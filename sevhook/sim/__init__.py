"""A software AMD SEV platform and a qemu-system-x86_64 stand-in that real libvirtd can drive.

platform: the simulated secure processor (root of trust, platform and guest commands);
guest: one guest's launch context and its state machine; state: the state directory;
argv: reading a real QEMU command line; qmp_server: QEMU's QMP protocol; standalone: a QEMU
that answers a launch by itself; proxy: wrapping the real QEMU; lifecycle: the launch, -daemonize and
cleanup both modes share; qemu_main: the executable."""
