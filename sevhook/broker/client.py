"""The host's side of the broker's /v1 API, used by the libvirt hook and `sevhook start`.

It fails closed: every refusal is a BrokerRefused carrying the broker's stable reason code, and
every transport problem (after bounded retries with backoff) is a BrokerUnavailable. A request is
only retried when it cannot have been acted on twice: connection failures (nothing was sent),
5xx answers (the broker rolls its transaction back) and 429 (not processed). The secret packet is
never logged and is kept out of reprs.

It is built on the standard library's http.client and ssl (the certificate is checked against the
given CA file or the system's trust store, host name included), which load in a few milliseconds:
the libvirt hook imports this module within a guest's attestation time. Proxy variables in the
environment are not used: the bearer token goes to the broker's URL and nowhere else."""

from __future__ import annotations

import http.client
import json
import logging
import random
import select
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from sevhook.errors import SevhookError, UsageError

if TYPE_CHECKING:
    import socket

    from sevhook.xml.models import BrokerRef

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0
MAX_RETRY_AFTER = 5.0
MAX_ANSWER_BYTES = 1 << 20  # the broker's answers are a few kilobytes; more is not a broker talking


class BrokerRefused(SevhookError):
    """The broker answered and said no (403 with a reason code, or another 4xx)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"the key broker refused: {message} (reason: {reason})")
        self.reason = reason
        self.detail = message


class BrokerUnavailable(SevhookError):
    """The broker could not be reached or did not give a usable answer in time."""


@dataclass(frozen=True)
class LaunchGrant:
    """What the host passes to QEMU's sev-guest object: the GODH cert and session blob (base64)."""

    launch_id: str
    godh_b64: str
    session_b64: str
    policy: int


@dataclass(frozen=True)
class SecretGrant:
    """The LAUNCH_SECRET packet for sev-inject-launch-secret (base64). Hidden from repr."""

    header_b64: str = field(repr=False)
    secret_b64: str = field(repr=False)


def read_token_file(path: str | Path) -> str:
    """Read a bearer token file (one line); the token itself never appears in a message."""
    token_path = Path(path)
    try:
        token = token_path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise UsageError(f"{token_path}: broker token file not found; ask the guest owner for a host token") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{token_path}: cannot read the broker token file ({exc.__class__.__name__}); "
                         "it must hold one ASCII line") from None
    _check_token(token, str(token_path))
    return token


def _check_token(token: str, where: str) -> None:
    if not token or not all(0x21 <= ord(ch) <= 0x7E for ch in token):
        raise UsageError(f"{where}: the broker token must be one line of visible ASCII characters")


class _Answer:
    """One HTTP answer as read off the wire: status, headers, and the JSON body if it was one."""

    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytes) -> None:
        self.status = status
        self.headers = headers
        try:
            self.json: object = json.loads(body) if body else None
        except ValueError:  # UnicodeDecodeError too
            self.json = None


class _SendFailed(Exception):
    """The request may have reached the broker, but its answer could not be read."""


