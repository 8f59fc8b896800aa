"""The SEV certificate chain ARK -> ASK -> CEK -> PEK <- OCA (self-signed), PEK -> PDH, loaded from
any of the layouts tools produce, and verified link by link so a failure names the link and why."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from sevhook.encoding import decode_base64
from sevhook.errors import FormatError, SevhookError, VerificationError
from sevhook.sev.certs import AmdCertificate, SevCertificate, Usage, parse_ca_bundle
from sevhook.sev.roots import NAPLES_ROOT, TrustAnchor, pinned_root, root_for_key_id
from sevhook.sev.sizes import CERT_CHAIN_SIZE, SEV_CERT_SIZE

SEV_CHAIN_ORDER = (Usage.PDH, Usage.PEK, Usage.OCA, Usage.CEK)
EXPORT_SIZE = 4 * SEV_CERT_SIZE  # PDH||PEK||OCA||CEK, `sevctl export`


def _sev_cert(data: bytes, usage: Usage, what: str) -> SevCertificate:
    cert = SevCertificate.parse(data, what)
    if cert.usage != usage:
        raise FormatError(f"{what}: holds a certificate with usage {cert.usage.name} where the {usage.name} belongs")
    return cert


def _amd_cert(data: bytes, usage: Usage, what: str) -> AmdCertificate:
    cert = AmdCertificate.parse(data, what)
    if cert.usage != usage:
        raise FormatError(f"{what}: holds a certificate with usage {cert.usage.name} where the {usage.name} belongs")
    return cert


def _decode_b64(text: str | bytes, what: str) -> bytes:
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    try:
        return decode_base64(text)
    except FormatError as exc:
        raise FormatError(f"{what}: not valid base64 ({exc.message})") from exc


def maybe_base64(data: bytes) -> bytes:
    """Files may hold raw certificates or their base64 text (as QMP/libvirt give them): decode
    when the whole content is valid base64, else return it as it is."""
    text = b"".join(data.split())
    if not text or len(text) % 4:
        return data
    try:
        return decode_base64(text.decode("latin-1"))
    except FormatError:
        return data


@dataclass(frozen=True)
class CertificateChain:
    """The six certificates of a platform: four SEV certificates and AMD's ASK and ARK."""

    pdh: SevCertificate
    pek: SevCertificate
    oca: SevCertificate
    cek: SevCertificate
    ask: AmdCertificate
    ark: AmdCertificate

    @classmethod
    def from_parts(
        cls, sev_certs: bytes, ca: bytes | None = None, pdh: bytes | None = None, what: str = "certificate chain"
    ) -> CertificateChain:
        """From PDH||PEK||OCA||CEK[||ASK||ARK] or PEK||OCA||CEK (then `pdh` is needed); the ASK||ARK
        come from the chain itself or from `ca`."""
        sev_certs = bytes(sev_certs)
        if len(sev_certs) < CERT_CHAIN_SIZE:
            raise FormatError(
                f"{what}: {len(sev_certs)} bytes; expected PDH|PEK|OCA|CEK[|ASK|ARK] ({EXPORT_SIZE}+ bytes) "
                f"or PEK|OCA|CEK ({CERT_CHAIN_SIZE} bytes)"
            )
        if len(sev_certs) == CERT_CHAIN_SIZE:
            if pdh is None:
                raise FormatError(f"{what}: holds PEK|OCA|CEK only; give the PDH certificate too")
            chunks = [bytes(pdh)] + [sev_certs[i * SEV_CERT_SIZE : (i + 1) * SEV_CERT_SIZE] for i in range(3)]
            names = ["PDH certificate"] + [f"{what} certificate {i}" for i in (1, 2, 3)]
            rest = b""
        else:
            if len(sev_certs) < EXPORT_SIZE:
                raise FormatError(f"{what}: {len(sev_certs)} bytes, truncated inside the SEV certificates")
            chunks = [sev_certs[i * SEV_CERT_SIZE : (i + 1) * SEV_CERT_SIZE] for i in range(4)]
            names = [f"{what} certificate {i}" for i in (1, 2, 3, 4)]
            rest = sev_certs[EXPORT_SIZE:]
        certs = [
            _sev_cert(chunk, usage, f"{name} ({usage.name})")
            for chunk, usage, name in zip(chunks, SEV_CHAIN_ORDER, names, strict=True)
        ]
        if pdh is not None and len(sev_certs) != CERT_CHAIN_SIZE and bytes(pdh) != certs[0].to_bytes():
            raise FormatError(f"{what}: the given PDH differs from the PDH inside the chain")
        if rest and ca is not None:
            raise FormatError(f"{what}: already holds the ASK and ARK; do not give them separately as well")
        bundle = rest or ca
        if not bundle:
            raise FormatError(
                f"{what}: no ASK/ARK; give AMD's ask_ark_<generation>.cert (--ark, or --ask and --ark)"
            )
        ask, ark = parse_ca_bundle(bundle, f"{what} ASK/ARK" if rest else "ASK/ARK")
        return cls(certs[0], certs[1], certs[2], certs[3], ask, ark)

    @classmethod
    def from_separate(
        cls, pdh: bytes, pek: bytes, oca: bytes, cek: bytes, ask: bytes, ark: bytes
    ) -> CertificateChain:
        """From one file per certificate (the ARK may be the unsigned Naples one)."""
        return cls(
            _sev_cert(pdh, Usage.PDH, "PDH certificate"),
            _sev_cert(pek, Usage.PEK, "PEK certificate"),
            _sev_cert(oca, Usage.OCA, "OCA certificate"),
            _sev_cert(cek, Usage.CEK, "CEK certificate"),
            _amd_cert(ask, Usage.ASK, "ASK certificate"),
            _amd_cert(ark, Usage.ARK, "ARK certificate"),
        )

    @classmethod
    def from_full(cls, data: bytes) -> CertificateChain:
        """PDH||PEK||OCA||CEK||ASK||ARK, as `sevctl export --full` writes it."""
        data = bytes(data)
        if len(data) <= EXPORT_SIZE:
            raise FormatError(
                f"full chain: {len(data)} bytes; PDH|PEK|OCA|CEK|ASK|ARK is {EXPORT_SIZE} bytes plus ASK and ARK"
            )
        return cls.from_parts(data, what="full chain")

    @classmethod
    def from_qmp(cls, pdh_b64: str | bytes, cert_chain_b64: str | bytes, ca_bytes: bytes) -> CertificateChain:
        """QEMU query-sev-capabilities / libvirt: base64 PDH and base64 PEK||OCA||CEK, plus ASK||ARK."""
        pdh = _decode_b64(pdh_b64, "pdh (base64)")
        chain = _decode_b64(cert_chain_b64, "cert-chain (base64)")
        if len(chain) != CERT_CHAIN_SIZE:
            raise FormatError(f"cert-chain: {len(chain)} bytes, expected PEK|OCA|CEK ({CERT_CHAIN_SIZE} bytes)")
        return cls.from_parts(chain, ca=ca_bytes, pdh=pdh, what="cert-chain")

    def to_full(self) -> bytes:
        return b"".join(
            c.to_bytes() for c in (self.pdh, self.pek, self.oca, self.cek, self.ask, self.ark)
        )

    def verify(self, trust_anchors: Iterable[TrustAnchor] = ()) -> ChainReport:
        """verify_chain that raises VerificationError naming the first failed link."""
        report = verify_chain(self, trust_anchors)
        failed = report.failures
        if failed:
            raise VerificationError(
                "certificate chain invalid: " + "; ".join(f"{link.name}: {link.why}" for link in failed)
            )
        return report


