"""plugin/settings.py: one parse of the environment, defaults by user, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from longembed.plugin import settings as settings_module
from longembed.plugin.settings import ROOT_CACHE, ROOT_HOME, SettingsError, settings


def _parse(as_root: bool, **env: str):
    values = tuple(env.get(name) for name in settings_module.NAMES)
    return settings_module._parse(values, as_root)


def test_defaults_for_root_and_for_a_user():
    root = _parse(True)
    assert (root.home, root.cache, root.port, root.dsn, root.service_user) == (
        ROOT_HOME,
        ROOT_CACHE,
        None,
        None,
        "longembed",
    )
    user = _parse(False, XDG_DATA_HOME="/x/data", XDG_CACHE_HOME="/x/cache")
    assert (user.home, user.cache) == (Path("/x/data/longembed"), Path("/x/cache/longembed"))


def test_explicit_values_win_and_are_frozen():
    s = _parse(True, LONGEMBED_HOME="/srv/le", LONGEMBED_PORT="5999", LONGEMBED_DSN="host=db",
               LONGEMBED_SERVICE_USER="svc", LONGEMBED_CACHE="/c")  # fmt: skip
    assert (s.home, s.port, s.dsn, s.service_user, s.cache) == (
        Path("/srv/le"),
        5999,
        "host=db",
        "svc",
        Path("/c"),
    )
    with pytest.raises(AttributeError):
        s.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("value", "message"), [("54x", "must be a number"), ("70000", r"must be in 1\.\.65535")]
)
def test_bad_port_is_a_clear_error(value, message):
    with pytest.raises(SettingsError, match=f"LONGEMBED_PORT {message}"):
        _parse(False, LONGEMBED_PORT=value)


def test_settings_follow_the_environment(monkeypatch):
    monkeypatch.setenv("LONGEMBED_HOME", "/tmp/one")
    assert settings().home == Path("/tmp/one")
    monkeypatch.setenv("LONGEMBED_HOME", "/tmp/two")
    assert settings().home == Path("/tmp/two")
