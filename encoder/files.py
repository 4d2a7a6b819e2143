"""Reading a model folder's small files, and the error every loading problem raises (no torch here)."""

from __future__ import annotations

import json
from pathlib import Path


class ModelLoadError(ValueError):
    """The model could not be found or is not one longembed can run; the message says why."""


def read_json_object(path: Path) -> dict:
    """A JSON file holding an object (a model folder's config files), or a ModelLoadError saying why not."""
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw
