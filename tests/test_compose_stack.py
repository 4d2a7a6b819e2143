"""docker-compose.yml for real: build the images, start the stack on the CPU profile, ingest through the cli
service, SQL embed()/search() through psql in the postgres container, the OpenAI client against the host's
port on 127.0.0.1, restarts, and down -v.

No registry is reachable here, so the images build from local bases: a Debian bookworm image made with
debootstrap (tagged once, reused by later runs), PostgreSQL 15 from Debian with pgvector built from Debian's
source, and a build-extras image carrying this machine's CPU torch wheel and CA bundle for pip. The public
defaults in the compose file (pgvector/pgvector:pg17, python:3.11-slim-bookworm) are what users build.
Skipped, with the reason, where no Docker Engine runs or can be started."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
BASE_IMAGE = "longembed-base:bookworm"
EXTRAS_IMAGE = "longembed-build-extras:test"
CORPUS = {
    "password.txt": "To reset your password, open Settings, choose Account and press 'Forgot password'. "
    "A reset link is mailed to you and stays valid for one hour.",
    "billing.txt": "Invoices are issued on the first day of each month. You can pay by credit card or by "
    "bank transfer; refunds take five working days.",
    "volcano.txt": "A volcano erupts when molten rock, called magma, rises through the crust. Lava flows "
    "and ash clouds follow the eruption.",
    "sourdough.txt": "Sourdough bread is leavened with a starter of flour and water that ferments for days; "
    "bake the loaf in a hot Dutch oven.",
}
QUERIES = {
    "how do I change my forgotten password": "password.txt",
    "when are invoices sent and how can I pay": "billing.txt",
    "magma and lava from an eruption": "volcano.txt",
    "baking bread with a fermented starter": "sourdough.txt",
}


def _run(
    cmd: list[str], *, check: bool = True, timeout: float = 900, **kwargs
) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    return result


def _engine_answers(docker: str) -> bool:
    try:
        return subprocess.run([docker, "info"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="module")
def docker() -> Iterator[str]:
    """The docker client, with an engine that answers: the running one, or a dockerd started here."""
    client = shutil.which("docker")
    if client is None:
        pytest.skip("no docker client installed (Debian: apt-get install docker.io docker-compose)")
    if _engine_answers(client):
        yield client
        return
    dockerd = shutil.which("dockerd")
    if dockerd is None or os.geteuid() != 0:
        pytest.skip("no Docker Engine answers, and none can be started here (needs dockerd and root)")
    log = open(Path(tempfile.gettempdir()) / "longembed-test-dockerd.log", "ab")  # noqa: SIM115
    daemon = subprocess.Popen([dockerd], stdout=log, stderr=log, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not _engine_answers(client):
            if daemon.poll() is not None or time.monotonic() > deadline:
                pytest.skip(f"dockerd did not come up (see {log.name})")
            time.sleep(1)
        yield client
    finally:
        daemon.terminate()
        daemon.wait(timeout=60)
        log.close()


@pytest.fixture(scope="module")
def compose_cmd(docker: str) -> list[str]:
    if subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.skip("neither `docker compose` nor `docker-compose` is installed")


@pytest.fixture(scope="module")
def base_image(docker: str) -> str:
    """Debian bookworm from Debian's archive, built once and found again by its tag."""
    if _run([docker, "image", "inspect", BASE_IMAGE], check=False).returncode == 0:
        return BASE_IMAGE
    if shutil.which("debootstrap") is None:
        pytest.skip(f"no {BASE_IMAGE} image and no debootstrap to make it (apt-get install debootstrap)")
    with tempfile.TemporaryDirectory() as tmp:
        rootfs = Path(tmp) / "rootfs"
        _run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs), "http://deb.debian.org/debian"])
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        _run([docker, "import", "-", BASE_IMAGE], stdin=tar.stdout)
        assert tar.wait() == 0
    return BASE_IMAGE


