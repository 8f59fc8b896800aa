"""A host's platform export, as `sevctl export` lays it out: what the firmware exports (the PDH, the
PEK|OCA|CEK chain with the CEK unsigned, the chip id) and, with --full, PDH|PEK|OCA|CEK|ASK|ARK with the
ASK-signed CEK from AMD's KDS. The directory it is written to (by default /var/lib/sevhook/platform,
root-only) is the host's platform cache: launch-creating commands read it when given no other source."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path

from sevhook.encoding import decode_base64
from sevhook.errors import FormatError, UsageError
from sevhook.files import write_private_file
from sevhook.sev.certs import SEV_CERT_SIZE, SevCertificate, parse_ca_bundle
from sevhook.sev.chain import CERT_CHAIN_SIZE, SEV_CHAIN_ORDER, maybe_base64

DEFAULT_PLATFORM_DIR = Path("/var/lib/sevhook/platform")
PDH_FILE = "pdh.cert"
CHAIN_FILE = "cert_chain.cert"
CHIP_ID_FILE = "chip_id.hex"
FULL_CHAIN_FILE = "full_chain.bin"
MAX_FILE_BYTES = 64 * 1024


@dataclass(frozen=True)
class PlatformExport:
    """One platform's export; `full_chain` only when the signed CEK (and ASK|ARK) were at hand."""

    pdh: bytes
    cert_chain: bytes  # PEK|OCA|CEK as the firmware exports it
    chip_id: bytes | None = None  # GET_ID (QMP cpu0-id)
    full_chain: bytes | None = None

    def __post_init__(self) -> None:
        _check_certificates(self.pdh + self.cert_chain, "platform export")
        if self.full_chain is not None:
            _check_certificates(self.full_chain[:4 * SEV_CERT_SIZE], "full chain")

    @classmethod
    def from_qmp(cls, capabilities: dict[str, object]) -> PlatformExport:
        """From query-sev-capabilities (or libvirt's getSEVInfo): base64 pdh, cert-chain and cpu0-id."""
        def field(name: str) -> bytes | None:
            value = capabilities.get(name)
            if value is None:
                return None
            if not isinstance(value, str):
                raise FormatError(f"query-sev-capabilities: '{name}' is not a string")
            try:
                return decode_base64(value)
            except FormatError as exc:
                raise FormatError(f"query-sev-capabilities: '{name}' is not valid base64 ({exc.message})") from exc

        pdh, chain = field("pdh"), field("cert-chain")
        if pdh is None or chain is None:
            raise FormatError("query-sev-capabilities: no 'pdh' or 'cert-chain' (is SEV enabled on this host?)")
        return cls(pdh, chain, field("cpu0-id"))

    @property
    def chip_id_hex(self) -> str | None:
        return self.chip_id.hex().upper() if self.chip_id else None

    @property
    def cek(self) -> SevCertificate:
        return SevCertificate.parse(self.cert_chain[2 * SEV_CERT_SIZE:], "exported CEK")

    def with_signed_cek(self, signed_cek: bytes, ca_bundle: bytes) -> PlatformExport:
        """The full chain (`sevctl export --full`): the signed CEK must certify the exported CEK's key and
        verify under the bundle's ASK, which the ARK signed."""
        signed = SevCertificate.parse(signed_cek, "signed CEK")
        if signed.body() != self.cek.body():
            raise UsageError("the signed CEK is not this platform's CEK (another chip's, or a wrong chip id)")
        ask, ark = parse_ca_bundle(ca_bundle, "--ca")
        ask.verify_signed_by(ark)
        signed.verify_signed_by(ask)
        full = self.pdh + self.cert_chain[:2 * SEV_CERT_SIZE] + signed.to_bytes() + ask.to_bytes() + ark.to_bytes()
        return PlatformExport(self.pdh, self.cert_chain, self.chip_id, full)

    def files(self) -> dict[str, bytes]:
        files = {PDH_FILE: self.pdh, CHAIN_FILE: self.cert_chain}
        if self.chip_id_hex:
            files[CHIP_ID_FILE] = (self.chip_id_hex + "\n").encode()
        if self.full_chain is not None:
            files[FULL_CHAIN_FILE] = self.full_chain
        return files

    def write(self, directory: Path) -> list[Path]:
        """Write every file (atomic, 0644 inside a 0700 directory: the cache is root's)."""
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"--out-dir {directory}: cannot create it ({exc.strerror or exc})") from exc
        return [write_private_file(directory / name, data, mode=0o644) for name, data in self.files().items()]

    def launch_fields(self) -> tuple[str, str, str | None]:
        """(pdh_b64, cert_chain_b64, cpu0_id_b64) for a launch request: the full chain when present (the
        broker then needs no KDS), else the firmware's chain, whose CEK the broker resolves by chip id."""
        chain = self.full_chain if self.full_chain is not None else self.cert_chain
        cpu0 = base64.b64encode(self.chip_id).decode("ascii") if self.chip_id else None
        return base64.b64encode(self.pdh).decode("ascii"), base64.b64encode(chain).decode("ascii"), cpu0


