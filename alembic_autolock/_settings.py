"""Settings: resolved in exactly one function into one frozen object.

Precedence, highest first: keyword arguments, ``ALEMBIC_AUTOLOCK_<KEY>`` environment variables,
``[alembic_autolock]`` in alembic.ini, ``[tool.alembic_autolock]`` in pyproject.toml, defaults.
Types are coerced here and only here. A bad value raises ConfigError naming the key, the value
(masked: it may be a URL with a password) and where it came from.
"""

from __future__ import annotations

import fnmatch
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit

from ._config import config_sections
from ._mask import mask_text, mask_url
from .exceptions import ConfigError

ENV_PREFIX = "ALEMBIC_AUTOLOCK_"

LOCK_NAMES = ("auto", "postgresql", "mysql", "file", "none")
MODES = ("off", "check", "upgrade")
TRANSACTIONS = ("per-migration", "all")
ON_AHEAD = ("warn", "error")
EMPTY_DATABASE = ("upgrade", "create_all")
METRICS = ("auto", "off")
ALERT_FORMATS = ("json", "slack")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True, repr=False)
class Settings:
    """The resolved settings. ``sources`` maps each key to where its value came from.

    Its repr masks the URLs (``lock``, ``lock_url``), which may carry a password.
    """

    lock: str = "auto"
    lock_url: str | None = None
    timeout: float = 30.0
    cache_ttl: float = 300.0
    mode: str = "upgrade"  # default: "check" in a production environment
    environment: str = "development"
    production_environments: frozenset[str] = frozenset({"production", "prod"})
    allow_downgrade: bool = True
    transaction: str = "all"
    namespace: str | None = None
    version_table: str = "alembic_version"
    version_table_schema: str | None = None
    on_ahead: str = "warn"
    lock_ttl: float = 15.0
    orphan_wait: float = 10.0
    empty_database: str = "upgrade"
    refresh_pool: bool = True
    cache_dir: str | None = None
    # PostgreSQL schema per tenant: the version table lives there, revisions run with it first
    # on the search path, and the lock and the cache belong to it
    schema: str | None = None
    # seconds a migration statement waits for a table lock before it gives up (0: as long as
    # the database lets it); default 5 in production, 0 elsewhere
    ddl_lock_timeout: float = 0.0
    # how often a revision that failed only on ddl_lock_timeout is tried again
    ddl_retries: int = 5
    # seconds: start-up refuses a run whose revisions are known to take longer (0: no limit)
    time_budget: float = 0.0
    # a JSON file of revision durations (``alembic-autolock durations --json``), for time_budget
    durations_file: str | None = None
    # operator surfaces: metrics.py, alerts.py, web.py
    metrics: str = "auto"
    alert_webhook: str | None = field(default=None, repr=False)  # its path may be the secret
    alert_format: str = "json"
    alert_lock_wait: float = 10.0
    alert_timeout: float = 3.0
    web_token: str | None = field(default=None, repr=False)
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_production(self) -> bool:
        return is_production(self.environment, self.production_environments)

    def source(self, key: str) -> str:
        return self.sources.get(key, "default")

    def __repr__(self) -> str:
        shown = []
        for f in fields(self):
            if f.repr:
                value = getattr(self, f.name)
                if f.name in _URL_KEYS and isinstance(value, str):
                    value = mask_url(value)
                shown.append(f"{f.name}={value!r}")
        return f"Settings({', '.join(shown)})"


# Settings whose value may be a URL with a password.
_URL_KEYS = frozenset({"lock", "lock_url"})
# Settings whose value is a secret as a whole: never echoed.
_SECRET_KEYS = frozenset({"alert_webhook", "web_token"})
# What a value with a locatable secret looks like: a URL, userinfo, key=value.
_STRUCTURED = re.compile(r"://|[@=]")
REDACTED = "<redacted>"


def _shown(key: str, value: object) -> object:
    """``value`` as it may be echoed in an error: masked. A lock_url whose password cannot be
    located (it does not even look like a URL) is not shown at all, nor is a secret."""
    if key in _SECRET_KEYS:
        return REDACTED
    if isinstance(value, str):
        masked = mask_url(value)
        if key == "lock_url" and masked == value and not _STRUCTURED.search(value):
            return REDACTED
        return masked
    if value is None or isinstance(value, bool | int | float):
        return value
    text = repr(value)  # a list or a table from pyproject.toml: mask what it quotes
    masked = mask_text(text)
    return value if masked == text else masked


def _fail(key: str, value: object, source: str, expected: str) -> ConfigError:
    shown = _shown(key, value)
    return ConfigError(
        f"invalid value {shown if shown is REDACTED else repr(shown)} for setting {key!r} "
        f"(from {source}): expected {expected}",
        key=key,
        value=shown,
        source=source,
    )


def _as_str(key: str, value: object, source: str) -> str:
    if not isinstance(value, str):
        raise _fail(key, value, source, "a string")
    return value.strip()


