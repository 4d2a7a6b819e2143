"""The model host beside the embedded server: started by `longembed up`, restarted when it dies.

`HostProcess(home)` starts a small supervisor process (`python -m longembed.plugin.service.supervisor`,
its own session, so it outlives the command that started it); the supervisor runs `longembed serve` as
its child and starts it again after a crash, waiting longer after each quick death (1 s doubling to
30 s; a child that ran a minute resets the wait). SIGTERM stops both. The supervisor holds an exclusive
lock on its pid file, so two `up`s never run two hosts on one socket.

The host listens on `<home>/host/host.sock`, in a folder only the server's OS user (and root) can open:
PostgreSQL backends reach it there without a key. The database's DSN (with its password) travels in the
environment, never on a command line that `ps` shows to every user.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

READY_TIMEOUT_S = 120.0  # importing torch and loading the model: seconds, more on a busy machine
STOP_TIMEOUT_S = 15.0
BACKOFF_START_S = 1.0
BACKOFF_CAP_S = 30.0
HEALTHY_RUN_S = 60.0  # a child that ran this long died of something new: restart at once
EXIT_USAGE = 2  # `longembed serve` refused its arguments (plugin/cli/errors.py)


class HostError(RuntimeError):
    """The model host could not be started or reached."""


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = str(path)

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def request(socket_path: Path, path: str, timeout: float = 5.0, body: Any = None) -> tuple[int, Any]:
    """GET `path` from the host over its Unix socket (POST `body` as JSON when given):
    (status, decoded JSON or text)."""
    conn = _UnixHTTPConnection(socket_path, timeout)
    try:
        if body is None:
            conn.request("GET", path)
        else:
            conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        body = response.read().decode("utf-8", "replace")
    finally:
        conn.close()
    try:
        return response.status, json.loads(body)
    except ValueError:
        return response.status, body


class HostProcess:
    """The supervised model host of one embedded home."""

    def __init__(self, home: Path, socket_path: Path, log_file: Path) -> None:
        self.home = home
        self.socket_path = socket_path
        self.pid_file = socket_path.parent / "supervisor.pid"
        self.log_file = log_file

    def running_pid(self) -> int | None:
        """The supervisor's pid while it holds its lock, else None."""
        try:
            fd = os.open(self.pid_file, os.O_RDONLY)
        except FileNotFoundError:
            return None
        with os.fdopen(fd) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:  # held: the supervisor is alive
                text = f.read().strip()
                return int(text) if text.isdigit() else None
            return None

    def get(self, path: str = "/ready") -> tuple[int, Any] | None:
        """The host's answer to `path`, or None when nothing answers on the socket."""
        try:
            return request(self.socket_path, path)
        except (OSError, http.client.HTTPException):
            return None

    def post(self, path: str, body: Any, timeout: float = 120.0) -> tuple[int, Any]:
        """POST `body` (JSON) to `path` over the socket; OSError when nothing answers."""
        try:
            return request(self.socket_path, path, timeout, body)
        except http.client.HTTPException as exc:
            raise OSError(str(exc)) from exc

    def start(self, serve_args: list[str], env: dict[str, str], timeout: float = READY_TIMEOUT_S) -> int:
        """Start the supervisor (unless one runs) and wait until the host is ready (/ready: models loaded,
        database answering)."""
        pid = self.running_pid()
        process = None
        if pid is None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            log = os.open(self.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                process = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "longembed.plugin.service.supervisor",
                        "--pid-file",
                        str(self.pid_file),
                        "--",
                        *serve_args,
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    env=env,
                    start_new_session=True,  # outlives `longembed up` and its terminal
                )
            finally:
                os.close(log)
            pid = process.pid
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            answer = self.get("/ready")
            if answer is not None and answer[0] == 200:
                return pid
            if process is not None and process.poll() is not None:
                log_tail = self.log_tail()
                raise HostError(f"the model host's supervisor exited; see {self.log_file}:\n{log_tail}")
            time.sleep(0.1)
        if process is not None:  # ours: do not leave it restarting a host that never comes up
            self.stop()
        raise HostError(f"the model host was not ready within {timeout:.0f} s; see {self.log_file}")

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> bool:
        """SIGTERM the supervisor (which stops the host) and wait; False when none was running."""
        pid = self.running_pid()
        if pid is None:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.running_pid() is None:
                return True
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        return True

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def supervise(pid_file: Path, serve_args: list[str]) -> int:
    """Run `longembed serve serve_args` until SIGTERM, restarting it when it dies."""
    fd = os.open(pid_file, os.O_RDWR | os.O_CREAT, 0o600)
    lock = os.fdopen(fd, "r+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print("longembed: another supervisor runs this host", file=sys.stderr)
        return 1
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()

    stopping = False
    child: subprocess.Popen[bytes] | None = None

    def on_term(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.terminate()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    backoff = BACKOFF_START_S
    while not stopping:
        started = time.monotonic()
        child = subprocess.Popen([sys.executable, "-m", "longembed.plugin.cli", "serve", *serve_args])
        while True:
            try:
                code = child.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                continue
        if stopping:
            break
        ran = time.monotonic() - started
        if code == EXIT_USAGE and ran < HEALTHY_RUN_S:  # refused its configuration: a restart cannot help
            print("longembed: the model host refused its configuration; not restarting", file=sys.stderr)
            break
        if ran >= HEALTHY_RUN_S:
            backoff, wait = BACKOFF_START_S, 0.0
        else:
            backoff, wait = min(backoff * 2, BACKOFF_CAP_S), backoff
        print(
            f"longembed: the model host exited with {code} after {ran:.1f} s; restart in {wait:g} s",
            file=sys.stderr,
            flush=True,
        )
        deadline = time.monotonic() + wait
        while not stopping and time.monotonic() < deadline:
            time.sleep(0.1)
    if child is not None and child.poll() is None:
        try:
            child.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    with contextlib.suppress(FileNotFoundError):
        pid_file.unlink()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m longembed.plugin.service.supervisor")
    parser.add_argument("--pid-file", type=Path, required=True)
    parser.add_argument("serve_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    serve_args = args.serve_args[1:] if args.serve_args[:1] == ["--"] else args.serve_args
    return supervise(args.pid_file, serve_args)


if __name__ == "__main__":
    sys.exit(main())
