"""Preparing a run: configuration, settings, scripts, identity. Everything here is computed once
per (engine, arguments) and reused until the cache TTL runs out."""

from __future__ import annotations

import configparser
import copy
import logging
import os
import sys
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from alembic.config import Config
from alembic.script import ScriptDirectory
from alembic.script.revision import ResolutionError
from alembic.util import CommandError
from sqlalchemy.engine import Engine

from . import _manifest as manifest
from . import _state
from ._config import ConfigLike, LightConfig, ini_error, load_config, script_location
from ._mask import mask_url
from ._settings import Settings, resolve_settings
from ._startup import manual_revisions
from .exceptions import ConfigError
from .locks.file import sqlite_path


@dataclass(frozen=True)
class Plan:
    settings: Settings
    cfg: Config
    script: ScriptDirectory
    script_heads: frozenset[str]
    # the engine (one token per Engine object, so two engines on one URL never share an
    # answer: another search_path, schema_translate_map or tenant is another engine), the
    # scripts and the version table
    cache_key: tuple[int, str, str | None, str]
    namespace: str
    masked_url: str
    engine_ref: weakref.ReferenceType[Engine]
    # an in-memory SQLite database: one connection that threads take turns on, so even the
    # first look happens under the (process-local) lock
    process_local: bool = False
    # revisions marked autolock_manual = True: start-up leaves them (and what follows) alone
    manual: frozenset[str] = frozenset()
    # writes what the manifest learns after the load (None: no manifest for this config)
    recorder: Any = None


def derive_namespace(settings: Settings, engine: Engine) -> str:
    """The lock identity: the database, the version table's schema and the version table.

    The host is left out on purpose: two replicas that reach one server under two names must
    still exclude each other (a collision between two servers only serialises them).
    """
    if settings.namespace is not None:
        return settings.namespace
    url = engine.url
    database = url.database or url.username or ""
    if url.get_backend_name() == "sqlite" and database not in ("", ":memory:"):
        database = sqlite_path(url) or database
    return (
        f"alembic_autolock:{database}:{settings.version_table_schema or ''}:"
        f"{settings.version_table}"
    )


