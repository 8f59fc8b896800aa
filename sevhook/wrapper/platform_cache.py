"""The host's SEV platform data as `sevhook platform export` caches it (root-only, default
/var/lib/sevhook/platform): `pdh.cert` (the raw 2084-byte PDH certificate), `cert_chain.cert` (raw
PEK||OCA||CEK) and `chip_id` (hex text, optional). The wrapper reads it at every start instead of
asking libvirt, which it must not call while libvirt waits on it."""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

from sevhook.errors import UsageError

SEV_CERT_SIZE = 2084
CHAIN_CERTS = 3  # PEK, OCA, CEK
EXPORT_HINT = "run `sevhook platform export`"


def load_platform_cache(directory: Path) -> tuple[str, str, str | None]:
    """(pdh_b64, cert_chain_b64, chip_id_b64 or None); a missing or malformed file is one message."""
    pdh = _read(directory / "pdh.cert")
    chain = _read(directory / "cert_chain.cert")
    if len(pdh) != SEV_CERT_SIZE:
        raise UsageError(f"{directory / 'pdh.cert'}: {len(pdh)} bytes, expected one {SEV_CERT_SIZE}-byte SEV "
                         f"certificate; {EXPORT_HINT}")
    if len(chain) != CHAIN_CERTS * SEV_CERT_SIZE:
        raise UsageError(f"{directory / 'cert_chain.cert'}: {len(chain)} bytes, expected PEK||OCA||CEK "
                         f"({CHAIN_CERTS * SEV_CERT_SIZE} bytes); {EXPORT_HINT}")
    chip_id = None
    chip_path = directory / "chip_id"
    if chip_path.exists():
        try:
            chip_id = base64.b64encode(bytes.fromhex(_read(chip_path).decode("ascii").strip())).decode("ascii")
        except (ValueError, UnicodeDecodeError, binascii.Error) as exc:
            raise UsageError(f"{chip_path}: not a hexadecimal chip id; {EXPORT_HINT}") from exc
    return base64.b64encode(pdh).decode("ascii"), base64.b64encode(chain).decode("ascii"), chip_id


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise UsageError(f"{path}: the platform export cache has no such file; {EXPORT_HINT}") from exc
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the platform export cache ({exc.strerror}); {EXPORT_HINT} "
                         "as root") from exc
