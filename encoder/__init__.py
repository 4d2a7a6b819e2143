"""Text -> vectors: BERT and JinaBERT encoders on packed batches, with prefixes and long-document modes.

    from longembed.encoder import load_model
    model = load_model()                                  # bundled all-MiniLM-L6-v2, no network
    vectors = model.embed(["how do I reset a password"], kind="query")
    chunks = model.embed_chunks(documents, mode="chunk", chunk_tokens=256, overlap=32)

Names resolve lazily (PEP 562), so `encoder.profiles` or `encoder.chunking` can be imported without
paying for torch: the CLI parses its arguments before any model code loads.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from longembed.encoder.files import ModelLoadError
    from longembed.encoder.model import Chunk, EmbeddingModel, ModelInfo, load_model

_EXPORTS = {
    "Chunk": "longembed.encoder.model",
    "EmbeddingModel": "longembed.encoder.model",
    "ModelInfo": "longembed.encoder.model",
    "load_model": "longembed.encoder.model",
    "ModelLoadError": "longembed.encoder.files",
}
__all__ = ["Chunk", "EmbeddingModel", "ModelInfo", "ModelLoadError", "load_model"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'encoder' has no attribute {name!r}")
