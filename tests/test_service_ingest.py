"""The model host with a database: its in-process worker embeds queued documents through the batcher,
/ready and /metrics see the database; and `longembed serve` as a real subprocess on a Unix socket."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from psycopg import sql

from longembed.plugin.cli import serve
from longembed.plugin.db import connect
from longembed.plugin.models import get_model
from longembed.plugin.service.host import HostConfig
from longembed.plugin.store.collections import create_collection
from longembed.plugin.store.documents import Document, add_documents, document_states
from tests.hostutil import running_host
from tests.pgdb import migrated_database
from tests.test_service_http import metric

DOCS = {
    "tides": "Tides are caused by the gravitational pull of the moon and the sun on the oceans of the Earth. "
    * 6,
    "bees": "Honey bees communicate the direction of flowers to their hive mates with a waggle dance.",
    "rust": "Rust's borrow checker enforces that references never outlive the data they point to.",
}


@pytest.fixture(scope="module")
def dsn(pg_dsn):
    with migrated_database(pg_dsn, "le_service") as url:
        yield url


def test_in_process_worker_embeds_queued_documents(dsn):
    model = get_model()
    with connect(dsn) as conn:
        collection = create_collection(conn, "hosted", model.info, chunk_tokens=48, overlap=8)
        result = add_documents(conn, "hosted", [Document(k, v) for k, v in DOCS.items()])
        assert result.counts == {"inserted": 3}
        with running_host(HostConfig(dsn=dsn)) as running:
            deadline = time.monotonic() + 60
            while any(s.status != "embedded" for s in document_states(conn, "hosted").values()):
                assert time.monotonic() < deadline, document_states(conn, "hosted")
                time.sleep(0.2)
            ready = httpx.get(f"{running.url}/ready")
            assert ready.status_code == 200, ready.text
            text = httpx.get(f"{running.url}/metrics").text
            assert metric(text, "longembed_database_up") == 1
            assert metric(text, "longembed_ingestion_backlog_documents") == 0
            assert "longembed_ingestion_oldest_age_seconds" in text
            assert (
                metric(text, "longembed_tokens_embedded_total", model=model.info.name, priority="ingestion")
                > 0
            )
            # A model no collection uses is not loaded on demand.
            r = httpx.post(f"{running.url}/v1/embeddings", json={"input": "x", "model": "someone/else"})
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        states = document_states(conn, "hosted")
        assert all(s.embed_count == 1 for s in states.values())
        assert states["tides"].n_chunks >= 2
        rows = conn.execute(
            sql.SQL(
                "SELECT c.ordinal, c.embedding FROM {} c JOIN longembed.documents d ON d.id = c.document_id "
                "WHERE d.external_id = 'tides' ORDER BY c.ordinal"
            ).format(collection.chunk_table)
        ).fetchall()
    expected = model.embed_chunks([DOCS["tides"]], mode="chunk", chunk_tokens=48, overlap=8)[0]
    assert len(rows) == len(expected)
    for (_, stored), chunk in zip(rows, expected, strict=True):
        assert np.abs(stored.to_numpy() - chunk.vector).max() < 1e-5


def test_ready_reports_an_unreachable_database():
    with running_host(HostConfig(dsn="postgresql://nobody@127.0.0.1:1/none", worker=False)) as running:
        r = httpx.get(f"{running.url}/ready")
        assert r.status_code == 503 and "database unreachable" in r.json()["reason"]
        assert httpx.get(f"{running.url}/health").status_code == 200
        assert metric(httpx.get(f"{running.url}/metrics").text, "longembed_database_up") == 0


def test_serve_subprocess_on_a_unix_socket(tmp_path):
    path = tmp_path / "run" / "host.sock"
    path.parent.mkdir(mode=0o700)
    cmd = [sys.executable, "-m", "longembed.plugin.cli", "serve", "--port", "0", "--socket", str(path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(path)), base_url="http://host") as http:
            deadline = time.monotonic() + 120
            while True:
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "the host did not become ready"
                try:
                    if http.get("/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
            # It re-executed itself (same pid) with glibc's huge-page tunable where this machine has it.
            environ = Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"\0")
            expected = serve.huge_pages_environment(
                os.environ, os.confstr("CS_GNU_LIBC_VERSION"), serve.THP_SETTING.read_text()
            )
            if expected is not None:
                assert f"GLIBC_TUNABLES={expected['GLIBC_TUNABLES']}".encode() in environ
                rollup = Path(f"/proc/{proc.pid}/smaps_rollup").read_text()
                huge_kb = int(rollup.split("AnonHugePages:")[1].split()[0])
                assert huge_kb >= 40 * 1024, rollup  # the weights, at least, in huge pages
            r = http.post("/v1/embeddings", json={"input": ["from another process"]})
            assert r.status_code == 200, r.text
            got = np.asarray(r.json()["data"][0]["embedding"])
            assert np.abs(got - get_model().embed(["from another process"])[0]).max() < 1e-5
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert "listening on unix:" in err
        assert not path.exists()  # removed on the way out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_model_a_collection_uses_is_loaded_on_demand(dsn, tmp_path):
    model = get_model()
    folder = tmp_path / "minilm-on-demand"
    shutil.copytree(model._m.folder, folder)
    with connect(dsn) as conn:  # a collection of a model the host was not started with
        info = dataclasses.replace(model.info, name="minilm-on-demand", source=str(folder))
        create_collection(conn, "on_demand", info)
    with running_host(HostConfig(dsn=dsn, worker=False)) as running:
        assert [m.info.name for m in running.host.models()] == [model.info.name]
        r = httpx.post(
            f"{running.url}/v1/embeddings", json={"input": "loaded for a collection", "model": str(folder)}
        )
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "minilm-on-demand"
        got = np.asarray(r.json()["data"][0]["embedding"])
        assert np.abs(got - model.embed(["loaded for a collection"])[0]).max() < 1e-5
        names = [entry["id"] for entry in httpx.get(f"{running.url}/v1/models").json()["data"]]
        assert names == [model.info.name, "minilm-on-demand"]
