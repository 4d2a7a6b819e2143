"""`longembed up | down | status | dsn | psql | setup-plpython`: the embedded PostgreSQL server."""

from __future__ import annotations

import argparse
import json
import os
import sys

from longembed.plugin.cli import errors, options
from longembed.plugin.embedded.server import EmbeddedServer, ServerError, bundled_pginstall, resolve_dsn


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register this module's subcommands; each sets `run=callable(args) -> int`."""
    p = sub.add_parser("up", help="start the embedded PostgreSQL server (initialise it on first use)")
    p.add_argument(
        "--port", type=int, help="TCP port on 127.0.0.1 (default: $LONGEMBED_PORT, else the last one)"
    )
    p.set_defaults(run=_cmd_up)

    p = sub.add_parser("down", help="stop the embedded server (fast shutdown)")
    p.set_defaults(run=_cmd_down)

    p = sub.add_parser("status", help="is the embedded server running; where it lives")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.set_defaults(run=_cmd_status)

    p = sub.add_parser("dsn", help="print the connection URI of the embedded server (with its password)")
    p.add_argument("--no-password", action="store_true", help="leave the password out")
    p.set_defaults(run=_cmd_dsn)

    p = sub.add_parser("psql", help="open psql on the database (embedded server, --dsn or $LONGEMBED_DSN)")
    options.dsn(p)
    p.add_argument("-c", "--command", action="append", help="run this SQL and exit (repeatable)")
    p.add_argument("-f", "--file", help="run the SQL in this file and exit")
    p.add_argument("psql_args", nargs=argparse.REMAINDER, help="after --: more psql arguments")
    p.set_defaults(run=_cmd_psql)

    p = sub.add_parser(
        "setup-plpython",
        help="build PL/Python (plpython3u) for the embedded server, needed by the SQL embed() (once, cached)",
    )
    p.add_argument("--force", action="store_true", help="rebuild even when a build is cached")
    p.set_defaults(run=_cmd_setup_plpython)


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
    system_python = plpython.system_python_version()
    ours = f"{sys.version_info.major}.{sys.version_info.minor}"
    if system_python != ours:
        print(
            f"warning: PL/Python runs the system Python {system_python}, longembed runs on {ours}: "
            f"SQL embed() needs longembed and its packages installed for Python {system_python}",
            file=sys.stderr,
        )
    for path in server.unreadable_python_paths():
        print(
            f"warning: user {server.run_as} cannot read {path}: SQL embed() will not find longembed's "
            "Python packages; install them where that user can read them",
            file=sys.stderr,
        )
    print("connection URI: longembed dsn")
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    server = EmbeddedServer()
    print("stopped" if server.stop() else "not running")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    """Exit status 0 when running, 3 when not (as pg_ctl status), so scripts can test it."""
    from longembed.plugin.embedded import plpython

    server = EmbeddedServer()
    status = server.status()
    plpython = plpython.installed_dir(bundled_pginstall())  # a copy would have the same version
    if args.json:
        print(json.dumps(status.as_dict() | {"plpython": str(plpython) if plpython else None}, indent=2))
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
    print(f"PL/Python: {plpython}" if plpython else "PL/Python: not built (`longembed setup-plpython`)")
    return errors.OK if status.running else errors.NOT_RUNNING


def _cmd_dsn(args: argparse.Namespace) -> int:
    server = EmbeddedServer()
    if server.running_pid() is None:
        raise ServerError("the embedded server is not running: start it with `longembed up`")
    print(server.dsn(with_password=not args.no_password))
    return 0


def _cmd_psql(args: argparse.Namespace) -> int:
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    dsn = resolve_dsn(args)
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
