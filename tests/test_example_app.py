"""The example notes backend (`python -m longembed.plugin.examples.notes`) over real HTTP on loopback: its
own process on an ephemeral port, the session's real server and model host behind its SQL embed() and
search(); answers compared with plain SQL, Python search and the model run here."""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import httpx
import numpy as np
import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from longembed.plugin.db import connect
from longembed.plugin.models import get_model
from longembed.plugin.pipeline.worker import Worker, WorkerConfig
from longembed.plugin.store.collections import create_collection
from longembed.plugin.store.search import search as python_search
from tests.pgdb import migrated_database

pytestmark = pytest.mark.usefixtures("model_host")

NOTES = [
    "Holiday plans: two weeks in Portugal in June, Lisbon first, then the beaches of the Algarve.",
    "Buy milk, eggs and a loaf of sourdough bread on the way home.",
    "The Sicilian Defence answers 1.e4 with c5; study the Najdorf variation before the tournament.",
    "Robert'); DROP TABLE notes;-- and a $$ dollar $$ quote, %s, {0}: stored as written 🦜",
]


@pytest.fixture(scope="module")
def model():
    return get_model()


@pytest.fixture(scope="module")
def dsn(pg_dsn, model):
    with migrated_database(pg_dsn, "le_app") as url:
        with connect(url) as conn:
            create_collection(conn, "notes", model.info, chunk_tokens=32, overlap=4)
        yield url


@pytest.fixture(scope="module")
def conn(dsn):
    with connect(dsn) as c:
        yield c


@pytest.fixture(scope="module")
def app_dsn(dsn) -> Iterator[str]:
    """A login role that is a member of longembed_writer only, as `longembed dsn` gives."""
    name, password = f"le_app_{uuid.uuid4().hex[:8]}", secrets.token_urlsafe(16)
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} IN ROLE longembed_writer").format(
                sql.Identifier(name), sql.Literal(password)
            )
        )
    try:
        yield make_conninfo(dsn, user=name, password=password)
    finally:
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


