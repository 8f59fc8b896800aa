"""The host's side of the broker's /v1 API, used by the libvirt hook and `sevhook start`.

It fails closed: every refusal is a BrokerRefused carrying the broker's stable reason code, and
every transport problem (after bounded retries with backoff) is a BrokerUnavailable. A request is
only retried when it cannot have been acted on twice: connection failures (nothing was sent),
5xx answers (the broker rolls its transaction back) and 429 (not processed). The secret packet is
never logged and is kept out of reprs.

It is built on the standard library's http.client and ssl (the certificate is checked against the
given CA file or the system's trust store, host name included), which load in a few milliseconds:
the libvirt hook imports this module within a guest's attestation time. Proxy variables in the
environment are not used: the bearer token goes to the broker's URL and nowhere else.

The timeout is one deadline for a whole call, end to end: connecting, the TLS handshake, sending the
request, every read of the answer's headers and body, and the retries with their pauses. Before
every send and receive the socket's timeout is set to the time left, so a broker that dribbles its
answer a byte at a time cannot hold the hook past its budget (a per-read timeout would let it)."""

from __future__ import annotations

import http.client
import json
import logging
import random
import select
import socket
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from sevhook.errors import SevhookError, UsageError
from sevhook.files import read_input_file

if TYPE_CHECKING:
    from sevhook.xml.models import BrokerRef

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0
MAX_RETRY_AFTER = 5.0
MAX_ANSWER_BYTES = 1 << 20  # the broker's answers are a few kilobytes; more is not a broker talking
MAX_TOKEN_BYTES = 4096  # tokens are tens of characters; this bounds the header every request carries
MAX_CA_FILE_BYTES = 1 << 20  # a CA bundle in PEM


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
    """Read a bearer token file (one line, at most MAX_TOKEN_BYTES: it travels in every request's
    header); the token itself never appears in a message."""
    if not Path(path).exists():
        raise UsageError(f"{path}: broker token file not found; ask the guest owner for a host token")
    data = read_input_file(path, MAX_TOKEN_BYTES, "broker token file", regular_only=True)
    try:
        token = data.decode("ascii").strip()
    except UnicodeDecodeError as exc:
        raise UsageError(f"broker token file {path}: not ASCII; it must hold one line, the host token the guest "
                         "owner gave") from exc
    _check_token(token, f"broker token file {path}")
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


class _Deadline:
    """The end of one call's time budget; `remaining()` raises TimeoutError once it has passed."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._end = time.monotonic() + seconds

    def remaining(self) -> float:
        left = self._end - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no answer within {self.seconds:g} s")
        return left

    def sleep(self, seconds: float) -> bool:
        """Pause up to `seconds` if the budget allows a try after it; False (without pausing) if not."""
        if self._end - time.monotonic() <= seconds:
            return False
        time.sleep(seconds)
        return True


class _DeadlineBound:
    """Socket methods that first set the socket's timeout to the time the call has left. CPython
    bounds one recv by the timeout, and sendall, SSL reads, writes and the handshake by it in total."""

    deadline: _Deadline | None = None

    def _arm(self) -> None:
        if self.deadline is not None:
            self.settimeout(self.deadline.remaining())  # type: ignore[attr-defined]

    def recv(self, *args: Any) -> bytes:
        self._arm()
        return super().recv(*args)  # type: ignore[misc]

    def recv_into(self, *args: Any) -> int:
        self._arm()
        return super().recv_into(*args)  # type: ignore[misc]

    def send(self, *args: Any) -> int:
        self._arm()
        return super().send(*args)  # type: ignore[misc]

    def sendall(self, *args: Any) -> None:
        self._arm()
        super().sendall(*args)  # type: ignore[misc]


class _DeadlineSocket(_DeadlineBound, socket.socket):
    """A plain TCP connection to the broker, bounded by the current call's deadline."""


class _DeadlineSSLSocket(_DeadlineBound, ssl.SSLSocket):
    """A TLS connection to the broker (the client's SSLContext makes these), bounded likewise."""

    def do_handshake(self, block: bool = False) -> None:
        self._arm()
        super().do_handshake(block)