class BrokerClient:
    """A small synchronous client; one instance may be reused for many calls and keeps its
    connection open between them."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        ca_file: str | Path | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = 2,
        *,
        token_file: str | Path | None = None,
        backoff: float = 0.2,
    ) -> None:
        scheme, host, port, prefix = _split_url(url)
        if token is None and token_file is not None:
            token = read_token_file(token_file)
        elif token is not None:
            token = token.strip()
            _check_token(token, "broker token")
        if retries < 0 or timeout <= 0:
            raise UsageError("broker client: retries must be >= 0 and timeout > 0")
        tls: ssl.SSLContext | None = None
        if ca_file is not None:
            ca_path = Path(ca_file)
            try:
                tls = ssl.create_default_context(cafile=str(ca_path))
            except FileNotFoundError:
                raise UsageError(f"{ca_path}: broker CA file not found") from None
            except (ssl.SSLError, OSError) as exc:
                raise UsageError(f"{ca_path}: not a PEM CA certificate file ({exc.__class__.__name__})") from None
        elif scheme == "https":
            tls = ssl.create_default_context()  # the system's trust store; verifies the host name too
        self._headers = {"Accept": "application/json", "User-Agent": "sevhook"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self.url = url.rstrip("/")
        self.retries = retries
        self.backoff = backoff
        self.timeout = timeout
        self._host = host
        self._port = port
        self._prefix = prefix
        self._tls = tls if scheme == "https" else None
        self._connection: http.client.HTTPConnection | None = None

    @classmethod
    def from_ref(cls, ref: BrokerRef, timeout: float = DEFAULT_TIMEOUT, retries: int = 2) -> BrokerClient:
        """A client for a domain's `<sevhook:broker url= ca-file= token-file=>` reference."""
        return cls(ref.url, ca_file=ref.ca_file, token_file=ref.token_file, timeout=timeout, retries=retries)

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def __enter__(self) -> BrokerClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def create_launch(self, guest: str, pdh_b64: str, cert_chain_b64: str,
                      cpu0_id_b64: str | None = None) -> LaunchGrant:
        """Ask for a launch session for `guest` on the platform whose PDH and chain are given; the chip
        id (QMP's cpu0-id) lets the broker fetch the signed CEK that the firmware's export lacks."""
        body = {"guest": guest, "pdh": pdh_b64, "cert_chain": cert_chain_b64}
        if cpu0_id_b64:
            body["cpu0_id"] = cpu0_id_b64
        answer = self._call("POST", "/v1/launches", body, resend_after_send_error=True)
        try:
            return LaunchGrant(
                launch_id=_string(answer, "launch_id"),
                godh_b64=_string(answer, "godh"),
                session_b64=_string(answer, "session"),
                policy=_integer(answer, "policy"),
            )
        except KeyError as exc:
            raise BrokerUnavailable(f"the broker's launch answer lacks a valid {exc.args[0]!r}") from None

    def attest(
        self, launch_id: str, measurement_b64: str, api_major: int, api_minor: int, build_id: int, policy: int
    ) -> SecretGrant:
        """Send the launch measurement; get the wrapped secret packet or a BrokerRefused."""
        body = {
            "measurement": measurement_b64,
            "api_major": api_major,
            "api_minor": api_minor,
            "build_id": build_id,
            "policy": policy,
        }
        # Not re-sent after a read error: a single-use launch may already be spent by the first try.
        answer = self._call("POST", f"/v1/launches/{quote(launch_id, safe='')}/attestation", body,
                            resend_after_send_error=False)
        try:
            return SecretGrant(header_b64=_string(answer, "secret_header"), secret_b64=_string(answer, "secret"))
        except KeyError as exc:
            raise BrokerUnavailable(f"the broker's secret answer lacks a valid {exc.args[0]!r}") from None

    def launch_status(self, launch_id: str) -> dict[str, Any]:
        """The broker's view of a launch: state, guest, policy, timestamps."""
        return self._call("GET", f"/v1/launches/{quote(launch_id, safe='')}", None, resend_after_send_error=True)

    def _call(self, method: str, path: str, body: dict[str, Any] | None, *, resend_after_send_error: bool
              ) -> dict[str, Any]:
        payload = None if body is None else json.dumps(body).encode("utf-8")
        last_problem = "no attempt made"
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * (2 ** (attempt - 1)) * random.uniform(0.5, 1.0))
            try:
                connection = self._connect()
            except ssl.SSLError as exc:  # a certificate the CA file does not vouch for: retrying cannot help
                why = getattr(exc, "verify_message", None) or exc.reason or exc
                raise BrokerUnavailable(f"TLS with the broker at {self.url} failed: {exc.__class__.__name__}: "
                                        f"{why}; check the broker CA file") from None
            except OSError as exc:  # nothing was sent: always safe to try again
                last_problem = f"cannot connect ({self._describe(exc)})"
            else:
                try:
                    answer = self._exchange(connection, method, path, payload)
                except _SendFailed as exc:
                    self.close()
                    last_problem = f"{exc} while talking to the broker"
                    if not resend_after_send_error:
                        break
                else:
                    if answer.status == 200:
                        return _json_object(answer)
                    if answer.status == 429:
                        last_problem = "rate limited (429)"
                        _sleep_retry_after(answer, attempt < self.retries)
                    elif answer.status >= 500:
                        last_problem = f"server error {answer.status}"
                    else:
                        raise _refusal(answer)
            log.info("broker %s %s: %s (attempt %d of %d)", method, path, last_problem, attempt + 1,
                        self.retries + 1)
        raise BrokerUnavailable(f"the key broker at {self.url} is unavailable: {last_problem}; "
                                "check that it runs and that the URL is right")

    def _connect(self) -> http.client.HTTPConnection:
        """The kept connection if the broker has not closed it meanwhile, else a new one (TCP, and
        the TLS handshake with certificate and host name checks), so that a request is only ever
        sent on a connection that was open when it was sent."""
        if self._connection is not None:
            sock = self._connection.sock
            if sock is not None and not _readable(sock):
                return self._connection  # idle and quiet: still open
            self.close()  # readable while idle means closed by the broker (or junk): never reuse it
        if self._tls is not None:
            connection: http.client.HTTPConnection = http.client.HTTPSConnection(
                self._host, self._port, timeout=self.timeout, context=self._tls)
        else:
            connection = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)
        try:
            connection.connect()
        except OSError:
            connection.close()
            raise
        self._connection = connection
        return connection

    def _exchange(self, connection: http.client.HTTPConnection, method: str, path: str,
                  payload: bytes | None) -> _Answer:
        headers = dict(self._headers)
        if payload is not None:
            headers["Content-Type"] = "application/json"
        try:
            connection.request(method, self._prefix + path, body=payload, headers=headers)
            response = connection.getresponse()
            body = response.read(MAX_ANSWER_BYTES + 1)
        except (OSError, http.client.HTTPException) as exc:
            raise _SendFailed(self._describe(exc)) from None
        if len(body) > MAX_ANSWER_BYTES:
            raise _SendFailed(f"an answer of more than {MAX_ANSWER_BYTES} bytes")
        if response.length:  # the connection ended before the Content-Length it announced
            raise _SendFailed("IncompleteRead")
        if response.will_close:
            self.close()
        return _Answer(response.status, response.headers, body)

    def _describe(self, exc: BaseException) -> str:
        """What went wrong on the wire, for an administrator (the OS's words, never a payload)."""
        if isinstance(exc, TimeoutError):
            return f"no answer within {self.timeout:g} s"
        reason = exc.strerror if isinstance(exc, OSError) else None
        return f"{exc.__class__.__name__}: {reason}" if reason else exc.__class__.__name__


