"""SEV platform certificates (2084-byte `sev_cert`) and AMD root certificates (ARK/ASK `amd_cert`).

Both formats store integers little-endian, including RSA moduli and signatures, so every key and
signature is byte-reversed on its way to and from `cryptography`. Parsing keeps every byte (reserved
fields, unused signature bytes) so that `to_bytes()` reproduces the input exactly and a flipped byte in
a signed region is caught by the signature check rather than lost in parsing."""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field, replace
from functools import cached_property

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from sevhook.errors import FormatError, VerificationError
from sevhook.sev.sizes import SEV_CERT_SIZE


class Usage(enum.IntEnum):
    """`pub_key_usage` / signature usage values (SEV-KM API appendix C)."""

    ARK = 0x0000
    ASK = 0x0013
    INVALID = 0x1000
    OCA = 0x1001
    PEK = 0x1002
    PDH = 0x1003
    CEK = 0x1004


class Algorithm(enum.IntEnum):
    """`pub_key_algo` / signature algorithm values; the low byte names the family, the high byte the hash."""

    NONE = 0x0000
    RSA_SHA256 = 0x0001
    ECDSA_SHA256 = 0x0002
    ECDH_SHA256 = 0x0003
    RSA_SHA384 = 0x0101
    ECDSA_SHA384 = 0x0102
    ECDH_SHA384 = 0x0103

    @property
    def family(self) -> str:
        return {0: "none", 1: "rsa", 2: "ecdsa", 3: "ecdh"}[self.value & 0xFF]

    def hash(self) -> hashes.HashAlgorithm:
        """The digest the algorithm signs with (SHA-256 or SHA-384)."""
        return hashes.SHA384() if self.value & 0x100 else hashes.SHA256()


class Curve(enum.IntEnum):
    P256 = 1
    P384 = 2


_CURVES: dict[Curve, ec.EllipticCurve] = {Curve.P256: ec.SECP256R1(), Curve.P384: ec.SECP384R1()}
_CURVE_IDS = {"secp256r1": Curve.P256, "secp384r1": Curve.P384}

SEV_CERT_VERSION = 1
SIGNED_END = 0x414  # version .. end of the public-key union: the region every signature covers
PUBKEY_SIZE = 0x404
SIG_SIZE = 0x200
EC_COORD_SIZE = 72  # qx, qy, r and s are 72-byte little-endian fields
SIGNING_USAGES = frozenset({Usage.ARK, Usage.ASK, Usage.OCA, Usage.PEK, Usage.CEK, Usage.PDH})
SIGNING_ALGORITHMS = frozenset(
    {Algorithm.RSA_SHA256, Algorithm.RSA_SHA384, Algorithm.ECDSA_SHA256, Algorithm.ECDSA_SHA384}
)


def _le(value: int, size: int, what: str) -> bytes:
    try:
        return value.to_bytes(size, "little")
    except OverflowError as exc:
        raise FormatError(f"{what} does not fit in {size} bytes") from exc


def _enum(kind: type[enum.IntEnum], value: int, what: str) -> enum.IntEnum:
    try:
        return kind(value)
    except ValueError as exc:
        names = ", ".join(f"{m.name}={m.value:#x}" for m in kind)
        raise FormatError(f"{what} {value:#x} is not a known value ({names})") from exc


