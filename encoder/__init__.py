"""Text -> vectors: BERT and JinaBERT encoders on packed batches, with prefixes and long-document modes.

from encoder import load_model
model = load_model()                                  # bundled all-MiniLM-L6-v2, no network
vectors = model.embed(["how do I reset a password"], kind="query")
chunks = model.embed_chunks(documents, mode="chunk", chunk_tokens=256, overlap=32)
"""

from encoder.loading import ModelLoadError
from encoder.model import Chunk, EmbeddingModel, ModelInfo, load_model

__all__ = ["Chunk", "EmbeddingModel", "ModelInfo", "ModelLoadError", "load_model"]
