"""<launchSecurity> -> model, with the rules libvirt, QEMU and the SEV firmware apply beyond the schema.

Called only for an element the RELAX NG schema accepted, so every child here has the right shape;
what remains are values: policy bits, ranges, base64 blobs and their lengths, the GODH certificate.
Errors mean the guest cannot start (or cannot attest) as written; warnings mean it starts but is
weaker than its owner probably thinks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lxml import etree

from sevhook.errors import FormatError
from sevhook.sev.policy import SEV_POLICY_MAX, SNP_POLICY_MAX, SevPolicy, SevPolicyFlag, SnpPolicy, SnpPolicyFlag
from sevhook.xml.blobs import SESSION_SIZE, check_godh_certificate, decode_base64
from sevhook.xml.models import (
    LaunchSecurity,
    OsInfo,
    S390PvLaunchSecurity,
    SevLaunchSecurity,
    SevSnpLaunchSecurity,
    TdxLaunchSecurity,
)
from sevhook.xml.problems import ERROR, WARNING, Level
from sevhook.xml.structure import element_text

Report = Callable[[Level, "etree._Element | None", str], None]  # the element gives the line

SNP_BLOB_SIZES = {"guestVisibleWorkarounds": 16, "idBlock": 96, "idAuth": 4096, "hostData": 32}
TDX_DIGEST_SIZE = 48  # mrConfigId, mrOwner, mrOwnerConfig are SHA-384 digests


@dataclass(frozen=True)
class DomainContext:
    """What the launch-security rules need from the rest of the domain."""

    os: OsInfo
    os_element: etree._Element | None
    kernel_element: etree._Element | None
    arch: str | None
    decode_certificates: bool = True  # False: <dhCert> gets its size and version checked only

    @property
    def uefi(self) -> bool:
        """firmware='efi', or a <loader> that is not SeaBIOS."""
        if self.os.firmware == "efi":
            return True
        if self.os.loader is None:
            return False
        base = self.os.loader.rsplit("/", 1)[-1].lower()
        return not base.startswith(("bios", "seabios"))


def _text(element: etree._Element, child: str) -> tuple[str | None, etree._Element | None]:
    found = element.find(child)
    return (None, None) if found is None else (element_text(found), found)


def _yes_no(element: etree._Element, attribute: str) -> bool | None:
    value = element.get(attribute)
    return None if value is None else value.strip() == "yes"


def _unsigned(element: etree._Element, child: str, report: Report, libvirt_name: str) -> int | None:
    """cbitpos / reducedPhysBits: schema-valid numbers; QEMU needs them in 1..63."""
    text, found = _text(element, child)
    if text is None or found is None:
        return None
    value = int(text.strip())
    if not 1 <= value <= 63:
        if child == "cbitpos":
            advice = (
                "use the host's value (virsh domcapabilities shows it under <sev><cbitpos>, 47 or 51 on EPYC) "
                "or remove <cbitpos> and libvirt fills it in"
            )
        else:
            advice = "use the host's value (usually 1) or remove <reducedPhysBits> and libvirt fills it in"
        report(ERROR, found, f"<{child}> {value} is outside 1..63 and QEMU refuses the {libvirt_name}: {advice}")
    return value


def _policy(
    element: etree._Element, maximum: int, report: Report, what: str
) -> tuple[int | None, etree._Element | None]:
    text, found = _text(element, "policy")
    if text is None or found is None:
        return None, None
    value = int(text, 16)  # libvirt reads policy as hex whether or not it has the 0x prefix
    if value > maximum:
        bits = maximum.bit_length()
        report(
            ERROR,
            found,
            f"failed to get launch security policy: <policy> {text} does not fit in {bits} bits; "
            f"{what} policies are {bits}-bit hex numbers",
        )
        return None, found
    return value, found


def _blob(element: etree._Element, child: str, report: Report) -> tuple[str | None, bytes | None]:
    """The text as given (the model keeps it verbatim) and its decoded bytes when it is valid base64."""
    text, found = _text(element, child)
    if text is None or found is None:
        return None, None
    try:
        return text, decode_base64(text)
    except FormatError as exc:
        report(ERROR, found, f"<{child}> is not valid base64: {exc.message}; paste the exact base64 text")
        return text, None


def _check_kernel_hashes(element: etree._Element, ctx: DomainContext, label: str, report: Report) -> bool | None:
    kernel_hashes = _yes_no(element, "kernelHashes")
    if kernel_hashes and ctx.os.kernel is None:
        report(
            ERROR,
            element,
            "kernelHashes='yes' measures a directly booted kernel, but <os> has no <kernel>: add "
            "<kernel> (with <initrd> and <cmdline> as needed) to <os>, or remove kernelHashes",
        )
    elif ctx.os.kernel is not None and not kernel_hashes and ctx.kernel_element is not None:
        report(
            WARNING,
            ctx.kernel_element,
            f"{label} guest boots a kernel directly without kernelHashes='yes': the kernel, initrd and "
            "command line are not part of the launch measurement; add kernelHashes='yes' to <launchSecurity>",
        )
    return kernel_hashes


def _check_uefi(element: etree._Element, ctx: DomainContext, label: str, report: Report, why: str) -> None:
    if not ctx.uefi:
        report(
            WARNING,
            ctx.os_element if ctx.os_element is not None else element,
            f"{label} guest without UEFI firmware: {why}; add firmware='efi' to <os> or a <loader> with an "
            "SEV-capable OVMF (e.g. /usr/share/OVMF/OVMF_CODE.fd)",
        )


def _check_arch(element: etree._Element, kind: str, ctx: DomainContext, report: Report) -> None:
    wanted = "s390x" if kind == "s390-pv" else "x86_64"
    if ctx.arch is not None and ctx.arch != wanted:
        report(
            ERROR,
            element,
            f"<launchSecurity type='{kind}'> needs an {wanted} guest, but <os><type arch='{ctx.arch}'>: "
            f"use arch='{wanted}' or remove <launchSecurity>",
        )


def sev(element: etree._Element, ctx: DomainContext, report: Report) -> SevLaunchSecurity | None:
    policy_value, policy_element = _policy(element, SEV_POLICY_MAX, report, "SEV")
    cbitpos = _unsigned(element, "cbitpos", report, "cbitpos")
    reduced = _unsigned(element, "reducedPhysBits", report, "reduced-phys-bits")
    kernel_hashes = _check_kernel_hashes(element, ctx, "SEV", report)
    dh_text, dh_bytes = _blob(element, "dhCert", report)
    session_text, session_bytes = _blob(element, "session", report)
    dh_element = element.find("dhCert")
    session_element = element.find("session")
    if dh_bytes is not None and dh_element is not None:
        wrong = check_godh_certificate(dh_bytes, decode=ctx.decode_certificates)
        if wrong:
            report(
                ERROR,
                dh_element,
                f"<dhCert> {wrong}: paste the guest owner's GODH certificate (base64 of the 2084-byte file "
                "made with the guest's session, e.g. by sevctl session or sevhook owner)",
            )
    if session_bytes is not None and session_element is not None and len(session_bytes) != SESSION_SIZE:
        report(
            ERROR,
            session_element,
            f"<session> decodes to {len(session_bytes)} bytes; a SEV launch session blob is exactly "
            f"{SESSION_SIZE}: paste the session file made together with <dhCert>",
        )
    if (dh_text is None) != (session_text is None):
        present, missing = ("dhCert", "session") if session_text is None else ("session", "dhCert")
        report(
            ERROR,
            element.find(present),
            f"<{present}> without <{missing}>: LAUNCH_START needs both the guest owner's DH certificate and "
            f"the session made with it; add <{missing}> or remove <{present}>",
        )
    handle_text, handle_element = _text(element, "handle")
    if handle_element is not None:
        report(
            WARNING,
            handle_element,
            "libvirt ignores <handle>: it never passes it to QEMU, so it has no effect; remove it",
        )
    _check_arch(element, "sev", ctx, report)
    if policy_value is None or policy_element is None:
        return None
    policy = SevPolicy(policy_value)
    label = "SEV-ES" if policy.es else "SEV"
    if policy.reserved_bits:
        report(
            ERROR,
            policy_element,
            f"SEV policy {policy_value:#06x} sets reserved bits 6-15 ({policy.reserved_bits:#06x}); the firmware "
            f"rejects it at LAUNCH_START: clear them (policy {policy_value & ~policy.reserved_bits:#06x})",
        )
    if policy.debug_allowed:
        report(
            WARNING,
            policy_element,
            f"SEV policy {policy_value:#06x} allows debugging (NODBG, bit 0, is clear): the host can read and "
            "write guest memory with the SEV debug commands; "
            f"set bit 0 (policy {policy_value | SevPolicyFlag.NODBG:#06x})",
        )
    if policy.key_sharing_allowed:
        report(
            WARNING,
            policy_element,
            f"SEV policy {policy_value:#06x} allows key sharing (NOKS, bit 1, is clear): other guests of the "
            "same owner may share this guest's memory key; "
            f"set bit 1 (policy {policy_value | SevPolicyFlag.NOKS:#06x})",
        )
    if policy.es:
        _check_uefi(element, ctx, label, report, "SEV-ES guests need OVMF to set up the encrypted register state")
    else:
        _check_uefi(element, ctx, label, report, "only OVMF knows the SEV memory layout and the launch secret area")
    return SevLaunchSecurity(
        policy=policy,
        cbitpos=cbitpos,
        reduced_phys_bits=reduced,
        dh_cert=dh_text,
        session=session_text,
        kernel_hashes=kernel_hashes,
        handle=int(handle_text.strip()) if handle_text is not None else None,
    )


def sev_snp(element: etree._Element, ctx: DomainContext, report: Report) -> SevSnpLaunchSecurity | None:
    policy_value, policy_element = _policy(element, SNP_POLICY_MAX, report, "SEV-SNP")
    cbitpos = _unsigned(element, "cbitpos", report, "cbitpos")
    reduced = _unsigned(element, "reducedPhysBits", report, "reduced-phys-bits")
    kernel_hashes = _check_kernel_hashes(element, ctx, "SEV-SNP", report)
    blobs: dict[str, str | None] = {}
    for child, size in SNP_BLOB_SIZES.items():
        text, decoded = _blob(element, child, report)
        blobs[child] = text
        found = element.find(child)
        if decoded is not None and found is not None and len(decoded) != size:
            report(
                ERROR,
                found,
                f"Unexpected length of '{child}', expected {size} got {len(decoded)}: <{child}> must be the "
                f"base64 of exactly {size} bytes",
            )
    _check_arch(element, "sev-snp", ctx, report)
    _check_uefi(element, ctx, "SEV-SNP", report, "SEV-SNP guests need an SNP-capable OVMF to validate their memory")
    if policy_value is None or policy_element is None:
        return None
    policy = SnpPolicy(policy_value)
    if not policy.reserved_bit17_set:
        report(
            ERROR,
            policy_element,
            f"SEV-SNP policy {policy_value:#010x} has bit 17 clear; the firmware requires it set (reserved, must "
            f"be one): use policy {policy_value | SnpPolicyFlag.RESERVED_MBO:#010x}",
        )
    if policy.reserved_bits:
        report(
            ERROR,
            policy_element,
            f"SEV-SNP policy {policy_value:#010x} sets reserved bits 26-63 ({policy.reserved_bits:#x}); the "
            f"firmware rejects it: clear them (policy {policy_value & ~policy.reserved_bits:#010x})",
        )
    if policy.debug_allowed:
        report(
            WARNING,
            policy_element,
            f"SEV-SNP policy {policy_value:#010x} allows debugging (DEBUG, bit 19, is set): the host can read "
            f"and write guest memory; clear bit 19 (policy {policy_value & ~SnpPolicyFlag.DEBUG:#010x})",
        )
    return SevSnpLaunchSecurity(
        policy=policy,
        cbitpos=cbitpos,
        reduced_phys_bits=reduced,
        kernel_hashes=kernel_hashes,
        author_key=_yes_no(element, "authorKey"),
        vcek=_yes_no(element, "vcek"),
        guest_visible_workarounds=blobs["guestVisibleWorkarounds"],
        id_block=blobs["idBlock"],
        id_auth=blobs["idAuth"],
        host_data=blobs["hostData"],
    )


def tdx(element: etree._Element, ctx: DomainContext, report: Report) -> TdxLaunchSecurity:
    policy_value, _ = _policy(element, SNP_POLICY_MAX, report, "TDX")
    digests: dict[str, str | None] = {}
    for child in ("mrConfigId", "mrOwner", "mrOwnerConfig"):
        text, decoded = _blob(element, child, report)
        digests[child] = text
        found = element.find(child)
        if decoded is not None and found is not None and len(decoded) != TDX_DIGEST_SIZE:
            report(
                ERROR,
                found,
                f"<{child}> decodes to {len(decoded)} bytes; it must be the base64 of a {TDX_DIGEST_SIZE}-byte "
                "SHA-384 digest",
            )
    _check_arch(element, "tdx", ctx, report)
    qgs = element.find("quoteGenerationService")
    return TdxLaunchSecurity(
        policy=policy_value,
        mr_config_id=digests["mrConfigId"],
        mr_owner=digests["mrOwner"],
        mr_owner_config=digests["mrOwnerConfig"],
        quote_generation_socket=qgs.get("path") if qgs is not None else None,
    )


def s390_pv(element: etree._Element, ctx: DomainContext, report: Report) -> S390PvLaunchSecurity:
    _check_arch(element, "s390-pv", ctx, report)
    return S390PvLaunchSecurity()


BUILDERS: dict[str, Callable[[etree._Element, DomainContext, Report], LaunchSecurity | None]] = {
    "sev": sev,
    "sev-snp": sev_snp,
    "s390-pv": s390_pv,
    "tdx": tdx,
}


def build(element: etree._Element, ctx: DomainContext, report: Report) -> LaunchSecurity | None:
    """The model of a schema-valid <launchSecurity>, reporting every rule it breaks; None when a value
    is too broken to model (the error says why)."""
    kind = " ".join((element.get("type") or "").split())
    return BUILDERS[kind](element, ctx, report)