@dataclass(frozen=True)
class ChainLink:
    name: str
    ok: bool
    why: str


@dataclass(frozen=True)
class ChainReport:
    links: tuple[ChainLink, ...]
    root: str  # "AMD Milan", "trust anchor 'sim'", or "" when no root was accepted

    @property
    def ok(self) -> bool:
        return all(link.ok for link in self.links)

    @property
    def failures(self) -> tuple[ChainLink, ...]:
        return tuple(link for link in self.links if not link.ok)

    def to_json(self) -> dict[str, object]:
        """The verdict and every link as JSON-ready data, for `owner verify-chain --json`."""
        return {"ok": self.ok, "root": self.root or None,
                "links": [{"name": link.name, "ok": link.ok, "why": link.why} for link in self.links]}


def _check(name: str, check: Callable[[], str]) -> ChainLink:
    try:
        return ChainLink(name, True, check())
    except SevhookError as exc:
        return ChainLink(name, False, exc.message)


def _root_link(ark: AmdCertificate, anchors: tuple[TrustAnchor, ...]) -> tuple[ChainLink, str]:
    key_id = ark.key_id.hex()
    root = pinned_root(ark)
    if root is not None:
        if not ark.is_signed and root is NAPLES_ROOT:
            # AMD first published the Naples ARK unsigned; its key itself is pinned, so it stands alone.
            return ChainLink("ARK", True, f"AMD Naples root {key_id} (pinned key), unsigned as AMD first "
                             "published it: accepted by its pinned key, not by a signature"), "AMD Naples"
        link = _check("ARK", lambda: _self_signed(ark, f"AMD {root.name} root {key_id} (pinned key)"))
        return link, f"AMD {root.name}" if link.ok else ""
    for anchor in anchors:
        if anchor.matches(ark):
            link = _check("ARK", lambda anchor=anchor: _self_signed(ark, f"trust anchor '{anchor.name}' {key_id}"))
            return link, f"trust anchor '{anchor.name}'" if link.ok else ""
    claimed = root_for_key_id(ark.key_id)
    if claimed is not None:
        why = (f"ARK claims AMD {claimed.name}'s key id {key_id} but holds a different key: "
               "not AMD's root (forged or corrupted); download ask_ark from AMD again")
    else:
        why = (f"ARK {key_id} is not one of AMD's published roots (Naples, Rome, Milan, Genoa, Turin); "
               "if you trust it, name it with --trust-anchor FILE")
    return ChainLink("ARK", False, why), ""