class _BoundedConnection(http.client.HTTPConnection):
    """http.client's connection with every step bounded by `deadline` (set before each call):
    connect() gets the time left, and the socket it makes re-arms its timeout before every I/O."""

    def __init__(self, host: str, port: int | None, deadline: _Deadline, tls: ssl.SSLContext | None) -> None:
        super().__init__(host, port or (http.client.HTTPS_PORT if tls is not None else http.client.HTTP_PORT))
        self.deadline = deadline
        self._tls = tls

    def bind_to(self, deadline: _Deadline) -> None:
        """Give a kept connection the deadline of the call about to use it."""
        self.deadline = deadline
        if isinstance(self.sock, _DeadlineBound):
            self.sock.deadline = deadline

    def connect(self) -> None:
        raw = socket.create_connection((self.host, self.port), self.deadline.remaining())
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls is None:
                bounded: _DeadlineBound = _DeadlineSocket(raw.family, raw.type, raw.proto, fileno=raw.detach())
            else:
                raw.settimeout(self.deadline.remaining())  # the handshake's budget, in total
                bounded = self._tls.wrap_socket(raw, server_hostname=self.host)  # a _DeadlineSSLSocket
        except BaseException:
            raw.close()
            raise
        bounded.deadline = self.deadline
        self.sock = bounded


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
            if not Path(ca_file).exists():
                raise UsageError(f"{ca_file}: broker CA file not found")
            ca_pem = read_input_file(ca_file, MAX_CA_FILE_BYTES, "broker CA file", regular_only=True)
            try:
                tls = ssl.create_default_context(cadata=ca_pem.decode("ascii"))
            except (ssl.SSLError, ValueError) as exc:  # UnicodeDecodeError too
                raise UsageError(f"broker CA file {ca_file}: not a PEM CA certificate file "
                                 f"({exc.__class__.__name__})") from exc
        elif scheme == "https":
            tls = ssl.create_default_context()  # the system's trust store; verifies the host name too
        if tls is not None:
            tls.sslsocket_class = _DeadlineSSLSocket
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
        self._connection: _BoundedConnection | None = None

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

    def _call(self, method: str, path: str, body: dict[str, Any] | None, *, resend_after_send_error: bool  # noqa: PLR0912  (a branch per failure kind)
              ) -> dict[str, Any]:
        """One request within one deadline of `timeout` seconds, retries and their pauses included."""
        payload = None if body is None else json.dumps(body).encode("utf-8")
        deadline = _Deadline(self.timeout)
        last_problem = "no attempt made"
        for attempt in range(self.retries + 1):
            if attempt and not deadline.sleep(self.backoff * (2 ** (attempt - 1)) * random.uniform(0.5, 1.0)):
                break
            try:
                connection = self._connect(deadline)
            except ssl.SSLError as exc:  # a certificate the CA file does not vouch for: retrying cannot help
                self.close()
                why = getattr(exc, "verify_message", None) or exc.reason or exc
                raise BrokerUnavailable(f"TLS with the broker at {self.url} failed: {exc.__class__.__name__}: "
                                        f"{why}; check the broker CA file") from exc
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
                        if attempt < self.retries and not deadline.sleep(_retry_after(answer)):
                            break
                    elif answer.status >= 500:
                        last_problem = f"server error {answer.status}"
                    else:
                        raise _refusal(answer)
            log.info("broker %s %s: %s (attempt %d of %d)", method, path, last_problem, attempt + 1,
                        self.retries + 1)
        raise BrokerUnavailable(f"the key broker at {self.url} is unavailable: {last_problem}; "
                                "check that it runs and that the URL is right")

    def _connect(self, deadline: _Deadline) -> _BoundedConnection:
        """The kept connection if the broker has not closed it meanwhile, else a new one (TCP, and
        the TLS handshake with certificate and host name checks), so that a request is only ever
        sent on a connection that was open when it was sent. Either is bound to `deadline`."""
        if self._connection is not None:
            sock = self._connection.sock
            if sock is not None and not _readable(sock):
                self._connection.bind_to(deadline)
                return self._connection  # idle and quiet: still open
            self.close()  # readable while idle means closed by the broker (or junk): never reuse it
        connection = _BoundedConnection(self._host, self._port, deadline, self._tls)
        try:
            connection.connect()
        except OSError:
            connection.close()
            raise
        self._connection = connection
        return connection

    def _exchange(self, connection: _BoundedConnection, method: str, path: str,
                  payload: bytes | None) -> _Answer:
        headers = dict(self._headers)
        if payload is not None:
            headers["Content-Type"] = "application/json"
        try:
            connection.request(method, self._prefix + path, body=payload, headers=headers)
            response = connection.getresponse()
            body = response.read(MAX_ANSWER_BYTES + 1)
        except (OSError, http.client.HTTPException) as exc:
            raise _SendFailed(self._describe(exc)) from exc
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


def _retry_after(answer: _Answer) -> float:
    """The pause a 429 asks for, within 0..MAX_RETRY_AFTER seconds."""
    try:
        delay = float(answer.headers.get("Retry-After", "0"))
    except ValueError:
        delay = 0.0
    return min(max(delay, 0.0), MAX_RETRY_AFTER)


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
