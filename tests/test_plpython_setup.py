"""`longembed setup-plpython`: the PL/Python build for the bundled server (embedded/plpython.py)."""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import stat
import subprocess
import time
import uuid
from pathlib import Path

import psycopg
import pytest

from longembed.plugin.cli import main
from longembed.plugin.embedded import plpython
from longembed.plugin.embedded.plpython import PlpythonSetupError
from longembed.plugin.embedded.server import EmbeddedServer, bundled_pginstall

AS_ROOT = os.geteuid() == 0


def test_second_run_uses_the_cache(capsys):
    first = plpython.setup()  # builds when the test command has not run setup-plpython yet
    built = (first / "lib" / "plpython3.so").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["setup-plpython"]) == 0
    out = capsys.readouterr().out
    assert "already built" in out and str(first) in out and "downloading" not in out
    assert (first / "lib" / "plpython3.so").stat().st_mtime_ns == built  # nothing rebuilt


def test_build_links_the_system_python_and_is_private():
    folder = plpython.setup()
    library = folder / "lib" / "plpython3.so"
    linked = subprocess.run(["ldd", str(library)], capture_output=True, text=True, check=True).stdout
    libpython = [line for line in linked.splitlines() if "libpython3" in line]
    assert len(libpython) == 1 and "=> /" in libpython[0] and "/root/" not in libpython[0], linked
    assert "not found" not in linked
    control = (folder / "share" / "extension" / "plpython3u.control").read_text()
    assert "module_pathname = 'plpython3'" in control  # found along dynamic_library_path, not $libdir
    for path in [folder, *folder.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o007 == 0, f"{path} is open to others: {mode:o}"
        if AS_ROOT:
            service = pwd.getpwnam(EmbeddedServer().service_user)
            assert path.stat().st_gid == service.pw_gid


def test_missing_build_tools_are_named(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGEMBED_CACHE", str(tmp_path / "cache"))  # nothing cached here
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(PlpythonSetupError) as failure:
        plpython.setup(bundled_pginstall())
    message = str(failure.value)
    for tool in ("apt-get", "perl", "gcc", "make"):
        assert tool in message
    assert "apt-get install" in message
    assert not (tmp_path / "cache" / "plpython").exists()


def _apt_state() -> dict[str, str]:
    """Content hashes of the system's apt sources and the names of its downloaded lists."""
    state = {}
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        if path.is_file():
            state[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    state["lists"] = ",".join(sorted(p.name for p in Path("/var/lib/apt/lists").glob("*")))
    return state


@pytest.mark.slow
@pytest.mark.skipif(not AS_ROOT, reason="the fresh-machine path (creating the service user) needs root")
def test_fresh_machine_build_leaves_the_system_apt_configuration_alone(monkeypatch, capsys):
    """As the test command runs it on a fresh machine: no service user, no cache, no server yet.

    A full build (download, extract, compile) through the CLI into an empty cache; the system's apt
    files are untouched; a running server picks the build up by a settings reload.
    """
    scratch = Path("/tmp") / f"longembed-cold-{uuid.uuid4().hex[:10]}"  # the service user reaches /tmp/*
    user = f"le_t{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("LONGEMBED_CACHE", str(scratch / "cache"))
    monkeypatch.setenv("LONGEMBED_HOME", str(scratch / "home"))
    monkeypatch.setenv("LONGEMBED_SERVICE_USER", user)
    scratch.mkdir(mode=0o755)
    try:
        assert main(["status"]) == 3  # looks, creates nothing
        assert "not built" in capsys.readouterr().out
        assert not (scratch / "home").exists()
        before = _apt_state()
        started = time.monotonic()
        assert main(["setup-plpython"]) == 0
        print(f"cold setup-plpython: {time.monotonic() - started:.1f} s")
        assert pwd.getpwnam(user).pw_gid == (scratch / "cache").stat().st_gid  # created for the build
        assert _apt_state() == before
        server = EmbeddedServer(durable=False)
        server.start()
        with psycopg.connect(server.dsn(), autocommit=True) as conn:
            conn.execute("CREATE EXTENSION plpython3u")
            conn.execute(
                "CREATE FUNCTION py_sum(a int, b int) RETURNS int LANGUAGE plpython3u AS 'return a + b'"
            )
            assert conn.execute("SELECT py_sum(40, 2)").fetchone() == (42,)
    finally:
        EmbeddedServer().stop()
        shutil.rmtree(scratch, ignore_errors=True)
        subprocess.run(["userdel", user], capture_output=True)


@pytest.mark.slow
@pytest.mark.skipif(not AS_ROOT, reason="the cold build is exercised as root, as the test command runs it")
def test_a_running_server_picks_up_a_new_build(monkeypatch):
    """`longembed setup-plpython` after `longembed up`: the server reloads its settings, no restart."""
    scratch = Path("/tmp") / f"longembed-cold-{uuid.uuid4().hex[:10]}"
    monkeypatch.setenv("LONGEMBED_CACHE", str(scratch / "cache"))
    monkeypatch.setenv("LONGEMBED_HOME", str(scratch / "home"))
    scratch.mkdir(mode=0o755)
    server = EmbeddedServer(durable=False)
    try:
        server.start()
        with psycopg.connect(server.dsn(), autocommit=True) as conn:
            available = "SELECT 1 FROM pg_available_extensions WHERE name = 'plpython3u'"
            assert conn.execute(available).fetchone() is None
        assert main(["setup-plpython"]) == 0
        with psycopg.connect(server.dsn(), autocommit=True) as conn:
            conn.execute("CREATE EXTENSION plpython3u")
            conn.execute("DO LANGUAGE plpython3u 'plpy.notice(\"ok\")'")
            (path,) = conn.execute("SELECT current_setting('dynamic_library_path')").fetchone()
            assert str(scratch / "cache") in path
    finally:
        server.stop()
        shutil.rmtree(scratch, ignore_errors=True)
