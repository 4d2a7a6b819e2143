"""The HTTP face of the model host (Starlette): OpenAI's /v1/embeddings and /v1/models, /v1/search (the
same rows as SQL `longembed.search()`, for backends without a database driver), /health, /ready and
/metrics. This module only translates requests and answers; the host does the work.

Every error is OpenAI-shaped JSON, `{"error": {"message", "type", "param", "code"}}`, never a trace.
API keys (when configured) guard /v1/* and /metrics on TCP; the Unix socket needs none (its file
permissions are the access control); /health and /ready are open for probes.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from longembed.encoder.profiles import KINDS
from longembed.plugin.service.ann import Busy
from longembed.plugin.service.batcher import INTERACTIVE, BatcherStopped, QueueFull
from longembed.plugin.service.errors import ApiError, invalid
from longembed.plugin.service.fastpath import HNSWLIB, mirrored, search_vector
from longembed.plugin.service.host import Host, HostConfig
from longembed.plugin.service.served import OVERFLOWS
from longembed.plugin.store.collections import Collection, CollectionNotFound, get_collection
from longembed.plugin.store.search import as_vector, check_arguments

log = logging.getLogger(__name__)

ENCODINGS = ("float", "base64")
INLINE_CHARS = 4096  # requests this small are tokenised on the event loop (tens of microseconds)
# Fast-path searches of at most this many candidates (and ef) run on the event loop: a fraction of a
# millisecond, less than a hop to a worker thread and back; larger ones take the hop.
INLINE_CANDIDATES = 400
Handler = Callable[[Request], Awaitable[Response]]
# JSON numbers decode to exactly these (true/false to bool, a subclass of int that is not a number here);
# one set of the element types costs a 384-number vector ~15 us, isinstance per element ~100 us.
NUMBER_TYPES = frozenset({int, float})


@dataclass(frozen=True)
class EmbeddingRequest:
    texts: list[str]
    model: str | None
    encoding_format: str
    dimensions: int | None
    kind: str
    instruction: str | None
    overflow: str


def build_app(host: Host) -> Starlette:
    keys = [key.encode() for key in host.config.api_keys]

    def authorised(request: Request) -> bool:
        if not keys or _via_unix_socket(request):
            return True
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        given = token.strip().encode()
        matches = [hmac.compare_digest(key, given) for key in keys]  # every key: no early exit
        return any(matches)

    def endpoint(name: str, handler: Handler, auth: bool) -> Handler:
        async def wrapped(request: Request) -> Response:
            t0 = time.perf_counter()
            try:
                if auth and not authorised(request):
                    raise ApiError(
                        401,
                        "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                        code="invalid_api_key",
                    )
                response = await handler(request)
            except ApiError as exc:
                response = _error_response(exc)
            except Exception:
                log.exception("%s failed", name)
                response = _error_response(ApiError(500, "internal error; the host's log has the details"))
            _record(host, name, response, time.perf_counter() - t0)
            return response

        return wrapped

    async def embeddings(request: Request) -> Response:
        req = parse_embedding_request(await _read_json(request, host.config.max_body_bytes), host.config)

        def prepare() -> tuple[Any, Any]:
            served = host.model(req.model)
            served.check_dimensions(req.dimensions)
            return served, served.plan(req.texts, req.kind, req.instruction, req.overflow)

        if host.is_served(req.model) and sum(map(len, req.texts)) <= INLINE_CHARS:
            served, plan = prepare()  # microseconds: cheaper than a hop to a worker thread and back
        else:  # in a worker thread: long texts, or a model to load or to look up in the database
            served, plan = await run_in_threadpool(prepare)
        rows = await _compute(served, plan)
        host.metrics.inputs.labels(served.info.name).inc(len(req.texts))
        result = served.finish(plan, rows, req.overflow, req.dimensions)
        if req.encoding_format == "base64":
            data = [base64.b64encode(v.astype("<f4").tobytes()).decode("ascii") for v in result.vectors]
        else:
            data = [v.tolist() for v in result.vectors]
        tokens = sum(result.n_tokens)
        return JSONResponse(
            {
                "object": "list",
                "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
                "model": served.info.name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                "longembed": {
                    "kind": req.kind,
                    "overflow": req.overflow,
                    "truncated": result.truncated,
                    "tokens": result.n_tokens,
                    "dimensions": int(result.vectors.shape[1]),
                    "revision": served.info.revision,
                },
            }
        )

    async def search(request: Request) -> Response:
        req = parse_search_request(await _read_json(request, host.config.max_body_bytes), host.config)
        fast = host.fastpath if req.index == "auto" else None
        cached = fast.collection(req.collection) if fast is not None else None
        embedded = None
        if cached is not None and _mirrored(cached, req):
            # Answered from the host's memory: the collection's copy from the last sync step, the query
            # embedded in the batcher, the index and its rows; no database connection, no thread hop
            # unless the work is large.
            embedded = await _embed_query(host, cached, req)
            if embedded is not None:
                vector, model, tokens = embedded
                try:  # on the event loop when small and the index is not being written, else a thread
                    if max(4 * req.k, 40, req.ef_search or 0) > INLINE_CANDIDATES:
                        raise Busy(cached.name)
                    results = fast.search(
                        cached, vector, req.k, filter=req.filter, ef_search=req.ef_search, wait=False
                    )
                except Busy:
                    results = await run_in_threadpool(
                        fast.search, cached, vector, req.k, filter=req.filter, ef_search=req.ef_search
                    )
                if results is not None:
                    return _search_response(cached, model, results, HNSWLIB, tokens)
        with host.database() as conn:

            def search_in_db(collection: Any, vector: Any) -> tuple[list, str]:  # in a worker thread
                try:
                    if vector is None:
                        vector = as_vector(req.vector, collection.dim)
                    return search_vector(
                        fast,
                        conn,
                        collection,
                        vector,
                        req.k,
                        filter=req.filter,
                        ef_search=req.ef_search,
                        text=req.query,
                        mode=_mode(req),
                        weights=req.weights,
                        fusion=req.fusion,
                        rrf_k=req.rrf_k,
                    )
                except ValueError as exc:
                    raise invalid(str(exc)) from None
                except psycopg.Error as exc:
                    raise ApiError(503, f"the search failed in the database: {exc}", retry_after=5) from None

            def prepare() -> tuple[Any, Any, Any, int | None, Any]:  # the collection, maybe a model load
                try:
                    collection = get_collection(conn, req.collection)
                except CollectionNotFound:
                    raise ApiError(
                        404,
                        f"no collection named {req.collection!r}",
                        param="collection",
                        code="collection_not_found",
                    ) from None
                if embedded is not None and collection == cached:  # embedded above for this very collection
                    return collection, None, None, None, search_in_db(collection, embedded[0])
                if req.vector is not None:  # embedded elsewhere: no model; search in this same thread hop
                    return collection, None, None, None, search_in_db(collection, None)
                return collection, *_query_plan(host, collection, req.query), None

            collection, served, plan, dims, found = await run_in_threadpool(prepare)
            if found is None:
                embedded_now = served.finish(plan, await _compute(served, plan), "truncate", dims)
                found = await run_in_threadpool(search_in_db, collection, embedded_now.vectors[0])
                model, tokens = served.info.name, embedded_now.n_tokens[0]
            elif embedded is not None and collection == cached:
                model, tokens = embedded[1], embedded[2]
            else:
                model, tokens = collection.model_name, 0
            results, index = found
        return _search_response(collection, model, results, index, tokens)

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [_model_entry(m) for m in host.models()]})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(request: Request) -> Response:
        reason = await run_in_threadpool(host.ready)
        if reason is None:
            return JSONResponse({"status": "ready", "models": [m.info.name for m in host.models()]})
        return JSONResponse({"status": "unavailable", "reason": reason}, 503, headers={"Retry-After": "2"})

    async def metrics(request: Request) -> Response:
        return Response(await run_in_threadpool(host.metrics.render), media_type=CONTENT_TYPE_LATEST)

    async def not_found(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        message = {404: f"no such endpoint: {request.url.path}", 405: f"method {request.method} not allowed"}
        response = _error_response(ApiError(status, message.get(status, "request failed")))
        _record(host, "other", response, 0.0)
        return response

    routes = [
        Route("/v1/embeddings", endpoint("embeddings", embeddings, True), methods=["POST"]),
        Route("/embeddings", endpoint("embeddings", embeddings, True), methods=["POST"]),
        Route("/v1/search", endpoint("search", search, True), methods=["POST"]),
        Route("/v1/models", endpoint("models", models, True), methods=["GET"]),
        Route("/health", endpoint("health", health, False), methods=["GET"]),
        Route("/ready", endpoint("ready", ready, False), methods=["GET"]),
        Route("/metrics", endpoint("metrics", metrics, True), methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: not_found})


def _mode(req: SearchRequest) -> str | None:
    return "hybrid" if req.hybrid and req.mode is None else req.mode


def _mirrored(collection: Collection, req: SearchRequest) -> bool:
    """Whether the fast path's index answers this request by itself; 400 for bad arguments (the same
    checks, in the same words, as the database path's)."""
    try:
        check_arguments(req.k, req.ef_search, req.filter)
        return mirrored(collection, _mode(req), req.weights, req.fusion, req.rrf_k)
    except ValueError as exc:
        raise invalid(str(exc)) from None


