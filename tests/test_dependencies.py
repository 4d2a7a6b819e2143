"""The package declares ranges, CI and the README pin exact builds, and the Triton floor is what the
kernels need.

Measured (tests/test_triton_kernels.py under the interpreter, PYTHONPATH=<triton 3.4.0 + numpy 2.3>):
3.4.0 passes; the 3.3.1 wheel has no `triton/knobs.py`, which the kernels import. (Triton 3.4's
interpreter predates NumPy 2.4, which refuses int() of a one-element array: CPU tests need NumPy < 2.4
there; compiled GPU kernels are unaffected.) tests/test_triton_compile.py's no-spill guarantee holds
for the Triton the tile table was tuned on (3.9): under 3.4 eight sm_80 fp16 tiles spill 16-144 B, a
speed matter, not a correctness one.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Triton APIs the kernels use that older releases lack, with the release that brought them.
TRITON_API_SINCE = {"from triton import knobs": (3, 4)}


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _floor(requirement: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.search(r">=\s*([\d.]+)", requirement).group(1).split("."))


def test_triton_floor_covers_every_api_the_kernels_use():
    code = "\n".join(p.read_text() for p in (ROOT / "triton_kernels").glob("*.py"))
    needed = max((since for api, since in TRITON_API_SINCE.items() if api in code), default=(0,))
    extras = _pyproject()["project"]["optional-dependencies"]
    floors = [_floor(r) for group in ("gpu", "test") for r in extras[group] if r.startswith("triton")]
    assert floors and all(floor >= needed for floor in floors), (floors, needed)


def test_private_triton_tooling_is_not_in_the_product():
    code = "\n".join(p.read_text() for p in (ROOT / "triton_kernels").glob("*.py"))
    assert "triton.compiler" not in code and "GPUTarget" not in code


def test_dependencies_are_ranges_and_the_exact_builds_are_constraints():
    deps = _pyproject()["project"]["dependencies"]
    torch = [r for r in deps if r.startswith("torch")]
    assert torch and all("==" not in r for r in torch)
    constraints = (ROOT / ".ci" / "constraints.txt").read_text()
    assert re.search(r"^torch==2\.13\.0$", constraints, re.M)
    install = "pip install -q -c .ci/constraints.txt -e '.[test]'"
    assert install in (ROOT / ".ci" / "run").read_text()
    assert install in (ROOT / "README.md").read_text()
    assert "pip install -c .ci/constraints.txt -e ." in (ROOT / "README.md").read_text()
