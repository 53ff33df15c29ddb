"""Settings: one resolution function, precedence, coercion, and errors that say where."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.config import Config

from alembic_autolock import ConfigError
from alembic_autolock._config import load_config
from alembic_autolock._settings import Settings, resolve_settings


def _ini(tmp_path: Path, body: str, toml: str | None = None) -> Config:
    ini = tmp_path / "alembic.ini"
    ini.write_text("[alembic]\nscript_location = somewhere\n\n" + body)
    if toml is not None:
        (tmp_path / "pyproject.toml").write_text(toml)
    return load_config(str(ini), environ={})


def test_defaults_without_any_source() -> None:
    """With nothing set, every key has its documented default."""
    s = resolve_settings({}, None, environ={})
    assert (s.lock, s.timeout, s.cache_ttl, s.mode, s.transaction) == (
        "auto",
        30.0,
        300.0,
        "upgrade",
        "all",
    )
    assert (s.environment, s.allow_downgrade, s.version_table) == (
        "development",
        True,
        "alembic_version",
    )
    assert s.production_environments == frozenset({"production", "prod"})


def test_precedence_kwarg_env_ini_toml_default(tmp_path: Path) -> None:
    """Keyword arguments beat ALEMBIC_AUTOLOCK_*, which beat alembic.ini, which beats toml."""
    cfg = _ini(
        tmp_path,
        "[alembic_autolock]\ntimeout = 11\ncache_ttl = 12\nmode = check\n",
        toml='[tool.alembic_autolock]\ntimeout = 21\ncache_ttl = 22\nmode = "off"\nlock_ttl = 23\n',
    )
    env = {"ALEMBIC_AUTOLOCK_TIMEOUT": "31", "ALEMBIC_AUTOLOCK_CACHE_TTL": "32"}
    s = resolve_settings({"timeout": 41}, cfg, environ=env)
    assert (s.timeout, s.cache_ttl, s.mode, s.lock_ttl, s.namespace) == (
        41.0,
        32.0,
        "check",
        23.0,
        None,
    )
    assert s.source("timeout") == "keyword argument"
    assert s.source("cache_ttl") == "environment variable ALEMBIC_AUTOLOCK_CACHE_TTL"
    assert s.source("mode").endswith("alembic.ini [alembic_autolock]")
    assert s.source("lock_ttl").endswith("pyproject.toml [tool.alembic_autolock]")
    assert s.source("namespace") == "default"


def test_zero_means_zero_not_default() -> None:
    """0 is a value (no cache, try the lock once), not a request for the default."""
    s = resolve_settings({"cache_ttl": 0, "timeout": "0"}, None, environ={})
    assert (s.cache_ttl, s.timeout) == (0.0, 0.0)


def test_none_keyword_means_unset() -> None:
    """A keyword argument of None falls through to the next source."""
    s = resolve_settings({"timeout": None}, None, environ={"ALEMBIC_AUTOLOCK_TIMEOUT": "7"})
    assert s.timeout == 7.0


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("timeout", "-1", "a number of seconds >= 0"),
        ("timeout", "soon", "a number of seconds >= 0"),
        ("timeout", "nan", "a number of seconds >= 0"),
        ("lock", "zookeeper", "one of auto, postgresql, mysql, file, none, or a redis://"),
        ("mode", "sometimes", "one of off, check, upgrade"),
        ("transaction", "each", "one of per-migration, all"),
        ("allow_downgrade", "maybe", "true or false"),
        ("on_ahead", "ignore", "one of warn, error"),
    ],
)
def test_bad_values_name_key_value_and_source(key: str, value: str, expected: str) -> None:
    """A bad value raises ConfigError naming the key, the value, where it came from."""
    env = {f"ALEMBIC_AUTOLOCK_{key.upper()}": value}
    with pytest.raises(ConfigError) as info:
        resolve_settings({}, None, environ=env)
    message = str(info.value)
    assert repr(value) in message
    assert repr(key) in message
    assert f"environment variable ALEMBIC_AUTOLOCK_{key.upper()}" in message
    assert expected in message
    assert (info.value.key, info.value.value) == (key, value)


def test_unknown_keys_are_errors_everywhere(tmp_path: Path) -> None:
    """A typo in a key is reported, from a kwarg, the environment and the ini alike."""
    with pytest.raises(ConfigError, match="unknown setting 'timout' .*keyword argument"):
        resolve_settings({"timout": 3}, None, environ={})
    with pytest.raises(ConfigError, match="ALEMBIC_AUTOLOCK_TIMOUT"):
        resolve_settings({}, None, environ={"ALEMBIC_AUTOLOCK_TIMOUT": "3"})
    cfg = _ini(tmp_path, "[alembic_autolock]\ntimout = 3\n")
    with pytest.raises(ConfigError, match=r"unknown setting 'timout' .*alembic\.ini"):
        resolve_settings({}, cfg, environ={})


def test_ini_here_default_does_not_leak_into_settings(tmp_path: Path) -> None:
    """Alembic's %(here)s default is usable in values and is not taken for a setting."""
    cfg = _ini(tmp_path, "[alembic_autolock]\nnamespace = app-%(here)s\n")
    s = resolve_settings({}, cfg, environ={})
    assert s.namespace == f"app-{tmp_path}"


