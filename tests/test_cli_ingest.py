"""`longembed migrate | collection | ingest | search` on real files, with every bad input reported."""

from __future__ import annotations

import io
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import psycopg
import pytest

from longembed.plugin.cli import main
from longembed.plugin.store.documents import MAX_DOCUMENT_CHARS, document_states
from tests.pgdb import fresh_database


@pytest.fixture(scope="module")
def dsn(pg_dsn):
    with fresh_database(pg_dsn, "le_cli") as url:
        yield url


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_migrate_and_collection_commands(dsn, capsys):
    code, out, _ = run(capsys, "migrate", "--dsn", dsn)
    assert code == 0 and "applied 0001_init.sql" in out
    code, out, _ = run(capsys, "migrate", "--dsn", dsn)
    assert code == 0 and "up to date" in out
    code, out, _ = run(capsys, "collection", "create", "-c", "manuals", "--chunk-tokens", "64", "--dsn", dsn)
    assert code == 0 and "created collection manuals" in out and "64 tokens per chunk" in out
    code, _, err = run(capsys, "collection", "create", "manuals", "--dsn", dsn)
    assert code == 2 and "already exists" in err
    code, _, err = run(capsys, "collection", "create", "bad name!", "--dsn", dsn)
    assert code == 2 and "invalid collection name" in err
    code, _, err = run(capsys, "collection", "create", "toolong", "--chunk-tokens", "9999", "--dsn", dsn)
    assert code == 2 and "chunk_tokens must be in 1..254" in err
    code, out, _ = run(capsys, "collection", "list", "--json", "--dsn", dsn)
    listed = json.loads(out)
    assert [(c["name"], c["dim"], c["chunk_tokens"], c["documents"]) for c in listed] == [
        ("manuals", 384, 64, 0)
    ]
    code, out, err = run(capsys, "collection", "drop", "manuals", "--dsn", dsn)  # the old positional form
    assert code == 0 and "dropped" in out and "positional collection name is deprecated" in err
    code, _, err = run(capsys, "collection", "drop", "manuals", "--dsn", dsn)
    assert code == 2 and "no collection named 'manuals'" in err
    assert run(capsys, "collection", "drop", "manuals", "--if-exists", "--dsn", dsn)[0] == 0


def test_ingest_reports_every_bad_input_and_keeps_the_good(dsn, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "guide.md").write_text(
        "# Install\nRun the installer and follow the prompts to set up the tool."
    )
    (folder / "sub" / "notes.txt").write_text("Notes on tuning the index: raise ef_search for better recall.")
    (folder / "empty.txt").write_bytes(b"")
    (folder / "blank.md").write_text("  \n\n ")
    (folder / "nul.txt").write_bytes(b"text with a \x00 NUL byte")
    (folder / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (folder / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    (folder / ".hidden.txt").write_text("hidden files are not documents")
    (folder / "big.txt").write_text("a" * (MAX_DOCUMENT_CHARS + 1))
    (folder / "records.jsonl").write_text(
        '{"id": "r1", "text": "Reset a password from the account page.", "metadata": {"lang": "en"}}\n'
        "\n"
        '{"id": 7, "text": "Numeric ids become strings."}\n'
        "{not json\n"
        '{"id": "r3"}\n'
        '["a", "list"]\n'
        '{"id": "r4", "text": "", "metadata": {}}\n'
        '{"id": "r5", "text": "metadata must be an object", "metadata": [1]}\n'
    )
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"Text piped on stdin about backups.")))
    code, out, err = run(
        capsys,
        "ingest",
        str(folder),
        "-",
        str(tmp_path / "missing"),
        "-c",
        "kb",
        "--create",
        "--no-progress",
        "--dsn",
        dsn,
    )
    assert code == 1, err  # something was skipped
    assert "created collection kb" in out
    assert "5 documents: 5 new" in out
    expected_skips = {
        f"{folder}/empty.txt": "empty file",
        f"{folder}/blank.md": "empty (whitespace only)",
        f"{folder}/nul.txt": "binary file (contains NUL bytes)",
        f"{folder}/latin1.txt": "not valid UTF-8 (byte 0xe9 at offset 3)",
        f"{folder}/big.txt": "more than the limit",
        f"{folder}/records.jsonl:4": "not valid JSON",
        f"{folder}/records.jsonl:5": "needs a 'text' field",
        f"{folder}/records.jsonl:6": "must be a JSON object",
        f"{folder}/records.jsonl:7": "text is empty",
        f"{folder}/records.jsonl:8": "metadata must be a JSON object",
        f"{tmp_path}/missing": "no such file or folder",
    }
    skipped = {
        line.split(": ", 1)[0].removeprefix("skipped "): line.split(": ", 1)[1]
        for line in err.splitlines()
        if line.startswith("skipped ")
    }
    assert set(skipped) == set(expected_skips), err
    for source, reason in expected_skips.items():
        assert reason in skipped[source], (source, skipped[source])
    assert "ignored 1 files of other types" in err and "photo.png" in err

    with psycopg.connect(dsn) as conn:
        states = document_states(conn, "kb")
        assert set(states) == {f"{folder}/guide.md", f"{folder}/sub/notes.txt", "r1", "7", "stdin"}
        assert {s.status for s in states.values()} == {"embedded"}  # ingest waited for the worker
        meta = dict(conn.execute("SELECT external_id, metadata FROM longembed.documents").fetchall())
    assert meta["r1"] == {"lang": "en"}
    assert meta[f"{folder}/guide.md"] == {"path": f"{folder}/guide.md", "suffix": ".md"}

    code, out, _ = run(
        capsys, "search", "-c", "kb", "how do I change my password", "-k", "2", "--json", "--dsn", dsn
    )
    assert code == 0 and json.loads(out)[0]["external_id"] == "r1"
    code, out, _ = run(capsys, "search", "-c", "kb", "password", "--filter", '{"lang": "de"}', "--dsn", dsn)
    assert code == 0 and out.strip() == "no results"
    code, _, err = run(capsys, "search", "-c", "kb", "password", "--filter", "{lang: en}", "--dsn", dsn)
    assert code == 2 and "--filter is not valid JSON" in err


