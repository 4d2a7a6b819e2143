"""`longembed up | down | status | dsn | psql | setup-plpython`: the embedded PostgreSQL server and the
model host (`longembed serve`) that `up` runs beside it."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

from longembed.plugin.cli import errors, options
from longembed.plugin.embedded.server import (
    EmbeddedServer,
    ServerError,
    bundled_pginstall,
    port_is_free,
    resolve_dsn,
)
from longembed.plugin.service.supervisor import HostError, HostProcess
from longembed.plugin.settings import DEFAULT_HTTP_PORT, settings


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register this module's subcommands; each sets `run=callable(args) -> int`."""
    p = sub.add_parser(
        "up", help="start the embedded PostgreSQL server (initialised on first use) and the model host"
    )
    p.add_argument(
        "--port", type=int, help="TCP port on 127.0.0.1 (default: $LONGEMBED_PORT, else the last one)"
    )
    p.add_argument(
        "--http-port",
        type=int,
        default=None,
        help="the model host's HTTP port on 127.0.0.1 (default: $LONGEMBED_HTTP_PORT, else "
        f"{DEFAULT_HTTP_PORT}); 0: only its Unix socket, which SQL embed() uses",
    )
    p.add_argument(
        "--model",
        action="append",
        help="a model for the host to serve (repeatable; default: the bundled all-MiniLM-L6-v2)",
    )
    p.add_argument(
        "--threads",
        type=int,
        help="the host's torch threads (default: cores - 1; all cores answer a lone query faster)",
    )
    p.add_argument(
        "--hnsw",
        action="append",
        metavar="COLLECTION",
        help="the host searches this collection through an hnswlib index kept in sync (repeatable; needs "
        "`pip install longembed[fast]`; indexes saved under hnsw/ in LONGEMBED_HOME)",
    )
    p.add_argument("--no-host", action="store_true", help="start PostgreSQL only (SQL embed() then fails)")
    p.set_defaults(run=_cmd_up)

    p = sub.add_parser("down", help="stop the model host and the embedded server (fast shutdown)")
    p.set_defaults(run=_cmd_down)

    p = sub.add_parser("status", help="is the embedded server running; where it lives")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.set_defaults(run=_cmd_status)

    p = sub.add_parser(
        "dsn", help="print the connection URI of the embedded server's application role (with its password)"
    )
    p.add_argument("--no-password", action="store_true", help="leave the password out")
    _admin_option(p)
    p.set_defaults(run=_cmd_dsn)

    p = sub.add_parser("psql", help="open psql on the database (embedded server, --dsn or $LONGEMBED_DSN)")
    options.dsn(p)
    p.add_argument("-c", "--command", action="append", help="run this SQL and exit (repeatable)")
    p.add_argument("-f", "--file", help="run the SQL in this file and exit")
    _admin_option(p)
    p.add_argument("psql_args", nargs=argparse.REMAINDER, help="after --: more psql arguments")
    p.set_defaults(run=_cmd_psql)

    p = sub.add_parser(
        "setup-plpython",
        help="build PL/Python (plpython3u) for the embedded server, needed by the SQL embed() (once, cached)",
    )
    p.add_argument("--force", action="store_true", help="rebuild even when a build is cached")
    p.set_defaults(run=_cmd_setup_plpython)


def _admin_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--admin",
        action="store_true",
        help="the embedded server's superuser instead of the application role longembed_app",
    )


def _cmd_up(args: argparse.Namespace) -> int:
    from longembed.plugin.embedded import plpython

    server = EmbeddedServer()
    was_running = server.running_pid() is not None
    status = server.start(port=args.port)
    if was_running:
        print(f"already running (pid {status.pid}) on 127.0.0.1:{status.port}")
        if args.port is not None and args.port != status.port:
            print(f"warning: --port {args.port} ignored; `longembed down` first to move it", file=sys.stderr)
    else:
        print(f"started PostgreSQL on 127.0.0.1:{status.port} (pid {status.pid}, data in {status.data_dir})")
    if plpython.installed_dir(server.pginstall()) is None:
        print(
            "note: PL/Python is not built; SQL embed() needs it: run `longembed setup-plpython`",
            file=sys.stderr,
        )
    if not args.no_host:
        _start_host(server, args)
    print("connection URI: longembed dsn")
    return 0


def host_of(server: EmbeddedServer) -> HostProcess:
    return HostProcess(server.home, server.host_socket, server.home / "log" / "host.log")


def host_serve_args(
    server: EmbeddedServer,
    http_port: int,
    models: list[str] | tuple[str, ...] = (),
    threads: int | None = None,
    hnsw: list[str] | tuple[str, ...] = (),
) -> list[str]:
    """`longembed serve` arguments for the host beside `server`: its socket (handed to the server's OS
    user as root, so backends connect), the HTTP port (0: none), models, torch threads and the
    collections searched through hnswlib."""
    args = ["--socket", str(server.host_socket), "--port", str(http_port)]
    if server.service_user is not None:
        args += ["--socket-user", server.service_user]
    for model in models:
        args += ["--model", model]
    if threads is not None:
        args += ["--threads", str(threads)]
    for collection in hnsw:
        args += ["--hnsw", collection]
    return args


