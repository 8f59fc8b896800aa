"""The attested launch of one SEV guest, independent of its transport: the time budget, the checks
of QEMU's and the broker's answers, the recorded steps, the key broker client, the launch session
and one sequence (check, measure, attest, inject, verify, resume) over a LaunchPort. The libvirt
hook (QMP monitor), `sevhook start` (libvirt's APIs), the demo and the emulator wrapper are shells
that build a port and call this package."""
