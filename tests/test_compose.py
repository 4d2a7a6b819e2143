"""docker-compose.yml, checked statically (no Docker engine here): services, wiring, security defaults,
and that every command it runs is a real `longembed` command."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from longembed.plugin.cli import build_parser

COMPOSE = Path(__file__).resolve().parent.parent / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_services_and_dependencies(compose):
    services = compose["services"]
    assert {"postgres", "migrate", "worker", "cli"} <= services.keys()
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["worker"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert "pgdata" in compose["volumes"]
    assert services["postgres"]["volumes"] == ["pgdata:/var/lib/postgresql/data"]
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]


def test_secure_defaults(compose):
    postgres = compose["services"]["postgres"]
    assert all(str(port).startswith("127.0.0.1:") for port in postgres["ports"])
    password = postgres["environment"]["POSTGRES_PASSWORD"]
    assert password.startswith("${") and ":?" in password  # required, no default
    assert "scram-sha-256" in postgres["environment"]["POSTGRES_INITDB_ARGS"]
    for name in ("migrate", "worker", "cli"):
        dsn = compose["services"][name]["environment"]["LONGEMBED_DSN"]
        assert "${LONGEMBED_DB_PASSWORD:?" in dsn and "@postgres:5432/" in dsn


def test_commands_are_real_cli_commands(compose):
    parser = build_parser()
    for name in ("migrate", "worker"):
        command = compose["services"][name]["command"]
        assert command[0] == "longembed"
        args = parser.parse_args(command[1:])
        assert callable(args.run)
    assert compose["services"]["cli"]["entrypoint"] == ["longembed"]


def test_dockerignore_keeps_local_state_out_of_images():
    """`COPY . /opt/longembed` must not carry the venv, the git history or caches into the images."""
    patterns = {
        line.strip().rstrip("/")
        for line in (COMPOSE.parent / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", ".git", "**/__pycache__", "*.npy", "build", "dist"} <= patterns
