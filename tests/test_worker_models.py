"""`longembed worker` without --model: every collection is embedded with its own model.

Real PostgreSQL, the real MiniLM and a small random-weight JinaBERT folder; the worker runs as the CLI
does, in a subprocess started from another directory.
"""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import psycopg
import pytest
from psycopg import sql

from longembed.encoder import load_model
from longembed.plugin.db import connect
from longembed.plugin.models import get_model
from longembed.plugin.store.collections import create_collection, get_collection
from longembed.plugin.store.documents import Document, add_documents
from tests.clirun import longembed
from tests.jina_reference import jina_config, write_checkpoint
from tests.pgdb import migrated_database

TEXTS = {
    "tides": "The moon's gravity raises two bulges of water, so most coasts see two high tides a day.",
    "yeast": "Bakers feed a sourdough starter flour and water; its wild yeast makes the dough rise.",
}


@pytest.fixture
def dsn(pg_dsn):
    with migrated_database(pg_dsn, "le_every") as url:
        yield url


def _fill(conn: psycopg.Connection, name: str, model) -> None:
    create_collection(conn, name, model, mode="full")
    add_documents(conn, name, [Document(key, text) for key, text in TEXTS.items()])


def _worker(cwd, dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    return longembed(cwd, "worker", "--once", "--dsn", dsn, *args)


def _vectors(conn: psycopg.Connection, name: str) -> dict[str, np.ndarray]:
    collection = get_collection(conn, name)
    rows = conn.execute(
        sql.SQL(
            "SELECT d.external_id, c.embedding FROM {} c JOIN longembed.documents d ON d.id = c.document_id"
        ).format(collection.chunk_table)
    ).fetchall()
    return {key: np.asarray(vector.to_numpy()) for key, vector in rows}


@pytest.mark.parametrize("max_models", ["2", "1"])  # 1: a model is unloaded for the next one
def test_a_worker_without_model_embeds_every_collection_with_its_own(dsn, tmp_path, max_models):
    folder = tmp_path / "tiny-jina"
    write_checkpoint(folder, jina_config(4))
    jina = load_model(str(folder))
    with connect(dsn) as conn:
        _fill(conn, "mini", get_model())
        _fill(conn, "jina", jina)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = _worker(elsewhere, dsn, "--max-models", max_models)
    assert run.returncode == 0, run.stderr
    with connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM longembed.queue").fetchone() == (0,)
        for name, model in (("mini", get_model()), ("jina", jina)):
            got = _vectors(conn, name)
            assert sorted(got) == sorted(TEXTS)
            want = model.embed(list(TEXTS.values()))
            for (key, _), vector in zip(TEXTS.items(), want, strict=True):
                np.testing.assert_allclose(got[key], vector, atol=1e-5)


def test_a_model_that_cannot_load_holds_back_only_its_collections(dsn, tmp_path):
    folder = tmp_path / "gone-jina"
    write_checkpoint(folder, jina_config(4))
    with connect(dsn) as conn:
        _fill(conn, "gone", load_model(str(folder)))
        _fill(conn, "mini", get_model())
    shutil.rmtree(folder)  # the model folder of collection "gone" was deleted since
    run = _worker(tmp_path, dsn)
    assert run.returncode == 0, run.stderr
    assert f"cannot load model {folder}" in run.stderr
    with connect(dsn) as conn:
        assert sorted(_vectors(conn, "mini")) == sorted(TEXTS)
        waiting = conn.execute(
            """SELECT count(*) FROM longembed.queue q JOIN longembed.collections c ON c.id = q.collection_id
               WHERE c.name = 'gone' AND q.attempts = 0"""
        ).fetchone()
        assert waiting == (len(TEXTS),)  # still queued, not charged an attempt: they wait for the model
