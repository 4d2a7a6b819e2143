"""Schema migrations: numbered files run once, function files rerun on every migrate.

Two kinds of SQL file ship inside the `migrations` package (so they travel with the wheel):

- `migrations/versions/NNNN_name.sql` run once each, in their own transaction, and are recorded with the
  sha256 of their body in `longembed.schema_migrations`. An applied file whose body changed is refused:
  the database no longer matches what the file says, and rerunning it would not fix that.
- `migrations/functions/*.sql` hold `CREATE OR REPLACE` definitions and rerun on every migrate, so a fixed
  function reaches existing databases. A first line `-- requires: ext1, ext2` names extensions the file
  needs (plpython3u for the SQL embed()); the file is skipped with a notice where the server lacks one.

Every transaction first takes one advisory lock, so concurrent migrate runs (two processes starting at
once) queue up instead of racing; the second finds everything applied. Outside schema `longembed`,
migrate touches: `CREATE EXTENSION vector` (and the extensions a function file requires), the wrappers
`public.embed` / `public.search` (functions/025_public_wrappers.sql), the server-wide roles
`longembed_reader` / `longembed_writer` and the migrating role's default privileges in this database
(versions/0003_privileges.sql, functions/090_privileges.sql). Notices the SQL raises for the user
(text starting "longembed:", e.g. roles left out for lack of CREATEROLE) end up in the report.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field
from importlib import resources

import psycopg

log = logging.getLogger(__name__)

SCHEMA = "longembed"
# pg_advisory_xact_lock key: hashtextextended() of this text, computed by the server.
LOCK_NAME = "longembed.migrate"

_VERSION_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_REQUIRES = re.compile(r"^--\s*requires:\s*(.+)$", re.IGNORECASE)


class MigrationError(RuntimeError):
    """A migration file cannot be applied (changed body, bad file name, failing SQL)."""


@dataclass(frozen=True)
class MigrationFile:
    kind: str  # "version" | "function"
    name: str  # file name
    sql: str
    requires: tuple[str, ...]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()

    @property
    def version(self) -> str:
        return self.name.split("_", 1)[0]


@dataclass
class MigrationReport:
    applied: list[str] = field(default_factory=list)  # version files run now
    already_applied: list[str] = field(default_factory=list)
    functions: list[str] = field(default_factory=list)  # function files (re)run
    skipped: list[str] = field(default_factory=list)  # "file: reason"
    notices: list[str] = field(default_factory=list)  # "file: message" (RAISE NOTICE 'longembed: ...')


def _requires(sql: str) -> tuple[str, ...]:
    first_line = sql.lstrip().split("\n", 1)[0].strip()
    match = _REQUIRES.match(first_line)
    if not match:
        return ()
    return tuple(part.strip() for part in match.group(1).split(",") if part.strip())


def load_files(kind: str, package: str = "longembed.migrations") -> list[MigrationFile]:
    """The packaged files of one kind ("version" or "function"), in name order."""
    folder = resources.files(package).joinpath("versions" if kind == "version" else "functions")
    if not folder.is_dir():
        return []
    files = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".sql"):
            continue
        if kind == "version" and not _VERSION_FILE.match(entry.name):
            raise MigrationError(f"migration file name {entry.name!r} does not match NNNN_name.sql")
        sql = entry.read_text(encoding="utf-8")
        files.append(MigrationFile(kind, entry.name, sql, _requires(sql)))
    versions = [f.version for f in files if kind == "version"]
    if len(versions) != len(set(versions)):
        raise MigrationError(f"two migration files share a version number: {versions}")
    return files


def _lock(conn: psycopg.Connection) -> None:
    conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (LOCK_NAME,))


def _ensure_bookkeeping(conn: psycopg.Connection) -> None:
    conn.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
    conn.execute(
        f"""CREATE TABLE IF NOT EXISTS {SCHEMA}.schema_migrations (
                version    text PRIMARY KEY,
                name       text NOT NULL,
                sha256     text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now())"""
    )


def _missing_extension(conn: psycopg.Connection, extensions: tuple[str, ...]) -> str | None:
    """Why a file needing `extensions` cannot run here, or None when it can."""
    for ext in extensions:
        row = conn.execute(
            """SELECT installed_version IS NOT NULL,
                      (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)
               FROM pg_available_extensions WHERE name = %s""",
            (ext,),
        ).fetchone()
        if row is None:
            return f"extension {ext} is not available on this server"
        installed, superuser = row
        if not installed and not superuser:
            return f"extension {ext} is not installed and only a superuser can install it"
        if not superuser and _untrusted_language(conn, ext):
            return f"functions in the untrusted language {ext} can only be created by a superuser"
    return None


def _untrusted_language(conn: psycopg.Connection, name: str) -> bool:
    row = conn.execute("SELECT NOT lanpltrusted FROM pg_language WHERE lanname = %s", (name,)).fetchone()
    return bool(row and row[0])


def migrate(conn: psycopg.Connection, package: str = "longembed.migrations") -> MigrationReport:
    """Bring schema `longembed` up to date. Safe to run twice and from several processes at once.

    `conn` must not be inside a transaction; each file commits on its own, so a failing file leaves
    the ones before it applied and itself not recorded. `package`: where the SQL files live (tests
    point it at a package of their own).
    """
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        raise MigrationError("migrate() needs a connection that is not inside a transaction")
    report = MigrationReport()
    for file in load_files("version", package):
        with conn.transaction():
            _lock(conn)
            _ensure_bookkeeping(conn)
            row = conn.execute(
                f"SELECT name, sha256 FROM {SCHEMA}.schema_migrations WHERE version = %s", (file.version,)
            ).fetchone()
            if row is not None:
                if row[1] != file.sha256:
                    raise MigrationError(
                        f"migration {file.name} was applied (as {row[0]}, sha256 {row[1][:12]}) but its body "
                        f"changed (sha256 {file.sha256[:12]}); never edit an applied migration, add a new one"
                    )
                report.already_applied.append(file.name)
                continue
            reason = _missing_extension(conn, file.requires)
            if reason:
                raise MigrationError(f"migration {file.name} cannot run: {reason}")
            _run_sql(conn, file, report)
            conn.execute(
                f"INSERT INTO {SCHEMA}.schema_migrations (version, name, sha256) VALUES (%s, %s, %s)",
                (file.version, file.name, file.sha256),
            )
            report.applied.append(file.name)
    for file in load_files("function", package):
        with conn.transaction():
            _lock(conn)
            reason = _missing_extension(conn, file.requires)
            if reason:
                report.skipped.append(f"{file.name}: {reason}")
                log.warning("skipped %s: %s", file.name, reason)
                continue
            _run_sql(conn, file, report)
            report.functions.append(file.name)
    return report


def _run_sql(conn: psycopg.Connection, file: MigrationFile, report: MigrationReport) -> None:
    def keep_notice(diag: psycopg.errors.Diagnostic) -> None:
        message = diag.message_primary or ""
        if message.startswith("longembed:"):
            report.notices.append(f"{file.name}: {message}")
            log.warning("%s: %s", file.name, message)

    conn.add_notice_handler(keep_notice)
    try:
        _pin_search_path(conn)
        # A file holds several statements: no parameters, so psycopg sends it as one simple query.
        conn.execute(file.sql.encode())
    except psycopg.Error as exc:
        raise MigrationError(f"migration {file.name} failed: {exc}") from exc
    finally:
        conn.remove_notice_handler(keep_notice)


def _pin_search_path(conn: psycopg.Connection) -> None:
    """For this transaction, search only pgvector's schema (public where pgvector is not installed yet).

    A role named `longembed` (docker-compose's) has "$user" = our schema first in its search_path, so
    `CREATE EXTENSION vector` would put pgvector's types and operators into schema longembed, where the
    revokes of 0003 and 090 would then take them from everybody else; the files name their own objects
    with the schema, and `vector` resolves through this path."""
    row = conn.execute(
        """SELECT coalesce((SELECT n.nspname FROM pg_catalog.pg_extension e
                              JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace
                             WHERE e.extname = 'vector'),
                           (SELECT nspname FROM pg_catalog.pg_namespace WHERE nspname = 'public'))"""
    ).fetchone()
    if row and row[0]:
        conn.execute(
            "SELECT pg_catalog.set_config('search_path', pg_catalog.quote_ident(%s), true)", (row[0],)
        )


def applied_versions(conn: psycopg.Connection) -> dict[str, str]:
    """version -> file name of the applied version files (empty before the first migrate)."""
    exists = conn.execute("SELECT to_regclass(%s)", (f"{SCHEMA}.schema_migrations",)).fetchone()
    if exists is None or exists[0] is None:
        return {}
    return dict(conn.execute(f"SELECT version, name FROM {SCHEMA}.schema_migrations ORDER BY version"))
