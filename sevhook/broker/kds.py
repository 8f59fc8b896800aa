"""The ASK-signed CEK a real platform's chain needs: SEV firmware exports its CEK unsigned (both
signature slots empty), and only AMD's Key Distribution Service hands out the ASK-signed copy, by chip
id (`GET <kds>/cek/id/<GET_ID as upper-case hex>`, as `sevctl export --full` does).

The broker looks a signed CEK up in its database first (keyed by the exported CEK's public key, with
the chip id and the time fetched), else fetches it from its KDS with a bounded timeout and retries that
honour 429/Retry-After; concurrent launches for one chip share one fetch. A fetched or imported CEK is
accepted only when it certifies the same key as the exported CEK and verifies under a registered ASK;
anything else refuses the launch with a reason that says what happened (cek-unsigned,
kds-unavailable, cek-mismatch), never a misleading unknown-root."""

from __future__ import annotations

import hashlib
import http.client
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

from sqlalchemy import Engine, insert, select, update

from sevhook.broker import db
from sevhook.encoding import decode_base64
from sevhook.errors import FormatError, SevhookError, UsageError, VerificationError
from sevhook.sev.certs import SEV_CERT_SIZE, AmdCertificate, SevCertificate, Usage
from sevhook.sev.chain import maybe_base64

DEFAULT_KDS_URL = "https://kdsintf.amd.com"
KDS_TIMEOUT = 10.0  # per HTTP request
KDS_DEADLINE = 30.0  # for all attempts of one fetch together
KDS_ATTEMPTS = 4
MAX_RETRY_AFTER = 10.0
MAX_CHIP_ID_BYTES = 128  # GET_ID is 64 bytes per socket
MAX_CEK_ANSWER = 64 * 1024
CHIP_ID = re.compile(r"^[0-9A-Fa-f]{2,256}$")


class CekRefusal(SevhookError):
    """No usable signed CEK: `reason` is the broker's stable reason code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def is_unsigned(cek: SevCertificate) -> bool:
    """Both signature slots empty: the CEK as PDH_CERT_EXPORT returns it."""
    return all(slot.is_empty for slot in cek.signatures)


def chip_id_hex(cpu0_id_b64: str) -> str:
    """QMP's base64 `cpu0-id` as the KDS names the chip: upper-case hex of the GET_ID bytes."""
    try:
        raw = decode_base64(cpu0_id_b64)
    except FormatError as exc:
        raise FormatError(f"cpu0_id: not valid base64 ({exc.message})") from exc
    if not 0 < len(raw) <= MAX_CHIP_ID_BYTES:
        raise FormatError(f"cpu0_id: {len(raw)} bytes; a chip id (GET_ID, QMP cpu0-id) is 1..{MAX_CHIP_ID_BYTES}")
    return raw.hex().upper()


def key_digest(cek: SevCertificate) -> str:
    """What identifies a CEK whatever its signatures: SHA-256 of its public-key field."""
    return hashlib.sha256(cek.pubkey).hexdigest()


def check_signed_cek(signed: SevCertificate, exported: SevCertificate | None,
                     asks: Sequence[AmdCertificate], source: str) -> AmdCertificate:
    """The signed CEK must certify the exported CEK's key and verify under one of `asks`; returns that ASK."""
    if signed.usage != Usage.CEK:
        raise CekRefusal("cek-mismatch", f"{source}: holds a {signed.usage.name} certificate, not a CEK")
    if exported is not None and (signed.pubkey != exported.pubkey or signed.algorithm != exported.algorithm):
        raise CekRefusal("cek-mismatch", f"{source}: the signed CEK certifies another key than the CEK this "
                         "platform exported (a CEK for another chip, or a wrong chip id)")
    if exported is not None and signed.body() != exported.body():
        raise CekRefusal("cek-mismatch", f"{source}: the signed CEK differs from the exported CEK outside "
                         "its signatures (version or API fields)")
    if is_unsigned(signed):
        raise CekRefusal("cek-unsigned", f"{source}: the CEK carries no ASK signature either")
    errors = []
    for ask in asks:
        try:
            signed.verify_signed_by(ask)
            return ask
        except VerificationError as exc:
            errors.append(f"ASK {ask.key_id.hex()}: {exc.message}")
    raise CekRefusal("cek-mismatch", f"{source}: the signed CEK verifies under none of the registered ASKs ("
                     + "; ".join(errors or ["no root with an ASK is registered"]) + ")")


