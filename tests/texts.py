"""A varied, deterministic set of real texts for comparing encoders: docstrings of the standard
library (prose and code), cut to many lengths, plus unicode, whitespace-heavy and degenerate inputs."""

from __future__ import annotations

import importlib
import inspect

MODULES = [
    "json",
    "os",
    "re",
    "argparse",
    "collections",
    "functools",
    "itertools",
    "pathlib",
    "subprocess",
    "textwrap",
    "dataclasses",
    "logging",
    "email",
    "http.client",
    "urllib.parse",
    "sqlite3",
    "csv",
    "decimal",
    "fractions",
    "statistics",
    "heapq",
    "bisect",
    "difflib",
    "shutil",
    "tempfile",
]

SPECIAL = [
    "",
    " ",
    "\t\n  \n\t",
    "a",
    "?",
    "naïve café déjà vu — “quoted” ‘text’ … ½ ∑ ∞",
    "日本語のテキストと中文文本以及한국어 텍스트",
    "emoji 🙂🚀🔥 and symbols ©®™ and math ∫x²dx",
    "Ελληνικά κείμενα και русский текст и עברית וערבית العربية",
    "def f(x):\n    return {k: v for k, v in x.items() if v is not None}\n",
    "SELECT id, embedding <=> '[1,2,3]' AS d FROM items ORDER BY d LIMIT 5;",
    "x" * 3000,
    "word " * 2000,
    "    lots     of      spaces\n\n\n\nand\t\t\ttabs    ",
    "ZERO\u200bWIDTH\u200dJOINERS\ufeffBOM",
    "https://example.com/a/b?c=d&e=f#g user@example.com 192.168.0.1",
]


def docstring_texts() -> list[str]:
    docs: list[str] = []
    for name in MODULES:
        module = importlib.import_module(name)
        for _, obj in sorted(vars(module).items()):
            doc = inspect.getdoc(obj) if callable(obj) else None
            if doc and len(doc) > 40:
                docs.append(doc)
    return docs


def varied_texts(n: int = 240) -> list[str]:
    """n texts: the special cases, then docstrings cut to lengths from a few words to far past 256
    tokens, cycling through the cuts so every length class is represented."""
    docs = docstring_texts()
    cuts = [12, 40, 100, 250, 600, 1500, 4000]
    texts = list(SPECIAL)
    i = 0
    while len(texts) < n:
        doc = docs[i % len(docs)]
        texts.append(doc[: cuts[i % len(cuts)]])
        i += 1
    return texts
