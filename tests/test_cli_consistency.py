"""One command line: exit codes, bad JSONL lines, path-independent file ids, --prune, --model checks."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import psycopg
import pytest

from longembed.plugin.cli import errors, main
from longembed.plugin.pipeline.ingest import Record, Skipped, iter_lines
from longembed.plugin.store.documents import document_states
from tests.jina_reference import jina_config, write_checkpoint
from tests.pgdb import fresh_database


@pytest.fixture(scope="module")
def dsn(pg_dsn):
    with fresh_database(pg_dsn, "le_cons") as url:
        assert main(["migrate", "--dsn", url]) == 0
        yield url


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


BAD_LINES = {
    "lone surrogate in id": b'{"id": "a\\ud800", "text": "x"}',
    "lone surrogate in metadata": b'{"id": "m", "text": "x", "metadata": {"k": ["\\udfff"]}}',
    "metadata nested 100000 deep": b'{"id": "d", "text": "x", "metadata": '
    + b'{"a": ' * 100_000
    + b"1"
    + b"}" * 100_001,
    "metadata nested 40 deep": b'{"id": "e", "text": "x", "metadata": ' + b'{"a": ' * 40 + b"1" + b"}" * 41,
    "not an object": b'"just a string"',
    "bad UTF-8": b'{"id": "u", "text": "caf\xe9"}',
    "NUL in metadata key": b'{"id": "n", "text": "x", "metadata": {"a\\u0000": 1}}',
}


def test_reader_skips_each_bad_line_with_its_line():
    lines = [b'{"id": 0, "text": "first"}', *BAD_LINES.values(), b'{"id": "last", "text": "z"}']
    items = list(iter_lines("f.jsonl", b"\n".join(lines), jsonl=True, metadata=True))
    assert [type(i) for i in items] == [Record] + [Skipped] * len(BAD_LINES) + [Record]
    skipped = dict(zip(BAD_LINES, items[1:-1], strict=True))
    assert [s.source for s in skipped.values()] == [f"f.jsonl:{n}" for n in range(2, 2 + len(BAD_LINES))]
    assert "lone surrogate" in skipped["lone surrogate in id"].reason
    assert skipped["lone surrogate in metadata"].reason.startswith("metadata: lone surrogate")
    assert "nested too deeply" in skipped["metadata nested 100000 deep"].reason
    assert "deeper than 32 levels" in skipped["metadata nested 40 deep"].reason
    assert "must be a JSON object, got str" in skipped["not an object"].reason
    assert "not valid UTF-8" in skipped["bad UTF-8"].reason
    assert "NUL" in skipped["NUL in metadata key"].reason
    assert items[0].id == "0" and items[-1].id == "last"


def test_ingest_keeps_every_valid_line_around_bad_ones(dsn, tmp_path, capsys):
    valid = [
        json.dumps({"id": f"v{i}", "text": f"valid record {i}", "metadata": {"n": i}}) for i in range(300)
    ]
    lines = [line.encode() for line in valid]
    for offset, bad in enumerate(BAD_LINES.values()):
        lines.insert(10 + 37 * offset, bad)  # spread over both 256-document batches
    src = tmp_path / "mixed.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\n")
    code, out, err = run(
        capsys, "ingest", str(src), "-c", "mixed", "--create", "--no-wait", "--no-progress", "--dsn", dsn
    )
    assert code == errors.FAILURE, err
    assert "300 documents: 300 new" in out
    skipped = [line for line in err.splitlines() if line.startswith("skipped ")]
    assert len(skipped) == len(BAD_LINES)
    assert all(line.startswith(f"skipped {src}:") for line in skipped), skipped
    assert "Traceback" not in err and "RecursionError" not in err
    with psycopg.connect(dsn) as conn:
        assert set(document_states(conn, "mixed")) == {f"v{i}" for i in range(300)}


def test_file_ids_do_not_depend_on_how_the_path_is_typed_and_prune(dsn, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "notes"
    folder.mkdir()
    for name in ("a.txt", "b.txt", "c.md"):
        (folder / name).write_text(f"The note called {name} about backups and restores.")
    (folder / "records.jsonl").write_text('{"id": "rec", "text": "a record, not a file"}\n')
    monkeypatch.chdir(tmp_path)
    args = ["-c", "notes", "--no-wait", "--no-progress", "--dsn", dsn]
    code, out, err = run(capsys, "ingest", "notes", "--create", *args)
    assert code == 0 and "4 documents: 4 new" in out, err
    code, out, _ = run(capsys, "ingest", str(folder), "./notes/../notes/", *args)
    assert code == 0 and "0 new, 0 changed, 0 re-queued, 4 unchanged" in out  # the same four ids
    with psycopg.connect(dsn) as conn:
        ids = set(document_states(conn, "notes"))
    assert ids == {str(folder / n) for n in ("a.txt", "b.txt", "c.md")} | {"rec"}

    (folder / "b.txt").unlink()
    (folder / "records.jsonl").unlink()  # its records are not files: they stay
    code, out, _ = run(capsys, "ingest", "notes", "--prune", *args)
    assert code == 0 and "pruned 1 documents of deleted files" in out
    with psycopg.connect(dsn) as conn:
        assert set(document_states(conn, "notes")) == ids - {str(folder / "b.txt")}


def test_ingest_model_other_than_the_collections_is_an_error(dsn, tmp_path, capsys):
    model = tmp_path / "jina-tiny"
    write_checkpoint(model, jina_config(4, 64))
    (tmp_path / "a.txt").write_text("some text")
    code, _, err = run(capsys, "collection", "create", "-c", "mini", "--dsn", dsn)
    assert code == 0, err
    code, out, err = run(
        capsys,
        "ingest",
        str(tmp_path / "a.txt"),
        "-c",
        "mini",
        "--model",
        str(model),
        "--no-wait",
        "--dsn",
        dsn,
    )
    assert code == errors.USAGE and "--model" in err and "dimension mismatch" in err
    assert "documents" not in out  # refused before anything was queued
    code, out, err = run(
        capsys, "ingest", str(tmp_path / "a.txt"), "-c", "mini", "--mode", "late", "--no-wait", "--dsn", dsn
    )
    assert code == errors.USAGE and "--mode late (it has chunk)" in err and "documents" not in out
    code, out, err = run(
        capsys, "ingest", str(tmp_path / "a.txt"), "-c", "mini", "--mode", "chunk", "--no-wait", "--dsn", dsn
    )
    assert code == 0 and "1 documents: 1 new" in out, err  # its own settings restated: fine


def test_exit_codes_are_the_same_across_commands(dsn, tmp_path, capsys):
    usage = [
        ["search", "-c", "nope", "q", "--dsn", dsn],
        ["collection", "drop", "-c", "nope", "--dsn", dsn],
        ["ingest", str(tmp_path), "-c", "nope", "--dsn", dsn],
        ["search", "-c", "mini", "q", "--filter", "{bad", "--dsn", dsn],
        ["embed", str(tmp_path / "missing.txt")],
        ["search", "q", "--dsn", dsn],  # no collection named
    ]
    for argv in usage:
        code, _, err = run(capsys, *argv)
        assert code == errors.USAGE and err.startswith("longembed: error: "), (argv, err)
    unreachable = "postgresql://nobody@127.0.0.1:1/none"
    for argv in (
        ["migrate", "--dsn", unreachable],
        ["collection", "list", "--dsn", unreachable],
        ["search", "-c", "x", "q", "--dsn", unreachable],
        ["worker", "--once", "--dsn", unreachable],
    ):
        code, _, err = run(capsys, *argv)
        assert code == errors.FAILURE and "cannot reach the database" in err, (argv, err)
    with pytest.raises(SystemExit) as exc:  # argparse: also 2
        main(["search", "-c", "x", "q", "-k", "0"])
    assert exc.value.code == errors.USAGE


def test_errors_outside_longembed_keep_their_traceback(tmp_path, capsys):
    """A torch error (here: a device string torch cannot parse) is not turned into a one-liner."""
    src = tmp_path / "in.txt"
    src.write_text("hello\n")
    with pytest.raises(RuntimeError, match="device"):
        main(["embed", str(src), "--device", "no-such-device"])


def test_policy_keeps_foreign_tracebacks_and_summarises_ours(capsys):
    import argparse

    import numpy as np
    import torch

    from longembed.plugin.store.collections import validate_name

    def command(fn):
        return argparse.Namespace(run=lambda _args: fn())

    with pytest.raises(RuntimeError):  # torch/CUDA errors: never hidden
        errors.run_command(command(lambda: torch.empty(1, device="no-such-device")))
    with pytest.raises(ValueError):  # a ValueError from numpy is not ours to summarise either
        errors.run_command(command(lambda: np.arange(2).reshape(3)))
    assert errors.run_command(command(lambda: validate_name("bad name!"))) == errors.USAGE
    assert capsys.readouterr().err.startswith("longembed: error: invalid collection name")


def test_readme_lists_every_command_option_and_setting():
    import argparse
    import re
    from pathlib import Path

    from longembed.plugin.cli import build_parser
    from longembed.plugin.settings import NAMES

    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()

    def commands(parser: argparse.ArgumentParser, prefix: str):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from commands(sub, f"{prefix} {name}".strip())
        yield prefix, parser

    missing = []
    for name, parser in commands(build_parser(), ""):
        if name and name not in readme:
            missing.append(name)
        for action in parser._actions:
            names = [o for o in action.option_strings if o not in ("-h", "--help", "--dsn")]
            if names and not any(re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", readme) for o in names):
                missing.append(f"{name} {names[0]}")
    assert not missing, missing
    sources = [p for p in root.glob("*/**/*.py") if ".venv" not in p.parts]
    used = set(re.findall(r"LONGEMBED_[A-Z_]+", " ".join(p.read_text() for p in sources)))
    assert {n for n in NAMES if n.startswith("LONGEMBED_")} <= used
    assert used <= set(re.findall(r"LONGEMBED_[A-Z_]+", readme)), used - set(readme.split())
