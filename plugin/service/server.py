"""Listening: TCP (127.0.0.1 by default) and/or a Unix socket, one uvicorn server over both.

The sockets are bound here rather than by uvicorn: uvicorn makes a Unix socket world-writable
(0666), while ours is 0660 (the directory's permissions, set by whoever starts us, do the rest).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import pwd
import signal
import socket
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import uvicorn

from longembed.plugin.service.host import Host
from longembed.plugin.service.http import build_app

log = logging.getLogger(__name__)

SOCKET_MODE = 0o660


class BindRefused(ValueError):
    """A listening address this configuration must not use."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: may resolve anywhere


def check_bind(host: str, port: int, api_keys: tuple[str, ...]) -> None:
    if port and not is_loopback(host) and not api_keys:
        raise BindRefused(
            f"refusing to listen on {host}:{port} without API keys: anyone who can reach it could use the "
            f"model host. Give --api-key-file FILE (or LONGEMBED_API_KEYS), or bind 127.0.0.1"
        )


def bind_tcp(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and
    # without it every keep-alive answer waits ~40 ms (Nagle against the client's delayed ACK).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except BaseException:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def bind_unix(path: str | os.PathLike, owner: str | None = None) -> socket.socket:
    """A listening Unix socket at `path`, mode 0660; a stale socket file (nobody listening) is replaced.

    `owner` (root only): the user the socket is handed to, e.g. the PostgreSQL server's OS user, whose
    backends then connect to a host that runs as root."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise FileExistsError(f"{path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise
            path.unlink(missing_ok=True)  # stale: left by a host that died
        else:
            raise FileExistsError(f"another process is listening on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o117)  # created 0660 from the start: no window with looser permissions
    try:
        sock.bind(str(path))
        os.chmod(path, SOCKET_MODE)
        if owner is not None:
            entry = pwd.getpwnam(owner)
            os.chown(path, entry.pw_uid, entry.pw_gid)
        sock.listen(2048)
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server, minus re-raising SIGTERM/SIGINT after its graceful shutdown: that would kill
    the process before the host stops its workers and removes its socket, and exit 143 instead of 0."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def make_server(host: Host, log_level: str = "warning") -> uvicorn.Server:
    config = uvicorn.Config(
        build_app(host),
        lifespan="off",
        access_log=False,
        log_level=log_level,
        timeout_graceful_shutdown=30,
    )
    return _Server(config)


def serve(host: Host, sockets: list[socket.socket], unix_path: str | None = None) -> None:
    """Serve until SIGINT/SIGTERM: the models load meanwhile (/ready says when), then drain and stop."""
    server = make_server(host, log_level="info")
    host.start()
    try:
        server.run(sockets=sockets)
    finally:
        host.stop()
        if unix_path:
            Path(unix_path).unlink(missing_ok=True)
