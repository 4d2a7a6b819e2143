"""One chunk_tokens default for the encoder and collections, leaving room for the document prefix; `late`
allowed for the same models by both. Real MiniLM, a tiny random JinaBERT, the session's PostgreSQL."""

from __future__ import annotations

import pytest

from longembed.encoder import load_model
from longembed.encoder.chunking import DEFAULT_CHUNK_TOKENS
from longembed.plugin.db import connect
from longembed.plugin.models import get_model
from longembed.plugin.pipeline.worker import Worker, WorkerConfig
from longembed.plugin.store.collections import create_collection
from longembed.plugin.store.documents import Document, add_documents, document_states
from tests.jina_reference import jina_config, write_checkpoint
from tests.pgdb import migrated_database

LONG = " ".join(
    f"Paragraph {i} tells how the river carved its valley over ten thousand years." for i in range(60)
)


@pytest.fixture(scope="module")
def model():
    return get_model()


@pytest.fixture(scope="module")
def conn(pg_dsn):
    with migrated_database(pg_dsn, "le_chunkdef") as url, connect(url) as c:
        yield c


@pytest.fixture(scope="module")
def jina(tmp_path_factory):
    folder = tmp_path_factory.mktemp("jina-8k")
    write_checkpoint(folder, jina_config(4, max_position_embeddings=8192))
    return load_model(folder, device="cpu")


@pytest.mark.parametrize("mode", ["chunk", "late"])
def test_documents_with_a_prefix_get_embedded_not_parked(conn, model, mode):
    """E5-style "passage: " on MiniLM: the default chunk leaves room for it, in chunk and late mode."""
    name = f"prefixed-{mode}"
    collection = create_collection(conn, name, model, mode=mode, document_prefix="passage: ")
    prefix_tokens = model.count_tokens(["passage: "])[0]
    assert collection.chunk_tokens == model.info.max_tokens - 2 - prefix_tokens
    add_documents(conn, collection, [Document("long", LONG), Document("short", "A short note on rivers.")])
    stats = Worker(conn, model, WorkerConfig(max_attempts=1), [name]).drain()
    assert (stats.embedded, stats.retrying, stats.parked) == (2, 0, 0)
    states = document_states(conn, collection)
    assert {s.status for s in states.values()} == {"embedded"}
    assert states["long"].n_chunks > 1
    # The encoder's own default for the same prefix is the collection's chunk size.
    chunks = model.embed_chunks([LONG], mode=mode, overlap=0, instruction="passage: ")[0]
    assert chunks[0].n_tokens == collection.chunk_tokens


def test_jina_chunk_mode_defaults_to_chunks_not_whole_documents(conn, jina):
    assert jina.info.max_tokens == 8192
    collection = create_collection(conn, "jina-chunks", jina, mode="chunk")
    assert collection.chunk_tokens == DEFAULT_CHUNK_TOKENS
    chunks = jina.embed_chunks([LONG * 3], mode="chunk", overlap=0)[0]
    assert len(chunks) > 1 and chunks[0].n_tokens == DEFAULT_CHUNK_TOKENS
    late = create_collection(conn, "jina-late", jina, mode="late", document_prefix="passage: ")
    assert late.chunk_tokens == DEFAULT_CHUNK_TOKENS


def test_prefix_that_leaves_no_room_and_info_without_tokenizer_are_refused(conn, model):
    with pytest.raises(ValueError, match=r"chunk_tokens must be in 1\.\.252 .* 2 document prefix tokens"):
        create_collection(conn, "too-big", model, chunk_tokens=254, document_prefix="passage: ")
    with pytest.raises(TypeError, match="pass the model, not its info"):
        create_collection(conn, "info-only", model.info, document_prefix="passage: ")
