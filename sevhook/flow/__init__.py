"""The user-facing flows: `sevhook start` (the attested launch through libvirt's own APIs) and
`sevhook demo` (the whole attested launch on a simulated platform).

steps: timed, named steps and the one failure type that names its step; report: printing them
(terminal, plain lines, JSON); start: the start sequence over injected libvirt and broker ports;
libvirt_domain: the real libvirt port; firmware: the demo's OVMF-like image; local_broker: a
broker served in-process on loopback; standin: the QEMU stand-in process; demo: the demo."""