def signing_algorithm_for(private_or_public_key: object) -> Algorithm:
    """The signature algorithm a key signs with in SEV certificates (P-384/P-256 -> ECDSA_SHA256,
    RSA-2048 -> RSA_SHA256, RSA-4096 -> RSA_SHA384, as AMD's chains use)."""
    if isinstance(private_or_public_key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        return Algorithm.ECDSA_SHA256
    if isinstance(private_or_public_key, (rsa.RSAPrivateKey, rsa.RSAPublicKey)):
        return Algorithm.RSA_SHA256 if private_or_public_key.key_size <= 2048 else Algorithm.RSA_SHA384
    raise FormatError(f"unsupported key type {type(private_or_public_key).__name__}: use P-384 or RSA")


def _rsa_pss(algorithm: Algorithm) -> padding.PSS:
    return padding.PSS(mgf=padding.MGF1(algorithm.hash()), salt_length=padding.PSS.DIGEST_LENGTH)


def _verify(public_key: object, algorithm: Algorithm, signature: bytes, message: bytes) -> bool:
    """Check one signature in SEV wire form (LE r/s, or LE RSA integer); False on any mismatch."""
    try:
        if algorithm.family == "ecdsa" and isinstance(public_key, ec.EllipticCurvePublicKey):
            r = int.from_bytes(signature[:EC_COORD_SIZE], "little")
            s = int.from_bytes(signature[EC_COORD_SIZE : 2 * EC_COORD_SIZE], "little")
            public_key.verify(encode_dss_signature(r, s), message, ec.ECDSA(algorithm.hash()))
            return True
        if algorithm.family == "rsa" and isinstance(public_key, rsa.RSAPublicKey):
            size = public_key.key_size // 8
            public_key.verify(signature[:size][::-1], message, _rsa_pss(algorithm), algorithm.hash())
            return True
    except (InvalidSignature, ValueError, UnsupportedAlgorithm):
        return False
    return False


def _sign(private_key: object, algorithm: Algorithm, message: bytes, slot_size: int) -> bytes:
    """Sign in SEV wire form, zero-padded to `slot_size`."""
    if algorithm.family == "ecdsa" and isinstance(private_key, ec.EllipticCurvePrivateKey):
        r, s = decode_dss_signature(private_key.sign(message, ec.ECDSA(algorithm.hash())))
        raw = _le(r, EC_COORD_SIZE, "ECDSA r") + _le(s, EC_COORD_SIZE, "ECDSA s")
    elif algorithm.family == "rsa" and isinstance(private_key, rsa.RSAPrivateKey):
        raw = private_key.sign(message, _rsa_pss(algorithm), algorithm.hash())[::-1]
    else:
        raise FormatError(f"cannot sign with {algorithm.name} using a {type(private_key).__name__}")
    return raw.ljust(slot_size, b"\0")


@dataclass(frozen=True)
class Signature:
    """One of the two 520-byte signature slots of a SEV certificate (usage, algorithm, 512 data bytes).

    usage and algorithm stay raw integers: an empty slot may hold anything outside the valid values."""

    usage: int
    algorithm: int
    data: bytes = field(repr=False)

    @classmethod
    def empty(cls) -> Signature:
        return cls(Usage.INVALID, Algorithm.NONE, bytes(SIG_SIZE))

    @property
    def is_empty(self) -> bool:
        """A slot counts only with a signing usage and a signature algorithm (as virtee decides)."""
        return self.usage not in SIGNING_USAGES or self.algorithm not in SIGNING_ALGORITHMS

    def to_bytes(self) -> bytes:
        return struct.pack("<II", self.usage, self.algorithm) + self.data

    def describe(self) -> str:
        if self.is_empty:
            return "empty"
        return f"{Usage(self.usage).name}/{Algorithm(self.algorithm).name}"


@dataclass(frozen=True)
class SevCertificate:
    """A 2084-byte SEV certificate (PDH, PEK, OCA, CEK, or a guest owner's GODH)."""

    version: int
    api_major: int
    api_minor: int
    reserved: int  # the u16 at 0x006, kept for a byte-exact round trip
    usage: Usage
    algorithm: Algorithm
    pubkey: bytes = field(repr=False)  # the 1028-byte public-key union, raw
    signatures: tuple[Signature, Signature]

    @classmethod
    def parse(cls, data: bytes, what: str = "SEV certificate") -> SevCertificate:
        """Parse exactly 2084 bytes; `what` names the input in error messages."""
        data = bytes(data)
        if len(data) != SEV_CERT_SIZE:
            raise FormatError(f"{what}: {len(data)} bytes, a SEV certificate is exactly {SEV_CERT_SIZE}")
        version, api_major, api_minor, reserved, usage, algorithm = struct.unpack_from("<IBBHII", data, 0)
        if version != SEV_CERT_VERSION:
            raise FormatError(f"{what}: version {version}, only version 1 SEV certificates exist")
        slots = []
        for offset in (SIGNED_END, SIGNED_END + 8 + SIG_SIZE):
            slot_usage, slot_algorithm = struct.unpack_from("<II", data, offset)
            slots.append(Signature(slot_usage, slot_algorithm, data[offset + 8 : offset + 8 + SIG_SIZE]))
        return cls(
            version=version,
            api_major=api_major,
            api_minor=api_minor,
            reserved=reserved,
            usage=_enum(Usage, usage, f"{what}: pub_key_usage"),
            algorithm=_enum(Algorithm, algorithm, f"{what}: pub_key_algo"),
            pubkey=data[0x10:SIGNED_END],
            signatures=(slots[0], slots[1]),
        )

    def body(self) -> bytes:
        """The signed region [0x000, 0x414)."""
        head = struct.pack(
            "<IBBHII", self.version, self.api_major, self.api_minor, self.reserved, self.usage, self.algorithm
        )
        return head + self.pubkey

    def to_bytes(self) -> bytes:
        return self.body() + self.signatures[0].to_bytes() + self.signatures[1].to_bytes()

    @classmethod
    def generate(
        cls, usage: Usage, public_key: ec.EllipticCurvePublicKey, api_major: int = 0, api_minor: int = 0
    ) -> SevCertificate:
        """A new certificate with both signature slots empty (a GODH, or a PEK/OCA/CEK/PDH before signing).
        The PDH gets algorithm ECDH_SHA256, every other usage ECDSA_SHA256."""
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or public_key.curve.name not in _CURVE_IDS:
            raise FormatError("SEV certificates hold P-384 (or P-256) keys; got another key type")
        numbers = public_key.public_numbers()
        pubkey = (
            struct.pack("<I", _CURVE_IDS[public_key.curve.name])
            + numbers.x.to_bytes(EC_COORD_SIZE, "little")
            + numbers.y.to_bytes(EC_COORD_SIZE, "little")
        ).ljust(PUBKEY_SIZE, b"\0")
        algorithm = Algorithm.ECDH_SHA256 if usage == Usage.PDH else Algorithm.ECDSA_SHA256
        return cls(SEV_CERT_VERSION, api_major, api_minor, 0, Usage(usage), algorithm, pubkey,
                   (Signature.empty(), Signature.empty()))

    def sign(self, signer_usage: Usage, signer_private_key: object) -> SevCertificate:
        """A copy signed by the given key into the first empty slot (ECDSA-SHA256 for EC keys,
        RSA-PSS SHA-256/384 for RSA-2048/4096 as an ASK signs a CEK)."""
        algorithm = signing_algorithm_for(signer_private_key)
        data = _sign(signer_private_key, algorithm, self.body(), SIG_SIZE)
        slots = list(self.signatures)
        for index, slot in enumerate(slots):
            if slot.is_empty:
                slots[index] = Signature(Usage(signer_usage), algorithm, data)
                return replace(self, signatures=(slots[0], slots[1]))
        raise FormatError(f"{self.usage.name} certificate has no empty signature slot left")

    @cached_property
    def _public_key(self) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
        family = self.algorithm.family
        name = self.usage.name
        if family in ("ecdsa", "ecdh"):
            curve_id = struct.unpack_from("<I", self.pubkey, 0)[0]
            if curve_id not in _CURVES:
                raise FormatError(f"{name} certificate: unknown curve {curve_id} (1 = P-256, 2 = P-384)")
            x = int.from_bytes(self.pubkey[4 : 4 + EC_COORD_SIZE], "little")
            y = int.from_bytes(self.pubkey[4 + EC_COORD_SIZE : 4 + 2 * EC_COORD_SIZE], "little")
            try:
                return ec.EllipticCurvePublicNumbers(x, y, _CURVES[Curve(curve_id)]).public_key()
            except ValueError as exc:
                raise FormatError(f"{name} certificate: the public key is not a point on its curve") from exc
        if family == "rsa":
            bits = struct.unpack_from("<I", self.pubkey, 0)[0]
            exponent = int.from_bytes(self.pubkey[4:516], "little")
            modulus = int.from_bytes(self.pubkey[516:1028], "little")
            try:
                key = rsa.RSAPublicNumbers(exponent, modulus).public_key()
            except ValueError as exc:
                raise FormatError(f"{name} certificate: invalid RSA public key") from exc
            if key.key_size != bits:
                raise FormatError(f"{name} certificate: modulus_size says {bits} bits, the modulus has {key.key_size}")
            return key
        raise FormatError(f"{name} certificate: algorithm {self.algorithm.name} carries no public key")

    def public_key(self) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
        """The certified key, loaded once per certificate object."""
        return self._public_key

    def verify_signed_by(self, signer: SevCertificate | AmdCertificate) -> Signature:
        """Check that a non-empty slot carries a valid signature by `signer`; returns that slot.

        The slot's usage must equal the signer's usage and its algorithm the signer's signing
        algorithm (sev-tool and virtee check the same)."""
        if isinstance(signer, AmdCertificate):
            signer_usage, expected = int(signer.usage), signer.signing_algorithm
        else:
            signer_usage, expected = int(signer.usage), signer.algorithm
        candidates = [slot for slot in self.signatures if not slot.is_empty and slot.usage == signer_usage]
        if not candidates:
            present = ", ".join(slot.describe() for slot in self.signatures)
            raise VerificationError(
                f"{self.usage.name} certificate has no signature by {Usage(signer_usage).name} (slots: {present})"
            )
        key = signer.public_key()
        body = self.body()
        for slot in candidates:
            if slot.algorithm != expected:
                continue
            if _verify(key, Algorithm(slot.algorithm), slot.data, body):
                return slot
        found = ", ".join(Algorithm(slot.algorithm).name for slot in candidates)
        if all(slot.algorithm != expected for slot in candidates):
            raise VerificationError(
                f"{self.usage.name} certificate: the {Usage(signer_usage).name} signature uses {found}, "
                f"but the {Usage(signer_usage).name} key signs with {Algorithm(expected).name}"
            )
        raise VerificationError(
            f"{self.usage.name} certificate: the {Usage(signer_usage).name} signature ({found}) does not verify "
            f"with the {Usage(signer_usage).name} key (altered certificate, or signed by a different key)"
        )


AMD_CERT_VERSION = 1
AMD_HEADER_SIZE = 0x40
AMD_KEY_SIZES = frozenset({2048, 4096})
AMD_USAGES = frozenset({Usage.ARK, Usage.ASK})
NAPLES_ARK_KEY_ID = bytes.fromhex("1bb987c359494606b174945601c9ea5b")


@dataclass(frozen=True)
class AmdCertificate:
    """An AMD root certificate (ARK or ASK) in AMD's RSA format: 64-byte header, then exponent,
    modulus and signature, all little-endian. `signature` is None only for the Naples ARK, which AMD
    first published unsigned (576 bytes); parse() accepts that form for the Naples key id only."""

    version: int
    key_id: bytes
    certifying_id: bytes
    usage: Usage
    reserved: bytes
    pub_exp_size: int  # bits
    modulus_size: int  # bits
    pub_exp: bytes  # LE, pub_exp_size/8 bytes
    modulus: bytes  # LE, modulus_size/8 bytes
    signature: bytes | None  # LE, modulus_size/8 bytes

    @staticmethod
    def _sizes(data: bytes, what: str) -> tuple[int, int]:
        if len(data) < AMD_HEADER_SIZE:
            raise FormatError(f"{what}: {len(data)} bytes, too short for an AMD certificate header (64 bytes)")
        version = struct.unpack_from("<I", data, 0)[0]
        if version != AMD_CERT_VERSION:
            raise FormatError(f"{what}: version {version}, AMD ARK/ASK certificates are version 1")
        pub_exp_size, modulus_size = struct.unpack_from("<II", data, 0x38)
        if modulus_size not in AMD_KEY_SIZES or pub_exp_size != modulus_size:
            raise FormatError(
                f"{what}: key sizes {pub_exp_size}/{modulus_size} bits; AMD certificates use 2048 or 4096 "
                "for both exponent and modulus"
            )
        return pub_exp_size, modulus_size

    @classmethod
    def parse_prefix(cls, data: bytes, what: str = "AMD certificate") -> tuple[AmdCertificate, int]:
        """Parse one certificate at the start of `data` (as in AMD's ask_ark_*.cert, ASK then ARK);
        returns it and the number of bytes it took."""
        data = bytes(data)
        pub_exp_size, modulus_size = cls._sizes(data, what)
        exp_end = AMD_HEADER_SIZE + pub_exp_size // 8
        mod_end = exp_end + modulus_size // 8
        full_end = mod_end + modulus_size // 8
        key_id = data[0x04:0x14]
        if len(data) >= full_end:
            signature: bytes | None = data[mod_end:full_end]
            end = full_end
        elif len(data) == mod_end and key_id == NAPLES_ARK_KEY_ID:
            signature, end = None, mod_end
        else:
            raise FormatError(
                f"{what}: {len(data)} bytes, but a {modulus_size}-bit AMD certificate needs {full_end} "
                "(truncated file, or not an AMD ARK/ASK certificate)"
            )
        return (
            cls(
                version=AMD_CERT_VERSION,
                key_id=key_id,
                certifying_id=data[0x14:0x24],
                usage=_enum(Usage, struct.unpack_from("<I", data, 0x24)[0], f"{what}: key_usage"),
                reserved=data[0x28:0x38],
                pub_exp_size=pub_exp_size,
                modulus_size=modulus_size,
                pub_exp=data[AMD_HEADER_SIZE:exp_end],
                modulus=data[exp_end:mod_end],
                signature=signature,
            ),
            end,
        )

    @classmethod
    def parse(cls, data: bytes, what: str = "AMD certificate") -> AmdCertificate:
        """Parse exactly one ARK or ASK certificate."""
        cert, used = cls.parse_prefix(data, what)
        if cert.usage not in AMD_USAGES:
            raise FormatError(f"{what}: key_usage {cert.usage.name}, expected ARK (0x0) or ASK (0x13)")
        if used != len(data):
            raise FormatError(f"{what}: {len(data) - used} bytes after the certificate (expected {used} bytes)")
        return cert

    @property
    def signed_part(self) -> bytes:
        """Everything but the signature: the region the RSA-PSS signature covers."""
        head = struct.pack("<I", self.version) + self.key_id + self.certifying_id
        head += struct.pack("<I", self.usage) + self.reserved + struct.pack("<II", self.pub_exp_size, self.modulus_size)
        return head + self.pub_exp + self.modulus

    @property
    def public_key_bytes(self) -> bytes:
        """Exponent and modulus as stored: what a pinned root's fingerprint is taken over."""
        return self.pub_exp + self.modulus

    def to_bytes(self) -> bytes:
        return self.signed_part + (self.signature or b"")

    @property
    def is_signed(self) -> bool:
        return self.signature is not None

    @property
    def signing_algorithm(self) -> Algorithm:
        """RSA-PSS with SHA-256 for 2048-bit keys (Naples) and SHA-384 for 4096-bit keys."""
        return Algorithm.RSA_SHA256 if self.modulus_size == 2048 else Algorithm.RSA_SHA384

    @cached_property
    def _public_key(self) -> rsa.RSAPublicKey:
        try:
            return rsa.RSAPublicNumbers(
                int.from_bytes(self.pub_exp, "little"), int.from_bytes(self.modulus, "little")
            ).public_key()
        except ValueError as exc:
            raise FormatError(f"{self.usage.name} certificate {self.key_id.hex()}: invalid RSA public key") from exc

    def public_key(self) -> rsa.RSAPublicKey:
        return self._public_key

    def verify_signed_by(self, signer: AmdCertificate) -> None:
        """Check certifying_id and the RSA-PSS signature (raises VerificationError)."""
        name = f"{self.usage.name} {self.key_id.hex()}"
        if self.certifying_id != signer.key_id:
            raise VerificationError(
                f"{name} is certified by key id {self.certifying_id.hex()}, not by {signer.usage.name} "
                f"{signer.key_id.hex()} (the ARK and ASK are from different product generations?)"
            )
        if self.signature is None:
            raise VerificationError(f"{name} carries no signature (unsigned certificate)")
        algorithm = signer.signing_algorithm
        if not _verify(signer.public_key(), algorithm, self.signature, self.signed_part):
            raise VerificationError(
                f"{name}: the RSA-PSS {algorithm.hash().name.upper()} signature by {signer.usage.name} "
                f"{signer.key_id.hex()} does not verify (altered or corrupted certificate)"
            )

    @classmethod
    def build(cls, key_id: bytes, certifying_id: bytes, usage: Usage, public_key: rsa.RSAPublicKey) -> AmdCertificate:
        """An unsigned ARK/ASK for an emulated platform; call sign() with the certifying key."""
        if len(key_id) != 16 or len(certifying_id) != 16:
            raise FormatError("AMD certificate key ids are 16 bytes")
        if not isinstance(public_key, rsa.RSAPublicKey) or public_key.key_size not in AMD_KEY_SIZES:
            raise FormatError("AMD certificates hold RSA-2048 or RSA-4096 keys")
        bits = public_key.key_size
        numbers = public_key.public_numbers()
        return cls(
            version=AMD_CERT_VERSION,
            key_id=bytes(key_id),
            certifying_id=bytes(certifying_id),
            usage=Usage(usage),
            reserved=bytes(16),
            pub_exp_size=bits,
            modulus_size=bits,
            pub_exp=numbers.e.to_bytes(bits // 8, "little"),
            modulus=numbers.n.to_bytes(bits // 8, "little"),
            signature=None,
        )

    def sign(self, private_key: rsa.RSAPrivateKey) -> AmdCertificate:
        """A copy signed with RSA-PSS (salt = digest length) by the certifying key."""
        if not isinstance(private_key, rsa.RSAPrivateKey):
            raise FormatError("AMD certificates are signed with an RSA key")
        algorithm = Algorithm.RSA_SHA256 if private_key.key_size == 2048 else Algorithm.RSA_SHA384
        signature = _sign(private_key, algorithm, self.signed_part, self.modulus_size // 8)
        return replace(self, signature=signature[: self.modulus_size // 8])


def parse_ca_bundle(data: bytes, what: str = "ARK/ASK file") -> tuple[AmdCertificate, AmdCertificate]:
    """Split AMD's ask_ark_<gen>.cert (ASK then ARK, concatenated) into (ask, ark); either order is
    accepted and sorted by usage."""
    data = bytes(data)
    first, used = AmdCertificate.parse_prefix(data, f"{what} (first certificate)")
    if used >= len(data):
        raise FormatError(f"{what}: holds one certificate; expected the ASK and the ARK concatenated")
    second = AmdCertificate.parse(data[used:], f"{what} (second certificate)")
    certs = {first.usage: first, second.usage: second}
    if set(certs) != {Usage.ASK, Usage.ARK}:
        raise FormatError(
            f"{what}: holds {first.usage.name} and {second.usage.name}; expected one ASK and one ARK"
        )
    return certs[Usage.ASK], certs[Usage.ARK]
