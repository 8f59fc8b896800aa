"""The host's local record of each guest's last attestation, which `sevhook status` shows: the hook
and `sevhook start` call `record_verdict` when an attestation ends.

One small JSON file per domain in a root-only directory (/var/lib/sevhook/status, or
$SEVHOOK_STATUS_DIR), written atomically, each bounded in size, the directory bounded in files.
A record holds the verdict, step and reason (never a secret, measurement or key). Recording never
changes the verdict: a failure to write is reported to the caller, not raised."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import quote

from sevhook.errors import SevhookError, StepError
from sevhook.files import UnwritableFileError, write_private_file

STATUS_DIR_ENV = "SEVHOOK_STATUS_DIR"
DEFAULT_STATUS_DIR = Path("/var/lib/sevhook/status")
MAX_REASON = 1000  # characters of a reason kept; the step log has every line
MAX_RECORD_BYTES = 8192  # what the clipped fields can add up to, even in 4-byte UTF-8
MAX_RECORDS = 4096  # files kept in the directory; the oldest go first
ATTESTED, REFUSED = "attested", "refused"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_+-][A-Za-z0-9_.+-]{0,199}$")


@dataclass(frozen=True)
class Verdict:
    """The last attestation of one domain."""

    domain: str
    mode: str  # hook, start or wrapper: who attested
    verdict: str  # attested or refused
    step: str | None
    reason: str | None
    launch_id: str | None
    at: float  # seconds since the epoch

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def status_dir() -> Path:
    return Path(os.environ.get(STATUS_DIR_ENV) or DEFAULT_STATUS_DIR)


def record_path(domain: str, directory: Path | None = None) -> Path:
    """The record's file; a name that is not a plain file name is percent-encoded."""
    name = domain if _SAFE_NAME.match(domain) else quote(domain, safe="")[:200]
    return (directory or status_dir()) / f"{name}.json"


def _clip(text: str | None, limit: int) -> str | None:
    return None if text is None else " ".join(text.split())[:limit]


def record_verdict(domain: str, *, mode: str, ok: bool, step: str | None = None, reason: str | None = None,
                   launch_id: str | None = None, directory: Path | None = None) -> str | None:
    """Write the domain's last verdict; returns None when written, else why not (for the caller's log)."""
    verdict = Verdict(domain[:200], mode, ATTESTED if ok else REFUSED, _clip(step, 64), _clip(reason, MAX_REASON),
                      _clip(launch_id, 64), round(time.time(), 3))
    data = json.dumps(verdict.to_json(), sort_keys=True, ensure_ascii=False).encode()
    target = record_path(domain, directory)
    try:
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_private_file(target, data + b"\n")
        _bound(target.parent)
    except (OSError, UnwritableFileError) as exc:
        return f"{target}: cannot record the verdict ({exc})"
    return None


def _bound(directory: Path) -> None:
    """Keep at most MAX_RECORDS records (domains come and go; the oldest records leave first)."""
    records = list(directory.glob("*.json"))
    if len(records) <= MAX_RECORDS:
        return
    records.sort(key=lambda path: path.stat().st_mtime)
    for path in records[:len(records) - MAX_RECORDS]:
        path.unlink(missing_ok=True)


@contextmanager
def recording(domain: str, mode: str, launch_id: str | None) -> Iterator[None]:
    """Record the block's outcome as the domain's verdict: attested when it returns, refused with the
    step and reason when it raises (the exception goes on unchanged)."""
    try:
        yield
    except StepError as failure:
        record_verdict(domain, mode=mode, ok=False, step=failure.step, reason=failure.reason, launch_id=launch_id)
        raise
    except Exception as exc:
        reason = exc.message if isinstance(exc, SevhookError) else f"{exc.__class__.__name__}: {exc}"
        record_verdict(domain, mode=mode, ok=False, step="internal", reason=reason, launch_id=launch_id)
        raise
    record_verdict(domain, mode=mode, ok=True, launch_id=launch_id)


def read_verdict(domain: str, directory: Path | None = None) -> Verdict | None:
    """The domain's last recorded verdict; None when there is none. A damaged record is a ValueError
    naming the file, so `status` can say so instead of guessing."""
    path = record_path(domain, directory)
    try:
        raw = path.read_bytes()[:MAX_RECORD_BYTES + 1]
    except FileNotFoundError:
        return None
    try:
        fields = json.loads(raw)
        verdict = Verdict(**{name: fields[name] for name in Verdict.__dataclass_fields__})
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"{path}: not a sevhook status record ({exc.__class__.__name__})") from exc
    if verdict.verdict not in (ATTESTED, REFUSED) or not isinstance(verdict.at, (int, float)):
        raise ValueError(f"{path}: not a sevhook status record (verdict {verdict.verdict!r})")
    return verdict
