"""A key broker for one process's lifetime: the real broker (SQLite in a data directory, the FastAPI
app, uvicorn) served from a thread on a random loopback port, for the demo. It stops cleanly: the
server is asked to exit, its thread joined within a bound, and the database released."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from types import TracebackType

from sevhook.errors import SevhookError

START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0


class LocalBroker:
    """`with LocalBroker(data_dir) as broker:` -> broker.url, broker.service (the Broker, for the
    owner's registrations, as `sevhook broker add-*` do)."""

    def __init__(self, data_dir: Path) -> None:
        from sevhook.broker.server import open_broker  # noqa: PLC0415

        self.data_dir = data_dir
        self.service = open_broker(data_dir, None, create=True)
        self._server = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self.url = ""

    def start(self, timeout: float = START_TIMEOUT) -> str:
        """Serve on 127.0.0.1 and a free port; returns the URL once the server accepts connections."""
        import uvicorn  # noqa: PLC0415

        from sevhook.broker.app import Limits, create_app, wrap_limits  # noqa: PLC0415
        from sevhook.broker.vault import admin_token_digest  # noqa: PLC0415

        limits = Limits(rate=0)  # one local client: no rate limit
        app = wrap_limits(create_app(self.service, admin_token_digest(self.data_dir), limits), limits)
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.bind(("127.0.0.1", 0))
        port = self._socket.getsockname()[1]
        config = uvicorn.Config(app, log_config=None, log_level="warning", access_log=False, lifespan="off",
                                server_header=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name="sevhook-local-broker", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise SevhookError(f"the local key broker did not start within {timeout:g} s")
            time.sleep(0.005)
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout)
            if self._thread.is_alive():  # open keep-alive connections: do not wait for them any longer
                self._server.force_exit = True
                self._thread.join(timeout)
        if self._socket is not None:
            self._socket.close()
        self.service.engine.dispose()
        self._server = self._thread = self._socket = None

    def __enter__(self) -> LocalBroker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