def _self_signed(ark: AmdCertificate, label: str) -> str:
    if ark.usage != Usage.ARK:
        raise VerificationError(f"root certificate has usage {ark.usage.name}, expected ARK")
    if not ark.is_signed:
        raise VerificationError(f"{label} is unsigned; only AMD's pinned Naples root may be")
    ark.verify_signed_by(ark)
    return f"{label}, self-signature valid"


def _signed(child: SevCertificate | AmdCertificate, signer: SevCertificate | AmdCertificate, label: str) -> str:
    child.verify_signed_by(signer)  # type: ignore[arg-type]
    return label


def _cek_by_ask(cek: SevCertificate, ask: AmdCertificate) -> str:
    try:
        cek.verify_signed_by(ask)
    except VerificationError as exc:
        raise VerificationError(
            f"{exc.message}. The CEK from PDH_CERT_EXPORT/QMP is not AMD-signed: fetch the signed CEK from "
            "AMD's key server (e.g. `sevctl export --full`) and check that the ASK/ARK match the CPU generation"
        ) from exc
    return f"CEK signed by ASK {ask.key_id.hex()} (RSA-PSS)"


def verify_chain(chain: CertificateChain, trust_anchors: Iterable[TrustAnchor] = ()) -> ChainReport:
    """Check every link, continuing after a failure so the report shows them all."""
    anchors = tuple(trust_anchors)
    root_link, root = _root_link(chain.ark, anchors)
    links = [
        root_link,
        _check("ARK -> ASK", lambda: _ask_link(chain.ask, chain.ark)),
        _check("ASK -> CEK", lambda: _cek_by_ask(chain.cek, chain.ask)),
        _check("CEK -> PEK", lambda: _signed(chain.pek, chain.cek, "PEK signed by CEK (ECDSA)")),
        _check("OCA (self-signed)", lambda: _signed(chain.oca, chain.oca, "OCA self-signature valid")),
        _check("OCA -> PEK", lambda: _signed(chain.pek, chain.oca, "PEK signed by OCA (ECDSA)")),
        _check("PEK -> PDH", lambda: _signed(chain.pdh, chain.pek, "PDH signed by PEK (ECDSA)")),
    ]
    return ChainReport(tuple(links), root)


def _ask_link(ask: AmdCertificate, ark: AmdCertificate) -> str:
    if ask.usage != Usage.ASK:
        raise VerificationError(f"ASK certificate has usage {ask.usage.name}, expected ASK (0x13)")
    ask.verify_signed_by(ark)  # an unsigned Naples ARK still carries the key that signed the ASK
    return f"ASK {ask.key_id.hex()} signed by ARK (RSA-PSS)"
