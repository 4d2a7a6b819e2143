"""Real text for benchmarks: prose lines from files this machine ships (Python's standard-library sources:
comments and docstrings; Debian's licence texts and package changelogs), embedded with the bundled
MiniLM and cached as .npy, since embedding 100,000 lines takes this CPU many minutes.

    python bench/real_texts.py --n 100000 --cache /tmp/longembed-real   # embeds once, then reuses
"""

from __future__ import annotations

import argparse
import gzip
import os
import re
import sys
import sysconfig
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

PROSE = re.compile(r"^[A-Za-z][A-Za-z0-9 ,.;:'()\-]{39,300}$")


def _lines(path: Path) -> list[str]:
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except OSError:
        return []
    return raw.decode("utf-8", "replace").splitlines()


def prose_lines(limit: int) -> list[str]:
    """Unique lines of prose (40-300 characters, mostly words), in a fixed order."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))
    files += sorted(Path("/usr/share/common-licenses").glob("*"))
    files += sorted(Path("/usr/share/doc").glob("*/changelog*.gz"))
    seen: dict[str, None] = {}
    for path in files:
        for line in _lines(path):
            text = line.strip().lstrip("#*- ").strip()
            if PROSE.match(text) and len(text.split()) >= 6:
                seen.setdefault(text, None)
        if len(seen) >= limit:
            break
    return list(seen)[:limit]


def real_vectors(n: int, cache: Path, n_queries: int = 1000) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(base vectors, query vectors, query texts): n + n_queries distinct lines, the queries held out and
    embedded as queries. Cached under `cache`."""
    cache.mkdir(parents=True, exist_ok=True)
    base_file, query_file = cache / f"real-{n}.npy", cache / f"real-{n}-queries.npy"
    texts = prose_lines(n + n_queries)
    if len(texts) < n + n_queries:
        raise SystemExit(
            f"only {len(texts)} prose lines on this machine; ask for --n {len(texts) - n_queries}"
        )
    rng = np.random.default_rng(0)
    order = rng.permutation(len(texts))
    queries = [texts[i] for i in order[:n_queries]]
    base = [texts[i] for i in order[n_queries:]]
    if base_file.exists() and query_file.exists():
        return np.load(base_file), np.load(query_file), queries
    from longembed.plugin.models import get_model

    model = get_model()
    t0 = time.perf_counter()
    vectors = np.concatenate([model.embed(base[i : i + 4096]) for i in range(0, len(base), 4096)])
    qv = model.embed(queries, kind="query")
    print(
        f"embedded {len(base)} lines + {len(queries)} queries in {time.perf_counter() - t0:.0f} s", flush=True
    )
    np.save(base_file, vectors.astype(np.float32))
    np.save(query_file, qv.astype(np.float32))
    return vectors, qv, queries


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/longembed-real"))
    args = parser.parse_args()
    base, queries, _ = real_vectors(args.n, args.cache)
    print(f"{len(base)} base vectors, {len(queries)} queries, dim {base.shape[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
