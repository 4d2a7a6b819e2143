-- requires: plpython3u
-- SQL embed() and search() (PL/Python). Rerun on every migrate (CREATE OR REPLACE); skipped with a notice
-- by the runner where the server has no plpython3u (`longembed setup-plpython` builds it for the embedded
-- server).
--
-- No model lives in a backend: longembed.host_embed() sends the texts to the model host (`longembed serve`,
-- started by `longembed up`) with Python's standard library only, and the host batches them with every
-- other caller's. A model per backend would cost each new connection ~2 s and ~400 MiB, and as root the
-- server's OS user cannot even read the virtual environment.
--
-- Where the host is, read from the server's configuration files only (postgresql.conf, an included file,
-- ALTER SYSTEM), never from a session's SET or a role's own defaults: a role that could point it
-- elsewhere would make the server connect anywhere, and receive the key.
--   longembed.host           'unix:/path/to/host.sock' (the embedded server: set by `longembed up`)
--                            or 'http://host:port' (docker-compose, any other server)
--   longembed.host_key_file  a file the server's OS user can read holding the API key (HTTP only)
--   longembed.host_timeout   seconds to wait for vectors (default 120: long documents take a while)
-- The model of embed(): `SET longembed.model = 'name'` in a session (default: the host's first model);
-- the host serves only its own models and those a collection uses.
--
-- STABLE: `ORDER BY embedding <=> embed('...') LIMIT k` then evaluates embed() once and walks the HNSW
-- index; a VOLATILE function would be called per row with a sequential scan.
-- PARALLEL RESTRICTED: the leader asks the host once instead of every worker.
-- search_path is pinned; the bodies name every object with its schema. NULL in, NULL out (STRICT).

CREATE EXTENSION IF NOT EXISTS plpython3u;

-- A longembed.* setting as the configuration files give it (pg_file_settings is for superusers: this
-- definer-rights function shows only our own settings, and nothing a session SET).
CREATE OR REPLACE FUNCTION longembed.host_setting(setting_name text)
RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    SELECT f.setting FROM pg_catalog.pg_file_settings f
     WHERE f.name = setting_name AND f.error IS NULL
       AND setting_name IN ('longembed.host', 'longembed.host_key_file', 'longembed.host_timeout')
     ORDER BY f.seqno DESC LIMIT 1;
END;

-- One request to the model host; NULL elements stay NULL. A small per-backend cache answers repeats: a
-- STABLE function is still evaluated once per row where the planner cannot hoist it (a WHERE clause on
-- a sequential scan).
CREATE OR REPLACE FUNCTION longembed.host_embed(
    inputs text[], kind text, model text DEFAULT NULL, instruction text DEFAULT NULL,
    dim integer DEFAULT NULL, revision text DEFAULT NULL)
RETURNS vector[]
LANGUAGE plpython3u STABLE PARALLEL RESTRICTED
SET search_path = pg_catalog, pg_temp
AS $body$
import base64
import json
import socket
import struct
import time
from collections import OrderedDict

if kind not in ("query", "document"):
    plpy.error("longembed: kind must be 'query' or 'document', got %r" % (kind,),
               hint="queries get the model's query prefix, documents its document prefix",
               sqlstate="22023")
if inputs is None:
    return None

def server_setting(name, default=None):
    # pg_file_settings reads the configuration files: ~0.4 ms a lookup, so a backend keeps the answers
    # for a second (a reload reaches it that late).
    settings = GD.get("longembed_settings")
    if settings is None or time.monotonic() - settings["at"] > 1.0:
        plan = GD.get("longembed_setting_plan")
        if plan is None:
            plan = plpy.prepare(
                "SELECT name, longembed.host_setting(name) AS value FROM unnest($1::text[]) AS name", ["text[]"])
            GD["longembed_setting_plan"] = plan
        names = ["longembed.host", "longembed.host_key_file", "longembed.host_timeout"]
        settings = {row["name"]: row["value"] for row in plpy.execute(plan, [names])}
        settings["at"] = time.monotonic()
        GD["longembed_settings"] = settings
    return settings.get(name) or default

target = server_setting("longembed.host")
if not target:
    plpy.error("longembed: no model host is configured for this server",
               hint="the embedded server: start it with `longembed up`; any other server: set "
                    "longembed.host = 'http://HOST:PORT' in postgresql.conf (or ALTER SYSTEM) and reload",
               sqlstate="55000")
cache = GD.setdefault("longembed_vectors", OrderedDict())
key_base = (target, model or "", kind, instruction, dim)  # two collections of one model may differ in size
out = [None] * len(inputs)
missing = {}
for i, text in enumerate(inputs):
    if text is None:
        continue
    if not text.strip():  # the rule of search() too: nothing to embed, and [CLS][SEP] is near anything
        plpy.error("longembed: the text is empty (or only whitespace): nothing to embed",
                   detail="input %d of %d" % (i + 1, len(inputs)), sqlstate="22000")
    hit = cache.get(key_base + (text,))
    if hit is not None:
        cache.move_to_end(key_base + (text,))
        out[i] = hit
    else:
        missing.setdefault(text, []).append(i)
if not missing:
    return out

def post_unix(path, body, timeout):
    # HTTP/1.1 over the host's Unix socket by hand: importing http.client (and the email package it
    # pulls in) would cost a new backend's first embed() ~25 ms; this takes well under one.
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
        parts = []
        while True:
            data = sock.recv(1 << 16)
            if not data:
                break
            parts.append(data)
    finally:
        sock.close()
    head_, sep, payload = b"".join(parts).partition(b"\r\n\r\n")
    lines = head_.decode("latin-1").split("\r\n")
    if not sep or not lines[0].startswith("HTTP/1."):
        raise OSError("the answer ended early or is not HTTP")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        chunks, rest = [], payload
        while True:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            chunks.append(rest[:size])
            rest = rest[size + 2:]
        payload = b"".join(chunks)
    elif "content-length" in headers and len(payload) != int(headers["content-length"]):
        raise OSError("the answer ended early")
    return status, headers, payload

try:
    timeout = float(server_setting("longembed.host_timeout", "120"))
except ValueError:
    timeout = 120.0
if target.startswith("unix:"):
    def post(body):
        return post_unix(target[len("unix:"):], body, timeout)
elif target.startswith(("http://", "https://")):
    import http.client
    from urllib.parse import urlsplit
    url = urlsplit(target)
    cls = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
    headers = {"Content-Type": "application/json"}
    key_file = server_setting("longembed.host_key_file")
    if key_file:
        try:
            with open(key_file) as f:
                headers["Authorization"] = "Bearer " + f.read().strip()
        except OSError as exc:
            plpy.error("longembed: cannot read longembed.host_key_file: %s" % exc, sqlstate="58030")

    def post(body):
        conn = cls(url.hostname, url.port, timeout=timeout)
        try:
            conn.request("POST", "/v1/embeddings", body, headers)
            response = conn.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        except http.client.HTTPException as exc:
            raise OSError(str(exc)) from exc
        finally:
            conn.close()
else:
    plpy.error("longembed: longembed.host must start with unix:, http:// or https://, got %r" % target,
               sqlstate="22023")

def head(text, limit=500000):
    # Only a text's first tokens are embedded (the model's window is at most 8192 tokens, ~50,000
    # characters), so a longer text is cut at a whitespace before `limit`: the vector stays the same and
    # the request stays under the host's limit on characters per input (1,000,000 by default).
    if len(text) <= limit:
        return text
    cut = max(text.rfind(" ", 0, limit), text.rfind("\n", 0, limit))
    return text[: cut if cut > 0 else limit]

texts = list(missing)
body = {"input": [head(text) for text in texts], "kind": kind, "encoding_format": "base64"}
if model:
    body["model"] = model
if instruction is not None:
    body["instruction"] = instruction
if dim is not None:
    # The collection's size: the model's own, or a Matryoshka size the host cuts its vectors to.
    body["dimensions"] = dim
# A host that is loading its models or whose queue is full answers 503/429 with Retry-After: wait
# (up to the timeout) rather than fail; the SELECT between tries lets a query cancel get through.
deadline = time.monotonic() + timeout
request = json.dumps(body).encode()
while True:
    try:
        status, response_headers, payload = post(request)
    except (OSError, ValueError) as exc:
        plpy.error("longembed: the model host at %s did not answer (%s)" % (target, exc),
                   hint="is it running? `longembed status` shows it; `longembed up` starts it",
                   sqlstate="08006")
    if status not in (429, 503) or time.monotonic() >= deadline:
        break
    try:
        wait = float(response_headers.get("retry-after") or 1)
    except ValueError:
        wait = 1.0
    time.sleep(max(0.05, min(wait, 0.5, deadline - time.monotonic())))
    plpy.execute("SELECT 1")
try:
    answer = json.loads(payload)
except ValueError:
    answer = {}
if status != 200:
    error = answer.get("error") if isinstance(answer, dict) else None
    message = error.get("message") if isinstance(error, dict) else payload[:200].decode("utf-8", "replace")
    sqlstate = {400: "22023", 401: "28000", 403: "42501", 404: "42704", 413: "54000",
                429: "53000", 503: "53000"}.get(status, "XX000")
    plpy.error("longembed: %s" % message, detail="model host answered HTTP %d" % status,
               sqlstate=sqlstate)
served = answer.get("longembed") or {}
if dim is not None or revision is not None:
    if revision is not None and served.get("revision") not in (None, revision):
        plpy.error("longembed: the collection was embedded with revision %s of %s; the host serves "
                   "revision %s" % (revision, answer.get("model"), served.get("revision")),
                   hint="serve the weights the collection was made with, or embed the collection "
                        "again into a new collection with the new ones", sqlstate="22000")
for item in answer["data"]:
    raw = base64.b64decode(item["embedding"])
    values = struct.unpack("<%df" % (len(raw) // 4), raw)
    if dim is not None and len(values) != dim:
        plpy.error("longembed: dimension mismatch: the collection has %d-d vectors, model %s gives %d-d"
                   % (dim, answer.get("model"), len(values)), sqlstate="22000")
    # repr() of a float32 widened to a float is the shortest text that parses back to the same float32.
    literal = "[" + ",".join(map(repr, values)) + "]"
    text = texts[item["index"]]
    for i in missing[text]:
        out[i] = literal
    if len(text) <= 10000:
        cache[key_base + (text,)] = literal
        if len(cache) > 256:
            cache.popitem(last=False)
return out
$body$;

CREATE OR REPLACE FUNCTION longembed.embed(inputs text[], kind text DEFAULT 'query')
RETURNS vector[]
LANGUAGE sql STRICT STABLE PARALLEL RESTRICTED
SET search_path = pg_catalog, pg_temp
RETURN longembed.host_embed(inputs, kind, nullif(current_setting('longembed.model', true), ''));

CREATE OR REPLACE FUNCTION longembed.embed(input text, kind text DEFAULT 'query')
RETURNS vector
LANGUAGE sql STRICT STABLE PARALLEL RESTRICTED
SET search_path = pg_catalog, pg_temp
RETURN (longembed.host_embed(ARRAY[input], kind, nullif(current_setting('longembed.model', true), '')))[1];

-- The query vector for a collection: its model, its query prefix, its dimension and revision.
CREATE OR REPLACE FUNCTION longembed.embed_query(collection text, query text)
RETURNS vector
LANGUAGE plpgsql STRICT STABLE PARALLEL RESTRICTED
SET search_path = pg_catalog, pg_temp
AS $body$
DECLARE
    c longembed.collections;
BEGIN
    SELECT * INTO c FROM longembed.collections WHERE name = collection;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'longembed: no collection named %', quote_literal(collection)
            USING ERRCODE = 'undefined_object', HINT = 'SELECT name FROM longembed.collections';
    END IF;
    RETURN (longembed.host_embed(ARRAY[query], 'query', c.model_source, c.query_prefix, c.dim,
                                 c.model_revision))[1];
END;
$body$;

-- Schema version 2 added `truncated` to the result: drop an older definition first (CREATE OR REPLACE
-- cannot change result columns); CASCADE takes the public wrapper depending on it, recreated below.
DO $do$
BEGIN
    IF to_regprocedure('longembed.search(text,text,integer,jsonb,boolean,integer)') IS NOT NULL
       AND NOT EXISTS (
           SELECT 1 FROM pg_proc
           WHERE oid = to_regprocedure('longembed.search(text,text,integer,jsonb,boolean,integer)')
             AND 'truncated' = ANY(proargnames)) THEN
        DROP FUNCTION longembed.search(text, text, integer, jsonb, boolean, integer) CASCADE;
    END IF;
END;
$do$;

-- Schema version 5 added the search mode and fusion options: the six-argument search is dropped (the
-- new one takes the same first six, so old calls still work); CASCADE takes the public wrapper,
-- recreated by 025_public_wrappers.sql.
DO $do$
BEGIN
    IF to_regprocedure('longembed.search(text,text,integer,jsonb,boolean,integer)') IS NOT NULL THEN
        DROP FUNCTION longembed.search(text, text, integer, jsonb, boolean, integer) CASCADE;
    END IF;
END;
$do$;

-- Top-k documents of a collection for a text query: the same rows as longembed.plugin.store.search.search() and
-- `longembed search` (all three end in longembed.search_modes, 015_search.sql). `mode`: dense, chunks,
-- lexical, hybrid or auto; NULL: the collection's search_mode. `weights`, `fusion`, `rrf_k`: hybrid's
-- options. `hybrid`: deprecated, true is mode 'hybrid'.
CREATE OR REPLACE FUNCTION longembed.search(
    collection text, query text, k integer DEFAULT 10, filter jsonb DEFAULT NULL,
    hybrid boolean DEFAULT NULL, ef_search integer DEFAULT NULL, mode text DEFAULT NULL,
    weights jsonb DEFAULT NULL, fusion text DEFAULT NULL, rrf_k integer DEFAULT NULL)
RETURNS TABLE (external_id text, score double precision, chunk_ordinal integer, char_start integer,
               char_end integer, snippet text, metadata jsonb, truncated boolean)
LANGUAGE plpgsql
AS $body$
DECLARE
    v_options jsonb;
    v_vector  vector;
BEGIN
    IF collection IS NULL OR query IS NULL THEN
        RAISE EXCEPTION 'longembed: search needs a collection and a query, got NULL'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF hybrid THEN
        IF mode IS NOT NULL AND mode <> 'hybrid' THEN
            RAISE EXCEPTION 'longembed: hybrid => true is mode hybrid, but mode is %', quote_literal(mode)
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        mode := 'hybrid';
    END IF;
    v_options := longembed.search_options(collection, mode, weights, fusion, rrf_k);
    -- The query is embedded only where a vector signal is used (lexical search needs no model host).
    IF v_options ->> 'mode' = 'chunks' OR coalesce((v_options #>> '{weights,dense}')::float8, 0) > 0
       OR coalesce((v_options #>> '{weights,chunks}')::float8, 0) > 0 THEN
        v_vector := longembed.embed_query(collection, query);
    END IF;
    RETURN QUERY SELECT * FROM longembed.search_modes(
        collection, query, v_vector, k, filter, ef_search, mode, weights, fusion, rrf_k);
END;
$body$;
