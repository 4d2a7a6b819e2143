"""`longembed eval` as a user runs it (a child process): a tiny BEIR folder and a tiny JSONL dataset built
here, the real embedded PostgreSQL, real MiniLM, SQL search through the real model host."""

from __future__ import annotations

import json

import psycopg
import pytest

from longembed.plugin.cli import errors
from tests.clirun import longembed
from tests.pgdb import migrated_database

pytestmark = pytest.mark.usefixtures("model_host")  # --via sql embeds queries through the host

DOCS = {
    "volcano": "Volcanoes form where magma rises through cracks in the crust; lava and ash follow eruptions.",
    "sourdough": "Sourdough bread rises with a starter of wild yeast; feed it flour and water before baking.",
    "chess": "The Sicilian Defence answers 1.e4 with c5 and is the most popular reply among chess openings.",
    "password": "To reset your account password open Settings, then Security, and follow the emailed link.",
    "tides": "Ocean tides rise and fall twice a day, pulled by the gravity of the Moon and the Sun.",
    "bicycle": "Oil the bicycle chain and pump the tyres to the pressure printed on their sidewall.",
    "tax": "File the annual income tax return before the deadline to avoid a late payment penalty.",
    "guitar": "Tune the six guitar strings to E A D G B E, from the thickest string to the thinnest.",
}
# Easy: each query restates its document's topic in the document's own key words.
EASY = {
    "q-volcano": ("magma, lava and ash: how volcanoes erupt", "volcano"),
    "q-sourdough": ("baking sourdough bread with a wild yeast starter", "sourdough"),
    "q-chess": ("Sicilian Defence chess opening", "chess"),
    "q-password": ("reset my account password", "password"),
    "q-tides": ("why ocean tides follow the Moon", "tides"),
    "q-bicycle": ("bicycle chain oil and tyre pressure", "bicycle"),
    "q-tax": ("income tax return deadline", "tax"),
    "q-guitar": ("how to tune guitar strings", "guitar"),
}


@pytest.fixture(scope="module")
def dsn(pg_dsn):
    with migrated_database(pg_dsn, "le_eval") as url:
        yield url


@pytest.fixture(scope="module")
def beir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("beir")
    (folder / "qrels").mkdir()
    (folder / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": k, "title": "", "text": t}) + "\n" for k, t in DOCS.items())
    )
    (folder / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": q, "text": text}) + "\n" for q, (text, _) in EASY.items())
    )
    (folder / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t1\n" for q, (_, d) in EASY.items())
    )
    (folder / "manifest.json").write_text(json.dumps({"name": "tiny", "source": {"package": "none"}}))
    return folder


def _eval(cwd, dsn, *args: str):
    done = longembed(cwd, "eval", *args, "--dsn", dsn, "--chunk-tokens", "64", "--no-progress")
    return done


def _scratch_collections(dsn) -> list[str]:
    with psycopg.connect(dsn) as conn:
        return [r[0] for r in conn.execute("SELECT name FROM longembed.collections WHERE name LIKE 'eval_%'")]


