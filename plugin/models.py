"""One loaded encoder per model source per process (loading takes seconds; queries need it in milliseconds).

`get_model` is the one entry point through which the CLI, the worker, search and the model host load a
model, so a process never holds two copies of one model.
"""

from __future__ import annotations

import functools
import os
from typing import Any


def get_model(source: str | os.PathLike | None = None) -> Any:
    """The encoder model loaded from `source`, cached per process.

    `source`: what `longembed.encoder.load_model` takes — a hub id, a model folder, or None for the
    bundled default — and what a collection records in `model_source` (`ModelInfo.source`: the hub id,
    or the folder's absolute path), so `get_model(collection.model_source)` works from any directory.
    None and the default's hub id are the same (bundled, offline) model; nothing else loads it.
    """
    from longembed.encoder.loading import DEFAULT_MODEL  # imports torch: only when a model is needed

    return _load(DEFAULT_MODEL if source is None else os.fspath(source))


@functools.cache
def _load(source: str) -> Any:
    from longembed.encoder import load_model

    return load_model(source)
