"""The app served by uvicorn on a daemon thread of this process, for in-process clients (the
serving tests and bench/bench_serving.py); `serve` in app.py is the blocking form a server uses.

    server = serve_in_background(app)   # a free port on 127.0.0.1; returns once /health answers 200
    ... httpx.get(server.url + "/v1/models") ...
    server.stop()                        # stop uvicorn, join its thread, stop the generation worker

or `with serve_in_background(app) as server: ...`.
"""

from __future__ import annotations

import socket
import threading
import time

__all__ = ["BackgroundServer", "free_local_port", "serve_in_background"]


def free_local_port(host: str = "127.0.0.1") -> int:
    """A TCP port on host that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class BackgroundServer:
    """A running uvicorn server: url (http://host:port), server (the uvicorn.Server), thread."""

    def __init__(self, app, url: str, server, thread: threading.Thread):
        self.app = app
        self.url = url
        self.server = server
        self.thread = thread

    def stop(self, join_timeout: float = 10.0) -> None:
        """Ask uvicorn to exit, wait up to join_timeout seconds for its thread, then close the app's
        scheduler (finishing its queued jobs and stopping the runner)."""
        self.server.should_exit = True
        self.thread.join(timeout=join_timeout)
        self.app.state.scheduler.close()

    def __enter__(self) -> "BackgroundServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_in_background(app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                        ready_polls: int = 200) -> BackgroundServer:
    """Start uvicorn serving app on host:port (port 0: a free one) in a daemon thread and poll
    GET /health (up to ready_polls tries, 50 ms apart while the connection is refused) until it
    answers 200."""
    import httpx
    import uvicorn

    port = port or free_local_port(host)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://{host}:{port}"
    for _ in range(ready_polls):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.05)
    return BackgroundServer(app, url, server, thread)
