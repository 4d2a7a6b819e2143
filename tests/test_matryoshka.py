"""Matryoshka `dimensions` from Python, the CLI and collections, on a random-weight NomicBERT checkpoint
named nomic-embed-text-v1.5 (the folder name picks the profile, hence the sizes 768/512/256/128/64)."""

from __future__ import annotations

import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from longembed.encoder.profiles import truncate_dim
from longembed.plugin.cli import errors, main
from longembed.plugin.db import connect
from longembed.plugin.models import get_model
from longembed.plugin.pipeline.worker import Worker, WorkerConfig, incompatibility
from longembed.plugin.service.batcher import Batcher
from longembed.plugin.service.host import HostConfig
from longembed.plugin.service.served import BatchedModel, ServedModel
from longembed.plugin.store.collections import create_collection, get_collection
from longembed.plugin.store.documents import Document, add_documents, document_states
from longembed.plugin.store.search import embed_query, search
from tests.hostutil import running_host
from tests.pgdb import migrated_database
from tests.test_nomic_bert import nomic_config, random_state, reference_vectors, write_folder

SIZES = (768, 512, 256, 128, 64)
TEXTS = ["hello world", "Matryoshka vectors keep their head. " * 5, "a"]
DOCS = {
    "volcano": "molten rock erupting from a mountain",
    "bread": "wild yeast culture for baking a sourdough loaf",
    "chess": "the best reply to 1.e4 among chess openings",
    "planet": "the biggest gas giant planet of the solar system",
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(folder, config, state): 768 wide like the real v1.5, so every Matryoshka size is shorter or equal."""
    config = nomic_config(heads=12, hidden=768, layers=1)
    state = random_state(config, seed=7)
    folder = write_folder(tmp_path_factory.mktemp("m") / "nomic-embed-text-v1.5", config, state)
    return folder, config, state


@pytest.fixture(scope="module")
def nomic(checkpoint):
    model = get_model(checkpoint[0])  # the collections' loader: the worker and search get this one
    assert model.info.dim == 768 and model.info.matryoshka_dims == SIZES
    return model


@pytest.fixture(scope="module")
def minilm():
    return get_model()


def recipe(raw: np.ndarray, dim: int) -> np.ndarray:
    """Nomic's published recipe on the raw mean-pooled output, in torch."""
    pooled = torch.from_numpy(raw)
    return F.normalize(F.layer_norm(pooled, (pooled.shape[1],))[:, :dim], dim=1).numpy()


def test_embed_dimensions_is_the_recipe(checkpoint, nomic):
    folder, config, state = checkpoint
    full = nomic.embed(TEXTS)
    raw = reference_vectors(config, state, folder, [nomic.info.prefixes["document"] + t for t in TEXTS])
    for dim in (512, 256, 64):
        got = nomic.embed(TEXTS, dimensions=dim)
        assert got.shape == (len(TEXTS), dim) and got.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
        assert np.abs(got - truncate_dim(full, dim, SIZES)).max() <= 1e-6
        # transformers' NomicBertModel output through the recipe: independent of our encoder.
        assert np.abs(got - recipe(raw, dim)).max() <= 1e-5
        # Plain truncation (no centring) is further off than the tolerance above: the recipe matters.
        assert np.abs(got - full[:, :dim] / np.linalg.norm(full[:, :dim], axis=1, keepdims=True)).max() > 1e-4
    np.testing.assert_array_equal(nomic.embed(TEXTS, dimensions=768), full)  # its own size: unchanged
    assert nomic.embed([], dimensions=128).shape == (0, 128)


def test_embed_chunks_dimensions_cut_every_chunk(nomic):
    for mode in ("chunk", "late"):
        full = nomic.embed_chunks(TEXTS, mode=mode, chunk_tokens=8, overlap=2)
        cut = nomic.embed_chunks(TEXTS, mode=mode, chunk_tokens=8, overlap=2, dimensions=128)
        for doc_full, doc_cut in zip(full, cut, strict=True):
            assert [(c.start, c.end) for c in doc_cut] == [(c.start, c.end) for c in doc_full]
            want = truncate_dim(np.stack([c.vector for c in doc_full]), 128, SIZES)
            assert np.abs(np.stack([c.vector for c in doc_cut]) - want).max() <= 1e-6


def test_refused_sizes(nomic, minilm):
    with pytest.raises(
        ValueError, match=r"one of 768, 512, 256, 128, 64 for nomic-embed-text-v1\.5 .*got 300"
    ):
        nomic.embed(["x"], dimensions=300)
    with pytest.raises(ValueError, match="one of"):
        nomic.embed_chunks(["x"], dimensions=1024)
    with pytest.raises(TypeError, match="integer"):
        nomic.embed(["x"], dimensions=256.0)
    for dim in (128, 256, 64):
        with pytest.raises(ValueError, match=r"not trained for Matryoshka.*omitted or 384"):
            minilm.embed(["x"], dimensions=dim)
    np.testing.assert_array_equal(minilm.embed(["x"], dimensions=384), minilm.embed(["x"]))


def test_cli_embed_dimensions(checkpoint, nomic, tmp_path, capsys):
    source = tmp_path / "in.txt"
    source.write_text("hello world\nsecond line\n")
    out = tmp_path / "out.npy"
    code = main(["embed", str(source), "--model", str(checkpoint[0]), "--dimensions", "256", "-o", str(out)])
    assert code == errors.OK
    vectors = np.load(out)
    assert vectors.shape == (2, 256)
    np.testing.assert_allclose(
        vectors, nomic.embed(["hello world", "second line"], dimensions=256), atol=1e-6
    )
    code = main(["embed", str(source), "--dimensions", "128", "-o", str(tmp_path / "no.npy")])
    err = capsys.readouterr().err
    assert code == errors.USAGE and "not trained for Matryoshka" in err
    assert not (tmp_path / "no.npy").exists()
    code = main(["embed", str(source), "--model", str(checkpoint[0]), "--dimensions", "100"])
    err = capsys.readouterr().err
    assert code == errors.USAGE and "one of 768, 512, 256, 128, 64" in err


def test_batched_model_cuts_to_the_asked_size(nomic):
    batcher = Batcher(nomic.forward_batch, nomic.info.dim)
    try:
        hosted = BatchedModel(ServedModel(nomic, batcher))
        got = hosted.embed_chunks(TEXTS, mode="full", dimensions=256)
        with pytest.raises(ValueError, match="one of"):
            hosted.embed_chunks(TEXTS, dimensions=100)
    finally:
        batcher.stop()
    want = nomic.embed(TEXTS, dimensions=256)
    assert np.abs(np.stack([doc[0].vector for doc in got]) - want).max() <= 1e-6


@pytest.fixture(scope="module")
def dsn(pg_dsn):
    with migrated_database(pg_dsn, "le_matryoshka") as url:
        yield url


def test_collection_of_a_matryoshka_size_ingests_and_searches(dsn, nomic, minilm):
    with connect(dsn) as conn:
        # No prefixes: a query equal to a document's text then has that document's very vector.
        collection = create_collection(
            conn, "m256", nomic, mode="full", query_prefix="", document_prefix="", dimensions=256
        )
        assert collection.dim == 256 and incompatibility(collection, nomic.info) is None
        add_documents(conn, collection, [Document(k, v) for k, v in DOCS.items()])
        stats = Worker(conn, nomic, WorkerConfig()).drain()
        assert stats.embedded == len(DOCS) and stats.parked == 0
        (stored,) = conn.execute(
            f"SELECT vector_dims(embedding) FROM longembed.chunks_{collection.id} GROUP BY 1"
        ).fetchall()
        assert stored == (256,)
        for key, text in DOCS.items():
            hits = search(conn, "m256", text, k=2)
            assert hits[0].external_id == key and hits[0].score == pytest.approx(1.0, abs=1e-5)
        want = nomic.embed([DOCS["chess"]], kind="query", instruction="", dimensions=256)[0]
        np.testing.assert_allclose(embed_query(get_collection(conn, "m256"), DOCS["chess"]), want, atol=1e-6)
        # Sizes the model was not trained for are refused, for MiniLM any but 384.
        with pytest.raises(ValueError, match="one of"):
            create_collection(conn, "m300", nomic, dimensions=300)
        with pytest.raises(ValueError, match="not trained for Matryoshka"):
            create_collection(conn, "mini128", minilm, dimensions=128)
        assert create_collection(conn, "mini384", minilm, dimensions=384).dim == 384
        assert get_collection(conn, "m300", missing_ok=True) is None


def test_cli_collection_and_ingest_dimensions(dsn, checkpoint, tmp_path, capsys):
    model = str(checkpoint[0])
    code = main(["collection", "create", "-c", "c128", "--dsn", dsn, "--model", model, "--dimensions", "128"])
    out = capsys.readouterr().out
    assert code == errors.OK and "(128-d)" in out
    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"id": "a", "text": "first document"}\n{"id": "b", "text": "second document"}\n')
    code = main(
        ["ingest", str(docs), "-c", "c64", "--create", "--dsn", dsn, "--model", model, "--dimensions", "64"]
    )
    assert code == errors.OK, capsys.readouterr()
    with connect(dsn) as conn:
        collection = get_collection(conn, "c64")
        assert collection.dim == 64
        (n,) = conn.execute(
            f"SELECT count(*) FROM longembed.chunks_{collection.id} WHERE vector_dims(embedding) = 64"
        ).fetchone()
        assert n == 2
    capsys.readouterr()
    # An existing collection keeps its size: another one asked for is refused, its own is fine.
    code = main(["ingest", str(docs), "-c", "c64", "--dsn", dsn, "--model", model, "--dimensions", "128"])
    err = capsys.readouterr().err
    assert code == errors.USAGE and "--dimensions 128 (it has 64)" in err
    assert main(["ingest", str(docs), "-c", "c64", "--dsn", dsn, "--dimensions", "64"]) == errors.OK
    code = main(["collection", "create", "-c", "mini", "--dsn", dsn, "--dimensions", "128"])
    assert code == errors.USAGE and "not trained for Matryoshka" in capsys.readouterr().err


