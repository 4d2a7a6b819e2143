"""Range errors before arithmetic, and one rule for blank text in SQL embed() and search().

Real embedded PostgreSQL with PL/Python; SQL embed()/search() go to the real model host (real MiniLM).
"""

from __future__ import annotations

import pytest
from psycopg import errors

from longembed.plugin.db import connect
from longembed.plugin.models import get_model
from longembed.plugin.store.collections import create_collection
from longembed.plugin.store.search import search
from tests.pgdb import migrated_database

pytestmark = pytest.mark.usefixtures("model_host")  # SQL embed()/search() send texts to the model host


@pytest.fixture(scope="module")
def conn(pg_dsn):
    with migrated_database(pg_dsn, "le_limits") as url, connect(url) as c:
        create_collection(c, "limits", get_model().info)
        yield c


@pytest.mark.parametrize("k", [10**9, 2**31 - 1, 0, -5])
def test_huge_or_small_k_is_a_range_error_not_an_overflow(conn, k):
    zero = "[" + ",".join(["0.1"] * 384) + "]"
    with pytest.raises(errors.InvalidParameterValue, match=rf"k must be in 1\.\.1000, got {k}"):
        conn.execute("SELECT * FROM longembed.search_vector('limits', %s::vector, %s)", (zero, k))
    with pytest.raises(errors.InvalidParameterValue, match=rf"k must be in 1\.\.1000, got {k}"):
        conn.execute("SELECT * FROM longembed.search_hybrid('limits', 'q', %s::vector, %s)", (zero, k))
    with pytest.raises(ValueError, match=r"k must be an integer in 1\.\.1000"):
        search(conn, "limits", [0.1] * 384, k)


def test_huge_k_through_sql_search(conn):
    with pytest.raises(errors.InvalidParameterValue, match=r"k must be in 1\.\.1000, got 1000000000"):
        conn.execute("SELECT * FROM search('limits', 'rivers', 1000000000)")


@pytest.mark.parametrize("blank", ["", "   ", "\n\t"])
def test_blank_query_is_refused_by_search(conn, blank):
    with pytest.raises(errors.DataException, match="empty"):
        conn.execute("SELECT * FROM search('limits', %s)", (blank,))
    with pytest.raises(ValueError, match="empty"):
        search(conn, "limits", blank)


@pytest.mark.parametrize("call", ["SELECT embed(%s)", "SELECT embed(ARRAY['text', %s])"])
def test_blank_text_is_refused_by_embed(conn, call):
    with pytest.raises(errors.DataException, match="empty"):
        conn.execute(call, ("  ",))
