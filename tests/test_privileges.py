"""SQL privileges (versions/0003_privileges.sql, functions/030_collection_tables.sql, 090_privileges.sql)
and the embedded server's application role, on real PostgreSQL servers.

The group roles longembed_reader / longembed_writer belong to the whole server (migrate creates them);
each test makes login roles of its own with random names and drops them afterwards. Test roles connect
with search_path = pg_catalog only, so nothing resolves through a search_path that holds pgvector.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import errors, sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from longembed.plugin.cli import main
from longembed.plugin.cli.server import host_of
from longembed.plugin.db import connect
from longembed.plugin.embedded.server import APP_ROLE, SUPERUSER, EmbeddedServer
from longembed.plugin.migrate import migrate
from longembed.plugin.store.collections import create_collection, drop_collection
from longembed.plugin.store.documents import Document, add_documents
from longembed.plugin.store.search import search
from longembed.plugin.store.vectorize import vectorize_table
from tests.pgdb import fresh_database, migrated_database

HOSTILE = "'); DROP TABLE longembed.collections; --"


@dataclasses.dataclass(frozen=True)
class FourDims:
    """A collection's model description (no model runs: the tests write and search vectors themselves)."""

    name: str = "four-dims"
    source: str = "four-dims"
    revision: str = "r1"
    dim: int = 4
    max_tokens: int = 256
    architecture: str = "none"
    pooling: str = "mean"
    prefixes = {"query": "", "document": ""}  # noqa: RUF012 (read only)


@pytest.fixture(scope="module")
def owner_dsn(pg_dsn: str) -> Iterator[str]:
    """A migrated database with collection `tiny`: document d1 with one chunk, written by the owner."""
    with migrated_database(pg_dsn, "le_priv") as url:
        with connect(url) as conn:
            collection = create_collection(conn, "tiny", FourDims())
            add_documents(conn, collection, [Document("d1", "alpha text", {"lang": "en"})])
            conn.execute(
                sql.SQL(
                    "INSERT INTO {} (document_id, ordinal, char_start, char_end, n_tokens, embedding) "
                    "SELECT id, 0, 0, 10, 3, '[1,0,0,0]' FROM longembed.documents WHERE external_id = 'd1'"
                ).format(collection.chunk_table)
            )
            conn.execute("UPDATE longembed.documents SET status = 'embedded' WHERE external_id = 'd1'")
        yield url


@pytest.fixture
def login(owner_dsn: str) -> Iterator[Callable[..., str]]:
    """login(*groups) -> DSN of a new login role, member of `groups`, whose search_path is pg_catalog."""
    made: list[str] = []

    def make(*groups: str, search_path: str | None = "pg_catalog") -> str:
        name, password = f"le_t_{uuid.uuid4().hex[:8]}", secrets.token_urlsafe(16)
        with psycopg.connect(owner_dsn, autocommit=True) as admin:
            admin.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                    sql.Identifier(name), sql.Literal(password)
                )
            )
            made.append(name)
            for group in groups:
                admin.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(group), sql.Identifier(name)))
        options = {"options": f"-c search_path={search_path}"} if search_path else {}
        return make_conninfo(owner_dsn, user=name, password=password, **options)

    yield make
    with psycopg.connect(owner_dsn, autocommit=True) as admin:
        for name in made:
            admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def _refused(dsn: str, statement: str | sql.Composable, params: tuple = ()) -> str:
    """Run `statement` as the role of `dsn`; it must fail with 42501. Returns the message."""
    with psycopg.connect(dsn, autocommit=True) as conn, pytest.raises(errors.InsufficientPrivilege) as caught:
        conn.execute(statement, params)
    return str(caught.value)


def _calls(owner_dsn: str) -> list[str]:
    """A call of every function in schema longembed with NULL arguments, types schema-qualified."""
    with psycopg.connect(owner_dsn, autocommit=True, options="-c search_path=pg_catalog") as conn:
        rows = conn.execute(
            """SELECT p.proname, array(SELECT format('NULL::%s', t::regtype)
                                       FROM unnest(p.proargtypes::oid[]) AS t)
               FROM pg_proc p WHERE p.pronamespace = 'longembed'::regnamespace ORDER BY 1"""
        ).fetchall()
    return [f"SELECT longembed.{name}({', '.join(args)})" for name, args in rows]


