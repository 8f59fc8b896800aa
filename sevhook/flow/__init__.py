"""The user-facing flows: `sevhook start` (the attested launch through libvirt's own APIs) and
`sevhook demo` (the whole attested launch on a simulated platform). Both are shells over
sevhook.launch (the steps, the checks and the attested-launch sequence).

report: printing steps (terminal, plain lines, JSON); start: reading, redefining and starting the
domain, then sevhook.launch over DomainLaunchPort; libvirt_domain: the real libvirt DomainPort;
firmware: the demo's OVMF-like image; demo: the demo, on sevhook.sim.world's broker and stand-in."""
