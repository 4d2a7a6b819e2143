"""The model host over real HTTP on loopback: the official `openai` client, unchanged, against it; bad
requests; keys; the Unix socket; /health, /ready, /v1/models, /metrics. Real MiniLM throughout."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import stat
import threading
import time

import httpx
import numpy as np
import openai
import pytest

from longembed.encoder import load_model
from longembed.plugin.cli import main
from longembed.plugin.cli.serve import huge_pages_environment
from longembed.plugin.models import get_model
from longembed.plugin.service.host import HostConfig
from longembed.plugin.service.server import BindRefused, bind_tcp, check_bind
from tests.hostutil import running_host
from tests.texts import varied_texts

NAME = "sentence-transformers/all-MiniLM-L6-v2"
KEY = "sk-test-0123456789abcdef"
LONG = " ".join(f"word{i} of a long document about embeddings" for i in range(120))  # ~800 tokens


@pytest.fixture(scope="module")
def model():
    return get_model()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    path = tmp_path_factory.mktemp("sock") / "host.sock"
    with running_host(HostConfig(), str(path)) as running:
        yield running


@pytest.fixture(scope="module")
def strict(tmp_path_factory):
    """A host with API keys and small limits."""
    path = tmp_path_factory.mktemp("sock") / "strict.sock"
    config = HostConfig(
        api_keys=(KEY, "another-key"), max_inputs=4, max_input_chars=1000, max_body_bytes=20_000
    )
    with running_host(config, str(path)) as running:
        yield running


def client(running, key="unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{running.url}/v1", api_key=key, max_retries=0)


def cosines(a, b) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def real_tokens(model, texts) -> int:
    return sum(min(n, model.info.max_tokens - 2) + 2 for n in model.count_tokens(texts))


def test_openai_client_string_and_list_input(served, model):
    c = client(served)
    one = c.embeddings.create(input="how do I reset my password", model=NAME)  # the client asks for base64
    assert one.model == NAME and len(one.data) == 1 and one.data[0].index == 0
    expected = model.embed(["how do I reset my password"])
    assert cosines([one.data[0].embedding], expected)[0] >= 0.99999
    assert (
        one.usage.prompt_tokens
        == one.usage.total_tokens
        == real_tokens(model, ["how do I reset my password"])
    )

    texts = ["short", "a somewhat longer sentence about photosynthesis in plants", LONG]
    many = c.embeddings.create(input=texts, model=NAME, encoding_format="float")
    assert [d.index for d in many.data] == [0, 1, 2]
    assert cosines([d.embedding for d in many.data], model.embed(texts)).min() >= 0.99999
    assert many.usage.total_tokens == real_tokens(model, texts)


def test_base64_is_little_endian_float32(served, model):
    r = httpx.post(
        f"{served.url}/v1/embeddings", json={"input": ["alpha", "beta"], "encoding_format": "base64"}
    )
    assert r.status_code == 200
    body = r.json()
    vectors = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in body["data"]]
    assert all(v.shape == (384,) for v in vectors)
    assert np.abs(np.stack(vectors) - model.embed(["alpha", "beta"])).max() < 1e-5
    assert body["model"] == NAME  # no model named: the default
    assert body["longembed"] == {
        "kind": "document",
        "overflow": "truncate",
        "truncated": [],
        "tokens": [3, 3],
        "dimensions": 384,
        "revision": model.info.revision,
    }


def test_dimensions_refused_for_a_model_without_matryoshka(served, model):
    c = client(served)
    with pytest.raises(openai.BadRequestError) as info:
        c.embeddings.create(input="hello", model=NAME, dimensions=128)
    assert info.value.status_code == 400
    assert info.value.body["param"] == "dimensions" and "Matryoshka" in info.value.body["message"]
    full = c.embeddings.create(input="hello", model=NAME, dimensions=384, encoding_format="float")
    assert len(full.data[0].embedding) == 384  # its own size is no truncation


def test_unknown_model_is_404(served):
    with pytest.raises(openai.NotFoundError) as info:
        client(served).embeddings.create(input="hello", model="no-such/model")
    assert info.value.body["code"] == "model_not_found" and info.value.body["param"] == "model"


def test_32_concurrent_clients_each_get_their_own_vectors(served, model):
    texts = [t for t in varied_texts(80) if t.strip()][:64]
    jobs = [texts[2 * i : 2 * i + 2] for i in range(32)]
    results: dict[int, list] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(32)

    def call(i: int) -> None:
        try:
            with httpx.Client(timeout=60) as http:
                start.wait()
                for _ in range(3):  # several rounds so requests overlap in the batcher
                    r = http.post(f"{served.url}/v1/embeddings", json={"input": jobs[i]})
                    assert r.status_code == 200, r.text
                    results.setdefault(i, []).append([d["embedding"] for d in r.json()["data"]])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    for i, job in enumerate(jobs):
        single = np.stack([model.embed([t])[0] for t in job])
        for got in results[i]:
            assert np.abs(np.asarray(got) - single).max() < 1e-5


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in response.text and body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize(
    ("body", "param", "needle"),
    [
        ({"input": ""}, "input", "empty string"),
        ({"input": []}, "input", "empty list"),
        ({"input": ["ok", 3.5]}, "input", "must be a string"),
        ({"input": ["ok", None]}, "input", "must be a string"),
        ({"input": [[101, 2023]]}, "input", "token arrays"),
        ({"input": [101, 2023]}, "input", "token arrays"),
        ({"input": {"text": "x"}}, "input", "string or a list"),
        ({}, "input", "required"),
        ({"input": "x", "model": 7}, "model", "non-empty string"),
        ({"input": "x", "kind": "passage"}, "kind", "query, document"),
        ({"input": "x", "overflow": "wrap"}, "overflow", "truncate, error, split"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format", "float, base64"),
        ({"input": "x", "dimensions": 0}, "dimensions", "positive integer"),
        ({"input": "x", "dimensions": "64"}, "dimensions", "positive integer"),
        ({"input": "x", "instruction": 5}, "instruction", "string"),
        ({"input": "bad \ud800 surrogate"}, None, "not valid Unicode"),
    ],
)
def test_bad_requests_get_400_in_openai_shape(served, body, param, needle):
    raw = json.dumps(body).encode()  # json.dumps escapes the lone surrogate as \ud800
    r = httpx.post(f"{served.url}/v1/embeddings", content=raw, headers={"content-type": "application/json"})
    error = error_of(r, 400)
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert needle in error["message"]


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2]", b'"text"', b"\xff\xfe{"])
def test_malformed_json_is_400(served, raw):
    error = error_of(httpx.post(f"{served.url}/v1/embeddings", content=raw), 400)
    assert error["code"] == "invalid_json"


def test_limits(strict):
    headers = {"Authorization": f"Bearer {KEY}"}
    url = f"{strict.url}/v1/embeddings"
    error = error_of(httpx.post(url, json={"input": ["a"] * 5}, headers=headers), 400)
    assert "at most 4" in error["message"]
    error = error_of(httpx.post(url, json={"input": "x" * 1001}, headers=headers), 400)
    assert error["code"] == "input_too_large"
    big = json.dumps({"input": ["y " * 3000] * 4}).encode()  # 24 kB > 20 kB
    error = error_of(httpx.post(url, content=big, headers=headers), 413)
    assert error["code"] == "body_too_large"

    def chunked():  # no Content-Length: the limit holds while streaming
        for _ in range(30):
            yield b" " * 1000

    error_of(httpx.post(url, content=chunked(), headers=headers), 413)
    assert httpx.post(url, json={"input": ["a"] * 4}, headers=headers).status_code == 200


def test_api_keys(strict, model):
    url = f"{strict.url}/v1/embeddings"
    error = error_of(httpx.post(url, json={"input": "x"}), 401)
    assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key"
    error_of(httpx.post(url, json={"input": "x"}, headers={"Authorization": "Bearer wrong"}), 401)
    error_of(httpx.post(url, json={"input": "x"}, headers={"Authorization": KEY}), 401)  # no scheme
    error_of(httpx.get(f"{strict.url}/v1/models"), 401)
    with pytest.raises(openai.AuthenticationError):
        client(strict, "wrong").embeddings.create(input="x", model=NAME)
    got = client(strict, "another-key").embeddings.create(input="x", model=NAME, encoding_format="float")
    assert cosines([got.data[0].embedding], model.embed(["x"]))[0] >= 0.99999
    assert httpx.get(f"{strict.url}/health").status_code == 200  # probes need no key
    assert httpx.get(f"{strict.url}/ready").status_code == 200


def test_unix_socket_needs_no_key_and_is_0660(strict, model):
    mode = stat.S_IMODE(os.stat(strict.socket).st_mode)
    assert mode & 0o007 == 0 and mode & 0o600 == 0o600
    with httpx.Client(transport=httpx.HTTPTransport(uds=strict.socket), base_url="http://host") as http:
        r = http.post("/v1/embeddings", json={"input": ["over the socket"]})
        assert r.status_code == 200, r.text
        got = np.asarray(r.json()["data"][0]["embedding"])
        assert np.abs(got - model.embed(["over the socket"])[0]).max() < 1e-5
        assert http.get("/metrics").status_code == 200


def test_instruction_and_kind(served, model):
    url = f"{served.url}/v1/embeddings"
    text = "what is the capital of france"
    body = httpx.post(url, json={"input": text, "instruction": "Represent this question: "}).json()
    expected = model.embed([text], instruction="Represent this question: ")
    assert cosines([body["data"][0]["embedding"]], expected)[0] >= 0.99999
    assert cosines([body["data"][0]["embedding"]], model.embed([text]))[0] < 0.999  # the prefix counts
    assert body["usage"]["total_tokens"] == real_tokens(model, ["Represent this question: " + text])
    query = httpx.post(url, json={"input": text, "kind": "query"}).json()
    assert query["longembed"]["kind"] == "query"
    assert cosines([query["data"][0]["embedding"]], model.embed([text], kind="query"))[0] >= 0.99999


def test_query_kind_applies_the_models_query_prefix(tmp_path):
    """A MiniLM folder whose sentence-transformers prompts give it query/passage prefixes."""
    folder = tmp_path / "minilm-prompted"
    source = get_model()._m.folder
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("config_sentence_transformers.json"))
    prompts = {"prompts": {"query": "query: ", "document": "passage: "}}
    (folder / "config_sentence_transformers.json").write_text(json.dumps(prompts))
    reference = load_model(folder)
    with running_host(HostConfig(models=(str(folder),))) as running:
        url = f"{running.url}/v1/embeddings"
        text = "how tall is mount everest"
        for kind in ("query", "document"):
            r = httpx.post(url, json={"input": text, "kind": kind, "model": str(folder)})  # alias: the path
            assert r.status_code == 200, r.text
            got = r.json()["data"][0]["embedding"]
            assert cosines([got], reference.embed([text], kind=kind))[0] >= 0.99999
            prefix = prompts["prompts"][kind]
            assert r.json()["usage"]["total_tokens"] == real_tokens(reference, [prefix + text])
        plain = httpx.post(url, json={"input": text, "model": "minilm-prompted"}).json()
        assert cosines([plain["data"][0]["embedding"]], reference.embed([text]))[0] >= 0.99999  # document


def test_overflow_policies_on_a_long_text(served, model):
    url = f"{served.url}/v1/embeddings"
    error = error_of(httpx.post(url, json={"input": ["short", LONG], "overflow": "error"}), 400)
    assert error["code"] == "context_length_exceeded" and "input[1]" in error["message"]

    cut = httpx.post(url, json={"input": ["short", LONG]}).json()  # truncate is the default
    assert cut["longembed"]["truncated"] == [1]
    assert cosines([cut["data"][1]["embedding"]], model.embed([LONG]))[0] >= 0.99999
    assert cut["usage"]["total_tokens"] == 3 + 256

    split = httpx.post(url, json={"input": [LONG, "short"], "overflow": "split"}).json()
    chunks = model.embed_chunks([LONG], mode="chunk", chunk_tokens=254, overlap=0)[0]
    assert len(chunks) >= 3
    weights = np.array([c.n_tokens for c in chunks], dtype=np.float64)
    mean = (np.stack([c.vector for c in chunks]) * weights[:, None]).sum(axis=0)
    assert cosines([split["data"][0]["embedding"]], [mean])[0] >= 0.99999
    assert abs(np.linalg.norm(split["data"][0]["embedding"]) - 1) < 1e-5
    assert cosines([split["data"][1]["embedding"]], model.embed(["short"]))[0] >= 0.99999  # one window
    assert split["longembed"]["truncated"] == [] and split["longembed"]["overflow"] == "split"
    n_content = model.count_tokens([LONG])[0]
    assert split["usage"]["total_tokens"] == n_content + 2 * len(chunks) + 3


def test_health_ready_models(served):
    assert httpx.get(f"{served.url}/health").json() == {"status": "ok"}
    ready = httpx.get(f"{served.url}/ready")
    assert ready.status_code == 200 and ready.json()["models"] == [NAME]
    models = httpx.get(f"{served.url}/v1/models").json()
    assert models["object"] == "list"
    (entry,) = models["data"]
    assert entry["id"] == NAME and entry["object"] == "model"
    assert entry["longembed"]["dim"] == 384 and entry["longembed"]["max_tokens"] == 256
    assert entry["longembed"]["prefixes"] == {"query": "", "document": ""}
    assert entry["longembed"]["backend"] == "onnxruntime" and entry["longembed"]["backend_note"] == ""
    assert [m.id for m in client(served).models.list()] == [NAME]
    error = error_of(httpx.get(f"{served.url}/v2/nothing"), 404)
    assert "no such endpoint" in error["message"]
    error_of(httpx.get(f"{served.url}/v1/embeddings"), 405)


def metric(text: str, name: str, missing: float | None = None, **labels) -> float | None:
    """A sample's value from Prometheus text (`missing` when the series is absent)."""
    selector = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = "(?m)^" + re.escape(name) + (r"\{" + re.escape(selector) + r"\}" if labels else "") + r" (\S+)$"
    found = re.search(pattern, text)
    return float(found.group(1)) if found else missing


