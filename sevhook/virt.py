"""The one way sevhook opens libvirt: imported lazily (the binding is an optional extra and costs
start-up time), libvirt's own stderr error printing silenced, failures turned into one message."""

from __future__ import annotations

from typing import Any

from sevhook.errors import SevhookError


class LibvirtError(SevhookError):
    """libvirt is missing, unreachable, or refused an operation."""


def libvirt_module() -> Any:
    try:
        import libvirt  # noqa: PLC0415  (an optional extra, and slow to import)
    except ImportError:
        raise LibvirtError("the libvirt Python binding is missing: pip install 'sevhook[libvirt]'") from None
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    return libvirt


def open_connection(uri: str | None, readonly: bool = False) -> Any:
    libvirt = libvirt_module()
    try:
        return libvirt.openReadOnly(uri) if readonly else libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise LibvirtError(f"cannot connect to libvirt at {uri or 'the default URI'}: {exc.get_error_message()}; "
                           "is libvirtd running? pass -c URI to choose another connection") from None
