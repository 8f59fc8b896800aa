"""The LAUNCH_START session: the guest owner wraps a fresh TEK/TIK so that only the platform holding
the PDH private key can unwrap them, and binds the exact 32-bit policy with a MAC under the TIK.

Owner side: create_session(); firmware side (for the software platform): open_session()."""

from __future__ import annotations

import base64
import hmac
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from sevhook.errors import FormatError, UsageError, VerificationError
from sevhook.files import InputFileError, read_input_file, write_private_file
from sevhook.sev.certs import SevCertificate, Usage
from sevhook.sev.kdf import sev_kdf

SESSION_SIZE = 0x80
KEY_SIZE = 16
MAX_POLICY = 0xFFFF_FFFF

# SEV firmware return codes open_session can produce (sev_ret_code)
SEV_RET_INVALID_LEN = 0x04
SEV_RET_INVALID_CERTIFICATE = 0x06
SEV_RET_POLICY_FAILURE = 0x07
SEV_RET_BAD_SIGNATURE = 0x0A
SEV_RET_INVALID_PARAM = 0x16


class SessionRejected(VerificationError):
    """The firmware side refused a LAUNCH_START session; fw_error is the SEV return code."""

    def __init__(self, fw_error: int, message: str) -> None:
        super().__init__(message)
        self.fw_error = fw_error


@dataclass(frozen=True)
class SessionBlob:
    """`sev_session_buf`, 128 bytes: nonce, wrapped TEK||TIK, wrap IV, wrap MAC, policy MAC."""

    nonce: bytes
    wrap_tk: bytes
    wrap_iv: bytes
    wrap_mac: bytes
    policy_mac: bytes

    @classmethod
    def parse(cls, data: bytes, what: str = "session blob") -> SessionBlob:
        data = bytes(data)
        if len(data) != SESSION_SIZE:
            raise FormatError(f"{what}: {len(data)} bytes, a SEV launch session blob is exactly {SESSION_SIZE}")
        return cls(data[0x00:0x10], data[0x10:0x30], data[0x30:0x40], data[0x40:0x60], data[0x60:0x80])

    def to_bytes(self) -> bytes:
        return self.nonce + self.wrap_tk + self.wrap_iv + self.wrap_mac + self.policy_mac


def _check_policy(policy: int) -> bytes:
    if not 0 <= policy <= MAX_POLICY:
        raise FormatError(f"SEV policy {policy:#x} does not fit in 32 bits")
    return struct.pack("<I", policy)


def derive_kek_kik(shared_secret: bytes, nonce: bytes) -> tuple[bytes, bytes]:
    """master = KDF(Z, "sev-master-secret", nonce); KEK/KIK = KDF(master, "sev-kek"/"sev-kik", "")."""
    master = sev_kdf(shared_secret, b"sev-master-secret", nonce, 128)
    return sev_kdf(master, b"sev-kek", b"", 128), sev_kdf(master, b"sev-kik", b"", 128)


def aes_ctr(key: bytes, iv: bytes, data: bytes) -> bytes:
    """AES-128-CTR with the full 16-byte IV as the initial counter block (encrypt = decrypt): the SEV
    transport cipher, for TEK||TIK under the KEK here and for LAUNCH_SECRET payloads under the TEK."""
    context = Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()
    return context.update(data) + context.finalize()


def policy_mac(tik: bytes, policy: int) -> bytes:
    """HMAC-SHA256(TIK, policy as u32 LE): the exact integer, minimum API bytes included."""
    return hmac.digest(tik, _check_policy(policy), "sha256")


def build_session_blob(
    shared_secret: bytes, nonce: bytes, wrap_iv: bytes, tek: bytes, tik: bytes, policy: int
) -> SessionBlob:
    """The deterministic part of session creation, from the ECDH secret and all random inputs."""
    kek, kik = derive_kek_kik(shared_secret, nonce)
    wrap_tk = aes_ctr(kek, wrap_iv, tek + tik)
    return SessionBlob(
        nonce=nonce,
        wrap_tk=wrap_tk,
        wrap_iv=wrap_iv,
        wrap_mac=hmac.digest(kik, wrap_tk, "sha256"),
        policy_mac=policy_mac(tik, policy),
    )


_KEY_FILE_READ_LIMIT = 4096


def read_key_file(path: Path | str, what: str) -> bytes:
    """Read a raw 16-byte TEK/TIK file (as sevctl writes NAME_tek.bin / NAME_tik.bin); at most a page is read,
    enough to name a wrong file's size, so an endless one (/dev/zero) cannot hang the read."""
    try:
        data = read_input_file(path, _KEY_FILE_READ_LIMIT, f"{what} file")
    except InputFileError as exc:
        if not exc.too_large:
            raise
        data = bytes(_KEY_FILE_READ_LIMIT + 1)  # reported as too large below, with the expected size
    if len(data) != KEY_SIZE:
        size = f"{len(data)} bytes" if len(data) <= _KEY_FILE_READ_LIMIT else f"more than {_KEY_FILE_READ_LIMIT} bytes"
        raise FormatError(
            f"{what} file {path}: {size}, expected a raw {KEY_SIZE}-byte key "
            "(sevctl's NAME_tek.bin / NAME_tik.bin; sev-tool's tmp_tk.bin holds TEK then TIK: split it)"
        )
    return data