def test_metrics_count_requests_tokens_and_batches(served):
    before = httpx.get(f"{served.url}/metrics").text
    r = httpx.post(f"{served.url}/v1/embeddings", json={"input": ["count me", "and me"]})
    assert r.status_code == 200
    httpx.post(f"{served.url}/v1/embeddings", json={"input": ""})
    after = httpx.get(f"{served.url}/metrics").text
    key = "longembed_http_requests_total"
    assert (
        metric(after, key, endpoint="embeddings", status="200")
        == metric(before, key, endpoint="embeddings", status="200") + 1
    )
    assert metric(after, key, endpoint="embeddings", status="400") >= 1
    tokens = "longembed_tokens_embedded_total"
    assert (
        metric(after, tokens, model=NAME, priority="interactive")
        - metric(before, tokens, model=NAME, priority="interactive")
        == r.json()["usage"]["total_tokens"]
    )
    for name in (
        "longembed_http_request_seconds_bucket",
        "longembed_batch_sequences_bucket",
        "longembed_batch_tokens_bucket",
        "longembed_queue_sequences",
        "longembed_queue_tokens",
    ):
        assert name in after
    assert "longembed_ingestion_backlog_documents" not in after  # no database here


def test_binding_beyond_loopback_needs_keys(capsys):
    with pytest.raises(BindRefused, match="without API keys"):
        check_bind("0.0.0.0", 8080, ())
    check_bind("0.0.0.0", 8080, ("k",))
    check_bind("127.0.0.1", 8080, ())
    check_bind("::1", 8080, ())
    assert main(["serve", "--host", "0.0.0.0", "--port", "8080"]) == 2
    assert "refusing to listen on 0.0.0.0:8080 without API keys" in capsys.readouterr().err
    assert main(["serve", "--port", "0"]) == 2
    assert "nothing to listen on" in capsys.readouterr().err
    assert main(["serve", "--max-wait-ms", "-1"]) == 2
    assert "batching window" in capsys.readouterr().err


