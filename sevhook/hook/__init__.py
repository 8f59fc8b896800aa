"""The libvirt hook (qemu.d/50-sevhook): attests SEV guests before they run, fail-closed.

fast: the entry point libvirt runs for every guest (exits at once for guests sevhook does not
manage); runner: one hook call, per operation, and at `started` the attested launch of
sevhook.launch over the guest's private QMP monitor; plan: the pure decisions; runtime: the
per-domain files; steplog: one log line per step; install: the script; prepare: `sevhook
prepare-domain`. Keep this file empty of imports: it is on the hot path."""
