"""The environment variables longembed reads, parsed and checked in one place.

- `LONGEMBED_HOME`: the embedded server's home (data, socket, log, password); default
  `$XDG_DATA_HOME/longembed` (`~/.local/share/longembed`), for root `/var/lib/longembed`;
- `LONGEMBED_PORT`: TCP port of the embedded server on 127.0.0.1; default the last one, else a free one;
- `LONGEMBED_DSN`: use this PostgreSQL instead of the embedded server (`--dsn` wins);
- `LONGEMBED_SERVICE_USER`: as root, the unprivileged user the server runs as; default `longembed`;
- `LONGEMBED_CACHE`: the PL/Python build cache; default `$XDG_CACHE_HOME/longembed` (`~/.cache/longembed`),
  for root `/var/cache/longembed`.

Read elsewhere, because the layers below the plugin do not import it: `LONGEMBED_KERNELS`
(`auto|triton|torch`, triton_kernels/dispatch.py, read at every call so a process may switch),
`HF_HUB_OFFLINE` (the model loader), `LONGEMBED_TEST_DSN` (the tests).

`settings()` parses the environment once per distinct set of values: objects such as the embedded
server read it once when they are made, and a changed environment (tests, a parent setting a variable)
is seen by the next object.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

NAMES = (
    "LONGEMBED_HOME",
    "LONGEMBED_PORT",
    "LONGEMBED_DSN",
    "LONGEMBED_SERVICE_USER",
    "LONGEMBED_CACHE",
    "XDG_DATA_HOME",
    "XDG_CACHE_HOME",
)
ROOT_HOME = Path("/var/lib/longembed")
ROOT_CACHE = Path("/var/cache/longembed")
DEFAULT_SERVICE_USER = "longembed"


class SettingsError(ValueError):
    """An environment variable holds a value longembed cannot use; the message names it."""


@dataclass(frozen=True)
class Settings:
    home: Path
    port: int | None
    dsn: str | None
    service_user: str
    cache: Path


def settings() -> Settings:
    """The current settings (see the module docstring)."""
    return _parse(tuple(os.environ.get(name) or None for name in NAMES), os.geteuid() == 0)


@functools.cache
def _parse(values: tuple[str | None, ...], as_root: bool) -> Settings:
    env = dict(zip(NAMES, values, strict=True))
    return Settings(
        home=_home(env, as_root),
        port=_port(env["LONGEMBED_PORT"]),
        dsn=env["LONGEMBED_DSN"],
        service_user=env["LONGEMBED_SERVICE_USER"] or DEFAULT_SERVICE_USER,
        cache=_cache(env, as_root),
    )


def _home(env: dict[str, str | None], as_root: bool) -> Path:
    if env["LONGEMBED_HOME"]:
        return Path(env["LONGEMBED_HOME"]).expanduser().absolute()
    if as_root:
        return ROOT_HOME  # root's own home (/root, 0700) is out of the service user's reach
    return Path(env["XDG_DATA_HOME"] or Path.home() / ".local" / "share") / "longembed"


def _cache(env: dict[str, str | None], as_root: bool) -> Path:
    if env["LONGEMBED_CACHE"]:
        return Path(env["LONGEMBED_CACHE"]).expanduser().absolute()
    if as_root:
        return ROOT_CACHE
    return Path(env["XDG_CACHE_HOME"] or Path.home() / ".cache") / "longembed"


def _port(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        port = int(value)
    except ValueError:
        raise SettingsError(f"LONGEMBED_PORT must be a number, got {value!r}") from None
    if not 1 <= port <= 65535:
        raise SettingsError(f"LONGEMBED_PORT must be in 1..65535, got {port}")
    return port