def _as_seconds(key: str, value: object, source: str) -> float:
    if isinstance(value, bool):
        raise _fail(key, value, source, "a number of seconds >= 0")
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise _fail(key, value, source, "a number of seconds >= 0") from None
    if not math.isfinite(number) or number < 0:
        raise _fail(key, value, source, "a number of seconds >= 0")
    return number


def _as_bool(key: str, value: object, source: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise _fail(key, value, source, "true or false")


def _choice(choices: tuple[str, ...]) -> Callable[[str, object, str], str]:
    def parse(key: str, value: object, source: str) -> str:
        text = value.strip().lower().replace("_", "-") if isinstance(value, str) else None
        if text not in choices:
            raise _fail(key, value, source, "one of " + ", ".join(choices))
        return text

    return parse


def _parse_lock(key: str, value: object, source: str) -> str:
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in LOCK_NAMES:
            return text.lower()
        if text.lower().startswith(("redis://", "rediss://", "unix://")):
            try:
                urlsplit(text).port  # noqa: B018  # raises for a port that is not a number
            except ValueError:
                raise _fail(
                    key, value, source, "a redis://host:port/db URL whose port is a number"
                ) from None
            return text
    raise _fail(
        key,
        value,
        source,
        "one of " + ", ".join(LOCK_NAMES) + ", or a redis://host:port/db URL",
    )


def _parse_envs(key: str, value: object, source: str) -> frozenset[str]:
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, list | tuple | set | frozenset):
        items = [str(v) for v in value]
    else:
        raise _fail(key, value, source, "a comma-separated list of environment names")
    names = frozenset(i.strip().lower() for i in items if i.strip())
    if not names:
        raise _fail(key, value, source, "at least one environment name")
    return names


def _optional_str(key: str, value: object, source: str) -> str | None:
    text = _as_str(key, value, source)
    return text or None


def _schema(key: str, value: object, source: str) -> str | None:
    """A tenant's schema; empty in a file or the environment means none. An empty name passed
    in code is refused: it would migrate the default schema instead of a tenant's."""
    text = _as_str(key, value, source)
    if not text and source == "keyword argument":
        raise _fail(key, value, source, "a schema name (None for the default schema)")
    return text or None


def _non_empty(what: str) -> Callable[[str, object, str], str]:
    def parse(key: str, value: object, source: str) -> str:
        text = _as_str(key, value, source)
        if not text:
            raise _fail(key, value, source, f"a non-empty {what}")
        return text

    return parse


def _count(key: str, value: object, source: str) -> int:
    ok = isinstance(value, str | int) and not isinstance(value, bool)
    text = str(value).strip() if ok else ""
    if not text.isdigit():
        raise _fail(key, value, source, "a whole number >= 0")
    return int(text)


def _lock_url(key: str, value: object, source: str) -> str | None:
    text = _as_str(key, value, source)
    if not text:
        return None
    expected = "an SQLAlchemy URL such as postgresql://user:password@host:5432/db"
    if "://" not in text:
        raise _fail(key, value, source, expected)
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        make_url(text)
    except (ArgumentError, ValueError):  # a port that is not a number
        raise _fail(
            key, value, source, expected + ", with a numeric port and @ : / % URL-encoded"
        ) from None
    return text


def _empty_database(key: str, value: object, source: str) -> str:
    text = value.strip().lower().replace("-", "_") if isinstance(value, str) else None
    if text not in EMPTY_DATABASE:
        raise _fail(key, value, source, "one of " + ", ".join(EMPTY_DATABASE))
    return text


def _webhook(key: str, value: object, source: str) -> str | None:
    text = _as_str(key, value, source)
    if not text:
        return None
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _fail(key, value, source, "an http:// or https:// URL")
    return text


def _positive_seconds(key: str, value: object, source: str) -> float:
    number = _as_seconds(key, value, source)
    if number <= 0:
        raise _fail(key, value, source, "a number of seconds > 0")
    return number


def _token(key: str, value: object, source: str) -> str | None:
    return _as_str(key, value, source) or None


_PARSERS: dict[str, Callable[[str, object, str], Any]] = {
    "lock": _parse_lock,
    "lock_url": _lock_url,
    "timeout": _as_seconds,
    "cache_ttl": _as_seconds,
    "mode": _choice(MODES),
    "environment": _non_empty("environment name"),
    "production_environments": _parse_envs,
    "allow_downgrade": _as_bool,
    "transaction": _choice(TRANSACTIONS),
    "namespace": _optional_str,
    "version_table": _non_empty("table name"),
    "version_table_schema": _optional_str,
    "on_ahead": _choice(ON_AHEAD),
    "lock_ttl": _as_seconds,
    "orphan_wait": _as_seconds,
    "empty_database": _empty_database,
    "refresh_pool": _as_bool,
    "cache_dir": _optional_str,
    "schema": _schema,
    "ddl_lock_timeout": _as_seconds,
    "ddl_retries": _count,
    "time_budget": _as_seconds,
    "durations_file": _optional_str,
    "metrics": _choice(METRICS),
    "alert_webhook": _webhook,
    "alert_format": _choice(ALERT_FORMATS),
    "alert_lock_wait": _as_seconds,
    "alert_timeout": _positive_seconds,
    "web_token": _token,
}