def test_no_wait_then_worker_once(dsn, tmp_path, capsys):
    (tmp_path / "a.txt").write_text("Queued now, embedded later by a separate worker run.")
    code, out, _ = run(
        capsys, "ingest", str(tmp_path), "-c", "later", "--create", "--no-wait", "--no-progress", "--dsn", dsn
    )
    assert code == 0 and "1 documents: 1 new" in out
    with psycopg.connect(dsn) as conn:
        assert {s.status for s in document_states(conn, "later").values()} == {"queued"}
    code, _, err = run(capsys, "worker", "--once", "-c", "later", "--dsn", dsn)
    assert code == 0, err
    with psycopg.connect(dsn) as conn:
        assert {s.status for s in document_states(conn, "later").values()} == {"embedded"}
    # Unchanged input: nothing queued, nothing re-embedded.
    code, out, _ = run(capsys, "ingest", str(tmp_path), "-c", "later", "--no-progress", "--dsn", dsn)
    assert code == 0 and "1 unchanged" in out


def test_unknown_collection_and_bad_flags(dsn, tmp_path, capsys):
    (tmp_path / "a.txt").write_text("text")
    code, _, err = run(capsys, "ingest", str(tmp_path), "-c", "nope", "--dsn", dsn)
    assert code == 2 and "no collection named 'nope'" in err
    code, _, err = run(
        capsys, "ingest", str(tmp_path), "-c", 'x"; DROP TABLE t; --', "--create", "--dsn", dsn
    )
    assert code == 2 and "invalid collection name" in err
    code, _, err = run(capsys, "search", "-c", "nope", "query", "--dsn", dsn)
    assert code == 2 and "no collection named 'nope'" in err
    for argv in (
        ["worker", "--processes", "0", "--dsn", dsn],
        ["ingest", str(tmp_path), "-c", "kb", "--batch-tokens", "0", "--dsn", dsn],
    ):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2 and "must be a positive integer" in capsys.readouterr().err
    code, _, err = run(capsys, "ingest", str(tmp_path), "-c", "kb", "--lease-seconds", "0", "--dsn", dsn)
    assert code == 2 and "lease_seconds must be positive" in err
    code, _, err = run(capsys, "search", "-c", "kb", "query", "--dsn", "postgresql://nobody@127.0.0.1:1/none")
    assert code == 1 and "longembed: error: cannot reach the database" in err
