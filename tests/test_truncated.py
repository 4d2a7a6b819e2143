"""`truncated` is stored per chunk and shown by search (Python, CLI, SQL) and by `ingest`; databases of
schema version 1 get the column on upgrade. Real MiniLM, the session's PostgreSQL with PL/Python."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from longembed.plugin.db import connect
from longembed.plugin.migrate import migrate
from longembed.plugin.store.search import search
from tests.clirun import longembed
from tests.pgdb import fresh_database, migrated_database

REPO = Path(__file__).resolve().parents[1]
LONG = " ".join(
    f"Chapter {i}: the lighthouse keeper logged every passing ship in the storm." for i in range(40)
)
SHORT = "A lighthouse keeper's notebook of ships."


@pytest.fixture(scope="module")
def dsn(pg_dsn):
    with migrated_database(pg_dsn, "le_trunc") as url:
        yield url


@pytest.fixture(scope="module")
def ingested(dsn, tmp_path_factory):
    folder = tmp_path_factory.mktemp("docs")
    (folder / "long.txt").write_text(LONG)
    (folder / "short.txt").write_text(SHORT)
    run = longembed(folder, "ingest", "long.txt", "short.txt", "-c", "whole", "--create", "--mode", "full",
              "--dsn", dsn, "--no-progress")  # fmt: skip
    assert run.returncode == 0, run.stderr
    return run, folder


def test_ingest_reports_truncated_documents(ingested):
    run, _ = ingested
    assert "1 documents truncated at 256 tokens" in run.stdout


@pytest.mark.usefixtures("model_host")  # SQL search() and embed_query() go through the model host
def test_search_results_say_which_chunk_was_truncated(dsn, ingested):
    _, folder = ingested
    with connect(dsn) as conn:
        python = {r.external_id: r.truncated for r in search(conn, "whole", "lighthouse keeper ships", k=2)}
        root = folder.resolve()  # ingest names files by their resolved path, however they were typed
        assert python == {str(root / "long.txt"): True, str(root / "short.txt"): False}
        vector = conn.execute("SELECT longembed.embed_query('whole', 'lighthouse keeper ships')").fetchone()[
            0
        ]
        rows = conn.execute(
            "SELECT external_id, truncated FROM longembed.search_vector('whole', %s::vector, 2)", (vector,)
        ).fetchall()
        assert dict(rows) == python
        rows = conn.execute(
            "SELECT external_id, truncated FROM longembed.search_hybrid('whole', 'ships', %s::vector, 2)",
            (vector,),
        ).fetchall()
        assert dict(rows) == python
        rows = conn.execute(
            "SELECT external_id, truncated FROM search('whole', 'lighthouse keeper ships', 2)"
        )
        assert dict(rows.fetchall()) == python
    found = longembed(folder, "search", "-c", "whole", "lighthouse keeper ships", "--json", "--dsn", dsn)
    assert found.returncode == 0, found.stderr
    assert {r["external_id"]: r["truncated"] for r in json.loads(found.stdout)} == python
    text = longembed(folder, "search", "-c", "whole", "lighthouse keeper ships", "--dsn", dsn).stdout
    assert [", truncated]" in line for line in text.splitlines() if "[chunk" in line].count(True) == 1


# Schema version 1 and search functions with its result columns (no `truncated`), as released.
OLD_FUNCTIONS = """
CREATE FUNCTION longembed.search_vector(
    p_collection text, p_query vector, p_k integer DEFAULT 10, p_filter jsonb DEFAULT NULL,
    p_ef_search integer DEFAULT NULL)
RETURNS TABLE (external_id text, score double precision, chunk_ordinal integer, char_start integer,
               char_end integer, snippet text, metadata jsonb)
LANGUAGE sql AS 'SELECT NULL::text, 0::float8, 0, 0, 0, NULL::text, NULL::jsonb WHERE false';
CREATE FUNCTION longembed.search(
    collection text, query text, k integer DEFAULT 10, filter jsonb DEFAULT NULL,
    hybrid boolean DEFAULT false, ef_search integer DEFAULT NULL)
RETURNS TABLE (external_id text, score double precision, chunk_ordinal integer, char_start integer,
               char_end integer, snippet text, metadata jsonb)
LANGUAGE plpgsql AS 'BEGIN RETURN QUERY SELECT * FROM longembed.search_vector(collection, NULL, k); END';
CREATE FUNCTION public.search(
    collection text, query text, k integer DEFAULT 10, filter jsonb DEFAULT NULL,
    hybrid boolean DEFAULT false, ef_search integer DEFAULT NULL)
RETURNS TABLE (external_id text, score double precision, chunk_ordinal integer, char_start integer,
               char_end integer, snippet text, metadata jsonb)
LANGUAGE sql
BEGIN ATOMIC SELECT * FROM longembed.search(collection, query, k, filter, hybrid, ef_search); END;
COMMENT ON FUNCTION public.search(text, text, integer, jsonb, boolean, integer)
    IS 'longembed: unqualified wrapper of longembed.search()';
"""


def test_version_1_database_upgrades(pg_dsn, tmp_path, monkeypatch):
    package = tmp_path / "v1_migrations"
    (package / "versions").mkdir(parents=True)
    (package / "functions").mkdir()
    (package / "__init__.py").write_text("")
    (package / "versions" / "0001_init.sql").write_text(
        (REPO / "migrations/versions/0001_init.sql").read_text()
    )
    (package / "functions" / "015_old.sql").write_text(textwrap.dedent(OLD_FUNCTIONS))
    monkeypatch.syspath_prepend(str(tmp_path))
    with fresh_database(pg_dsn, "le_upgrade") as url, connect(url) as conn:
        migrate(conn, "v1_migrations")
        (cid,) = conn.execute(
            """INSERT INTO longembed.collections (name, model_name, model_revision, dim)
               VALUES ('old', 'sentence-transformers/all-MiniLM-L6-v2', 'r1', 3) RETURNING id"""
        ).fetchone()
        conn.execute(
            f"""CREATE TABLE longembed.chunks_{cid} (document_id bigint, ordinal integer,
                    char_start integer, char_end integer, n_tokens integer, embedding vector(3),
                    PRIMARY KEY (document_id, ordinal))"""
        )
        report = migrate(conn)
        assert report.applied[0] == "0002_model_source_and_chunk_flags.sql"  # later versions follow
        assert conn.execute("SELECT model_source FROM longembed.collections").fetchone() == (
            "sentence-transformers/all-MiniLM-L6-v2",
        )
        assert conn.execute(
            "SELECT column_default, is_nullable FROM information_schema.columns "
            "WHERE table_schema = 'longembed' AND table_name = %s AND column_name = 'truncated'",
            (f"chunks_{cid}",),
        ).fetchone() == ("false", "NO")
        for function in ("longembed.search_vector", "longembed.search", "public.search"):
            (names,) = conn.execute(
                "SELECT proargnames FROM pg_proc WHERE oid = %s::regproc", (function,)
            ).fetchone()
            assert names[-1] == "truncated", (function, names)
        assert conn.execute(
            "SELECT count(*) FROM longembed.search_vector('old', '[1,0,0]', 5)"
        ).fetchone() == (0,)
