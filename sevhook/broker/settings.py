"""The broker's limits and timeouts against slow, idle and hostile clients, in one dataclass (the serve
flags fill it; a configuration file can fill the same fields). The defaults are safe for a broker on a
network: nothing a client sends can hold a connection, a worker or memory for long."""

from __future__ import annotations

from dataclasses import dataclass, fields

from sevhook.errors import UsageError

DEFAULT_MAX_BODY = 64 * 1024


@dataclass(frozen=True)
class Limits:
    """Every bound the broker puts on a client; `check()` names the first one out of range."""

    max_body: int = DEFAULT_MAX_BODY  # bytes of one request body; more gives 413
    max_header_bytes: int = 16 * 1024  # request line plus all headers; more gives 431 and the connection closes
    header_timeout: float = 10.0  # seconds from a connection's (or request's) first byte to its last header
    body_timeout: float = 10.0  # seconds from the last header to the last body byte
    keepalive_timeout: float = 5.0  # seconds an idle keep-alive connection stays open between requests
    max_connections: int = 512  # open connections; more are answered 503 and closed at once
    rate: float = 100.0  # requests per second per host token; 0 disables
    burst: int = 200
    auth_failure_rate: float = 5.0  # unauthenticated or failed-auth requests per second per client address
    auth_failure_burst: int = 50

    def check(self) -> None:
        """Refuse values that would disable a protection by accident (0 disables only the rate limits)."""
        minimums = {"max_body": 1024, "max_header_bytes": 1024, "header_timeout": 0.1, "body_timeout": 0.1,
                    "keepalive_timeout": 0.1, "max_connections": 1, "rate": 0.0, "burst": 1,
                    "auth_failure_rate": 0.0, "auth_failure_burst": 1}
        for item in fields(self):
            value = getattr(self, item.name)
            if value < minimums[item.name]:
                flag = "--rate-limit" if item.name == "rate" else "--" + item.name.replace("_", "-")
                raise UsageError(f"{flag} {value}: must be at least {minimums[item.name]}")
