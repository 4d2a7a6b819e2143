"""Model profiles: the instruction prefixes and pooling each known model family was trained with.

Prefixes are data, as in sentence-transformers' `prompts`: a model folder's own
`config_sentence_transformers.json` prompts win; otherwise the family is recognised by name.
So are the Matryoshka dimensions a family was trained to be truncated to (`truncate_dim`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from longembed.encoder.files import ModelLoadError, read_json_object

POOLING_MODES = ("mean", "cls")
KINDS = ("query", "document")


@dataclass(frozen=True)
class Profile:
    pooling: str = "mean"
    prefixes: dict[str, str] = field(default_factory=lambda: {"query": "", "document": ""})
    # Output sizes the model was trained to be truncated to (largest first); () when it was not.
    matryoshka_dims: tuple[int, ...] = ()


# Matched against the model name (hub id or folder name), first match wins.
BGE_QUERY = "Represent this sentence for searching relevant passages: "
NOMIC_PREFIXES = {"query": "search_query: ", "document": "search_document: "}
KNOWN_FAMILIES: list[tuple[str, Profile]] = [
    (
        r"(^|/)bge-",
        Profile("cls", {"query": BGE_QUERY, "document": ""}),
    ),
    (r"(^|/)(multilingual-)?e5-", Profile("mean", {"query": "query: ", "document": "passage: "})),
    (
        r"(^|/)nomic-embed-text-v1\.5",
        Profile("mean", NOMIC_PREFIXES, matryoshka_dims=(768, 512, 256, 128, 64)),
    ),
    (r"(^|/)nomic-embed-text", Profile("mean", NOMIC_PREFIXES)),
    (r"(^|/)jina-embeddings-v2", Profile("mean", {"query": "", "document": ""})),
    (r"(^|/)all-minilm", Profile("mean", {"query": "", "document": ""})),
]


def profile_for(name: str, folder: Path) -> Profile:
    """The profile of a model: its folder's sentence-transformers files, else its family, else mean."""
    family = next(
        (p for pattern, p in KNOWN_FAMILIES if re.search(pattern, name, flags=re.IGNORECASE)), Profile()
    )
    pooling = _folder_pooling(folder) or family.pooling
    prefixes = dict(family.prefixes)
    prompts = _folder_prompts(folder)
    if "query" in prompts:
        prefixes["query"] = prompts["query"]
    for key in ("document", "passage", "corpus"):
        if key in prompts:
            prefixes["document"] = prompts[key]
            break
    return Profile(pooling, prefixes, family.matryoshka_dims)


def check_dimensions(dimensions: int | None, dim: int, allowed: Sequence[int], name: str) -> None:
    """Refuse an output size model `name` cannot give: None or its own `dim` always pass (no truncation);
    otherwise `dimensions` must be one of its Matryoshka sizes `allowed` (the profile's matryoshka_dims)."""
    if dimensions is None:
        return
    if not isinstance(dimensions, int) or isinstance(dimensions, bool):
        raise TypeError(f"dimensions must be an integer, got {type(dimensions).__name__}")
    if dimensions == dim:
        return
    if not allowed:
        raise ValueError(
            f"{name} was not trained for Matryoshka truncation: dimensions must be omitted or {dim}, "
            f"got {dimensions}"
        )
    if dimensions not in allowed:
        sizes = ", ".join(str(d) for d in sorted(allowed, reverse=True))
        raise ValueError(
            f"dimensions must be one of {sizes} for {name} (its Matryoshka sizes), got {dimensions}"
        )


def truncate_dim(vectors: np.ndarray, dim: int, allowed: Sequence[int]) -> np.ndarray:
    """(n, full) embeddings -> (n, dim) float32 by Nomic's published Matryoshka recipe:
    layer_norm over the full vector (no affine), keep the first `dim` values, L2-normalise.

    layer_norm is a shift by the mean and a division by a per-row scalar, and the final normalisation
    removes any per-row scalar, so this is exact for the L2-normalised vectors the encoder returns as well
    as for raw mean-pooled ones. `allowed`: the profile's matryoshka_dims; other sizes are refused."""
    if dim not in allowed:
        if not allowed:
            raise ValueError(
                "this model was not trained for Matryoshka truncation: dimensions is not supported"
            )
        raise ValueError(f"dimensions must be one of {sorted(allowed, reverse=True)}, got {dim!r}")
    if vectors.ndim != 2 or vectors.shape[1] < dim:
        raise ValueError(f"expected (n, >= {dim}) embeddings, got shape {vectors.shape}")
    full = vectors.astype(np.float64)
    kept = (full - full.mean(axis=1, keepdims=True))[:, :dim]
    norms = np.linalg.norm(kept, axis=1, keepdims=True)
    return (kept / np.maximum(norms, 1e-12)).astype(np.float32)


def _folder_pooling(folder: Path) -> str | None:
    path = folder / "1_Pooling" / "config.json"
    if not path.is_file():
        return None
    config = read_json_object(path)
    if config.get("pooling_mode_mean_tokens"):
        return "mean"
    if config.get("pooling_mode_cls_token"):
        return "cls"
    modes = sorted(k for k, v in config.items() if k.startswith("pooling_mode") and v)
    raise ModelLoadError(f"{path}: unsupported pooling {modes}; supported: {POOLING_MODES}")


def _folder_prompts(folder: Path) -> dict[str, str]:
    path = folder / "config_sentence_transformers.json"
    if not path.is_file():
        return {}
    prompts = read_json_object(path).get("prompts") or {}
    if not isinstance(prompts, dict) or not all(isinstance(v, str) for v in prompts.values()):
        raise ModelLoadError(f"{path}: prompts must be an object of name -> prefix string, got {prompts!r}")
    return prompts