async def _embed_query(host: Host, collection: Collection, req: SearchRequest) -> tuple | None:
    """(query vector, model name, tokens) without the database: the request's vector, or its text
    embedded by a model this host already serves (short texts tokenised on the event loop). None when
    the collection's model is not loaded yet (the database path loads it)."""
    if req.vector is not None:
        try:
            return as_vector(req.vector, collection.dim), collection.model_name, 0
        except ValueError as exc:
            raise invalid(str(exc)) from None
    if not host.is_served(collection.model_source):
        return None
    if len(req.query) <= INLINE_CHARS:
        served, plan, dims = _query_plan(host, collection, req.query)
    else:
        served, plan, dims = await run_in_threadpool(_query_plan, host, collection, req.query)
    embedded = served.finish(plan, await _compute(served, plan), "truncate", dims)
    return embedded.vectors[0], served.info.name, embedded.n_tokens[0]


def _query_plan(host: Host, collection: Collection, query: str) -> tuple[Any, Any, int | None]:
    """(served model, tokenised query, Matryoshka size or None) for a text query of `collection`: its
    model (loaded when it is not yet), refused when the host serves other weights than it was embedded
    with."""
    served = host.model(collection.model_source)
    if served.info.revision != collection.model_revision:
        raise ApiError(
            409,
            f"collection {collection.name!r} was embedded with revision "
            f"{collection.model_revision} of {served.info.name}; this host serves revision "
            f"{served.info.revision}: serve those weights, or embed into a new collection",
            code="revision_mismatch",
        )
    dims = collection.dim if collection.dim != served.info.dim else None
    served.check_dimensions(dims)
    return served, served.plan([query], "query", collection.query_prefix, "truncate"), dims


