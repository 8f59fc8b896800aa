"""Guards in front of the broker's routes: per-key token-bucket rate limits and the request-body cap
(applied before the app reads a byte more than the cap)."""

import json
import threading
import time
from collections import OrderedDict

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class RateLimiter:
    """Token buckets keyed by host (or client address); bounded memory (the least recently used key
    goes first), thread-safe. A rate of 0 disables it."""

    def __init__(self, rate: float, burst: int, max_keys: int = 10000) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def has_room(self, key: str) -> bool:
        """Whether `key` could make a request now, without spending from its bucket."""
        if self.rate <= 0:
            return True
        with self._lock:
            tokens, last = self._buckets.get(key, (self.burst, time.monotonic()))
        return min(self.burst, tokens + (time.monotonic() - last) * self.rate) >= 1.0

    def allow(self, key: str) -> bool:
        """Spend one request from `key`'s bucket; False when it is empty."""
        if self.rate <= 0:
            return True
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.pop(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            allowed = tokens >= 1.0
            self._buckets[key] = (tokens - 1.0 if allowed else tokens, now)
            if len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        return allowed


class BodyLimit:
    """Reads at most `limit` body bytes before the app sees the request; more gives 413."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = self.limit + 1
                if declared > self.limit:
                    await self._too_large(send)
                    return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            if size > self.limit:
                await self._too_large(send)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        await self.app(scope, replaying(b"".join(chunks), receive), send)

    async def _too_large(self, send: Send) -> None:
        payload = json.dumps({"error": f"request body larger than {self.limit} bytes",
                              "reason": "body-too-large"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(payload)).encode()), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": payload})


def replaying(body: bytes, receive: Receive) -> Receive:
    """A receive channel that gives the app `body` (already read whole) as one message, then whatever
    `receive` brings next (a disconnect)."""
    delivered = False

    async def replay() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