@pytest.fixture(scope="module")
def app(dsn, app_dsn) -> Iterator[httpx.Client]:
    """The app serving as the application role; its table made at start with the superuser's DSN."""
    args = ["--dsn", app_dsn, "--admin-dsn", dsn, "--collection", "notes", "--port", "0"]
    process = subprocess.Popen(
        [sys.executable, "-m", "longembed.plugin.examples.notes", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
    )
    try:
        line = process.stdout.readline()  # the first line says where it listens
        match = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
        assert match, (line, process.poll(), process.stderr.read() if process.poll() is not None else "")
        with httpx.Client(base_url=match.group(1), timeout=60) as client:
            yield client
    finally:
        process.terminate()
        process.wait(timeout=30)


def _count(conn) -> int:
    return conn.execute("SELECT count(*) FROM notes").fetchone()[0]


@pytest.fixture(scope="module")
def added(app) -> list[int]:
    ids = []
    for body in NOTES:
        response = app.post("/notes", json={"body": body})
        assert response.status_code == 201, response.text
        assert response.json()["body"] == body
        ids.append(response.json()["id"])
    return ids


def test_notes_are_stored_with_the_models_vectors(conn, model, added):
    rows = conn.execute("SELECT id, body, embedding FROM notes ORDER BY id").fetchall()
    assert [(r[0], r[1]) for r in rows] == list(zip(added, NOTES, strict=True))
    want = model.embed(NOTES, kind="document")
    for row, vector in zip(rows, want, strict=True):
        np.testing.assert_allclose(row[2].to_numpy(), vector, atol=1e-5)


def test_search_answers_as_plain_sql(app, conn, added):
    for query, expected in [
        ("where am I going on vacation", 0),
        ("groceries to buy", 1),
        ("chess opening preparation", 2),
    ]:
        response = app.get("/notes/search", params={"q": query, "k": 3})
        assert response.status_code == 200, response.text
        hits = response.json()
        assert hits[0]["id"] == added[expected] and hits[0]["body"] == NOTES[expected]
        plain = conn.execute(
            "SELECT id, 1 - (embedding <=> embed(%s)) AS score FROM notes ORDER BY score DESC LIMIT 3",
            (query,),
        ).fetchall()
        assert [h["id"] for h in hits] == [r[0] for r in plain]
        np.testing.assert_allclose([h["score"] for h in hits], [r[1] for r in plain], atol=1e-6)


def test_passages_answer_as_python_search(app, conn, model, added):
    # The model host's worker embeds the queued notes where it serves this database (`longembed up`);
    # this module's database is a fresh one, so a worker here does it.
    assert Worker(conn, model, WorkerConfig()).drain().embedded == len(NOTES)
    query = "a trip to Lisbon in the summer"
    response = app.get("/notes/passages", params={"q": query, "k": 2})
    assert response.status_code == 200, response.text
    hits = response.json()
    python = python_search(conn, "notes", query, k=2, model=model)
    assert [str(h["id"]) for h in hits] == [p.external_id for p in python]
    assert hits[0]["id"] == added[0]
    np.testing.assert_allclose([h["score"] for h in hits], [p.score for p in python], atol=1e-5)
    assert [(h["char_start"], h["char_end"], h["snippet"]) for h in hits] == [
        (p.char_start, p.char_end, p.snippet) for p in python
    ]


@pytest.mark.parametrize(
    ("content", "status", "message"),
    [
        (b"{", 400, "not valid JSON"),
        (b"", 400, "not valid JSON"),
        (b"\xff\xfe not utf-8", 400, "not valid JSON"),
        (b"[1, 2]", 400, 'JSON object with a string "body"'),
        (b'{"text": "wrong field"}', 400, 'JSON object with a string "body"'),
        (b'{"body": 5}', 400, 'JSON object with a string "body"'),
        (b'{"body": "   "}', 400, "empty"),
        (b'{"body": "nul \\u0000 byte"}', 400, "NUL"),
        (b'{"body": "' + b"x" * (1 << 20) + b'"}', 413, "over"),
    ],
)
def test_bad_bodies_get_4xx_and_add_nothing(app, conn, added, content, status, message):
    before = _count(conn)
    response = app.post("/notes", content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    assert _count(conn) == before


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({}, "missing query parameter q"),
        ({"q": "  "}, "empty"),
        ({"q": "x", "k": "abc"}, "k must be an integer"),
        ({"q": "x", "k": "0"}, "k must be in 1..100"),
        ({"q": "x", "k": "101"}, "k must be in 1..100"),
    ],
)
@pytest.mark.parametrize("path", ["/notes/search", "/notes/passages"])
def test_bad_queries_get_400(app, added, path, params, message):
    response = app.get(path, params=params)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]


def test_hostile_note_round_trips_as_text(app, added):
    response = app.get("/notes/search", params={"q": "DROP TABLE notes dollar quote parrot", "k": 4})
    assert response.status_code == 200
    assert NOTES[3] in [h["body"] for h in response.json()]


def test_the_app_says_why_it_cannot_start(dsn):
    result = subprocess.run(
        [sys.executable, "-m", "longembed.plugin.examples.notes", "--dsn", dsn, "--collection", "nope"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("notes: error: no collection named 'nope'"), result.stderr


def test_503_while_the_model_host_is_down_then_back(app, conn, model_host):
    """SIGKILL the host: the app answers 503 with the SQL layer's reason and adds nothing; once the
    supervisor has started the host again, the same request works."""
    supervisor = model_host.running_pid()
    with open(f"/proc/{supervisor}/task/{supervisor}/children") as f:
        (serve_pid,) = (int(pid) for pid in f.read().split())
    before = _count(conn)
    os.kill(serve_pid, signal.SIGKILL)
    down = app.post("/notes", json={"body": "written while the host is down"})
    assert down.status_code == 503, down.text
    assert "model host" in down.json()["error"]
    assert app.get("/notes/search", params={"q": "anything"}).status_code == 503
    assert _count(conn) == before
    deadline = time.monotonic() + 120
    while (response := app.post("/notes", json={"body": "written once it is back"})).status_code == 503:
        assert time.monotonic() < deadline, "the host did not come back"
        time.sleep(0.5)
    assert response.status_code == 201, response.text
    assert _count(conn) == before + 1