def _start_host(server: EmbeddedServer, args: argparse.Namespace) -> None:
    host = host_of(server)
    pid = host.running_pid()
    if pid is not None:
        print(f"model host already running (supervisor pid {pid}): unix:{server.host_socket}")
        return
    http_port = settings().http_port if args.http_port is None else args.http_port
    if http_port and not port_is_free(http_port):
        raise HostError(
            f"port {http_port} on 127.0.0.1 is in use: pass --http-port N (0: only the Unix socket)"
        )
    if args.hnsw and importlib.util.find_spec("hnswlib") is None:
        # Found here, not in the supervised host's log after `up` said it started.
        raise errors.UsageError("--hnsw needs hnswlib: pip install 'longembed[fast]'")
    serve_args = host_serve_args(server, http_port, args.model or [], args.threads, args.hnsw or [])
    # The application role, not the superuser; in the environment, not in argv (ps shows argv to all).
    env = dict(os.environ, LONGEMBED_DSN=server.app_dsn())
    pid = host.start(serve_args, env)
    where = f"unix:{server.host_socket}" + (f" and http://127.0.0.1:{http_port}" if http_port else "")
    print(f"started the model host on {where} (supervisor pid {pid}, log {host.log_file})")


def _cmd_down(args: argparse.Namespace) -> int:
    server = EmbeddedServer()
    if host_of(server).stop():
        print("model host stopped")
    print("stopped" if server.stop() else "not running")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    """Exit status 0 when running, 3 when not (as pg_ctl status), so scripts can test it."""
    from longembed.plugin.embedded import plpython

    server = EmbeddedServer()
    status = server.status()
    plpython_dir = plpython.installed_dir(bundled_pginstall())  # a copy would have the same version
    host = host_of(server)
    host_pid = host.running_pid()
    ready = host.get("/ready") if host_pid is not None else None
    host_status = {
        "running": host_pid is not None,
        "supervisor_pid": host_pid,
        "socket": str(server.host_socket),
        "ready": ready is not None and ready[0] == 200,
        "log": str(host.log_file),
    }
    if args.json:
        extra = {"plpython": str(plpython_dir) if plpython_dir else None, "host": host_status}
        print(json.dumps(status.as_dict() | extra, indent=2))
        return errors.OK if status.running else errors.NOT_RUNNING
    if status.running:
        print(
            f"running: pid {status.pid}, 127.0.0.1:{status.port}, "
            f"data {status.data_dir}, user {status.run_as}"
        )
    elif status.initialised:
        print(f"stopped (data in {status.data_dir}); start it with `longembed up`")
    else:
        print(f"not set up ({status.home}); start it with `longembed up`")
    if host_pid is None:
        print("model host: not running (`longembed up` starts it)")
    else:
        state = "ready" if host_status["ready"] else f"not ready ({ready[1] if ready else 'no answer'})"
        print(f"model host: {state}, supervisor pid {host_pid}, unix:{server.host_socket}")
    print(
        f"PL/Python: {plpython_dir}" if plpython_dir else "PL/Python: not built (`longembed setup-plpython`)"
    )
    return errors.OK if status.running else errors.NOT_RUNNING


def _cmd_dsn(args: argparse.Namespace) -> int:
    server = EmbeddedServer()
    if server.running_pid() is None:
        raise ServerError("the embedded server is not running: start it with `longembed up`")
    dsn = server.dsn if args.admin else server.app_dsn
    print(dsn(with_password=not args.no_password))
    return 0


def _cmd_psql(args: argparse.Namespace) -> int:
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    dsn = resolve_dsn(args, admin=args.admin)
    # The password travels in the environment, not in argv (visible to every user in ps).
    params = conninfo_to_dict(dsn)
    password = params.pop("password", None)
    env = dict(os.environ)
    if password is not None:
        env["PGPASSWORD"] = str(password)
    psql = str(bundled_pginstall() / "bin" / "psql")
    extra = ["--no-psqlrc", "--set=ON_ERROR_STOP=1"] if args.command or args.file else []
    for command in args.command or []:
        extra += ["--command", command]
    if args.file:
        extra += ["--file", args.file]
    extra += args.psql_args[1:] if args.psql_args[:1] == ["--"] else args.psql_args
    sys.stdout.flush()
    os.execve(psql, [psql, "--dbname", make_conninfo(**params), *extra], env)
    return 0  # not reached


def _cmd_setup_plpython(args: argparse.Namespace) -> int:
    from longembed.plugin.embedded import plpython

    server = EmbeddedServer()
    # The bundled pg_config, even where the server runs a copy (same version, same build).
    folder = plpython.setup(bundled_pginstall(), force=args.force)
    if server.running_pid() is not None:
        server.reload_settings()
        print("the running server now finds plpython3u (settings reloaded)")
    print(f"plpython3u for the embedded server: {folder}")
    return 0
