"""`longembed embed` end to end: real files, real model, the installed console script for stdin."""

from __future__ import annotations

import json
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest

from longembed.encoder import load_model
from longembed.plugin.cli import main


@pytest.fixture(scope="module")
def model():
    return load_model(device="cpu")


def run_cli(args, capsys):
    code = main(["embed", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_stdin_lines_through_console_script(tmp_path, model):
    texts = ["first line", "", "second line", "  ", "naïve café 🙂"]
    proc = subprocess.run(
        [sys.executable, "-m", "longembed.plugin.cli", "embed", "-"],
        input="\n".join(texts).encode(),
        capture_output=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr.decode()
    rows = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    assert [r["line"] for r in rows] == [1, 3, 5]  # empty lines skipped, numbering kept
    assert "skipped 2 empty line(s)" in proc.stderr.decode()
    expected = model.embed(["first line", "second line", "naïve café 🙂"])
    got = np.array([r["embedding"] for r in rows], dtype=np.float32)
    assert np.abs(got - expected).max() <= 1e-6


def test_npy_output_and_query_kind(tmp_path, model, capsys):
    src = tmp_path / "in.txt"
    src.write_text("how do I reset my password\nwhere are the logs\n")
    out = tmp_path / "vectors.npy"
    code, _, err = run_cli([str(src), "-o", str(out), "--kind", "query"], capsys)
    assert code == 0, err
    matrix = np.load(out)
    assert matrix.shape == (2, 384) and matrix.dtype == np.float32
    expected = model.embed(["how do I reset my password", "where are the logs"], kind="query")
    assert np.abs(matrix - expected).max() <= 1e-6


def test_jsonl_with_ids_and_chunks(tmp_path, model, capsys):
    src = tmp_path / "docs.jsonl"
    long_text = "PostgreSQL stores the vectors next to the text. " * 60
    src.write_text(json.dumps({"id": 7, "text": long_text}) + "\n" + json.dumps({"text": "short"}) + "\n")
    out = tmp_path / "out.jsonl"
    code, _, err = run_cli([str(src), "-o", str(out), "--mode", "chunk", "--chunk-tokens", "64"], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["id"] == "7" and "id" not in rows[1]
    chunks = rows[0]["chunks"]
    assert len(chunks) > 3 and all(c["n_tokens"] <= 64 for c in chunks)
    expected = model.embed_chunks([long_text], mode="chunk", chunk_tokens=64)[0]
    assert [(c["start"], c["end"]) for c in chunks] == [(c.start, c.end) for c in expected]


@pytest.mark.parametrize(
    ("content", "extra", "message"),
    [
        (b"ok\n\xff\xfe broken\nfine\n", [], ":2: not valid UTF-8"),
        (b'{"text": "ok"}\n{not json}\n{"text": "fine"}\n', ["--jsonl"], ":2: not valid JSON"),
        (b'{"text": "ok"}\n{"body": "x"}\n{"text": "fine"}\n', ["--jsonl"], ":2: needs a 'text' field"),
        (b'{"text": "ok"}\n{"text": 42}\n{"text": "fine"}\n', ["--jsonl"], "holding a string, got int"),
        (
            b'{"text": "ok"}\n["text"]\n{"text": "fine"}\n',
            ["--jsonl"],
            ":2: a JSONL line must be a JSON object",
        ),
        (b'{"text": "ok"}\n{"text": "a\\u0000b"}\n{"text": "fine"}\n', ["--jsonl"], ":2: text: NUL"),
        (
            b'{"text": "ok"}\n{"text": "a\\ud800"}\n{"text": "fine"}\n',
            ["--jsonl"],
            ":2: text: lone surrogate",
        ),
        (
            b'{"text": "ok"}\n{"id": 1.5, "text": "x"}\n{"text": "fine"}\n',
            ["--jsonl"],
            '"id" must be a string',
        ),
    ],
)
def test_bad_line_is_skipped_with_its_line_and_the_rest_embedded(tmp_path, capsys, content, extra, message):
    src = tmp_path / "bad.txt"
    src.write_bytes(content)
    out = tmp_path / "out.jsonl"
    code, _, err = run_cli([str(src), "-o", str(out), *extra], capsys)
    assert code == 1  # partial: the bad line was skipped
    assert f"skipped {src}{message}" in err or (message in err and f"skipped {src}:2" in err), err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["line"] for r in rows] == [1, 3]  # nothing valid lost, numbering kept


@pytest.mark.parametrize(
    ("content", "extra", "message"),
    [
        (b"\x7fELF\x00\x00\x01binary", [], "binary file"),
        (b"ok\n\nnext\n", ["--empty", "error"], ":2: empty line"),
    ],
)
def test_unusable_input_is_refused(tmp_path, capsys, content, extra, message):
    src = tmp_path / "bad.txt"
    src.write_bytes(content)
    out = tmp_path / "out.jsonl"
    code, _, err = run_cli([str(src), "-o", str(out), *extra], capsys)
    assert code == 2 and err.startswith("longembed: error: ") and message in err
    assert not out.exists()  # nothing half-written


def test_missing_file_unknown_model_and_bad_flags(tmp_path, capsys):
    code, _, err = run_cli([str(tmp_path / "nope.txt")], capsys)
    assert code == 2 and "cannot read" in err
    src = tmp_path / "in.txt"
    src.write_text("hello\n")
    code, _, err = run_cli([str(src), "--model", str(tmp_path / "no-such-model")], capsys)
    assert code == 2 and "no model folder" in err
    code, _, err = run_cli([str(src), "--model", "someorg/some-model"], capsys)
    assert code == 2 and "someorg/some-model" in err
    code, _, err = run_cli([str(src), "--mode", "chunk", "-o", str(tmp_path / "x.npy")], capsys)
    assert code == 2 and "JSONL" in err
    for flags in (["--chunk-tokens", "0"], ["--overlap", "-1"], ["--mode", "sentences"], ["--kind", "x"]):
        with pytest.raises(SystemExit) as exc:
            main(["embed", str(src), *flags])
        assert exc.value.code == 2
    code, _, err = run_cli([str(src), "--mode", "chunk", "--chunk-tokens", "5000"], capsys)
    assert code == 2 and "does not fit" in err


def test_huge_line_is_truncated_not_refused(tmp_path, capsys):
    src = tmp_path / "huge.txt"
    src.write_text("word " * 300_000 + "\n")
    out = tmp_path / "out.jsonl"
    code, _, err = run_cli([str(src), "-o", str(out)], capsys)
    assert code == 0, err
    assert "1 text(s) truncated at 256 tokens" in err
    [row] = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["truncated"] is True and len(row["embedding"]) == 384
