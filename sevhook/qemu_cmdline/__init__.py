"""<launchSecurity> <-> QEMU command line, byte for byte as libvirt writes it.

Public API:
    translate(domain, options, model=None) -> Translation      (.argv, .object_text, .files)
    translate_launch_security(model, lib_dir, options)         the same for a bare model
    CmdlineOptions(qemu_version, syntax, libvirt4_compat, lib_dir), QemuVersion.parse("7.2")
    read_launch_security(argv, files=None) -> ArgvLaunchSecurity   (.model, .object, .problems)
    compare(expected_translation, found, files) -> CheckResult
    sevhook.qemu_cmdline.platform: fill_platform and the host-value sources (domcaps, QMP, libvirt)
    sevhook.qemu_cmdline.libdir: default_lib_dir, write_files
    sevhook.qemu_cmdline.passthrough: commandline_xml, args_from_commandline
    sevhook.qemu_cmdline.domain_input: load_for_cmdline (which XML problems libvirt lets through)
    sevhook.qemu_cmdline.options: QEMU's flag table, iter_options, split_keyval_parts (shared with sevhook.sim)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sevhook.qemu_cmdline.argv import ArgvLaunchSecurity, read_launch_security
    from sevhook.qemu_cmdline.check import CheckResult, compare
    from sevhook.qemu_cmdline.qemu_version import QemuVersion
    from sevhook.qemu_cmdline.translate import CmdlineOptions, Translation, translate, translate_launch_security

# The public names, loaded on first use: the software platform's stand-in imports the light
# sevhook.qemu_cmdline.options on every libvirt probe and must not pay for lxml and the translator.
_PUBLIC = {
    "ArgvLaunchSecurity": "argv",
    "read_launch_security": "argv",
    "CheckResult": "check",
    "compare": "check",
    "QemuVersion": "qemu_version",
    "CmdlineOptions": "translate",
    "Translation": "translate",
    "translate": "translate",
    "translate_launch_security": "translate",
}
__all__ = [
    "ArgvLaunchSecurity",
    "CheckResult",
    "CmdlineOptions",
    "QemuVersion",
    "Translation",
    "compare",
    "read_launch_security",
    "translate",
    "translate_launch_security",
]


def __getattr__(name: str) -> object:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
