"""The host's side of the broker's /v1 API, used by the libvirt hook and `sevhook start`.

It fails closed: every refusal is a BrokerRefused carrying the broker's stable reason code, and
every transport problem (after bounded retries with backoff) is a BrokerUnavailable. A request is
only retried when it cannot have been acted on twice: connection failures (nothing was sent),
5xx answers (the broker rolls its transaction back) and 429 (not processed). The secret packet is
never logged and is kept out of reprs."""

from __future__ import annotations

import logging
import random
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

import httpx

from sevhook.errors import SevhookError, UsageError

if TYPE_CHECKING:
    from sevhook.xml.models import BrokerRef

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0
MAX_RETRY_AFTER = 5.0


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


def _tls_failure(exc: BaseException) -> ssl.SSLError | None:
    """The TLS error under an httpx connection error, if that is what it was (not worth retrying)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


class BrokerClient:
    """A small synchronous client; one instance may be reused for many calls (keeps connections)."""

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
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise UsageError(f"broker URL {url!r}: use http://HOST:PORT or https://HOST:PORT")
        if token is None and token_file is not None:
            token = read_token_file(token_file)
        elif token is not None:
            token = token.strip()
            _check_token(token, "broker token")
        if retries < 0 or timeout <= 0:
            raise UsageError("broker client: retries must be >= 0 and timeout > 0")
        verify: ssl.SSLContext | bool = True
        if ca_file is not None:
            ca_path = Path(ca_file)
            try:
                verify = ssl.create_default_context(cafile=str(ca_path))
            except FileNotFoundError:
                raise UsageError(f"{ca_path}: broker CA file not found") from None
            except (ssl.SSLError, OSError) as exc:
                raise UsageError(f"{ca_path}: not a PEM CA certificate file ({exc.__class__.__name__})") from None
        headers = {"Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.url = url.rstrip("/")
        self.retries = retries
        self.backoff = backoff
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=httpx.Timeout(timeout), verify=verify)

    @classmethod
    def from_ref(cls, ref: BrokerRef, timeout: float = DEFAULT_TIMEOUT, retries: int = 2) -> BrokerClient:
        """A client for a domain's `<sevhook:broker url= ca-file= token-file=>` reference."""
        return cls(ref.url, ca_file=ref.ca_file, token_file=ref.token_file, timeout=timeout, retries=retries)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> BrokerClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def create_launch(self, guest: str, pdh_b64: str, cert_chain_b64: str) -> LaunchGrant:
        """Ask for a launch session for `guest` on the platform whose PDH and chain are given."""
        body = {"guest": guest, "pdh": pdh_b64, "cert_chain": cert_chain_b64}
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
        last_problem = "no attempt made"
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * (2 ** (attempt - 1)) * random.uniform(0.5, 1.0))
            try:
                response = self._http.request(method, path, json=body)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
                tls = _tls_failure(exc)
                if tls is not None:
                    raise BrokerUnavailable(f"TLS with the broker at {self.url} failed: {tls.__class__.__name__}: "
                                            f"{getattr(tls, 'reason', None) or tls}; check the broker CA file") from None
                last_problem = f"cannot connect ({exc.__class__.__name__})"
            except httpx.TransportError as exc:
                last_problem = f"{exc.__class__.__name__} while talking to the broker"
                if not resend_after_send_error:
                    break
            else:
                if response.status_code == 200:
                    return _json_object(response)
                if response.status_code == 429:
                    last_problem = "rate limited (429)"
                    _sleep_retry_after(response, attempt < self.retries)
                elif response.status_code >= 500:
                    last_problem = f"server error {response.status_code}"
                else:
                    raise _refusal(response)
            log.warning("broker %s %s: %s (attempt %d of %d)", method, path, last_problem, attempt + 1,
                        self.retries + 1)
        raise BrokerUnavailable(f"the key broker at {self.url} is unavailable: {last_problem}; "
                                "check that it runs and that the URL is right")


def _sleep_retry_after(response: httpx.Response, will_retry: bool) -> None:
    if not will_retry:
        return
    try:
        delay = float(response.headers.get("Retry-After", "0"))
    except ValueError:
        delay = 0.0
    time.sleep(min(max(delay, 0.0), MAX_RETRY_AFTER))


def _json_object(response: httpx.Response) -> dict[str, Any]:
    try:
        value = response.json()
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise BrokerUnavailable(f"the broker answered {response.status_code} without a JSON object")
    return value


def _refusal(response: httpx.Response) -> BrokerRefused:
    try:
        value = response.json()
    except ValueError:
        value = None
    reason = f"http-{response.status_code}"
    message = f"HTTP {response.status_code}"
    if isinstance(value, dict):
        if isinstance(value.get("reason"), str):
            reason = value["reason"]
        if isinstance(value.get("error"), str):
            message = value["error"]
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
