"""One loaded encoder per model name per process (loading takes seconds; queries need it in milliseconds)."""

from __future__ import annotations

import functools
from typing import Any


@functools.cache
def get_model(name: str | None = None) -> Any:
    """The encoder model `name` (a hub id or local folder), or the bundled default for None.

    A collection records its model's `info.name`; the bundled default answers to its own name, so
    collections made with it load it offline.
    """
    from longembed.encoder import load_model  # imports torch: only when a model is really needed

    if name is None:
        return load_model()
    default = get_model(None)
    return default if name == default.info.name else load_model(name)