def load_scripts(
    cfg: Config, before_load: Callable[[ScriptDirectory], object] | None = None
) -> tuple[ScriptDirectory, frozenset[str]]:
    """The ScriptDirectory and its heads, with Alembic's errors turned into ConfigError.

    The heads are those the version table holds after an upgrade to ``heads``: a head that
    another revision ``depends_on`` is not one (Alembic's ``consider_depends_on``).
    ``before_load(script)`` runs before the revision files are read (the manifest's digest).

    ``prepend_sys_path`` makes every ``ScriptDirectory.from_config`` prepend to ``sys.path``
    again; entries it adds that were already there are removed.
    """
    location = script_location(cfg)
    before = list(sys.path)
    try:
        script = ScriptDirectory.from_config(cfg)
        if before_load is not None:
            before_load(script)
        heads = frozenset(script.get_heads(consider_depends_on=True))
    except CommandError as exc:
        raise ConfigError(f"cannot load the migration scripts at {location}: {exc}") from exc
    except configparser.InterpolationError as exc:  # its text quotes the value
        raise ini_error(cfg, exc) from None
    except Exception as exc:  # a revision file that does not import
        raise ConfigError(
            f"cannot load the migration scripts at {location}: {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        added = len(sys.path) - len(before)
        if added > 0 and sys.path[added:] == before:
            fresh = [p for p in sys.path[:added] if p not in before]
            sys.path[:] = fresh + before
    return script, heads


def check_engine(engine: object) -> None:
    """A ConfigError for anything but an Engine, saying what to call instead."""
    if isinstance(engine, Engine):
        return
    hint = (
        "for an AsyncEngine use the _async twin (await ensure_migrated_async(engine))"
        if type(engine).__name__ == "AsyncEngine"
        else "pass the result of sqlalchemy.create_engine(...)"
    )
    raise ConfigError(f"expected an SQLAlchemy Engine, got {type(engine).__name__}: {hint}")


def prepare(engine: Engine, config: ConfigLike, overrides: Mapping[str, Any]) -> Plan:
    check_engine(engine)
    from os import environ

    cfg = load_config(config, environ=environ)
    settings = resolve_settings(overrides, cfg)
    check_identifiers(settings, engine)
    recorder: manifest.Recorder | None = None

    def digest_first(script: ScriptDirectory) -> None:
        nonlocal recorder
        if (
            config is None
            or isinstance(config, str | os.PathLike)
            or config.attributes.get(manifest.FROM_FILES)  # the CLI's: files, -x url only
        ):
            recorder = manifest.Recorder(
                LightConfig(cfg.config_file_name, cfg.toml_file_name),
                settings.cache_dir,
                [str(path) for path in script._version_locations],
                bool(script.recursive_version_locations),
            )

    script, heads = load_scripts(cfg, digest_first)
    if recorder is not None:
        recorder.write(script.dir, heads)
    masked = mask_url(engine.url)
    return Plan(
        settings=settings,
        cfg=cfg,
        script=script,
        script_heads=heads,
        cache_key=(
            _state.engine_token(engine),
            script.dir,
            settings.version_table_schema,
            settings.version_table,
        ),
        namespace=derive_namespace(settings, engine),
        masked_url=masked,
        engine_ref=weakref.ref(engine),
        process_local=engine.dialect.name == "sqlite" and sqlite_path(engine.url) is None,
        manual=manual_revisions(script),
        recorder=recorder,
    )


_NAME_LIMITS = {"mysql": 64, "mariadb": 64}


def check_identifiers(settings: Settings, engine: Engine) -> None:
    """Names the database cannot hold are refused before anything runs (SQLAlchemy's MySQL
    dialect reports its 255-character label limit; a MySQL table name holds 64)."""
    limit = _NAME_LIMITS.get(engine.dialect.name, engine.dialect.max_identifier_length)
    for key in ("version_table", "version_table_schema"):
        name = getattr(settings, key)
        if name is not None and len(name) > limit:
            raise ConfigError(
                f"{key} {name[:20]!r}... is {len(name)} characters long; {engine.dialect.name} "
                f"names hold at most {limit}: choose a shorter one",
                key=key,
                value=name,
                source=settings.source(key),
            )


def unknown_heads(script: ScriptDirectory, heads: tuple[str, ...]) -> list[str]:
    """The heads that these scripts do not contain (the database is ahead of the code)."""
    missing = []
    for head in heads:
        try:
            script.revision_map.get_revision(head)
        except (ResolutionError, CommandError):
            missing.append(head)
    return missing


def pending_steps(script: ScriptDirectory, heads: tuple[str, ...]) -> list[tuple[str, str | None]]:
    """(revision, message) of what ``upgrade heads`` would apply, in order."""
    steps = script._upgrade_revs("heads", heads)  # type: ignore[arg-type]  # as command.upgrade
    return [(step.revision.revision, step.revision.doc) for step in steps]


def ancestors(script: ScriptDirectory, heads: tuple[str, ...]) -> set[str]:
    """Every revision applied when the database is at ``heads``."""
    if not heads:
        return set()
    return {rev.revision for rev in script.iterate_revisions(heads, "base") if rev is not None}


def clone_config(cfg: Config) -> Config:
    """A shallow copy of ``cfg`` with its own ``attributes``, so a run never changes the caller's
    Config and two runs never share a connection through it."""
    clone = copy.copy(cfg)
    vars(clone)["attributes"] = dict(cfg.attributes)
    clone.attributes.setdefault("configure_logger", False)
    return clone


@contextmanager
def keep_loggers_enabled() -> Iterator[None]:
    """Undo what a stock env.py's ``fileConfig()`` does to the application's loggers.

    ``logging.config.fileConfig`` disables every logger that exists when it runs; an app that
    calls ensure_migrated would otherwise lose its own logging.
    """
    manager = logging.Logger.manager
    enabled = [
        lg
        for lg in list(manager.loggerDict.values())
        if isinstance(lg, logging.Logger) and not lg.disabled
    ]
    try:
        yield
    finally:
        for lg in enabled:
            lg.disabled = False