def _tables(owner_dsn: str) -> list[str]:
    with psycopg.connect(owner_dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'longembed' ORDER BY 1")
        return [name for (name,) in rows.fetchall()]


def test_public_holds_nothing(owner_dsn):
    """Every function of ours has an ACL without PUBLIC (a NULL ACL would mean PUBLIC may EXECUTE)."""
    with psycopg.connect(owner_dsn, autocommit=True) as conn:
        rows = conn.execute(
            """SELECT p.oid::regprocedure::text, p.proacl IS NULL,
                      EXISTS (SELECT 1 FROM aclexplode(p.proacl) a WHERE a.grantee = 0)
               FROM pg_proc p
               WHERE p.pronamespace = 'longembed'::regnamespace
                  OR (p.pronamespace = 'public'::regnamespace AND longembed.is_our_wrapper(p.oid))"""
        ).fetchall()
        schema_acl = conn.execute(
            """SELECT EXISTS (SELECT 1 FROM aclexplode(n.nspacl) a WHERE a.grantee = 0)
               FROM pg_namespace n WHERE n.nspname = 'longembed'"""
        ).fetchone()
    assert len(rows) > 10
    assert [r for r in rows if r[1] or r[2]] == []
    assert schema_acl == (False,)


def test_a_role_granted_nothing_can_do_nothing(owner_dsn, login):
    dsn = login()
    calls = _calls(owner_dsn)
    assert any("search_vector" in c for c in calls) and any("create_chunk_table" in c for c in calls)
    for call in calls:
        assert "permission denied" in _refused(dsn, call), call
    for table in _tables(owner_dsn):
        _refused(dsn, sql.SQL("SELECT * FROM {} LIMIT 1").format(sql.Identifier("longembed", table)))
        _refused(dsn, sql.SQL("DELETE FROM {}").format(sql.Identifier("longembed", table)))
    with psycopg.connect(owner_dsn, autocommit=True) as conn:
        wrappers = conn.execute("SELECT to_regprocedure('public.embed(text,text)') IS NOT NULL").fetchone()[0]
    if wrappers:  # 025_public_wrappers.sql ran (plpython3u): the SQL-body wrapper must not skip the check
        assert "permission denied for function embed" in _refused(dsn, "SELECT public.embed('x')")
        _refused(dsn, "SELECT * FROM public.search('tiny', 'x')")


def test_reader_searches_with_a_bare_search_path_but_cannot_write(owner_dsn, login):
    dsn = login("longembed_reader")
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("SHOW search_path").fetchone() == ("pg_catalog",)
        vector = conn.execute(
            "SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace "
            "WHERE e.extname = 'vector'"
        ).fetchone()[0]
        query = sql.SQL("{}::{}").format(sql.Literal("[0.9,0.1,0,0]"), sql.Identifier(vector, "vector"))
        found = conn.execute(
            sql.SQL("SELECT external_id, score FROM longembed.search_vector('tiny', {}, 3)").format(query)
        ).fetchall()
        assert found == [("d1", pytest.approx(0.9 / 0.82**0.5, abs=1e-6))]
        hybrid = conn.execute(
            sql.SQL("SELECT external_id FROM longembed.search_hybrid('tiny', 'alpha', {}, 3)").format(query)
        ).fetchall()
        assert hybrid == [("d1",)]
        filtered = conn.execute(
            sql.SQL(
                "SELECT count(*) FROM longembed.search_vector('tiny', {}, 3, '{{\"lang\": \"de\"}}')"
            ).format(query)
        ).fetchone()
        assert filtered == (0,)
        # embed() is only checked, not called: the model host replaces its body.
        granted = conn.execute(
            """SELECT p.oid::regprocedure::text, has_function_privilege(p.oid, 'EXECUTE')
               FROM pg_proc p WHERE p.pronamespace = 'longembed'::regnamespace
                 AND p.proname IN ('embed', 'embed_query', 'search', 'host_embed', 'host_setting')"""
        ).fetchall()
        assert len(granted) == 6 and all(ok for _, ok in granted), granted
    for statement in (
        "SELECT longembed.upsert_document(1, 'x', 'text')",
        "INSERT INTO longembed.documents (collection_id, external_id, text, content_hash) "
        "VALUES (1, 'x', 'x', '\\x00')",
        "UPDATE longembed.collections SET model_name = '/etc'",
        "DELETE FROM longembed.documents",
        "SELECT longembed.create_chunk_table(1)",
        "SELECT longembed.delete_collection(1)",
        "CREATE TABLE longembed.mine (x int)",
    ):
        _refused(dsn, statement)


def test_writer_ingests_and_manages_collections_but_not_the_owners_objects(owner_dsn, login):
    dsn = login("longembed_writer", search_path=None)
    with connect(dsn) as conn:
        collection = create_collection(conn, "by_writer", FourDims())
        result = add_documents(conn, collection, [Document("w1", "written by the writer")])
        assert result.counts["inserted"] == 1
        queued = conn.execute(
            "SELECT count(*) FROM longembed.queue WHERE collection_id = %s", (collection.id,)
        )
        assert queued.fetchone() == (1,)
        conn.execute(
            sql.SQL(
                "INSERT INTO {} (document_id, ordinal, char_start, char_end, n_tokens, embedding) "
                "SELECT id, 0, 0, 5, 2, '[0,1,0,0]' FROM longembed.documents WHERE external_id = 'w1'"
            ).format(collection.chunk_table)
        )
        assert [
            r.external_id for r in search(conn, collection, [0.0, 1.0, 0.0, 0.0], k=2, mode="chunks")
        ] == ["w1"]
        conn.execute(  # the document vector table is the writer's to fill too
            sql.SQL(
                "INSERT INTO {} (document_id, n_tokens, embedding) "
                "SELECT id, 2, '[0,1,0,0]' FROM longembed.documents WHERE external_id = 'w1'"
            ).format(collection.document_table)
        )
        assert [r.external_id for r in search(conn, collection, [0.0, 1.0, 0.0, 0.0], k=2, mode="dense")] == [
            "w1"
        ]
        owner = conn.execute(
            "SELECT tableowner FROM pg_tables WHERE schemaname = 'longembed' AND tablename = %s",
            (f"chunks_{collection.id}",),
        ).fetchone()
        assert owner != (conn.info.user,)  # the schema's owner made it, on the writer's behalf
        assert drop_collection(conn, "by_writer") is True
        gone = conn.execute("SELECT to_regclass(%s)", (f"longembed.chunks_{collection.id}",)).fetchone()
        assert gone == (None,)
    chunk_table = f"longembed.chunks_{_collection_id(owner_dsn, 'tiny')}"
    for statement in (
        "CREATE ROLE le_should_not_exist",
        "GRANT pg_read_all_data TO CURRENT_USER",
        "ALTER TABLE longembed.collections ADD COLUMN x int",
        "ALTER TABLE longembed.documents OWNER TO CURRENT_USER",
        f"DROP TABLE {chunk_table}",
        f"ALTER TABLE {chunk_table} DROP COLUMN embedding",
        "CREATE TABLE longembed.mine (x int)",
        "CREATE FUNCTION longembed.search_vector(text) RETURNS int LANGUAGE sql RETURN 1",
        "ALTER FUNCTION longembed.search_vector(text, vector, integer, jsonb, integer) RESET ALL",
        "DELETE FROM longembed.schema_migrations",
        "TRUNCATE longembed.documents",
    ):
        _refused(dsn, statement)


def _collection_id(dsn: str, name: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute("SELECT id FROM longembed.collections WHERE name = %s", (name,)).fetchone()[0]


def test_hostile_names_and_filters_still_get_clear_errors(owner_dsn, login):
    reader = login("longembed_reader")
    with psycopg.connect(reader, autocommit=True) as conn:
        with pytest.raises(errors.UndefinedObject, match="no collection named"):
            conn.execute("SELECT * FROM longembed.search_vector(%s, NULL, 3)", (HOSTILE,))
        with pytest.raises(errors.InvalidParameterValue, match="filter must be a JSON object"):
            conn.execute("SELECT * FROM longembed.search_vector('tiny', NULL, 3, '[1]')")
        with pytest.raises(errors.InvalidParameterValue, match=r"k must be in 1\.\.1000"):
            conn.execute("SELECT * FROM longembed.search_vector('tiny', NULL, 0)")
    writer = login("longembed_writer", search_path=None)
    with psycopg.connect(owner_dsn, autocommit=True) as admin:  # a table of the writer's own
        admin.execute("CREATE TABLE public.notes (id int PRIMARY KEY, body text)")
        admin.execute(
            sql.SQL("ALTER TABLE public.notes OWNER TO {}").format(
                sql.Identifier(conninfo_to_dict(writer)["user"])
            )
        )
    with connect(writer) as conn:
        with pytest.raises(ValueError, match="invalid collection name"):
            create_collection(conn, HOSTILE, FourDims())
        with pytest.raises(ValueError, match=r"table public\.notes has no column"):
            vectorize_table(conn, "public.notes", "id", HOSTILE, "tiny")
        # Its own table, though, it may feed into a collection (the triggers run with its rights).
        create_collection(conn, "notes", FourDims())
        assert vectorize_table(conn, "public.notes", "id", "body", "notes") == 0
        conn.execute("INSERT INTO public.notes VALUES (1, 'a note')")
        queued = conn.execute(
            "SELECT d.external_id FROM longembed.documents d JOIN longembed.collections c "
            "ON c.id = d.collection_id WHERE c.name = 'notes'"
        ).fetchall()
        assert queued == [("1",)]
        assert conn.execute("SELECT count(*) FROM longembed.collections WHERE name = 'tiny'").fetchone() == (
            1,
        )


def test_search_functions_pin_pgvectors_schema(owner_dsn):
    """Functions without a search_path of their own get pg_catalog, pgvector's schema and pg_temp."""
    with psycopg.connect(owner_dsn, autocommit=True) as conn:
        rows = dict(
            conn.execute(
                """SELECT p.proname, p.proconfig FROM pg_proc p
                   WHERE p.pronamespace = 'longembed'::regnamespace
                     AND p.proname IN ('search_vector', 'search_hybrid')"""
            ).fetchall()
        )
    assert set(rows) == {"search_vector", "search_hybrid"}
    for config in rows.values():
        assert "search_path=pg_catalog, public, pg_temp" in config


def test_wrapper_owned_by_us_but_not_calling_longembed_is_left_alone(pg_dsn):
    """The same role migrates and writes its own public.embed(): the owner alone does not make it ours."""
    with fresh_database(pg_dsn, "le_priv_own") as url, psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "CREATE FUNCTION public.embed(t text, k text DEFAULT 'x') RETURNS text LANGUAGE sql RETURN 'mine'"
        )
        conn.execute("COMMENT ON FUNCTION public.embed(text, text) IS 'longembed: looks like ours'")
        report = migrate(conn)
        if "025_public_wrappers.sql" not in report.functions:
            pytest.skip("the server has no plpython3u (run `longembed setup-plpython`)")
        assert conn.execute("SELECT public.embed('hello', 'query')").fetchone() == ("mine",)
        assert any("public.embed(text,text) exists and is not ours" in n for n in report.notices), report
        # A user's own function keeps its own privileges: PUBLIC may still call it.
        acl = conn.execute(
            "SELECT proacl IS NULL FROM pg_proc WHERE oid = 'public.embed(text,text)'::regprocedure"
        )
        assert acl.fetchone() == (True,)


def test_app_role_is_what_dsn_gives_and_runs_ingest_and_search(tmp_path, monkeypatch, capsys):
    """A fresh embedded server: `dsn` names longembed_app (not a superuser), `dsn --admin` the superuser;
    ingest --create (migrating through the superuser), search and SQL search through the model host run
    as the app role, and so does the host; backends do not see our secrets."""
    home = Path("/tmp") / f"longembed-priv-{uuid.uuid4().hex[:10]}"
    monkeypatch.setenv("LONGEMBED_HOME", str(home))
    monkeypatch.delenv("LONGEMBED_DSN", raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_secret_must_not_reach_postgres")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws_secret_must_not_reach_postgres")
    server = EmbeddedServer(home, durable=False)

    def cli(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    try:
        assert cli("up", "--http-port", "0", "--hnsw", "notes")[0] == 0
        assert (home / "app-password").stat().st_mode & 0o777 == 0o600
        app = cli("dsn")[1].strip()
        admin = cli("dsn", "--admin")[1].strip()
        assert conninfo_to_dict(app)["user"] == APP_ROLE and conninfo_to_dict(admin)["user"] == SUPERUSER
        with psycopg.connect(app, autocommit=True) as conn:
            row = conn.execute(
                "SELECT rolsuper, rolcreaterole, rolcreatedb, pg_has_role('longembed_writer', 'MEMBER') "
                "FROM pg_roles WHERE rolname = current_user"
            ).fetchone()
            assert row == (False, False, False, True)

        corpus = tmp_path / "corpus"
        corpus.mkdir()
        (corpus / "tea.txt").write_text("Green tea is brewed with water below boiling, about 80 degrees.")
        (corpus / "bikes.txt").write_text("A bicycle chain needs oil every few hundred kilometres.")
        code, out, err = cli("ingest", str(corpus), "--collection", "notes", "--create", "--no-progress")
        assert code == 0, err
        code, out, err = cli("search", "notes", "how hot should the water be for tea", "-k", "1", "--json")
        assert code == 0, err
        [hit] = json.loads(out)
        assert hit["external_id"].endswith("tea.txt")
        with psycopg.connect(app, autocommit=True) as conn:  # SQL search: embed() asks the model host
            sql_hit = conn.execute(
                "SELECT external_id FROM longembed.search('notes', 'tea and hot water', 1)"
            )
            assert sql_hit.fetchall() == [(hit["external_id"],)]
        # `up --hnsw notes`: the host, as the app role, follows the collection made after it started
        # (hnswlib mirrors chunk vectors: mode chunks).
        deadline = time.monotonic() + 60
        while True:
            status, body = host_of(server).post(
                "/v1/search", {"collection": "notes", "query": "tea", "k": 1, "mode": "chunks"}
            )
            assert status == 200, body
            if body["index"] == "hnswlib" or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert body["index"] == "hnswlib" and body["data"][0]["external_id"] == hit["external_id"]
        supervisor = host_of(server).running_pid()
        host_env = Path(f"/proc/{supervisor}/environ").read_bytes().split(b"\0")
        [host_dsn] = [v.split(b"=", 1)[1].decode() for v in host_env if v.startswith(b"LONGEMBED_DSN=")]
        assert conninfo_to_dict(host_dsn)["user"] == APP_ROLE
        with psycopg.connect(admin, autocommit=True) as conn:
            owners = conn.execute(
                "SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = 'longembed'"
            ).fetchall()
            docs = conn.execute(
                "SELECT count(*) FROM longembed.documents WHERE status = 'embedded'"
            ).fetchone()
        assert owners == [(SUPERUSER,)] and docs == (2,)

        # A server started before the application role existed (or a lost password file): `dsn`
        # (re)makes it through the superuser.
        (home / "app-password").unlink()
        renewed = cli("dsn")[1].strip()
        assert renewed != app
        with psycopg.connect(renewed, autocommit=True) as conn:
            assert conn.execute("SELECT current_user").fetchone() == (APP_ROLE,)

        # A backend's environment, seen from inside (PostgreSQL reuses /proc/PID/environ for its titles).
        assert "HF_TOKEN" not in server._server_env()
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS plpython3u")
            seen: list[str] = []
            conn.add_notice_handler(lambda diag: seen.append(diag.message_primary or ""))
            conn.execute("DO LANGUAGE plpython3u $$import os; plpy.notice(' '.join(sorted(os.environ)))$$")
        names = seen[0].split()
        assert "PATH" in names and "HF_TOKEN" not in names and "AWS_SECRET_ACCESS_KEY" not in names
    finally:
        main(["down"])
        shutil.rmtree(home, ignore_errors=True)


def test_without_createrole_roles_are_left_out_with_a_notice(pg_dsn, tmp_path, monkeypatch):
    """An owner without CREATEROLE migrates: the roles it cannot create are named in the report, PUBLIC
    still gets nothing, and the owner itself has everything. The server-wide roles of the other tests
    exist, so this runs our migration files with role names nobody has created."""
    suffix = uuid.uuid4().hex[:8]
    package = f"le_roles_{suffix}"
    source = Path(__file__).resolve().parents[1] / "migrations"
    shutil.copytree(source, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    for path in (tmp_path / package).rglob("*.sql"):
        text = path.read_text().replace("longembed_reader", f"le_reader_{suffix}")
        path.write_text(text.replace("longembed_writer", f"le_writer_{suffix}"))
    monkeypatch.syspath_prepend(str(tmp_path))
    owner, password = f"le_owner_{suffix}", secrets.token_urlsafe(16)
    with fresh_database(pg_dsn, "le_priv_norole") as url:
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute("CREATE EXTENSION vector")
            admin.execute(
                sql.SQL("CREATE ROLE {} LOGIN NOCREATEROLE PASSWORD {}").format(
                    sql.Identifier(owner), sql.Literal(password)
                )
            )
            admin.execute(
                sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(
                    sql.Identifier(admin.info.dbname), sql.Identifier(owner)
                )
            )
        try:
            with connect(make_conninfo(url, user=owner, password=password)) as conn:
                report = migrate(conn, package)
                [notice] = [n for n in report.notices if n.startswith("090_privileges.sql")]
                assert f"roles le_reader_{suffix}, le_writer_{suffix} not created" in notice
                assert f"{owner} lacks CREATEROLE" in notice
                public = conn.execute(
                    """SELECT count(*) FROM pg_proc p WHERE p.pronamespace = 'longembed'::regnamespace
                         AND (p.proacl IS NULL
                              OR EXISTS (SELECT 1 FROM aclexplode(p.proacl) a WHERE a.grantee = 0))"""
                ).fetchone()
                assert public == (0,)
                collection = create_collection(conn, "owned", FourDims())
                assert add_documents(conn, collection, [Document("o1", "text")]).counts["inserted"] == 1
                assert drop_collection(conn, "owned") is True
        finally:
            with psycopg.connect(url, autocommit=True) as admin:
                admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(owner)))
                admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(owner)))
