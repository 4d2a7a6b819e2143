"""The environment variables longembed reads, parsed and checked in one place.

- `LONGEMBED_HOME`: the embedded server's home (data, socket, log, password); default
  `$XDG_DATA_HOME/longembed` (`~/.local/share/longembed`), for root `/var/lib/longembed`;
- `LONGEMBED_PORT`: TCP port of the embedded server on 127.0.0.1; default the last one, else a free one;
- `LONGEMBED_DSN`: use this PostgreSQL instead of the embedded server (`--dsn` wins);
- `LONGEMBED_SERVICE_USER`: as root, the unprivileged user the server runs as; default `longembed`;
- `LONGEMBED_CACHE`: the PL/Python build cache; default `$XDG_CACHE_HOME/longembed` (`~/.cache/longembed`),
  for root `/var/cache/longembed`;
- `LONGEMBED_HTTP_PORT`: the HTTP port of the model host that `longembed up` starts; default 8080;
- `LONGEMBED_API_KEYS`: API keys the model host accepts, comma-separated (beside `--api-key-file`).

Read elsewhere, because the layers below the plugin do not import it: `LONGEMBED_KERNELS`
(`auto|triton|torch`, triton_kernels/dispatch.py, read at every call so a process may switch),
`LONGEMBED_CPU_BACKEND` and `LONGEMBED_ONNX_MIN_COSINE` (encoder/onnx_cpu.py, read at model load, which
also reads `LONGEMBED_CACHE` for exports of read-only model folders),
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
    "LONGEMBED_HTTP_PORT",
    "LONGEMBED_API_KEYS",
    "XDG_DATA_HOME",
    "XDG_CACHE_HOME",
)
ROOT_HOME = Path("/var/lib/longembed")
ROOT_CACHE = Path("/var/cache/longembed")
DEFAULT_SERVICE_USER = "longembed"
DEFAULT_HTTP_PORT = 8080


class SettingsError(ValueError):
    """An environment variable holds a value longembed cannot use; the message names it."""


@dataclass(frozen=True)
class Settings:
    home: Path
    port: int | None
    dsn: str | None
    service_user: str
    cache: Path
    http_port: int
    api_keys: tuple[str, ...]


def settings() -> Settings:
    """The current settings (see the module docstring)."""
    return _parse(tuple(os.environ.get(name) or None for name in NAMES), os.geteuid() == 0)


@functools.cache
def _parse(values: tuple[str | None, ...], as_root: bool) -> Settings:
    env = dict(zip(NAMES, values, strict=True))
    http_port = _port("LONGEMBED_HTTP_PORT", env["LONGEMBED_HTTP_PORT"], zero=True)
    return Settings(
        home=_home(env, as_root),
        port=_port("LONGEMBED_PORT", env["LONGEMBED_PORT"]),
        dsn=env["LONGEMBED_DSN"],
        service_user=env["LONGEMBED_SERVICE_USER"] or DEFAULT_SERVICE_USER,
        cache=_cache(env, as_root),
        http_port=DEFAULT_HTTP_PORT if http_port is None else http_port,
        api_keys=tuple(k.strip() for k in (env["LONGEMBED_API_KEYS"] or "").split(",") if k.strip()),
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


def _port(name: str, value: str | None, *, zero: bool = False) -> int | None:
    """A TCP port; `zero`: 0 is allowed (no TCP listener)."""
    if value is None:
        return None
    try:
        port = int(value)
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {value!r}") from None
    if not (0 if zero else 1) <= port <= 65535:
        raise SettingsError(f"{name} must be in {0 if zero else 1}..65535, got {port}")
    return port
