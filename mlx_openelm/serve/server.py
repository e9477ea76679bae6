"""Running the app under uvicorn: in the foreground (the CLI) or in a background thread (tests,
benchmarks), always on the address given (127.0.0.1 by default)."""

from __future__ import annotations

import threading
import time
from typing import Optional

import uvicorn


def make_server(app, host: str = "127.0.0.1", port: int = 8080, log_level: str = "warning") -> uvicorn.Server:
    return uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                                         timeout_graceful_shutdown=5))


class BackgroundServer:
    """uvicorn in a daemon thread; ``port=0`` takes a free port (``.port`` tells which).

    ``with BackgroundServer(app) as s: requests to s.url``; leaving the block stops the server
    (and its engines, through the app's lifespan)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, start_timeout: float = 60.0):
        self.server = make_server(app, host, port)
        self.host = host
        self.start_timeout = start_timeout
        self.thread: Optional[threading.Thread] = None
        self.port: Optional[int] = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "BackgroundServer":
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.host}")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout)

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
