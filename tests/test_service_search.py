"""POST /v1/search on the model host: the rows SQL `longembed.search()` and Python `search()` give, for
application backends that speak HTTP only. Real host on loopback, real PostgreSQL, real MiniLM."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from psycopg.types.json import Jsonb

from longembed.plugin.db import connect
from longembed.plugin.models import get_model
from longembed.plugin.pipeline.worker import Worker
from longembed.plugin.service.host import HostConfig
from longembed.plugin.store.collections import create_collection, get_collection
from longembed.plugin.store.documents import Document, add_documents
from longembed.plugin.store.search import embed_query, search
from tests.hostutil import running_host
from tests.pgdb import migrated_database

CORPUS = {
    "volcano": "Volcanoes form where magma rises through cracks in the crust; lava and ash follow.",
    "sourdough": "Sourdough bread rises with a starter of wild yeast; feed it flour and water before baking.",
    "chess": "The Sicilian Defence answers 1.e4 with c5 and is the most popular reply in chess openings.",
    "password": "To reset your account password open Settings, then Security, and follow the emailed link.",
}
KEY = "search-test-key"


@pytest.fixture(scope="module")
def dsn(pg_dsn):
    with migrated_database(pg_dsn, "le_hsearch") as url:
        model = get_model()
        with connect(url) as conn:
            create_collection(conn, "notes", model, chunk_tokens=64, overlap=8)
            docs = [
                Document(key, text, {"topic": key, "n": i}) for i, (key, text) in enumerate(CORPUS.items())
            ]
            add_documents(conn, "notes", docs)
            assert Worker(conn, model).drain().embedded == len(docs)
        yield url


@pytest.fixture(scope="module")
def host(dsn):
    with running_host(HostConfig(dsn=dsn, worker=False, api_keys=(KEY,))) as running:
        yield running


def _search(host, body, key: str | None = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{host.url}/v1/search", json=body, headers=headers, timeout=60)


@pytest.mark.parametrize(
    ("query", "expected"),
    [("molten rock from a mountain", "volcano"), ("baking bread with yeast", "sourdough"),
     ("I forgot my login", "password")],
)  # fmt: skip
def test_search_over_http_equals_python_search(host, dsn, query, expected):
    r = _search(host, {"collection": "notes", "query": query, "k": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["collection"] == "notes" and body["model"] == get_model().info.name
    assert body["usage"]["prompt_tokens"] > 2
    with connect(dsn) as conn:
        python = search(conn, "notes", query, k=3)
    assert [row["external_id"] for row in body["data"]] == [hit.external_id for hit in python]
    assert body["data"][0]["external_id"] == expected
    np.testing.assert_allclose(
        [row["score"] for row in body["data"]], [hit.score for hit in python], atol=1e-5
    )
    first = body["data"][0]
    assert set(first) == {"external_id", "score", "chunk_ordinal", "char_start", "char_end", "snippet",
                          "metadata", "truncated"}  # fmt: skip
    assert first["metadata"]["topic"] == expected


def test_filter_hybrid_and_ef_search(host):
    r = _search(host, {"collection": "notes", "query": "bread", "k": 5, "filter": {"topic": "chess"}})
    assert [row["external_id"] for row in r.json()["data"]] == ["chess"]
    r = _search(
        host, {"collection": "notes", "query": "Sicilian Defence", "k": 2, "hybrid": True, "ef_search": 80}
    )
    assert r.status_code == 200 and r.json()["data"][0]["external_id"] == "chess"
    hostile = {"topic": "x'); DROP TABLE longembed.documents; --"}
    r = _search(host, {"collection": "notes", "query": "bread", "filter": hostile})
    assert r.status_code == 200 and r.json()["data"] == []


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"query": "q"}, 400, "collection"),
        ({"collection": "notes"}, 400, "query"),
        ({"collection": "notes", "query": "   "}, 400, "query"),
        ({"collection": "notes", "query": "q", "k": 0}, 400, None),
        ({"collection": "notes", "query": "q", "k": 10**9}, 400, None),
        ({"collection": "notes", "query": "q", "k": "3"}, 400, "k"),
        ({"collection": "notes", "query": "q", "filter": [1, 2]}, 400, "filter"),
        ({"collection": "notes", "query": "q", "hybrid": "yes"}, 400, "hybrid"),
        ({"collection": "notes", "query": "q", "ef_search": 5000}, 400, None),
        ({"collection": "notes", "query": "q", "mode": 3}, 400, "mode"),
        ({"collection": "notes", "query": "q", "mode": "semantic"}, 400, None),
        ({"collection": "notes", "query": "q", "mode": "dense", "hybrid": True}, 400, "mode"),
        ({"collection": "notes", "query": "q", "mode": "hybrid", "weights": {"dense": -1}}, 400, None),
        ({"collection": "notes", "query": "q", "mode": "hybrid", "weights": [1]}, 400, "weights"),
        ({"collection": "notes", "query": "q", "mode": "hybrid", "fusion": "max"}, 400, None),
        ({"collection": "notes", "query": "q", "mode": "hybrid", "rrf_k": "60"}, 400, "rrf_k"),
        ({"collection": "notes'; DROP TABLE longembed.collections; --", "query": "q"}, 404, "collection"),
    ],
)
def test_bad_requests_get_openai_shaped_errors(host, body, status, param):
    r = _search(host, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and "Traceback" not in error["message"]
    if param:
        assert error["param"] == param


@pytest.mark.parametrize(
    "options",
    [
        {"mode": "dense"},
        {"mode": "chunks"},
        {"mode": "lexical"},
        {"mode": "auto"},
        {"mode": "hybrid", "weights": {"dense": 1, "lexical": 0.5}, "fusion": "zscore"},
        {"mode": "hybrid", "rrf_k": 5},
    ],
)
def test_every_search_mode_over_http_equals_python_and_sql(host, dsn, options):
    query = "wild yeast for baking bread"
    r = _search(host, {"collection": "notes", "query": query, "k": 3, **options})
    assert r.status_code == 200, r.text
    with connect(dsn) as conn:
        python = search(conn, "notes", query, k=3, **options)
        vector = embed_query(get_collection(conn, "notes"), query)
        sql_rows = conn.execute(
            "SELECT external_id, score FROM longembed.search_modes("
            "'notes', %s, %s, 3, NULL, NULL, %s, %s, %s, %s)",
            (query, vector, options["mode"], options.get("weights") and Jsonb(options["weights"]),
             options.get("fusion"), options.get("rrf_k")),
        ).fetchall()  # fmt: skip
    data = r.json()["data"]
    assert [row["external_id"] for row in data] == [hit.external_id for hit in python]
    assert [row[0] for row in sql_rows] == [hit.external_id for hit in python]
    np.testing.assert_allclose([row["score"] for row in data], [hit.score for hit in python], atol=1e-5)
    np.testing.assert_allclose([row[1] for row in sql_rows], [hit.score for hit in python], atol=1e-5)
    assert data[0]["external_id"] == "sourdough"


def test_key_required_and_malformed_json(host):
    assert _search(host, {"collection": "notes", "query": "q"}, key=None).status_code == 401
    assert _search(host, {"collection": "notes", "query": "q"}, key="wrong").status_code == 401
    r = httpx.post(f"{host.url}/v1/search", content=b"{not json", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_a_collection_of_other_weights_is_refused_not_searched(host, dsn):
    """A text query is embedded with the collection's model only if the host serves the revision the
    collection was embedded with: other weights would rank by vectors of another space."""
    model = get_model()
    with connect(dsn) as conn:
        create_collection(conn, "older", model, chunk_tokens=64, overlap=8)
        conn.execute("UPDATE longembed.collections SET model_revision = 'older' WHERE name = 'older'")
    r = _search(host, {"collection": "older", "query": "molten rock"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "revision_mismatch", r.text
    assert "revision older" in r.json()["error"]["message"]
    # a vector needs no model: searched as given
    vector = model.embed(["molten rock"], kind="query")[0].tolist()
    assert _search(host, {"collection": "older", "vector": vector}).status_code == 200


def test_a_host_without_database_says_so():
    with running_host(HostConfig()) as running:
        r = httpx.post(f"{running.url}/v1/search", json={"collection": "notes", "query": "q"})
    assert r.status_code == 503 and "--dsn" in r.json()["error"]["message"]