def test_host_worker_embeds_a_collection_of_a_matryoshka_size(dsn, checkpoint, nomic):
    """The host's in-process worker (BatchedModel over its batcher) cuts documents to the collection size."""
    with connect(dsn) as conn:
        collection = create_collection(conn, "hosted128", nomic, mode="full", dimensions=128)
        add_documents(conn, collection, [Document(k, v) for k, v in DOCS.items()])
        with running_host(HostConfig(models=(str(checkpoint[0]),), dsn=dsn)):
            deadline = time.monotonic() + 60
            while any(s.status != "embedded" for s in document_states(conn, "hosted128").values()):
                assert time.monotonic() < deadline, document_states(conn, "hosted128")
                time.sleep(0.2)
        rows = conn.execute(
            f"SELECT d.external_id, c.embedding FROM longembed.chunks_{collection.id} c "
            "JOIN longembed.documents d ON d.id = c.document_id ORDER BY 1"
        ).fetchall()
    assert [key for key, _ in rows] == sorted(DOCS)
    want = nomic.embed([DOCS[key] for key, _ in rows], dimensions=128)
    got = np.stack([np.asarray(vector.to_numpy(), dtype=np.float32) for _, vector in rows])
    assert got.shape == (len(DOCS), 128) and np.abs(got - want).max() < 1e-5