KEYS = tuple(sorted(_PARSERS))

# ddl_lock_timeout in a production environment: long enough for a busy table's short queries
# to finish, short enough that the queries queued behind the waiting ALTER are not noticed.
PRODUCTION_DDL_LOCK_TIMEOUT = 5.0

# Environment variables with this prefix that are not settings keys but are still ours.
_ENV_ALIASES = {"ALEMBIC_AUTOLOCK_ENV": "environment"}
# Variables with this prefix that are ours but not settings: the CLI's database URL.
_ENV_NOT_SETTINGS = frozenset({"ALEMBIC_AUTOLOCK_URL"})

# Where platforms and frameworks put the deployment environment, read in this order when
# neither the environment setting nor ALEMBIC_AUTOLOCK_ENV says it.
PLATFORM_ENV_VARS = ("APP_ENV", "APP_ENVIRONMENT", "ENVIRONMENT", "ENV", "DEPLOY_ENV", "FLASK_ENV")


def is_production(environment: str, patterns: frozenset[str]) -> bool:
    """Whether ``environment`` matches one of the production names or glob patterns
    (``prod*``), case-insensitively."""
    name = environment.lower()
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _unknown(key: str, source: str) -> ConfigError:
    return ConfigError(
        f"unknown setting {key!r} (from {source}); known settings: {', '.join(KEYS)}",
        key=key,
        source=source,
    )


def resolve_settings(
    overrides: Mapping[str, Any],
    cfg: Any,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Build the Settings from keyword arguments, the environment, the config files, defaults."""
    env = os.environ if environ is None else environ
    # Each layer: the values it sets, and for each key where that value came from.
    layers: list[tuple[Mapping[str, Any], Mapping[str, str]]] = []

    kw = {}
    for key, value in overrides.items():
        if key not in _PARSERS:
            raise _unknown(key, "keyword argument")
        if value is not None:
            kw[key] = value
    layers.append((kw, dict.fromkeys(kw, "keyword argument")))

    from_env: dict[str, Any] = {}
    env_sources: dict[str, str] = {}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or name in _ENV_NOT_SETTINGS:
            continue
        key = _ENV_ALIASES.get(name) or name[len(ENV_PREFIX) :].lower()
        if key not in _PARSERS:
            raise _unknown(key, f"environment variable {name}")
        if key in from_env and name in _ENV_ALIASES:
            continue  # ALEMBIC_AUTOLOCK_ENVIRONMENT wins over the short alias
        from_env[key] = value
        env_sources[key] = f"environment variable {name}"
    if "environment" not in from_env:
        for name in PLATFORM_ENV_VARS:
            if env.get(name, "").strip():
                from_env["environment"] = env[name]
                env_sources["environment"] = f"environment variable {name}"
                break
    layers.append((from_env, env_sources))

    if cfg is not None:
        ini, ini_label, toml, toml_label = config_sections(cfg)
        for values, label in ((ini, ini_label), (toml, toml_label)):
            if label is None:
                continue
            for key in values:
                if key not in _PARSERS:
                    raise _unknown(key, label)
            layers.append((values, dict.fromkeys(values, label)))

    resolved: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key, parse in _PARSERS.items():
        for layer_values, where in layers:
            if key in layer_values:
                resolved[key] = parse(key, layer_values[key], where[key])
                sources[key] = where[key]
                break

    environment = resolved.get("environment", Settings.environment)
    production = is_production(
        environment, resolved.get("production_environments", Settings.production_environments)
    )
    if "allow_downgrade" not in resolved:
        resolved["allow_downgrade"] = not production
        sources["allow_downgrade"] = f"default for environment {environment!r}"
    if "mode" not in resolved:
        resolved["mode"] = "check" if production else "upgrade"
        sources["mode"] = f"default for environment {environment!r}"
    if "ddl_lock_timeout" not in resolved:
        resolved["ddl_lock_timeout"] = PRODUCTION_DDL_LOCK_TIMEOUT if production else 0.0
        sources["ddl_lock_timeout"] = f"default for environment {environment!r}"
    schema = resolved.get("schema")
    if schema is not None:
        given = resolved.get("version_table_schema")
        if given is None:
            resolved["version_table_schema"] = schema
            sources["version_table_schema"] = f"the schema setting (from {sources['schema']})"
        elif given != schema:
            raise ConfigError(
                f"schema {schema!r} (from {sources['schema']}) and version_table_schema "
                f"{given!r} (from {sources['version_table_schema']}) differ: a tenant schema "
                "keeps its own version table, so set only schema",
                key="version_table_schema",
                value=given,
                source=sources["version_table_schema"],
            )
    return Settings(**resolved, sources=sources)
