"""`sevhook-qemu`: the domain's <emulator> in emulator mode. A command line without a sev-guest object
(libvirt's capability probes, -help, -version, any non-SEV guest) is handed to the real QEMU with
exec, before anything heavy is imported; an SEV guest goes to sevhook.wrapper.launch, which attests
it when its sevhook metadata asks for emulator mode."""

from __future__ import annotations

import gc
import sys
from collections.abc import Sequence

from sevhook.wrapper.config import PROG, ConfigError, config_path, exec_qemu, read_config


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        config = read_config(config_path())
    except ConfigError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    if not any("sev-guest" in arg for arg in args):
        return exec_qemu(config["qemu"], args)
    # Start-up makes almost no garbage, but the collector's passes over what the imports create cost a
    # start tens of milliseconds: off until they are done (sevhook.wrapper.interposer turns it back on).
    gc.disable()
    from sevhook.wrapper.launch import run_sev_guest  # only for SEV guests

    return run_sev_guest(args, config)


if __name__ == "__main__":
    sys.exit(main())