@dataclass(frozen=True)
class LaunchSession:
    """What the owner hands to QEMU (GODH certificate, session blob, policy) and keeps (TEK, TIK)."""

    godh_cert: bytes = field(repr=False)
    session: bytes = field(repr=False)
    tek: bytes = field(repr=False)
    tik: bytes = field(repr=False)
    policy: int

    @property
    def godh_b64(self) -> str:
        return base64.b64encode(self.godh_cert).decode()

    @property
    def session_b64(self) -> str:
        return base64.b64encode(self.session).decode()

    def file_paths(self, directory: Path | str, name: str) -> dict[str, Path]:
        directory = Path(directory)
        return {
            "godh": directory / f"{name}_godh.b64",
            "session": directory / f"{name}_session.b64",
            "tek": directory / f"{name}_tek.bin",
            "tik": directory / f"{name}_tik.bin",
        }

    def write_files(self, directory: Path | str, name: str) -> dict[str, Path]:
        """Write sevctl-compatible NAME_godh.b64, NAME_session.b64, NAME_tek.bin, NAME_tik.bin (0600)."""
        if not name or "/" in name or name.startswith("."):
            raise UsageError(f"session name {name!r}: use a plain file-name prefix such as 'guest1'")
        directory = Path(directory)
        if not directory.is_dir():
            raise UsageError(f"output directory {directory} does not exist: create it first")
        paths = self.file_paths(directory, name)
        contents = {"godh": self.godh_b64.encode(), "session": self.session_b64.encode(),
                    "tek": self.tek, "tik": self.tik}
        for key, path in paths.items():
            write_private_file(path, contents[key])
        return paths


def _check_pdh(pdh: SevCertificate) -> ec.EllipticCurvePublicKey:
    if pdh.usage != Usage.PDH:
        raise FormatError(f"the platform key certificate has usage {pdh.usage.name}, expected PDH")
    key = pdh.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        raise FormatError("the PDH certificate does not hold a P-384 key; SEV firmware uses P-384")
    return key


def create_session(pdh: SevCertificate, policy: int) -> LaunchSession:
    """A fresh GODH key, ECDH with the PDH, random TEK/TIK/nonce/IV, and the 128-byte blob.
    The PDH's chain must already be verified (chain.verify)."""
    pdh_key = _check_pdh(pdh)
    godh_private = ec.generate_private_key(ec.SECP384R1())
    shared = godh_private.exchange(ec.ECDH(), pdh_key)
    randoms = os.urandom(4 * KEY_SIZE)
    nonce, wrap_iv, tek, tik = (randoms[i : i + KEY_SIZE] for i in range(0, 4 * KEY_SIZE, KEY_SIZE))
    blob = build_session_blob(shared, nonce, wrap_iv, tek, tik, policy)
    godh = SevCertificate.generate(Usage.PDH, godh_private.public_key())
    return LaunchSession(godh.to_bytes(), blob.to_bytes(), tek, tik, policy)


def open_session(
    pdh_private_key: ec.EllipticCurvePrivateKey, godh_cert: bytes, session: bytes, policy: int
) -> tuple[bytes, bytes]:
    """Firmware side of LAUNCH_START: unwrap TEK and TIK, checking the wrap MAC (BAD_SIGNATURE)
    and the policy MAC over the exact policy (POLICY_FAILURE)."""
    try:
        godh = SevCertificate.parse(godh_cert, "GODH certificate")
    except FormatError as exc:
        raise SessionRejected(SEV_RET_INVALID_CERTIFICATE, f"invalid GODH certificate: {exc.message}") from exc
    try:
        godh_key = godh.public_key()
    except FormatError as exc:
        # the GODH has usage PDH, so the certificate's own message would blame "PDH certificate"
        detail = exc.message.partition(": ")[2] or exc.message
        raise SessionRejected(SEV_RET_INVALID_CERTIFICATE, f"invalid GODH certificate: {detail}") from exc
    if not isinstance(godh_key, ec.EllipticCurvePublicKey) or godh_key.curve.name != pdh_private_key.curve.name:
        raise SessionRejected(SEV_RET_INVALID_CERTIFICATE, "the GODH key is not on the PDH's curve (P-384)")
    try:
        blob = SessionBlob.parse(session)
    except FormatError as exc:
        raise SessionRejected(SEV_RET_INVALID_LEN, exc.message) from exc
    try:
        policy_bytes = _check_policy(policy)
    except FormatError as exc:
        raise SessionRejected(SEV_RET_INVALID_PARAM, exc.message) from exc
    shared = pdh_private_key.exchange(ec.ECDH(), godh_key)
    kek, kik = derive_kek_kik(shared, blob.nonce)
    if not hmac.compare_digest(hmac.digest(kik, blob.wrap_tk, "sha256"), blob.wrap_mac):
        raise SessionRejected(
            SEV_RET_BAD_SIGNATURE, "session wrap MAC mismatch: the session was made for another PDH, or altered"
        )
    keys = aes_ctr(kek, blob.wrap_iv, blob.wrap_tk)
    tek, tik = keys[:KEY_SIZE], keys[KEY_SIZE:]
    if not hmac.compare_digest(hmac.digest(tik, policy_bytes, "sha256"), blob.policy_mac):
        raise SessionRejected(
            SEV_RET_POLICY_FAILURE, f"policy MAC mismatch: the session was not made for policy {policy:#x}"
        )
    return tek, tik
