"""Migration runner against a real PostgreSQL: from empty, re-run, concurrent runs, changed files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import psycopg
import pytest

from longembed.plugin.migrate import MigrationError, load_files, migrate
from tests.pgdb import fresh_database

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def dsn(pg_dsn):
    with fresh_database(pg_dsn, "le_migrate") as url:
        yield url


def _tables(conn, schema):
    rows = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = %s ORDER BY 1", (schema,))
    return [r[0] for r in rows.fetchall()]


def test_from_empty_then_rerun_is_a_no_op(dsn):
    versions = [f.name for f in load_files("version")]
    assert versions and versions[0] == "0001_init.sql"
    with psycopg.connect(dsn, autocommit=True) as conn:
        public_before = _tables(conn, "public")
        first = migrate(conn)
        assert first.applied == versions
        assert first.already_applied == []
        assert "010_documents.sql" in first.functions
        assert {"collections", "documents", "queue", "schema_migrations"} <= set(_tables(conn, "longembed"))
        assert _tables(conn, "public") == public_before  # nothing of ours outside schema longembed
        recorded = conn.execute("SELECT name, sha256, applied_at FROM longembed.schema_migrations").fetchall()
        assert [r[0] for r in recorded] == versions
        assert {r[0]: r[1] for r in recorded} == {f.name: f.sha256 for f in load_files("version")}

        second = migrate(conn)
        assert second.applied == []
        assert second.already_applied == versions
        again = conn.execute("SELECT name, sha256, applied_at FROM longembed.schema_migrations").fetchall()
        assert again == recorded  # not re-applied: same rows, same timestamps


def test_changed_body_of_applied_migration_is_refused(dsn):
    with psycopg.connect(dsn, autocommit=True) as conn:
        migrate(conn)
        conn.execute("UPDATE longembed.schema_migrations SET sha256 = repeat('0', 64) WHERE version = '0001'")
        with pytest.raises(MigrationError, match=r"0001_init\.sql was applied .* body changed"):
            migrate(conn)


def test_migrate_inside_a_transaction_is_refused(dsn):
    with psycopg.connect(dsn) as conn:  # not autocommit: the first statement opens a transaction
        conn.execute("SELECT 1")
        with pytest.raises(MigrationError, match="not inside a transaction"):
            migrate(conn)


def test_concurrent_runs_from_two_connections(dsn):
    """Two threads with their own connections: both succeed, every migration applied exactly once."""
    barrier = threading.Barrier(2)
    reports, errors = [], []

    def run():
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                barrier.wait()
                reports.append(migrate(conn))
        except Exception as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    applied = sorted(name for r in reports for name in r.applied)
    assert applied == [f.name for f in load_files("version")]
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM longembed.schema_migrations").fetchone()[0] == len(applied)


def _write_package(root: Path, name: str, files: dict[str, str]) -> None:
    pkg = root / name
    for rel, body in files.items():
        path = pkg / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(body))
    (pkg / "__init__.py").write_text("")


SLOW_PACKAGE = {
    # Not idempotent on purpose: a second run of this file would fail on CREATE TABLE.
    "versions/0001_slow.sql": """
        SELECT pg_sleep(1);
        CREATE TABLE longembed.made_once (id int);
        INSERT INTO longembed.made_once VALUES (1);
    """,
    "versions/0002_more.sql": "ALTER TABLE longembed.made_once ADD COLUMN note text;\n",
    "functions/010_f.sql": "CREATE OR REPLACE FUNCTION longembed.f() RETURNS int AS 'SELECT 1' LANGUAGE sql;",
    "functions/020_needs_ext.sql": "-- requires: no_such_extension_xyz\nSELECT no_such_function();\n",
}


def test_concurrent_runs_from_two_processes_serialise(dsn, tmp_path):
    """Two processes start together on a slow, non-idempotent migration: the advisory lock makes the
    second wait and then find it applied."""
    _write_package(tmp_path, "slow_migrations", SLOW_PACKAGE)
    code = (
        "import json, sys, psycopg\n"
        "from longembed.plugin.migrate import migrate\n"
        "with psycopg.connect(sys.argv[1], autocommit=True) as c:\n"
        "    r = migrate(c, 'slow_migrations')\n"
        "print(json.dumps(r.__dict__))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, dsn], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=60) for p in procs]
    for p, (_out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err.decode()
    reports = [json.loads(out) for out, _ in outputs]
    assert sorted(name for r in reports for name in r["applied"]) == ["0001_slow.sql", "0002_more.sql"]
    for r in reports:
        assert r["functions"] == ["010_f.sql"]
        assert len(r["skipped"]) == 1
        assert r["skipped"][0].startswith(
            "020_needs_ext.sql: extension no_such_extension_xyz is not available"
        )
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT id, note FROM longembed.made_once").fetchall() == [(1, None)]
        assert conn.execute("SELECT longembed.f()").fetchone()[0] == 1


def test_failing_migration_is_not_recorded(dsn, tmp_path):
    _write_package(
        tmp_path,
        "bad_migrations",
        {
            "versions/0001_ok.sql": "CREATE TABLE longembed.ok (id int);\n",
            "versions/0002_bad.sql": "CREATE TABLE longembed.half (id int);\nSELECT 1/0;\n",
        },
    )
    sys.path.insert(0, str(tmp_path))
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            with pytest.raises(MigrationError, match=r"0002_bad\.sql failed: division by zero"):
                migrate(conn, "bad_migrations")
            versions = conn.execute("SELECT version FROM longembed.schema_migrations").fetchall()
            assert versions == [("0001",)]
            # The failing file ran in one transaction: its first statement was rolled back too.
            assert conn.execute("SELECT to_regclass('longembed.half')").fetchone()[0] is None
    finally:
        sys.path.remove(str(tmp_path))


def test_non_superuser_owner_migrates_and_skips_untrusted_language_functions(dsn):
    """A database owner without superuser (the usual app role): the schema migrates; the PL/Python
    functions, which only a superuser may create, are skipped with the reason instead of failing."""
    from psycopg import sql
    from psycopg.conninfo import make_conninfo

    role = f"le_app_{os.getpid()}"
    with psycopg.connect(dsn, autocommit=True) as admin:
        has_plpython = admin.execute(
            "SELECT count(*) FROM pg_available_extensions WHERE name = 'plpython3u'"
        ).fetchone()[0]
        if not has_plpython:
            pytest.skip("the server has no plpython3u (run `longembed setup-plpython`)")
        admin.execute("CREATE EXTENSION IF NOT EXISTS vector")
        admin.execute("CREATE EXTENSION IF NOT EXISTS plpython3u")
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'app-secret'").format(sql.Identifier(role)))
        admin.execute(
            sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(
                sql.Identifier(admin.info.dbname), sql.Identifier(role)
            )
        )
    try:
        with psycopg.connect(make_conninfo(dsn, user=role, password="app-secret"), autocommit=True) as app:
            report = migrate(app)
            assert "0001_init.sql" in report.applied
            assert "010_documents.sql" in report.functions
            [skipped] = [s for s in report.skipped if s.startswith("020_embed.sql")]
            assert "superuser" in skipped
    finally:
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP OWNED BY {} CASCADE").format(sql.Identifier(role)))
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_an_owner_named_longembed_keeps_pgvector_out_of_our_schema(pg_dsn):
    """docker-compose's role is `longembed`: "$user" in its search_path is our schema, which would take
    pgvector's types and operators (and 090's revokes would then take them from everybody else)."""
    from psycopg import sql
    from psycopg.conninfo import make_conninfo

    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        if not admin.execute("SELECT 1 FROM pg_roles WHERE rolname = 'longembed'").fetchone():
            admin.execute(sql.SQL("CREATE ROLE longembed LOGIN SUPERUSER PASSWORD {}").format("le-test-pw"))
    with (
        fresh_database(pg_dsn, "le_owner_named") as url,
        psycopg.connect(make_conninfo(url, user="longembed", password="le-test-pw"), autocommit=True) as conn,
    ):
        assert conn.execute("SHOW search_path").fetchone()[0].startswith('"$user"')
        migrate(conn)
        migrate(conn)  # again: 090 reruns over the functions
        schema = conn.execute(
            "SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace "
            "WHERE e.extname = 'vector'"
        ).fetchone()[0]
        assert schema == "public"
        assert conn.execute("SELECT has_function_privilege('public', 'public.l2_distance(public.vector,"
                            "public.vector)', 'EXECUTE')").fetchone() == (True,)  # fmt: skip