@pytest.fixture(scope="module")
def extras_image(docker: str) -> str:
    """/extras for the build only: the CPU torch wheel pip finds on this machine, and its CA bundle."""
    with tempfile.TemporaryDirectory() as tmp:
        wheels = Path(tmp) / "wheels"
        # --no-index: only a wheel lying on disk (pip's find-links); an index would give the CUDA build.
        got = _run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-index",
                "torch==2.13.0",
                "-d",
                str(wheels),
            ],
            check=False,
        )
        if got.returncode != 0 or not any("+cpu" in p.name for p in wheels.iterdir()):
            pytest.skip("no CPU torch 2.13.0 wheel on this machine's disk (the CPU image would pull GBs)")
        bundle = Path("/etc/ssl/certs/ca-certificates.crt")
        if bundle.exists():
            shutil.copy(bundle, Path(tmp) / "ca.crt")
        (Path(tmp) / "Dockerfile").write_text("FROM scratch\nCOPY . /extras/\n")
        (Path(tmp) / ".dockerignore").write_text("Dockerfile\n")
        _run([docker, "build", "-q", "-t", EXTRAS_IMAGE, tmp], env={**os.environ, "DOCKER_BUILDKIT": "0"})
    return EXTRAS_IMAGE


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Stack:
    compose: list[str]
    docker: str
    env: dict[str, str]
    password: str
    api_key: str
    host_port: int

    def __call__(self, *args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
        return _run([*self.compose, *args], check=check, timeout=timeout, cwd=ROOT, env=self.env)

    def container(self, service: str) -> str:
        ids = self("ps", "-q", service).stdout.split()
        assert len(ids) == 1, f"{service}: containers {ids}"
        return ids[0]

    def psql(self, sql: str) -> str:
        return _run(
            [self.docker, "exec", "-e", f"PGPASSWORD={self.password}", self.container("postgres"),
             "psql", "-h", "127.0.0.1", "-U", "longembed", "-d", "longembed", "-X", "-q", "-A", "-t",
             "-v", "ON_ERROR_STOP=1", "-c", sql],
        ).stdout.strip()  # fmt: skip

    def wait_ready(self, timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.host_port}/ready", timeout=5) as r:
                    return json.loads(r.read())
            except OSError as exc:
                if time.monotonic() > deadline:
                    logs = self("logs", "--tail", "50", check=False).stdout
                    raise AssertionError(f"the host never became ready: {exc}\n{logs}") from exc
                time.sleep(1)

    def wait_healthy(self, service: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            state = _run(
                [self.docker, "inspect", "-f", "{{.State.Health.Status}}", self.container(service)]
            ).stdout.strip()
            if state == "healthy":
                return
            assert time.monotonic() < deadline, f"{service} is {state}"
            time.sleep(1)


@pytest.fixture(scope="module")
def stack(docker, compose_cmd, base_image, extras_image, tmp_path_factory) -> Iterator[Stack]:
    data = tmp_path_factory.mktemp("corpus")
    data.chmod(0o755)  # the cli container's user is not root
    for name, text in CORPUS.items():
        (data / name).write_text(text)
        (data / name).chmod(0o644)
    password = "pw-" + secrets.token_hex(8) + "'\"@/ ;"  # characters a URL or a shell would trip over
    api_key = secrets.token_hex(16)
    host_port = _free_port()
    env = {
        **os.environ,
        "COMPOSE_PROJECT_NAME": f"longembed-test-{os.getpid()}",
        "COMPOSE_PROFILES": "cpu",
        "LONGEMBED_DB_PASSWORD": password,
        "LONGEMBED_API_KEY": api_key,
        "LONGEMBED_POSTGRES_PORT": str(_free_port()),
        "LONGEMBED_HOST_PORT": str(host_port),
        "LONGEMBED_DATA": str(data),
        # The local bases instead of the public images (no registry here).
        "LONGEMBED_POSTGRES_IMAGE": base_image,
        "LONGEMBED_PG_MAJOR": "15",
        "LONGEMBED_PGVECTOR": "debian-source",
        "LONGEMBED_PYTHON_IMAGE": base_image,
        "LONGEMBED_BUILD_EXTRAS": extras_image,
        "LONGEMBED_TORCH_CPU_INDEX": "",
        "DOCKER_BUILDKIT": "0",
    }
    env.pop("COMPOSE_FILE", None)
    # The process environment only, never a user's .env in the checkout.
    no_env_file = data.parent / "empty.env"
    no_env_file.write_text("")
    stack = Stack([*compose_cmd, "--env-file", str(no_env_file)], docker, env, password, api_key, host_port)
    try:
        t0 = time.monotonic()
        stack("build", "postgres", "migrate", timeout=1800)
        print(f"\ncompose build: {time.monotonic() - t0:.1f} s")
        t0 = time.monotonic()
        up = stack("up", "-d", check=False, timeout=600)
        if up.returncode != 0:  # say why: a container that exited has its reason in its log
            logs = stack("logs", "--tail", "40", check=False).stdout
            raise AssertionError(f"compose up exited {up.returncode}\n{up.stderr[-2000:]}\n{logs[-6000:]}")
        stack.wait_ready()
        print(f"compose up to ready: {time.monotonic() - t0:.1f} s")
        yield stack
    finally:
        stack("down", "-v", "--remove-orphans", check=False, timeout=300)


def test_refuses_to_start_without_secrets(compose_cmd, tmp_path):
    # Not a user's .env in the checkout (docker-compose 1.29 wants a file, not /dev/null).
    no_env_file = tmp_path / "empty.env"
    no_env_file.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LONGEMBED_", "COMPOSE_"))}
    env["COMPOSE_PROJECT_NAME"] = f"longembed-test-nosecret-{os.getpid()}"
    result = _run(
        [*compose_cmd, "--env-file", str(no_env_file), "config"], check=False, cwd=ROOT, env=env, timeout=60
    )
    assert result.returncode != 0
    assert "LONGEMBED_DB_PASSWORD" in result.stderr + result.stdout


def test_stack_end_to_end(stack: Stack):
    import openai

    # Images: non-root users; no torch in PostgreSQL's.
    assert _run([stack.docker, "exec", stack.container("longembed-cpu"), "id", "-u"]).stdout.strip() != "0"
    assert _run([stack.docker, "exec", stack.container("postgres"), "id", "-un"]).stdout.strip() == "postgres"
    # The backends' Python (PL/Python) has the standard library, and neither torch nor longembed.
    stack.psql(
        "DO LANGUAGE plpython3u $$\nimport importlib.util as u\n"
        "found = [m for m in ('torch', 'longembed') if u.find_spec(m)]\n"
        "if found or not u.find_spec('http.client'):\n    plpy.error('backend Python: %r' % found)\n$$"
    )

    # Ingest through the cli service (queued; the host's in-process worker and worker-cpu embed).
    t0 = time.monotonic()
    stack("run", "--rm", "-T", "cli", "ingest", "/data", "-c", "docs", "--create", "--no-wait")
    deadline = time.monotonic() + 300
    count_sql = "SELECT count(*) FILTER (WHERE status = 'embedded'), count(*) FROM longembed.documents"
    while (counts := stack.psql(count_sql)) != f"{len(CORPUS)}|{len(CORPUS)}":
        assert time.monotonic() < deadline, f"embedded|all: {counts}"
        time.sleep(1)
    print(f"ingest of {len(CORPUS)} documents until embedded: {time.monotonic() - t0:.1f} s")

    def answers() -> tuple[dict[str, list[str]], list[float], list[float]]:
        tops = {
            query: stack.psql(f"SELECT external_id FROM search('docs', '{query}', 2)").splitlines()
            for query in QUERIES
        }
        sql_vector = json.loads(stack.psql("SELECT embed('reset my password', 'document')::text"))
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{stack.host_port}/v1", api_key=stack.api_key)
        model = client.models.list().data[0].id
        http_vector = client.embeddings.create(model=model, input=["reset my password"]).data[0].embedding
        return tops, sql_vector, http_vector

    tops, sql_vector, http_vector = answers()
    assert {query: Path(ids[0]).name for query, ids in tops.items()} == QUERIES  # ids: /data/NAME
    assert len(sql_vector) == len(http_vector) == 384
    assert max(abs(a - b) for a, b in zip(sql_vector, http_vector, strict=True)) < 1e-5

    # The published port wants the key.
    stranger = openai.OpenAI(base_url=f"http://127.0.0.1:{stack.host_port}/v1", api_key="not-the-key")
    with pytest.raises(openai.AuthenticationError):
        stranger.embeddings.create(model="any", input=["hello"])

    # Restarts keep the data (named volume) and give the same answers.
    stack("restart", "postgres", "longembed-cpu", timeout=300)
    stack.wait_healthy("postgres")
    stack.wait_ready()
    again = answers()
    assert again[0] == tops
    assert max(abs(a - b) for a, b in zip(again[1], sql_vector, strict=True)) < 1e-6
    assert max(abs(a - b) for a, b in zip(again[2], http_vector, strict=True)) < 1e-6
