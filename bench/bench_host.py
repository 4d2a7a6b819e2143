"""The model host under load: `longembed serve` against in-process batched encoding of the same texts,
and against Infinity when it is installed (a separate venv: `--infinity PATH/TO/infinity_emb`).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_host.py [--seconds 8] [--infinity /path/bin/infinity_emb]

Each server runs as its own process on loopback, serving the same all-MiniLM-L6-v2 folder; one load
generator (threads with keep-alive httpx clients) drives both at 1, 8 and 32 concurrent clients, with
two workloads: single short texts (a query each) and batches of 8 mixed-length texts. Tokens are real
tokens counted with the model's own tokenizer for every server alike ([CLS] and [SEP] included,
truncated at 256). Latency is per request, client side. The in-process figure is `model.embed` of the
workload's texts in one call (packed 4,096-token batches), best of --repeats with 1 and with all torch
threads: what batching could reach.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx
import numpy as np
import torch

from longembed.encoder import load_model

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.bench_encoder_cpu import mixed_length_texts  # noqa: E402

SHORT = [
    "how do I reset my password",
    "best sourdough starter ratio",
    "what causes ocean tides",
    "python list comprehension with condition",
    "cheapest flights to lisbon in may",
    "symptoms of vitamin d deficiency",
    "how to rebase a git branch",
    "distance from earth to mars",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise TimeoutError(url)


def start_longembed(port: int) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "longembed.plugin.cli", "serve", "--port", str(port), "--no-worker"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_ready(f"http://127.0.0.1:{port}/ready", proc)
    return proc, f"http://127.0.0.1:{port}/v1/embeddings"


def start_infinity(binary: str, folder: Path, port: int) -> tuple[subprocess.Popen, str]:
    cmd = [binary, "v2", "--model-id", str(folder), "--port", str(port)]
    cmd += ["--engine", "torch", "--device", "cpu", "--no-bettertransformer"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_ready(f"http://127.0.0.1:{port}/health", proc)
    return proc, f"http://127.0.0.1:{port}/embeddings"


def drive(url: str, model_id: str, requests: list[list[str]], clients: int, seconds: float) -> dict:
    """`clients` threads send requests round-robin from `requests` for `seconds`; per-request latency."""
    latencies: list[float] = []
    texts_done: list[list[str]] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds
    errors: list[str] = []

    def client(k: int) -> None:
        rng = random.Random(k)
        with httpx.Client(timeout=120) as http:
            while time.monotonic() < stop:
                batch = requests[rng.randrange(len(requests))]
                t0 = time.perf_counter()
                r = http.post(url, json={"input": batch, "model": model_id})
                dt = time.perf_counter() - t0
                if r.status_code != 200:
                    errors.append(r.text[:200])
                    return
                with lock:
                    latencies.append(dt)
                    texts_done.append(batch)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(errors[0])
    return {"wall": wall, "latencies": np.array(latencies), "texts": [t for b in texts_done for t in b]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=8.0, help="per cell")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--mixed", type=int, default=400, help="mixed-length texts (8 per request)")
    parser.add_argument("--repeats", type=int, default=3, help="in-process runs (best of)")
    parser.add_argument("--infinity", default=None, help="path of the infinity_emb executable (own venv)")
    args = parser.parse_args()

    model = load_model()
    folder = model._m.folder
    counts: dict[str, int] = {}

    def tokens(texts: list[str]) -> int:
        missing = [t for t in set(texts) if t not in counts]
        if missing:
            for t, n in zip(missing, model.count_tokens(missing), strict=True):
                counts[t] = min(n, model.info.max_tokens - 2) + 2
        return sum(counts[t] for t in texts)

    mixed = mixed_length_texts(args.mixed, seed=1)
    workloads = {
        "single short text": [[t] for t in SHORT],
        "batches of 8 mixed texts": [mixed[i : i + 8] for i in range(0, len(mixed), 8)],
    }
    machine = platform.processor() or platform.machine()
    print(f"# {machine}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"# load average at start: {os.getloadavg()[0]:.2f}")

    inprocess = {}
    default_threads = torch.get_num_threads()
    for name, reqs in workloads.items():
        texts = [t for r in reqs for t in r] * (4 if name.startswith("single") else 1)
        model.embed(texts[:64])
        best = {}
        for threads in sorted({1, default_threads}):  # the better of both: the fairest reference
            torch.set_num_threads(threads)
            best[threads] = min(_timed(lambda t=texts: model.embed(t)) for _ in range(args.repeats))
        torch.set_num_threads(default_threads)
        inprocess[name] = tokens(texts) / min(best.values())
        each = ", ".join(f"{n} thread(s) {tokens(texts) / sec:,.0f}" for n, sec in best.items())
        print(f"in-process model.embed, {name}: {inprocess[name]:,.0f} tokens/s ({each})")

    servers = {"longembed serve": lambda: start_longembed(free_port())}
    if args.infinity:
        servers["infinity"] = lambda: start_infinity(args.infinity, folder, free_port())
    clients = [int(c) for c in args.clients.split(",")]
    rows = []
    for server, start in servers.items():
        proc, url = start()
        model_id = model.info.name if server.startswith("longembed") else str(folder)
        try:
            drive(url, model_id, workloads["single short text"], 1, 1.0)  # warm up
            for name, reqs in workloads.items():
                for n in clients:
                    result = drive(url, model_id, reqs, n, args.seconds)
                    tps = tokens(result["texts"]) / result["wall"]
                    p50, p99 = np.percentile(result["latencies"] * 1000, [50, 99])
                    row = (server, name, n, tps, tps / inprocess[name], p50, p99, len(result["latencies"]))
                    rows.append(row)
                    print(
                        f"{server:16s} {name:26s} clients={n:3d} {tps:9,.0f} tok/s "
                        f"({tps / inprocess[name]:4.0%} of in-process) p50 {p50:7.1f} ms p99 {p99:7.1f} ms "
                        f"({len(result['latencies'])} requests)",
                        flush=True,
                    )
        finally:
            proc.terminate()
            proc.wait(60)
    print()
    print("| server | workload | clients | tokens/s | of in-process | p50 ms | p99 ms | requests |")
    print("|---|---|---|---|---|---|---|---|")
    for server, name, n, tps, share, p50, p99, count in rows:
        print(f"| {server} | {name} | {n} | {tps:,.0f} | {share:.0%} | {p50:.1f} | {p99:.1f} | {count} |")


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
