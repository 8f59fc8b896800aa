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

from sevhook.qemu_cmdline.argv import ArgvLaunchSecurity, read_launch_security
from sevhook.qemu_cmdline.check import CheckResult, compare
from sevhook.qemu_cmdline.qemu_version import QemuVersion
from sevhook.qemu_cmdline.translate import CmdlineOptions, Translation, translate, translate_launch_security

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
