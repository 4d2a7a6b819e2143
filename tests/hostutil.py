"""Run a real model host (uvicorn on loopback, real model) inside the test process."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from longembed.plugin.service.host import Host, HostConfig
from longembed.plugin.service.server import bind_tcp, bind_unix, make_server


@dataclass
class Running:
    host: Host
    url: str  # http://127.0.0.1:PORT
    socket: str | None


@contextmanager
def running_host(config: HostConfig, unix_path: str | None = None) -> Iterator[Running]:
    host = Host(config)
    host.start(wait=True)
    sockets = [bind_tcp("127.0.0.1", 0)]
    port = sockets[0].getsockname()[1]
    if unix_path:
        sockets.append(bind_unix(unix_path))
    server = make_server(host)
    thread = threading.Thread(target=server.run, kwargs={"sockets": sockets}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the host did not start"
        time.sleep(0.01)
    try:
        yield Running(host, f"http://127.0.0.1:{port}", unix_path)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        host.stop()