def _check_certificates(data: bytes, what: str) -> None:
    """PDH|PEK|OCA|CEK, each parsed and in its place, so a wrong file fails here and not at the broker."""
    if len(data) != 4 * SEV_CERT_SIZE:
        raise FormatError(f"{what}: {len(data)} bytes where PDH|PEK|OCA|CEK is {4 * SEV_CERT_SIZE}")
    for index, usage in enumerate(SEV_CHAIN_ORDER):
        certificate = SevCertificate.parse(data[index * SEV_CERT_SIZE:(index + 1) * SEV_CERT_SIZE],
                                           f"{what} certificate {index + 1}")
        if certificate.usage != usage:
            raise FormatError(f"{what} certificate {index + 1}: holds a {certificate.usage.name} certificate where "
                              f"the {usage.name} belongs")


def _read(path: Path) -> bytes:
    """A certificate file, raw or base64."""
    return maybe_base64(_read_raw(path))


def _read_raw(path: Path) -> bytes:
    try:
        with path.open("rb") as stream:
            data = stream.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the platform export ({exc.strerror or exc}); write it with "
                         "`sevhook platform export`") from exc
    if len(data) > MAX_FILE_BYTES:
        raise UsageError(f"{path}: larger than {MAX_FILE_BYTES} bytes, not a platform export file")
    return data


def read_chip_id(path: Path) -> bytes:
    text = _read_raw(path).decode("ascii", "replace").strip()  # hex text is valid base64 too: never decode it
    try:
        chip_id = bytes.fromhex(text)
    except ValueError as exc:
        raise UsageError(f"{path}: not a chip id in hex (GET_ID as `sevhook platform export` writes it)") from exc
    if not 0 < len(chip_id) <= 128:
        raise UsageError(f"{path}: a chip id of {len(chip_id)} bytes; GET_ID is 64")
    return chip_id


def read_export(directory: Path) -> PlatformExport:
    """The export in a directory: pdh.cert and cert_chain.cert (or only full_chain.bin), chip_id.hex if there."""
    chip = directory / CHIP_ID_FILE
    chip_id = read_chip_id(chip) if chip.is_file() else None
    full = directory / FULL_CHAIN_FILE
    full_chain = _read(full) if full.is_file() else None
    if (directory / PDH_FILE).is_file() and (directory / CHAIN_FILE).is_file():
        return PlatformExport(_read(directory / PDH_FILE), _read(directory / CHAIN_FILE), chip_id, full_chain)
    if full_chain is not None:
        if len(full_chain) < 4 * SEV_CERT_SIZE:
            raise UsageError(f"{full}: {len(full_chain)} bytes, too short for PDH|PEK|OCA|CEK|ASK|ARK")
        return PlatformExport(full_chain[:SEV_CERT_SIZE], full_chain[SEV_CERT_SIZE:SEV_CERT_SIZE + CERT_CHAIN_SIZE],
                              chip_id, full_chain)
    raise UsageError(f"{directory}: no platform export here (pdh.cert and cert_chain.cert, or full_chain.bin); "
                     f"write one with `sevhook platform export --out-dir {directory}`")


