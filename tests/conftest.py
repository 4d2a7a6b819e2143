"""Session fixtures: one throwaway embedded PostgreSQL server for the whole test run.

`pg_dsn` is a superuser DSN (it may CREATE DATABASE; tests/pgdb.py makes one database per module).
`model_host` runs the model host (`longembed serve`, supervised as `longembed up` runs it) on the server's
Unix socket, for the tests of SQL embed() and search(); it is started only by the modules that use it.
The server lives in a fresh LONGEMBED_HOME under /tmp, reachable by the service user when the tests run
as root; the PL/Python build is shared through the cache (`longembed setup-plpython`), so a test run
never builds it. Set LONGEMBED_TEST_DSN to run against another PostgreSQL (>= 15 with pgvector) instead.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LONGEMBED_HTTP_PORT", "0")  # `longembed up` in tests: the host's Unix socket only


@pytest.fixture(scope="session")
def embedded_server() -> Iterator[object]:
    """A started EmbeddedServer in its own home; stopped and removed at the end of the session."""
    from longembed.plugin.embedded.server import EmbeddedServer

    home = Path("/tmp") / f"longembed-test-{uuid.uuid4().hex[:12]}"
    server = EmbeddedServer(home, durable=False)  # no fsync: a throwaway server, several times faster
    try:
        server.start()
        yield server
    finally:
        try:
            server.stop()
        finally:
            shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_dsn(request: pytest.FixtureRequest) -> str:
    """Superuser DSN of the session's PostgreSQL (database `longembed`)."""
    external = os.environ.get("LONGEMBED_TEST_DSN")
    if external:
        return external
    server = request.getfixturevalue("embedded_server")
    return server.dsn()


@pytest.fixture(scope="session")
def model_host(request: pytest.FixtureRequest) -> Iterator[object]:
    """The model host beside the session's server (the embedded one; an external server's
    `longembed.host` setting must name a running host)."""
    if os.environ.get("LONGEMBED_TEST_DSN"):
        yield None
        return
    from longembed.plugin.cli.server import host_of, host_serve_args

    server = request.getfixturevalue("embedded_server")
    host = host_of(server)
    host.start(host_serve_args(server, http_port=0), dict(os.environ, LONGEMBED_DSN=server.dsn()))
    try:
        yield host
    finally:
        host.stop()