def test_environment_names_and_downgrade_default() -> None:
    """ALEMBIC_AUTOLOCK_ENV, else APP_ENV, picks the environment; production forbids
    downgrades by default and says why."""
    s = resolve_settings({}, None, environ={"APP_ENV": "Production"})
    assert (s.environment, s.is_production, s.allow_downgrade) == ("Production", True, False)
    assert s.source("allow_downgrade") == "default for environment 'Production'"
    s = resolve_settings(
        {}, None, environ={"APP_ENV": "production", "ALEMBIC_AUTOLOCK_ENV": "staging"}
    )
    assert (s.environment, s.allow_downgrade) == ("staging", True)
    s = resolve_settings(
        {"production_environments": "live, prod"}, None, environ={"ALEMBIC_AUTOLOCK_ENV": "live"}
    )
    assert (s.is_production, s.allow_downgrade) == (True, False)
    s = resolve_settings({"allow_downgrade": "yes"}, None, environ={"APP_ENV": "prod"})
    assert s.allow_downgrade is True


def test_settings_are_frozen() -> None:
    """The resolved settings cannot be changed after the fact."""
    s = Settings()
    with pytest.raises(AttributeError):
        s.timeout = 1  # type: ignore[misc]


def test_lock_url_value_is_never_echoed() -> None:
    """A bad lock_url does not show its (possibly secret) value, in the message or the error."""
    with pytest.raises(ConfigError) as info:
        resolve_settings({"lock_url": "not a url with password hunter2"}, None, environ={})
    assert "hunter2" not in str(info.value)
    assert info.value.value == "<redacted>"


def test_invalid_pyproject_beside_alembic_ini_is_an_error(tmp_path: Path) -> None:
    """A pyproject.toml that is not TOML is reported, not silently skipped with its settings."""
    (tmp_path / "alembic.ini").write_text("[alembic]\nscript_location = m\n")
    (tmp_path / "pyproject.toml").write_text("[tool.alembic_autolock\ntimeout = 3\n")
    with pytest.raises(ConfigError, match="pyproject.toml is not valid TOML"):
        load_config(str(tmp_path / "alembic.ini"), environ={})


def test_config_lookup_lists_where_it_looked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No alembic.ini where expected: the error lists every place it looked."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config(None, environ={})
    assert str(tmp_path / "alembic.ini") in str(info.value)
    assert str(tmp_path / "pyproject.toml") in str(info.value)
    with pytest.raises(ConfigError, match="ALEMBIC_CONFIG=/nowhere/alembic.ini"):
        load_config(None, environ={"ALEMBIC_CONFIG": "/nowhere/alembic.ini"})
    with pytest.raises(ConfigError, match="missing.ini"):
        load_config("missing.ini", environ={})


def test_config_lookup_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ALEMBIC_CONFIG, else ./alembic.ini (with a pyproject.toml beside it), else pyproject."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pyproject.toml").write_text('[tool.alembic]\nscript_location = "m"\n')
    cfg = load_config(None, environ={})
    assert (cfg.config_file_name, cfg.toml_file_name) == (None, "pyproject.toml")
    (tmp_path / "alembic.ini").write_text("[alembic]\nscript_location = m\n")
    cfg = load_config(None, environ={})
    assert (cfg.config_file_name, cfg.toml_file_name) == ("alembic.ini", "pyproject.toml")
    other = tmp_path / "other.ini"
    other.write_text("[alembic]\nscript_location = m\n")
    cfg = load_config(None, environ={"ALEMBIC_CONFIG": str(other)})
    assert cfg.config_file_name == str(other)
