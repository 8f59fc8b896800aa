"""AMD's published ARK roots pinned as constants, and explicit user-named trust anchors.

A root is recognised by its key id AND a SHA-256 fingerprint of its public key (exponent and
modulus as stored): a key id alone is public and a forged self-signed ARK could copy it. The
product never reads root files at run time; users pass the ARK/ASK they downloaded from AMD."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from sevhook.errors import FormatError, UsageError
from sevhook.files import InputFileError, read_input_file
from sevhook.sev.certs import AmdCertificate, Usage, parse_ca_bundle

MAX_ANCHOR_BYTES = 64 * 1024
"""An ASK||ARK bundle is about 2 KiB: a bigger trust-anchor file is the wrong file (or endless), not read whole."""


@dataclass(frozen=True)
class PinnedRoot:
    """One AMD product generation's ARK: its key id, its key fingerprint and its ASK's key id."""

    name: str
    ark_key_id: bytes
    ark_key_sha256: bytes
    ask_key_id: bytes


def _root(name: str, ark_id: str, ark_sha256: str, ask_id: str) -> PinnedRoot:
    return PinnedRoot(name, bytes.fromhex(ark_id), bytes.fromhex(ark_sha256), bytes.fromhex(ask_id))


AMD_ROOTS: tuple[PinnedRoot, ...] = (
    _root("Naples", "1bb987c359494606b174945601c9ea5b",
          "fb61bb1bf3b399dfb7c811390c25845d74369aae5f2a77e25710c86cc2ecb158", "e139970cfc464377ae61b289e2f9e96e"),
    _root("Rome", "e6002122fb58419399d15fee7b131351",
          "227cc97640363424696c3e80d4d17902a5e1784cc5805a9eb5acc00620661a71", "c6cbcf145b3146f498e40ecb4ad4fded"),
    _root("Milan", "94c38e4177d0479292a7ae671d083fb6",
          "5201496b2232d81cf2ae75b867e7b8516f81a3d4d0dc876138051927a5a20bab", "73478c05cc174bfeb06e718fa75dc3c8"),
    _root("Genoa", "9f9d4a8fe761456599f6946c4c010f3a",
          "6be9aa11d1b8c246ba0e67c8cb850f249e8fa0690adcba97189f223885e6a91b", "acbb4ad21acc436fb3e932f812cd01b0"),
    _root("Turin", "d05c3a8bde484904b49552422ceb3942",
          "1d1245f774fd7190e5380751a9338c3dc63c89d75c44c1faa317bfffe4bd00c7", "15051693f7304d65a527b4a7f3f7cb77"),
)
NAPLES_ROOT = AMD_ROOTS[0]


def key_fingerprint(cert: AmdCertificate) -> bytes:
    return hashlib.sha256(cert.public_key_bytes).digest()


def root_for_key_id(key_id: bytes) -> PinnedRoot | None:
    """The generation whose ARK has this key id (the key itself is not checked here)."""
    return next((root for root in AMD_ROOTS if root.ark_key_id == key_id), None)


def pinned_root(ark: AmdCertificate) -> PinnedRoot | None:
    """The AMD generation this ARK is, when both its key id and its key match AMD's published root."""
    root = root_for_key_id(ark.key_id)
    if root is not None and key_fingerprint(ark) == root.ark_key_sha256:
        return root
    return None


@dataclass(frozen=True)
class TrustAnchor:
    """A root the user trusts explicitly by name (e.g. a software platform's ARK)."""

    name: str
    ark: AmdCertificate

    def matches(self, ark: AmdCertificate) -> bool:
        return ark.key_id == self.ark.key_id and ark.public_key_bytes == self.ark.public_key_bytes

    @classmethod
    def load(cls, path: Path | str, name: str | None = None) -> TrustAnchor:
        """Read an ARK file, or an ASK||ARK bundle (the ARK is taken); named after the file by default."""
        path = Path(path)
        try:
            data = read_input_file(path, MAX_ANCHOR_BYTES, "trust anchor")
        except InputFileError as exc:
            if not exc.too_large:
                raise
            raise UsageError(f"trust anchor {path}: larger than {MAX_ANCHOR_BYTES} bytes, too large for an ARK "
                             "or ASK||ARK bundle; check that it is the right file") from exc
        try:
            ark = AmdCertificate.parse(data, f"trust anchor {path}")
        except FormatError as single_error:
            try:
                ark = parse_ca_bundle(data, f"trust anchor {path}")[1]
            except FormatError as exc:
                raise single_error from exc
        if ark.usage != Usage.ARK:
            raise FormatError(f"trust anchor {path}: holds an {ark.usage.name}, expected an ARK (root) certificate")
        if not ark.is_signed:
            raise FormatError(f"trust anchor {path}: the ARK is unsigned; only AMD's pinned Naples root may be")
        return cls(name or path.name, ark)