def test_the_host_asks_glibc_for_huge_pages_unless_told_otherwise():
    """`longembed serve` re-executes itself with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (the real
    re-execution: test_serve_subprocess_on_a_unix_socket); here which environments it leaves alone."""
    env = {"PATH": "/usr/bin"}
    thp = "always [madvise] never\n"
    assert huge_pages_environment(env, "glibc 2.36", thp) == {
        **env,
        "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1",
    }
    other = {**env, "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}  # the user's other tunables are kept
    assert huge_pages_environment(other, "glibc 2.41", "[always] madvise never")["GLIBC_TUNABLES"] == (
        "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    )
    for user_choice in ("glibc.malloc.hugetlb=0", "glibc.malloc.hugetlb=1", "a=1:glibc.malloc.hugetlb=2"):
        assert huge_pages_environment({"GLIBC_TUNABLES": user_choice}, "glibc 2.36", thp) is None
    assert huge_pages_environment(env, "glibc 2.34", thp) is None  # no such tunable before 2.35
    assert huge_pages_environment(env, "glibc 2.36", "always madvise [never]") is None
    assert huge_pages_environment(env, "glibc 2.36", "") is None
    for libc in ("", "musl 1.2", "glibc", "glibc x.y"):
        assert huge_pages_environment(env, libc, thp) is None
    assert env == {"PATH": "/usr/bin"}  # never changed in place


def test_a_failed_re_execution_leaves_the_host_running_without_huge_pages(tmp_path):
    import subprocess
    import sys

    from longembed.plugin.cli import serve

    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if (
        serve.huge_pages_environment(env, os.confstr("CS_GNU_LIBC_VERSION"), serve.THP_SETTING.read_text())
        is None
    ):
        pytest.skip("this machine would not re-execute (no glibc >= 2.35 or transparent huge pages off)")
    script = (
        "import sys; sys.executable = sys.argv[1]\n"
        "from longembed.plugin.cli import serve\n"
        "serve.prefer_huge_pages()\n"
        "print('went on')\n"
    )
    missing = str(tmp_path / "no-such-python")
    done = subprocess.run([sys.executable, "-c", script, missing], env=env, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout == "went on\n", done
    assert (
        f"not restarted with glibc.malloc.hugetlb=1: [Errno 2] No such file or directory: '{missing}'"
        in done.stderr
    )


def test_tcp_listener_sets_nodelay():
    """Without TCP_NODELAY on accepted sockets every keep-alive answer waited ~40 ms (Nagle against
    delayed ACKs); asyncio sets it only on sockets created with proto IPPROTO_TCP."""
    sock = bind_tcp("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        sock.close()


def test_full_queue_answers_429_with_retry_after():
    with running_host(HostConfig(max_queued_tokens=12)) as running:
        (served,) = running.host.models()
        forward, gate, entered = served.batcher._forward, threading.Event(), threading.Event()

        def gated(sequences):  # the real forward pass, held until the test has filled the queue
            entered.set()
            gate.wait(30)
            return forward(sequences)

        served.batcher._forward = gated
        url = f"{running.url}/v1/embeddings"
        answers: dict[str, httpx.Response] = {}

        def post(name: str, text: str) -> None:
            answers[name] = httpx.post(url, json={"input": text}, timeout=60)

        # Over the batcher's inline_tokens: it runs on the batcher thread, not in the event loop.
        first = threading.Thread(target=post, args=("running", "the batch in progress " * 20))
        first.start()
        assert entered.wait(10)
        second = threading.Thread(target=post, args=("queued", "eight tokens wait in the queue"))
        second.start()
        deadline = time.monotonic() + 10
        while served.batcher.queue_depth()[1] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        refused = httpx.post(url, json={"input": "one more request"})
        error = error_of(refused, 429)
        assert error["type"] == "rate_limit_error" and error["code"] == "queue_full"
        assert int(refused.headers["retry-after"]) >= 1
        gate.set()
        first.join()
        second.join()
        assert answers["running"].status_code == answers["queued"].status_code == 200
