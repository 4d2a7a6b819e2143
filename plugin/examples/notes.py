"""A notes backend: Starlette + SQLAlchemy 2 ORM on longembed's embedded server and model host.

    longembed up && longembed migrate
    longembed collection create -c notes     # optional: passages of long notes through SQL search()
    python -m longembed.plugin.examples.notes --port 8000 --collection notes

    POST /notes                    {"body": "..."}        -> 201 {"id", "body"}
    GET  /notes/search?q=...&k=5   nearest notes: ORDER BY embedding <=> embed(q), walking an HNSW index
    GET  /notes/passages?q=...&k=5 longembed.search() over the `notes` collection (chunks, snippets),
                                   joined to the notes table by external id

The app loads no model: SQL `embed()` and `search()` ask the model host, which batches them with
everyone else's texts. A note's vector is written by `embed(body, 'document')` in its own INSERT; with
`--collection`, triggers (longembed.vectorize_table) also queue it for the host's worker, which cuts long
notes into chunks. Errors are JSON `{"error": "..."}`: 400 for bad input (the SQL layer's own message),
404 for an unknown collection, 413 for a body over 1 MiB, 503 when the model host is down.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import sqlalchemy as sa
import uvicorn
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from longembed.plugin.sqlalchemy import Vector, create_engine, embed, on_external_id, search, vectorize_table

MAX_BODY_BYTES = 1 << 20
MAX_K = 100


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "notes"

    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str]
    # The dimension is the host's model's, fixed when `setup` creates the table.
    embedding = mapped_column(Vector())


def setup(admin: sa.Engine, collection: str | None) -> int:
    """Create the table (idempotent) with the model's dimension and an HNSW index, let the application
    role (longembed_writer) use it, and with `collection` vectorize it. Returns the dimension."""
    with admin.begin() as c:
        dim = c.execute(sa.select(sa.func.vector_dims(embed("dimension probe")))).scalar_one()
        c.execute(
            sa.text(
                f"""CREATE TABLE IF NOT EXISTS notes (
                        id bigserial PRIMARY KEY,
                        body text NOT NULL,
                        embedding vector({int(dim)}) NOT NULL)"""
            )
        )
        c.execute(
            sa.text(
                "CREATE INDEX IF NOT EXISTS notes_embedding ON notes USING hnsw (embedding vector_cosine_ops)"
            )
        )
        if c.execute(sa.text("SELECT to_regrole('longembed_writer') IS NOT NULL")).scalar_one():
            c.execute(sa.text("GRANT SELECT, INSERT, UPDATE, DELETE ON notes TO longembed_writer"))
            c.execute(sa.text("GRANT USAGE ON SEQUENCE notes_id_seq TO longembed_writer"))
        if collection:
            vectorize_table(c, Note, "id", "body", collection)
    return dim


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _error_status(error: sa.exc.DBAPIError) -> int | None:
    """The HTTP status for what the SQL layer refused; None for a server fault (a real 500)."""
    sqlstate = getattr(error.orig, "sqlstate", None) or ""
    if sqlstate.startswith("22") or sqlstate == "23514":
        return 400  # data: blank text, k or a filter out of range, a text too long
    if sqlstate == "42704":
        return 404  # no such collection
    if sqlstate.startswith(("08", "53")):
        return 503  # the model host is down or busy
    if isinstance(error, sa.exc.DataError):
        return 400  # refused by the driver before it was sent (a NUL byte)
    return None


def _query_args(request: Request) -> tuple[str, int]:
    q = request.query_params.get("q")
    if q is None:
        raise BadRequest("missing query parameter q")
    try:
        k = int(request.query_params.get("k", "5"))
    except ValueError:
        raise BadRequest("k must be an integer") from None
    if not 1 <= k <= MAX_K:
        raise BadRequest(f"k must be in 1..{MAX_K}, got {k}")
    return q, k


def make_app(engine: sa.Engine, collection: str | None) -> Starlette:
    def add_note(body: str) -> dict[str, Any]:
        with Session(engine) as session, session.begin():
            note = Note(body=body, embedding=embed(body, "document"))
            session.add(note)
            session.flush()
            return {"id": note.id, "body": note.body}

    def nearest(q: str, k: int) -> list[dict[str, Any]]:
        distance = Note.embedding.cosine_distance(embed(q))
        with Session(engine) as session:
            rows = session.execute(sa.select(Note.id, Note.body, distance).order_by(distance).limit(k))
            return [{"id": id_, "body": body, "score": 1.0 - d} for id_, body, d in rows]

    def passages(q: str, k: int) -> list[dict[str, Any]]:
        hits = search(collection, q, k)
        query = (
            sa.select(Note.id, hits.c.score, hits.c.snippet, hits.c.char_start, hits.c.char_end)
            .join(hits, on_external_id(hits, Note.id))
            .order_by(hits.c.score.desc())
        )
        with Session(engine) as session:
            return [row._asdict() for row in session.execute(query)]

    async def post_note(request: Request) -> JSONResponse:
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise BadRequest(f"the body is over {MAX_BODY_BYTES} bytes", 413)
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadRequest(f"the body is not valid JSON: {exc}") from None
        if not isinstance(data, dict) or not isinstance(data.get("body"), str):
            raise BadRequest('the body must be a JSON object with a string "body"')
        return JSONResponse(await run_in_threadpool(add_note, data["body"]), status_code=201)

    async def get_search(request: Request) -> JSONResponse:
        q, k = _query_args(request)
        return JSONResponse(await run_in_threadpool(nearest, q, k))

    async def get_passages(request: Request) -> JSONResponse:
        if collection is None:
            raise BadRequest("no collection: start the app with --collection NAME", 404)
        q, k = _query_args(request)
        return JSONResponse(await run_in_threadpool(passages, q, k))

    async def bad_request(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, BadRequest)
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    async def refused(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, sa.exc.DBAPIError)
        status = _error_status(exc)
        if status is None:
            raise exc
        diag = getattr(exc.orig, "diag", None)
        message = (diag.message_primary if diag else None) or str(exc.orig)
        return JSONResponse({"error": message}, status_code=status)

    return Starlette(
        routes=[
            Route("/notes", post_note, methods=["POST"]),
            Route("/notes/search", get_search),
            Route("/notes/passages", get_passages),
        ],
        exception_handlers={BadRequest: bad_request, sa.exc.DBAPIError: refused},
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m longembed.plugin.examples.notes", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--dsn", help="the application's DSN (default: $LONGEMBED_DSN, else `longembed dsn`)")
    parser.add_argument(
        "--admin-dsn", help="creates the table (default: --dsn, else `longembed dsn --admin`)"
    )
    parser.add_argument("--collection", help="a collection to vectorize the notes into (for /notes/passages)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0: any free port (printed)")
    args = parser.parse_args(argv)

    from longembed.plugin.embedded.server import resolve_dsn
    from longembed.plugin.service.server import bind_tcp

    try:
        dsn = resolve_dsn(args)
        admin = create_engine(args.admin_dsn or args.dsn or resolve_dsn(admin=True))
        try:
            dim = setup(admin, args.collection)
        finally:
            admin.dispose()
    except (RuntimeError, LookupError, ValueError, sa.exc.DBAPIError) as exc:
        # No server, no collection, no model host: one line, as longembed's own commands say it.
        message = exc.orig if isinstance(exc, sa.exc.DBAPIError) else exc
        print(f"notes: error: {str(message).strip()}", file=sys.stderr)
        return 1
    engine = create_engine(dsn, pool_size=8)
    sock = bind_tcp(args.host, args.port)
    host, port = sock.getsockname()[:2]
    print(f"notes: {dim}-d vectors, listening on http://{host}:{port}", flush=True)
    server = uvicorn.Server(uvicorn.Config(make_app(engine, args.collection), log_level="warning"))
    server.run(sockets=[sock])
    engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