def _readable(sock: socket.socket) -> bool:
    """Whether the socket has something to read (or its end of file) right now."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


def _split_url(url: str) -> tuple[str, str, int | None, str]:
    """(scheme, host, port or None for the scheme's default, path prefix) of the broker's URL."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:  # not a number, or out of range
        port = 0
    if parts.scheme not in ("http", "https") or not parts.hostname or port == 0:
        raise UsageError(f"broker URL {url!r}: use http://HOST:PORT or https://HOST:PORT")
    return parts.scheme, parts.hostname, port, parts.path.rstrip("/")


def _sleep_retry_after(answer: _Answer, will_retry: bool) -> None:
    if not will_retry:
        return
    try:
        delay = float(answer.headers.get("Retry-After", "0"))
    except ValueError:
        delay = 0.0
    time.sleep(min(max(delay, 0.0), MAX_RETRY_AFTER))


def _json_object(answer: _Answer) -> dict[str, Any]:
    if not isinstance(answer.json, dict):
        raise BrokerUnavailable(f"the broker answered {answer.status} without a JSON object")
    return answer.json


def _refusal(answer: _Answer) -> BrokerRefused:
    reason = f"http-{answer.status}"
    message = f"HTTP {answer.status}"
    if isinstance(answer.json, dict):
        if isinstance(answer.json.get("reason"), str):
            reason = answer.json["reason"]
        if isinstance(answer.json.get("error"), str):
            message = answer.json["error"]
    return BrokerRefused(reason, message)


def _string(answer: dict[str, Any], key: str) -> str:
    value = answer.get(key)
    if not isinstance(value, str) or not value:
        raise KeyError(key)
    return value


def _integer(answer: dict[str, Any], key: str) -> int:
    value = answer.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise KeyError(key)
    return value
