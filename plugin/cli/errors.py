"""One error policy and one set of exit codes for every `longembed` command.

- 0 `OK`: done.
- 1 `FAILURE`: the command was right but the work failed or was partial (inputs skipped, documents
  parked, the database or the embedded server unreachable or failing).
- 2 `USAGE`: fix the command line or its input (bad arguments, as argparse; unknown collection, bad
  JSON filter, unreadable input, a model that cannot be loaded).
- 3 `NOT_RUNNING`: `longembed status` when the server is not running (as `pg_ctl status`).
- 130 `INTERRUPTED`: Ctrl-C.

Expected errors print one line, `longembed: error: <message>`, with no traceback. Anything else, and
any exception raised outside longembed's own code (torch, CUDA, numpy), keeps Python's traceback:
hiding it would hide the cause.
"""

from __future__ import annotations

import sys
from types import TracebackType

import psycopg

OK = 0
FAILURE = 1
USAGE = 2
NOT_RUNNING = 3
INTERRUPTED = 130


class UsageError(ValueError):
    """The command line or its input is wrong: exit 2."""


class CommandFailed(RuntimeError):
    """The work failed for a reason the message explains: exit 1."""


def _usage_errors() -> tuple[type[BaseException], ...]:
    from longembed.plugin.settings import SettingsError
    from longembed.plugin.store.collections import CollectionNotFound

    # ValueError covers ModelLoadError, InvalidDocument and our validation; LookupError CollectionNotFound.
    return (UsageError, SettingsError, CollectionNotFound, ValueError)


def _failure_errors() -> tuple[type[BaseException], ...]:
    from longembed.plugin.embedded.plpython import PlpythonSetupError
    from longembed.plugin.embedded.server import ServerError
    from longembed.plugin.migrate import MigrationError
    from longembed.plugin.service.supervisor import HostError

    return (CommandFailed, ServerError, PlpythonSetupError, MigrationError, HostError, psycopg.Error, OSError)


def _raised_by_longembed(exc: BaseException) -> bool:
    """Whether the innermost frame of `exc` is longembed's code (not torch's, numpy's, ...)."""
    tb: TracebackType | None = exc.__traceback__
    module = ""
    while tb is not None:
        module = tb.tb_frame.f_globals.get("__name__", "")
        tb = tb.tb_next
    return module.startswith("longembed.")


def report(message: str) -> None:
    print(f"longembed: error: {message}", file=sys.stderr)


def run_command(args: object) -> int:
    """Run `args.run(args)` under the policy above; returns the exit status."""
    try:
        return int(args.run(args) or OK)  # type: ignore[attr-defined]
    except KeyboardInterrupt:
        print("longembed: interrupted", file=sys.stderr)
        return INTERRUPTED
    except BaseException as exc:
        code = _exit_code(exc)
        if code is None:
            raise
        report(_message(exc))
        return code


def _exit_code(exc: BaseException) -> int | None:
    if isinstance(exc, psycopg.OperationalError | psycopg.errors.InsufficientPrivilege):
        return FAILURE
    if isinstance(exc, _failure_errors()):
        # An OSError from torch's file handling or a driver is not ours to summarise.
        return FAILURE if not isinstance(exc, OSError) or _raised_by_longembed(exc) else None
    if isinstance(exc, _usage_errors()):
        return USAGE if _raised_by_longembed(exc) else None
    return None


def _message(exc: BaseException) -> str:
    if isinstance(exc, psycopg.OperationalError):
        return f"cannot reach the database: {str(exc).strip()}"
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror or exc}"
    return str(exc).strip() or type(exc).__name__
