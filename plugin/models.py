"""One loaded encoder per model source per process (loading takes seconds; queries need it in milliseconds).

`get_model` is the one entry point through which the CLI, the worker, search and the model host load a
model, so a process never holds two copies of one model.
"""

from __future__ import annotations

import os
import threading
from typing import Any

_models: dict[str, Any] = {}
_lock = threading.Lock()  # one load at a time: two callers of one source share one copy


def get_model(source: str | os.PathLike | None = None) -> Any:
    """The encoder model loaded from `source`, cached per process.

    `source`: what `longembed.encoder.load_model` takes — a hub id, a model folder, or None for the
    bundled default — and what a collection records in `model_source` (`ModelInfo.source`: the hub id,
    or the folder's absolute path), so `get_model(collection.model_source)` works from any directory.
    None and the default's hub id are the same (bundled, offline) model; nothing else loads it.
    """
    key = _key(source)
    with _lock:
        model = _models.get(key)
        if model is None:
            from longembed.encoder import load_model

            model = _models[key] = load_model(key)
    return model


def forget_model(source: str | os.PathLike | None) -> None:
    """Drop this process's copy of a model (a worker's memory budget); the next get_model loads it again."""
    with _lock:
        _models.pop(_key(source), None)


def _key(source: str | os.PathLike | None) -> str:
    from longembed.encoder.loading import DEFAULT_MODEL  # imports torch: only when a model is needed

    return DEFAULT_MODEL if source is None else os.fspath(source)
