"""uvicorn's HTTP parser and event loop under the host's kind of request, side by side: h11 on asyncio
(what uvicorn falls back to), httptools on asyncio, httptools on uvloop (what the host gets, as both are
dependencies).

    .venv/bin/python bench/bench_http_stack.py [--requests 3000]

Each stack serves a Starlette endpoint that reads a JSON body and answers ten search-result-sized rows,
in its own process, over loopback TCP with one keep-alive client; the first 500 requests are warm-up.
The stacks take turns and the first runs again at the end, so drift of this shared machine shows.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import statistics
import threading
import time

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from longembed.plugin.service.server import bind_tcp

STACKS = (("h11", "asyncio"), ("httptools", "asyncio"), ("httptools", "uvloop"), ("h11", "asyncio"))
WARMUP = 500


async def search(request: Request) -> JSONResponse:
    body = await request.json()
    rows = [{"external_id": str(i), "score": 0.5, "snippet": "x" * 300, "metadata": {}} for i in range(10)]
    return JSONResponse({"object": "list", "data": rows, "k": body.get("k")})


def serve_and_measure(parser: str, loop: str, requests: int, out: multiprocessing.Queue) -> None:
    app = Starlette(routes=[Route("/v1/search", search, methods=["POST"])])
    sock = bind_tcp("127.0.0.1", 0)  # the host's own (TCP_NODELAY: asyncio's default needs IPPROTO_TCP)
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, http=parser, loop=loop, log_level="error", access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    client = http.client.HTTPConnection("127.0.0.1", port)
    body = json.dumps({"query": "how do I reset my password", "collection": "docs", "k": 10})
    seconds = []
    for _ in range(requests):
        t0 = time.perf_counter()
        client.request("POST", "/v1/search", body, {"Content-Type": "application/json"})
        client.getresponse().read()
        seconds.append(time.perf_counter() - t0)
    server.should_exit = True
    thread.join()
    out.put(statistics.median(seconds[WARMUP:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores, uvicorn {uvicorn.__version__}; load {os.getloadavg()[0]:.2f}")
    results = []
    for parser_name, loop in STACKS:
        out: multiprocessing.Queue = multiprocessing.Queue()
        process = multiprocessing.Process(
            target=serve_and_measure, args=(parser_name, loop, args.requests, out)
        )
        process.start()
        results.append((parser_name, loop, out.get()))
        process.join()
    base = results[0][2]
    print(f"{'parser':<10} {'loop':<8} {'p50 ms':>7} {'vs h11/asyncio':>15}")
    for parser_name, loop, p50 in results:
        print(f"{parser_name:<10} {loop:<8} {1000 * p50:>7.3f} {p50 / base:>14.2f}x")


if __name__ == "__main__":
    main()