@dataclass(frozen=True)
class KdsAnswer:
    status: int
    body: bytes
    retry_after: float | None


def _retry_after(value: str | None) -> float | None:
    """Retry-After as seconds (delta-seconds or an HTTP date), capped; None when absent or unreadable."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def http_get(url: str, timeout: float) -> KdsAnswer:
    """One GET (urllib: system CA store, host name checked); HTTP errors come back as answers."""
    request = urllib.request.Request(url, headers={"Accept": "application/octet-stream",
                                                   "User-Agent": "sevhook-broker"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # http(s) checked
            return KdsAnswer(response.status, response.read(MAX_CEK_ANSWER + 1), None)
    except urllib.error.HTTPError as exc:
        with exc:
            return KdsAnswer(exc.code, b"", _retry_after(exc.headers.get("Retry-After")))


class KdsClient:
    """Fetches signed CEKs from one KDS with bounded time and retries."""

    def __init__(self, url: str, timeout: float = KDS_TIMEOUT, deadline: float = KDS_DEADLINE,
                 attempts: int = KDS_ATTEMPTS, get: Callable[[str, float], KdsAnswer] = http_get,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if not url.startswith(("http://", "https://")):
            raise UsageError(f"--kds-url {url!r}: use https://HOST (AMD's is {DEFAULT_KDS_URL}), or `none` "
                             "for a broker without network access to a KDS")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.deadline = deadline
        self.attempts = attempts
        self._get = get
        self._sleep = sleep

    def fetch(self, chip_hex: str) -> bytes:
        """The raw signed CEK for a chip, or CekRefusal (404: cek-unsigned; else kds-unavailable)."""
        url = f"{self.url}/cek/id/{chip_hex}"
        give_up = time.monotonic() + self.deadline
        problem = ""
        for attempt in range(self.attempts):
            left = give_up - time.monotonic()
            if left <= 0:
                break
            wait = min(0.25 * 2 ** attempt, 2.0)
            try:
                answer = self._get(url, min(self.timeout, left))
            except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
                reason = getattr(exc, "reason", None) or exc
                problem = f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__
            else:
                if answer.status == 200:
                    if len(answer.body) > MAX_CEK_ANSWER:
                        problem = f"an answer over {MAX_CEK_ANSWER} bytes, not a CEK"
                        break
                    return answer.body
                if answer.status == 404:
                    raise CekRefusal("cek-unsigned",
                                     f"AMD's KDS at {self.url} knows no CEK for chip {chip_hex[:16]}... "
                                     "(HTTP 404): check that the chip id is this host's (GET_ID / QMP cpu0-id), "
                                     "or import the signed CEK with `sevhook broker add-cek FILE --chip-id HEX`")
                problem = f"HTTP {answer.status}"
                if answer.status == 429 or answer.status >= 500:
                    wait = answer.retry_after if answer.retry_after is not None else wait
                else:
                    break  # another 4xx will not change on retry
            if attempt + 1 < self.attempts and time.monotonic() + wait < give_up:
                self._sleep(wait)
            elif attempt + 1 < self.attempts:
                break
        raise CekRefusal("kds-unavailable", f"AMD's KDS at {url} gave no signed CEK ({problem or 'timed out'}, "
                         f"{self.attempts} attempts within {self.deadline:g} s); retry later, or import the CEK "
                         "with `sevhook broker add-cek`")


class SignedCeks:
    """The broker's signed-CEK cache (in its database) in front of its KDS, with one fetch per chip at a time."""

    def __init__(self, engine: Engine, kds: KdsClient | None = None) -> None:
        self.engine = engine
        self.kds = kds
        self._lock = threading.Lock()
        self._inflight: dict[str, Future[bytes]] = {}

    def configure(self, kds_url: str | None) -> None:
        """`--kds-url URL`, or None (`none`) for an air-gapped broker that uses imported CEKs only."""
        self.kds = KdsClient(kds_url) if kds_url else None

    def cached(self, exported: SevCertificate) -> bytes | None:
        with self.engine.connect() as conn:
            return conn.execute(select(db.signed_ceks.c.cek).where(
                db.signed_ceks.c.key_sha256 == key_digest(exported))).scalar()

    def store(self, cek: SevCertificate, chip_hex: str | None, source: str) -> None:
        """Insert or refresh one verified signed CEK."""
        values = {"cek": cek.to_bytes(), "fetched_at": time.time(), "source": source[:300]}
        if chip_hex:
            values["chip_id"] = chip_hex
        key = key_digest(cek)
        with self.engine.begin() as conn:
            done = conn.execute(update(db.signed_ceks).where(db.signed_ceks.c.key_sha256 == key).values(**values))
            if done.rowcount == 0:
                conn.execute(insert(db.signed_ceks).values(key_sha256=key, **values))

    def resolve(self, exported: SevCertificate, cpu0_id_b64: str | None,
                asks: Sequence[AmdCertificate]) -> SevCertificate:
        """The verified ASK-signed copy of an unsigned exported CEK (cache, else KDS), or CekRefusal."""
        cached = self.cached(exported)
        if cached is not None:
            signed = SevCertificate.parse(cached, "cached signed CEK")
            check_signed_cek(signed, exported, asks, "the cached signed CEK")
            return signed
        chip_hex = chip_id_hex(cpu0_id_b64) if cpu0_id_b64 else None
        if chip_hex is None:
            raise CekRefusal("cek-unsigned", "the chain's CEK is unsigned (as firmware exports it) and the launch "
                             "request carries no cpu0_id to fetch the signed CEK with: send cpu0_id (QMP "
                             "query-sev-capabilities 'cpu0-id'), a full chain (`sevhook platform export --full`), "
                             "or import the CEK with `sevhook broker add-cek`")
        if self.kds is None:
            raise CekRefusal("cek-unsigned", f"no signed CEK for chip {chip_hex[:16]}... is cached and this broker "
                             "has no KDS (--kds-url none): import it with `sevhook broker add-cek FILE --chip-id "
                             f"{chip_hex}`, or send a full chain (`sevhook platform export --full`)")
        raw = self._fetch_once(chip_hex)
        source = f"{self.kds.url}/cek/id/{chip_hex}"
        try:
            signed = SevCertificate.parse(raw, f"the CEK from {source}")
        except FormatError as exc:
            raise CekRefusal("kds-unavailable", f"AMD's KDS at {self.kds.url} answered with something that is "
                             f"not a CEK: {exc.message}") from exc
        check_signed_cek(signed, exported, asks, f"the CEK from {source}")
        self.store(signed, chip_hex, self.kds.url)
        return signed

    def _fetch_once(self, chip_hex: str) -> bytes:
        """Coalesce: the first caller for a chip fetches, the others wait for its result."""
        with self._lock:
            future = self._inflight.get(chip_hex)
            leader = future is None
            if leader:
                future = self._inflight[chip_hex] = Future()
        assert future is not None
        if leader:
            kds = self.kds
            assert kds is not None
            try:
                future.set_result(kds.fetch(chip_hex))
            except BaseException as exc:  # noqa: BLE001 (handed to every waiter, then raised here too)
                future.set_exception(exc)
            finally:
                with self._lock:
                    self._inflight.pop(chip_hex, None)
        return future.result()

    def import_cek(self, data: bytes, chip_hex: str | None, asks: Sequence[AmdCertificate]) -> dict[str, str]:
        """`broker add-cek`: a signed CEK (raw or base64, or the CEK inside a full chain) for air-gapped use."""
        if chip_hex is not None and not CHIP_ID.match(chip_hex):
            raise UsageError(f"--chip-id {chip_hex[:40]!r}: give the chip id as hex "
                             "(GET_ID, 64 bytes = 128 hex digits)")
        data = maybe_base64(bytes(data))
        if len(data) > 4 * SEV_CERT_SIZE:  # PDH|PEK|OCA|CEK|ASK|ARK: the CEK is the fourth certificate
            data = data[3 * SEV_CERT_SIZE:4 * SEV_CERT_SIZE]
        try:
            cek = SevCertificate.parse(data, "CEK file")
        except FormatError as exc:
            raise UsageError(f"{exc.message}; give the 2084-byte signed CEK from AMD's KDS "
                             "(…/cek/id/<chip id>) or a full chain (sevctl export --full)") from exc
        if is_unsigned(cek):
            raise UsageError("CEK file: this CEK carries no ASK signature (as firmware exports it); download the "
                             "signed one from AMD's KDS: https://kdsintf.amd.com/cek/id/<chip id>")
        try:
            ask = check_signed_cek(cek, None, asks, "CEK file")
        except CekRefusal as exc:
            raise UsageError(f"{exc.message}; register its root first with `sevhook broker add-root`") from exc
        self.store(cek, chip_hex.upper() if chip_hex else None, "add-cek")
        return {"key_sha256": key_digest(cek), "chip_id": chip_hex.upper() if chip_hex else "",
                "ask_key_id": ask.key_id.hex()}
