"""`longembed quickstart`, the README's first command: its own embedded server, real ingest and search."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from longembed.plugin.cli import main
from longembed.plugin.cli.quickstart import python_reference_corpus


@pytest.fixture
def own_home(monkeypatch):
    home = Path("/tmp") / f"longembed-qs-{uuid.uuid4().hex[:8]}"  # reachable by the service user as root
    monkeypatch.setenv("LONGEMBED_HOME", str(home))
    monkeypatch.delenv("LONGEMBED_DSN", raising=False)
    yield home
    main(["down"])
    shutil.rmtree(home, ignore_errors=True)


def test_default_corpus_is_the_python_language_reference(tmp_path):
    folder = python_reference_corpus(tmp_path / "corpus")
    files = sorted(p.name for p in folder.iterdir())
    assert len(files) == 79 and "try.txt" in files and "for.txt" in files
    assert "except" in (folder / "try.txt").read_text()
    before = (folder / "try.txt").stat().st_mtime_ns
    python_reference_corpus(folder)  # a second run rewrites nothing
    assert (folder / "try.txt").stat().st_mtime_ns == before


def test_quickstart_ingests_searches_and_is_rerunnable(own_home, tmp_path, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "passwords.md").write_text(
        "To reset your password, open Settings, choose Security and click Reset."
    )
    (docs / "billing.md").write_text("Invoices are sent on the first day of each month by email.")
    (docs / "garden.txt").write_text("Tomatoes need six hours of sun and regular watering in summer.")
    argv = ["quickstart", str(docs), "--query", "I forgot my login password", "--collection", "qs"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    # Every step it prints is a command a user can paste into a shell as it stands.
    steps = [line[2:].split("    # ")[0] for line in out.splitlines() if line.startswith("$ longembed ")]
    assert ["longembed", "search", "-c", "qs", "I forgot my login password", "-k", "3"] in [
        shlex.split(step) for step in steps
    ]
    ranked = [line for line in out.splitlines() if line.strip().startswith("1. ")]
    assert ranked and "passwords.md" in ranked[-1]
    assert "3 documents: 3 new" in out
    assert "longembed.search('qs'" in out  # the SQL to try, PL/Python being built by the test command
    assert (own_home / "pg").is_dir() and oct(own_home.stat().st_mode & 0o777) == "0o700"

    # The SQL it prints works as printed, from psql: the backends ask the model host that `up` started
    # (as root the server's OS user could never read this checkout or its venv; it does not need to).
    printed = out[out.index("Try it in SQL") :].splitlines()
    statement = " ".join(line.strip() for line in printed[1:4])
    assert statement.startswith("SELECT external_id") and statement.endswith(";")
    result = subprocess.run(
        [sys.executable, "-m", "longembed.plugin.cli", "psql", "-c", statement],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "(3 rows)" in result.stdout and "passwords.md" in result.stdout, result.stdout
    distance = next(line.strip() for line in printed if "cosine_distance" in line)
    result = subprocess.run(
        [sys.executable, "-m", "longembed.plugin.cli", "psql", "-c", distance],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and "(1 row)" in result.stdout, result.stderr

    assert main(argv) == 0  # again: same server, nothing re-embedded
    assert "3 unchanged" in capsys.readouterr().out

    # With the host up, `ingest` leaves the embedding to the host's worker (one model in memory) and
    # still reports what the worker did.
    (docs / "long.txt").write_text("The lighthouse keeper logged every passing ship. " * 400)
    for collection, extra, summary in (
        ("qs", [], "1 new, 0 changed, 0 re-queued, 3 unchanged"),
        ("qsfull", ["--create", "--mode", "full"], "4 new"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "longembed.plugin.cli", "ingest", str(docs), "-c", collection, *extra,
             "--no-progress"],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert summary in result.stdout, result.stdout
        assert f"embedded into {collection} by the model host" in result.stdout, result.stdout
    assert "; 1 documents truncated at 256 tokens" in result.stdout  # full mode: the long text was cut
    # ... and returns once the host's worker has made search mode auto's choice for the new collection
    listed = subprocess.run(
        [sys.executable, "-m", "longembed.plugin.cli", "collection", "list", "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    entry = next(c for c in json.loads(listed.stdout) if c["name"] == "qsfull")
    assert entry["search_mode"] == "auto" and entry["auto_fusion"] is not None, entry