def _search_response(collection: Collection, model: str, results: list, index: str, tokens: int) -> Response:
    return JSONResponse(
        {
            "object": "list",
            "collection": collection.name,
            "model": model,
            # Shallow: each result's metadata is its own (parsed per result); asdict's deep copy cost
            # ~15 us a row.
            "data": [dict(vars(r)) for r in results],
            "index": index,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


@dataclass(frozen=True)
class SearchRequest:
    collection: str
    query: str | None
    k: int
    filter: dict[str, Any] | None
    hybrid: bool  # deprecated: mode "hybrid"
    ef_search: int | None
    vector: list[float] | None = None  # instead of `query`: a query vector embedded elsewhere
    index: str = "auto"  # "pgvector": skip the host's hnswlib index even where it has one
    mode: str | None = None  # None: the collection's search_mode
    weights: dict[str, Any] | None = None
    fusion: str | None = None
    rrf_k: int | None = None


async def _compute(served: Any, plan: Any) -> Any:
    """The plan's rows from the batcher at interactive priority; a full queue is 429, a stopped one 503."""
    try:
        future = served.submit(plan, INTERACTIVE)
    except QueueFull as exc:
        raise ApiError(429, f"{exc}; retry later", code="queue_full", retry_after=exc.retry_after) from None
    except BatcherStopped as exc:
        raise ApiError(503, str(exc), retry_after=5) from None
    return await asyncio.wrap_future(future)


def parse_search_request(body: dict[str, Any], config: HostConfig) -> SearchRequest:
    """Validate a /v1/search body (the arguments of SQL `longembed.search()`); ApiError 400 if bad."""
    collection = body.get("collection")
    if not isinstance(collection, str) or not collection:
        raise invalid("'collection' is required: the collection's name", "collection")
    query, vector = body.get("query"), body.get("vector")
    if vector is not None:
        if query is not None:
            raise invalid("give 'query' (a text) or 'vector' (its embedding), not both", "vector")
        if not isinstance(vector, list) or not {type(x) for x in vector} <= NUMBER_TYPES:
            raise invalid("'vector' must be an array of numbers", "vector")
        if body.get("hybrid"):
            raise invalid("hybrid search needs a text 'query', not a 'vector'", "hybrid")
    elif not isinstance(query, str) or not query.strip():
        raise invalid("'query' is required: a text that is not empty or only whitespace", "query")
    elif len(query) > config.max_input_chars:
        raise invalid(f"'query' has {len(query)} characters; at most {config.max_input_chars}", "query")
    k = body.get("k", 10)
    if isinstance(k, bool) or not isinstance(k, int):
        raise invalid(f"'k' must be an integer, got {_json_type(k)}", "k")
    filter_ = body.get("filter")
    if filter_ is not None and not isinstance(filter_, dict):
        raise invalid(f"'filter' must be a JSON object, got {_json_type(filter_)}", "filter")
    hybrid = body.get("hybrid", False)
    if not isinstance(hybrid, bool):
        raise invalid(f"'hybrid' must be true or false, got {_json_type(hybrid)}", "hybrid")
    ef_search = body.get("ef_search")
    if ef_search is not None and (isinstance(ef_search, bool) or not isinstance(ef_search, int)):
        raise invalid(f"'ef_search' must be an integer, got {_json_type(ef_search)}", "ef_search")
    index = _choice(body, "index", ("auto", "pgvector"), "auto")
    mode = body.get("mode")
    if mode is not None and not isinstance(mode, str):
        raise invalid(f"'mode' must be a string, got {_json_type(mode)}", "mode")
    if hybrid and mode not in (None, "hybrid"):
        raise invalid(f"'hybrid': true is mode 'hybrid', but 'mode' is {mode!r}", "mode")
    weights = body.get("weights")
    if weights is not None and not isinstance(weights, dict):
        raise invalid(f"'weights' must be a JSON object, got {_json_type(weights)}", "weights")
    fusion = body.get("fusion")
    if fusion is not None and not isinstance(fusion, str):
        raise invalid(f"'fusion' must be a string, got {_json_type(fusion)}", "fusion")
    rrf_k = body.get("rrf_k")
    if rrf_k is not None and (isinstance(rrf_k, bool) or not isinstance(rrf_k, int)):
        raise invalid(f"'rrf_k' must be an integer, got {_json_type(rrf_k)}", "rrf_k")
    return SearchRequest(
        collection, query, k, filter_, hybrid, ef_search, vector, index, mode, weights, fusion, rrf_k
    )


def parse_embedding_request(body: dict[str, Any], config: HostConfig) -> EmbeddingRequest:
    """Validate an OpenAI embeddings body (plus our kind/instruction/overflow); ApiError 400 if bad."""
    if "input" not in body:
        raise invalid("'input' is required: a string or a list of strings", "input")
    raw = body["input"]
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list):
        raise invalid(f"'input' must be a string or a list of strings, got {_json_type(raw)}", "input")
    if not raw:
        raise invalid("'input' is an empty list: send at least one string", "input")
    if len(raw) > config.max_inputs:
        raise invalid(f"'input' has {len(raw)} items; at most {config.max_inputs} per request", "input")
    for i, text in enumerate(raw):
        if isinstance(text, int | list) and not isinstance(text, bool):
            raise invalid(
                f"input[{i}] is {_json_type(text)}: token arrays are not supported, send the text itself",
                "input",
                "unsupported_input",
            )
        if not isinstance(text, str):
            raise invalid(f"input[{i}] must be a string, got {_json_type(text)}", "input")
        if not text:
            raise invalid(f"input[{i}] is an empty string", "input")
        if len(text) > config.max_input_chars:
            raise invalid(
                f"input[{i}] has {len(text)} characters; at most {config.max_input_chars} per input",
                "input",
                "input_too_large",
            )
    model = body.get("model")
    if model is not None and (not isinstance(model, str) or not model):
        raise invalid("'model' must be a non-empty string", "model")
    encoding = _choice(body, "encoding_format", ENCODINGS, "float")
    dimensions = body.get("dimensions")
    if dimensions is not None and (
        not isinstance(dimensions, int) or isinstance(dimensions, bool) or dimensions < 1
    ):
        raise invalid("'dimensions' must be a positive integer", "dimensions")
    instruction = body.get("instruction")
    if instruction is not None and not isinstance(instruction, str):
        raise invalid("'instruction' must be a string", "instruction")
    return EmbeddingRequest(
        texts=raw,
        model=model,
        encoding_format=encoding,
        dimensions=dimensions,
        kind=_choice(body, "kind", KINDS, "document"),
        instruction=instruction,
        overflow=_choice(body, "overflow", OVERFLOWS, "truncate"),
    )


def _choice(body: dict[str, Any], name: str, allowed: tuple[str, ...], default: str) -> str:
    value = body.get(name)
    if value is None:
        return default
    if value not in allowed:
        raise invalid(f"'{name}' must be one of {', '.join(allowed)}, got {json.dumps(value)}", name)
    return value


async def _read_json(request: Request, limit: int) -> dict[str, Any]:
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise ApiError(413, f"request body larger than {limit} bytes", code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body larger than {limit} bytes", code="body_too_large")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as exc:
        raise invalid(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise invalid(f"the request body must be a JSON object, got {_json_type(body)}", code="invalid_json")
    return body


def _via_unix_socket(request: Request) -> bool:
    server = request.scope.get("server")  # ASGI: [path, None] on a Unix socket, [host, port] on TCP
    return bool(server) and server[1] is None


def _model_entry(served: Any) -> dict[str, Any]:
    info = served.info
    return {
        "id": info.name,
        "object": "model",
        "created": served.created,
        "owned_by": "longembed",
        "longembed": {
            "dim": info.dim,
            "max_tokens": info.max_tokens,
            "prefixes": info.prefixes,
            "pooling": info.pooling,
            "architecture": info.architecture,
            "revision": info.revision,
            "device": info.device,
            "dtype": info.dtype,
            "backend": info.backend,  # onnxruntime or torch; backend_note: why not ONNX Runtime on a CPU
            "backend_note": info.backend_note,
            "matryoshka_dims": list(info.matryoshka_dims),
            "aliases": sorted(served.aliases - {info.name}),
        },
    }


def _error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), exc.status, headers=exc.headers())


def _record(host: Host, endpoint: str, response: Response, seconds: float) -> None:
    m = host.metrics
    m.requests.labels(endpoint, str(response.status_code)).inc()
    if response.status_code >= 400:
        kind = "server_error" if response.status_code >= 500 else f"http_{response.status_code}"
        m.errors.labels(endpoint, kind).inc()
    if seconds:
        m.latency.labels(endpoint).observe(seconds)


def _json_type(value: Any) -> str:
    names = {bool: "a boolean", int: "a number", float: "a number", list: "an array", dict: "an object"}
    return "null" if value is None else names.get(type(value), "a string" if isinstance(value, str) else "?")