def test_eval_scores_an_easy_set_perfectly_and_python_equals_sql(beir, dsn, tmp_path):
    python = _eval(tmp_path, dsn, str(beir), "--json")
    assert python.returncode == 0, python.stderr
    result = json.loads(python.stdout)
    assert result["counts"]["documents"] == len(DOCS) and result["counts"]["queries"] == len(EASY)
    assert result["dataset"]["format"] == "beir" and result["dataset"]["manifest"]["name"] == "tiny"
    assert result["model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert result["collection"]["chunk_tokens"] == 64
    assert set(result["modes"]) == {"dense", "chunks", "lexical", "hybrid", "auto"}
    chosen = result["collection"]["auto_fusion"]  # the report says what auto searched with
    assert chosen["basis"] in ("statistics", "pseudo-queries") and chosen["weights"]
    for scores in result["modes"].values():
        for metric in ("ndcg@10", "recall@10", "mrr@10"):
            assert 0.0 <= scores[metric] <= 1.0
        assert 0 < scores["latency_ms"]["p50"] <= scores["latency_ms"]["p99"]
        assert scores["queries"] == len(EASY)
    assert result["modes"]["dense"]["ndcg@10"] == pytest.approx(1.0)
    assert result["modes"]["dense"]["mrr@10"] == pytest.approx(1.0)
    assert _scratch_collections(dsn) == []  # dropped afterwards

    sql = _eval(tmp_path, dsn, str(beir), "--json", "--via", "sql", "--keep")
    assert sql.returncode == 0, sql.stderr
    via_sql = json.loads(sql.stdout)
    assert via_sql["via"] == "sql"
    for mode, scores in result["modes"].items():
        for metric in ("ndcg@10", "recall@10", "mrr@10"):
            assert via_sql["modes"][mode][metric] == pytest.approx(scores[metric], abs=1e-9), (mode, metric)
    kept = _scratch_collections(dsn)
    assert kept == [via_sql["collection"]["name"]] and f"kept collection {kept[0]}" in sql.stderr
    assert longembed(tmp_path, "collection", "drop", "-c", kept[0], "--dsn", dsn).returncode == 0


def test_eval_table_on_a_jsonl_dataset_with_bad_lines(dsn, tmp_path):
    lines = [json.dumps({"type": "doc", "id": k, "text": t}) for k, t in DOCS.items()]
    lines += [json.dumps({"type": "query", "id": q, "text": t}) for q, (t, _) in EASY.items()]
    lines += [json.dumps({"type": "qrel", "query": q, "doc": d}) for q, (_, d) in EASY.items()]
    lines += [
        '{"type": "doc", "id": "broken", "text": ',  # malformed JSON
        json.dumps({"type": "doc", "id": "chess", "text": "a second chess document"}),  # repeated id
        json.dumps({"type": "query", "id": "q-orphan", "text": "no judgement for me"}),
        json.dumps({"type": "qrel", "query": "q-tax", "doc": "no-such-doc", "score": 1}),
        json.dumps({"type": "qrel", "query": "no-such-query", "doc": "tax"}),
        json.dumps({"type": "note", "id": "x"}),
    ]
    data = tmp_path / "set.jsonl"
    data.write_text("\n".join(lines) + "\n")
    first_bad = len(DOCS) + 2 * len(EASY) + 1

    done = _eval(tmp_path, dsn, str(data), "--search-modes", "dense")
    assert done.returncode == errors.FAILURE, done.stderr  # lines were skipped: a partial run, as ingest
    err = done.stderr
    assert f"skipped {data}:{first_bad}: not valid JSON" in err
    assert f"skipped {data}:{first_bad + 1}: document 'chess' repeated" in err
    assert f'{data}:{first_bad + 5}: "type" must be' in err
    assert "warning: 1 judgements naming an unknown document left out" in err
    assert "warning: 1 judgements naming an unknown query left out" in err
    assert "warning: 1 queries without a relevant document in the corpus left out" in err
    table = done.stdout.splitlines()
    assert f"{data}: {len(DOCS)} documents, {len(EASY)} queries" in table[0]
    assert table[1].split()[:2] == ["mode", "nDCG@10"] and len(table) == 3
    row = table[2].split()
    assert row[0] == "dense" and float(row[1]) == pytest.approx(1.0, abs=5e-5) and row[-1] == str(len(EASY))
    assert _scratch_collections(dsn) == []


def test_eval_refuses_unusable_input(dsn, tmp_path, beir):
    missing = _eval(tmp_path, dsn, str(tmp_path / "nope"))
    assert missing.returncode == errors.USAGE and "no such file or folder" in missing.stderr
    (tmp_path / "notbeir").mkdir()
    not_beir = _eval(tmp_path, dsn, str(tmp_path / "notbeir"))
    assert not_beir.returncode == errors.USAGE and "missing corpus.jsonl, queries.jsonl" in not_beir.stderr
    (tmp_path / "empty.jsonl").write_text("\n\n")
    empty = _eval(tmp_path, dsn, str(tmp_path / "empty.jsonl"))
    assert empty.returncode == errors.USAGE and "no documents" in empty.stderr
    huge = _eval(tmp_path, dsn, str(beir), "-k", "100000")
    assert huge.returncode == errors.USAGE and "at most 1000" in huge.stderr
    mode = _eval(tmp_path, dsn, str(beir), "--search-modes", "dense,bogus")
    assert mode.returncode == errors.USAGE and "choose from" in mode.stderr
    assert _scratch_collections(dsn) == []
