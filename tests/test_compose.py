"""docker-compose.yml read as data (no Docker needed): services, wiring, security defaults, that every
command it runs is a real `longembed` command, and that the Dockerfiles' defaults are the compose file's.
tests/test_compose_stack.py builds and runs the stack for real."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from longembed.plugin.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
HOSTS = ("longembed", "longembed-cpu")
WORKERS = ("worker", "worker-cpu")
IMAGE_SERVICES = ("migrate", "cli", *HOSTS, *WORKERS)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_services_and_dependencies(compose):
    services = compose["services"]
    assert set(services) == {"postgres", "migrate", *HOSTS, *WORKERS, "cli"}
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("cli", *HOSTS, *WORKERS):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert services["migrate"]["restart"] == "no"
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"]
    assert {"pgdata", "models"} <= compose["volumes"].keys()
    assert services["postgres"]["volumes"] == ["pgdata:/var/lib/postgresql/data"]


def test_gpu_and_cpu_profiles(compose):
    services = compose["services"]
    # Exactly one host and one worker kind per profile; the CPU host answers under the GPU host's name,
    # which is what PostgreSQL's longembed.host names.
    assert [services[n]["profiles"] for n in HOSTS] == [["gpu"], ["cpu"]]
    assert [services[n]["profiles"] for n in WORKERS] == [["gpu"], ["cpu"]]
    assert services["cli"]["profiles"] == ["cli"]
    assert "longembed" in services["longembed-cpu"]["networks"]["default"]["aliases"]
    for name in ("longembed", "worker"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]
        assert services[name]["build"]["args"]["VARIANT"] == "gpu"
    for name in ("longembed-cpu", "worker-cpu", "migrate", "cli"):
        assert "deploy" not in services[name]
        assert services[name]["build"]["args"]["VARIANT"] == "cpu"
    conf = (ROOT / "plugin/docker/postgres/longembed.conf").read_text()
    assert "longembed.host = 'http://longembed:8080'" in conf


def test_host_serves_the_sql_functions_with_a_key(compose):
    for name in HOSTS:
        host = compose["services"][name]
        assert host["command"][:2] == ["longembed", "serve"]
        assert host["command"][host["command"].index("--host") + 1] == "0.0.0.0"
        assert "--no-worker" not in host["command"]  # the in-process ingestion worker runs
        assert host["environment"]["LONGEMBED_API_KEYS"].startswith("${LONGEMBED_API_KEY:?")
        assert "/ready" in " ".join(host["healthcheck"]["test"])
    postgres = compose["services"]["postgres"]
    assert postgres["environment"]["LONGEMBED_API_KEY"].startswith("${LONGEMBED_API_KEY:?")
    conf = (ROOT / "plugin/docker/postgres/longembed.conf").read_text()
    key_file = re.search(r"longembed\.host_key_file = '([^']+)'", conf).group(1)
    assert key_file in (ROOT / "plugin/docker/postgres/entrypoint.sh").read_text()


def test_secure_defaults(compose):
    services = compose["services"]
    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith("${LONGEMBED_DB_PASSWORD:?")
    for name in IMAGE_SERVICES:
        env = services[name]["environment"]
        assert env["PGPASSWORD"].startswith("${LONGEMBED_DB_PASSWORD:?")
        assert env["PGHOST"] == "postgres"
        assert "password" not in env["LONGEMBED_DSN"]
    entrypoint = (ROOT / "plugin/docker/postgres/entrypoint.sh").read_text()
    assert "--auth=scram-sha-256" in entrypoint and "host all all all scram-sha-256" in entrypoint
    assert "unset POSTGRES_PASSWORD LONGEMBED_API_KEY" in entrypoint
    assert ".env" in (ROOT / ".gitignore").read_text().split()
    assert ".env" in (ROOT / ".dockerignore").read_text().split()


def test_images_run_as_non_root():
    for dockerfile in ("plugin/docker/longembed/Dockerfile", "plugin/docker/postgres/Dockerfile"):
        users = re.findall(r"^USER (\S+)", (ROOT / dockerfile).read_text(), re.MULTILINE)
        assert users and users[-1] != "root", dockerfile


def test_public_base_images_by_default(compose):
    """The compose file's fallbacks are the Dockerfiles' defaults: the images users expect."""
    postgres = compose["services"]["postgres"]["build"]["args"]
    assert postgres["BASE_IMAGE"] == "${LONGEMBED_POSTGRES_IMAGE:-pgvector/pgvector:pg17}"
    dockerfile = (ROOT / "plugin/docker/postgres/Dockerfile").read_text()
    assert "ARG BASE_IMAGE=pgvector/pgvector:pg17" in dockerfile and "ARG PG_MAJOR=17" in dockerfile
    for name in IMAGE_SERVICES:
        args = compose["services"][name]["build"]["args"]
        assert args["BASE_IMAGE"] == "${LONGEMBED_PYTHON_IMAGE:-python:3.11-slim-bookworm}"
        assert args["BUILD_EXTRAS"] == "${LONGEMBED_BUILD_EXTRAS:-no-extras}"
    dockerfile = (ROOT / "plugin/docker/longembed/Dockerfile").read_text()
    assert "ARG BASE_IMAGE=python:3.11-slim-bookworm" in dockerfile
    assert "ARG BUILD_EXTRAS=no-extras" in dockerfile
    # The CPU image's torch is the version the constraints file pins.
    pinned = re.search(r"^torch==(\S+)$", (ROOT / ".ci/constraints.txt").read_text(), re.M).group(1)
    assert f"ARG TORCH_VERSION={pinned}" in dockerfile


def test_commands_are_real_cli_commands(compose):
    parser = build_parser()
    services = compose["services"]
    for name in ("migrate", *HOSTS, *WORKERS):
        command = services[name]["command"]
        assert command[0] == "longembed"
        args = parser.parse_args(command[1:])
        assert callable(args.run)
    assert services["cli"]["entrypoint"] == ["longembed"]
    assert callable(parser.parse_args(["ingest", "/data", "-c", "docs", "--create", "--no-wait"]).run)


def test_env_example_holds_every_required_variable_without_a_value(compose):
    example = dict(
        line.split("=", 1)
        for line in (ROOT / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    required = set(re.findall(r"\$\{(\w+):\?", COMPOSE.read_text()))
    assert required == {"LONGEMBED_DB_PASSWORD", "LONGEMBED_API_KEY"}
    assert all(example[name] == "" for name in required)  # no default secret to forget to change
    assert example["COMPOSE_PROFILES"] in ("gpu", "cpu")
