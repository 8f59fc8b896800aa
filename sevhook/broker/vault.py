"""Keys at rest in the broker's data directory: the storage key that seals secrets and launch keys
(AES-256-GCM, bound to the row they belong to) and the admin token. Files are 0600 and written
atomically; the directory is 0700."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets as random_source
import stat
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sevhook.errors import UsageError, VerificationError
from sevhook.files import write_private_file

STORAGE_KEY_FILE = "storage.key"
ADMIN_TOKEN_FILE = "admin.token"
NONCE_BYTES = 12


def ensure_data_dir(data_dir: Path) -> None:
    """Create the data directory 0700, or make an existing one private (see check_data_dir)."""
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{data_dir}: cannot create the broker data directory ({exc.strerror})") from exc
    check_data_dir(data_dir)


def check_data_dir(data_dir: Path) -> None:
    """The data directory holds the storage key, the admin token and the SQLite database with its audit
    log: it must be a directory of this user's, and nobody else may list or enter it. A directory
    owned by another user is refused (they could swap its files); our own is tightened to 0700."""
    try:
        info = data_dir.lstat()
    except FileNotFoundError as exc:
        raise UsageError(f"{data_dir}: no such broker data directory; run `sevhook broker init --data-dir "
                         f"{data_dir}` first") from exc
    except OSError as exc:
        raise UsageError(f"{data_dir}: cannot read the broker data directory ({exc.strerror})") from exc
    if not stat.S_ISDIR(info.st_mode):
        raise UsageError(f"{data_dir}: the broker data directory is not a directory")
    if info.st_uid != os.geteuid():
        raise UsageError(f"{data_dir}: the broker data directory belongs to uid {info.st_uid}, not to this user "
                         f"(uid {os.geteuid()}); run the broker as its owner, or give a directory of your own")
    if info.st_mode & 0o077:
        try:
            data_dir.chmod(0o700)
        except OSError as exc:
            raise UsageError(f"{data_dir}: the broker data directory is open to others (mode "
                             f"{info.st_mode & 0o777:o}) and cannot be made private ({exc.strerror}); "
                             "run chmod 700 on it") from exc


def new_token() -> str:
    return random_source.token_urlsafe(32)


def token_digest(token: str) -> str:
    """Tokens are stored and looked up by SHA-256 only; a leaked database gives no usable token."""
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def init_keys(data_dir: Path) -> str | None:
    """Create the storage key and admin token if missing; return the admin token if it was new."""
    ensure_data_dir(data_dir)
    key_path = data_dir / STORAGE_KEY_FILE
    if not key_path.exists():
        write_private_file(key_path, AESGCM.generate_key(bit_length=256))
    token_path = data_dir / ADMIN_TOKEN_FILE
    if token_path.exists():
        return None
    token = new_token()
    write_private_file(token_path, (token + "\n").encode())
    return token


def _read_private(path: Path, what: str) -> bytes:
    try:
        mode = path.stat().st_mode & 0o777
        data = path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"{path}: the broker {what} is missing; run `sevhook broker init --data-dir "
                         f"{path.parent}` first") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the broker {what} ({exc.strerror})") from None
    if mode & 0o077:
        raise UsageError(f"{path}: the broker {what} is readable by others (mode {mode:o}); run chmod 600 on it")
    return data


def admin_token_digest(data_dir: Path) -> str:
    token = _read_private(data_dir / ADMIN_TOKEN_FILE, "admin token").decode("ascii", "replace").strip()
    if not token:
        raise UsageError(f"{data_dir / ADMIN_TOKEN_FILE}: the admin token file is empty")
    return token_digest(token)


def tokens_match(presented_digest: str, expected_digest: str) -> bool:
    return hmac.compare_digest(presented_digest, expected_digest)


class Vault:
    """Seals small values with AES-256-GCM; the associated data names the row, so a sealed value
    moved to another row (another guest, another launch) does not open."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise UsageError("the broker storage key must be 32 bytes; it was damaged, restore it from backup")
        self._aead = AESGCM(key)

    @classmethod
    def from_data_dir(cls, data_dir: Path) -> Vault:
        return cls(_read_private(data_dir / STORAGE_KEY_FILE, "storage key"))

    def seal(self, plaintext: bytes, context: str) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, plaintext, context.encode())

    def open(self, sealed: bytes, context: str) -> bytes:
        try:
            return self._aead.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], context.encode())
        except (InvalidTag, ValueError):
            raise VerificationError(f"sealed value for {context} does not open: wrong storage key or "
                                    "tampered database row") from None

    def __repr__(self) -> str:
        return "Vault(<key hidden>)"

