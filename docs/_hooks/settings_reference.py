"""The settings reference, generated from the settings definition itself.

``alembic_autolock/_settings.py`` holds every key, its parser and its default; this module adds
only what code cannot say: one sentence of meaning per key (a key without one is an error, so a
new setting cannot be left undocumented). It is used in three places:

* as an MkDocs hook (``mkdocs.yml``: ``hooks``): ``<!-- settings-reference -->`` in a page is
  replaced by the table;
* by ``tests/test_docs.py``, which checks that the table covers every setting and that
  ``alembic.ini`` and the ``init`` template list every setting with its default;
* from the command line: ``python docs/_hooks/settings_reference.py ini`` prints the
  ``[alembic_autolock]`` section that alembic.ini and the template carry.
"""

from __future__ import annotations

import inspect
import sys
import textwrap
from typing import Any

MARKER = "<!-- settings-reference -->"

# What each setting means. The first sentence is also the comment in alembic.ini.
MEANINGS: dict[str, str] = {
    "lock": (
        "The lock backend. `auto` picks by the engine's dialect: PostgreSQL → `postgresql`, "
        "MySQL/MariaDB → `mysql`, SQLite → `file` (in-memory SQLite: the process lock); another "
        "dialect needs a Redis URL or `none`. See [locking](locking.md)."
    ),
    "lock_url": (
        "A separate URL for the PostgreSQL or MySQL lock connection. Use it when the "
        "application reaches PostgreSQL through PgBouncer in transaction pooling: see "
        "[PgBouncer](pgbouncer.md). Shown masked in every message."
    ),
    "timeout": "Seconds to wait for the lock (the process-local lock included); `0` tries once.",
    "cache_ttl": (
        'Seconds an "at head" answer is trusted in this process; `0` disables the cache and '
        "every call reads the database."
    ),
    "mode": (
        "What `ensure_migrated()` and `install()` may do when revisions are pending: apply "
        "them (`upgrade`), raise `PendingMigrations` (`check`), or return at once without "
        "connecting (`off`). Does not apply to `upgrade()`, `downgrade()` or the command line."
    ),
    "environment": (
        "The deployment environment: decides whether this is production (the defaults of "
        "`mode`, `allow_downgrade` and `ddl_lock_timeout`) and is reported by `status`."
    ),
    "production_environments": (
        "Environment names treated as production, compared case-insensitively; glob "
        "patterns (`prod*`) are allowed."
    ),
    "allow_downgrade": (
        "Whether `downgrade()`, `alembic-autolock downgrade`, `POST /downgrade` and "
        "`alembic downgrade` through the env.py hook may run."
    ),
    "transaction": (
        "`all`: every pending revision in one transaction where the database has "
        "transactional DDL (Alembic's default); `per-migration`: one transaction per revision."
    ),
    "namespace": (
        "The lock identity: processes with the same namespace exclude each other. Derived from "
        "the database name, the version table's schema and name (see below)."
    ),
    "version_table": "The version table, read by the check and written by `run_migrations()`.",
    "version_table_schema": "The schema of the version table (empty: the default schema).",
    "on_ahead": (
        "When the database is at a revision these scripts do not know: `warn` and return "
        '`action="ahead"`, or `error` (raise `DatabaseAhead`).'
    ),
    "lock_ttl": (
        "Redis only: seconds after its last renewal that the lock key expires (renewed every "
        "`lock_ttl / 3`); bounds how long a dead holder blocks the others."
    ),
    "orphan_wait": (
        "PostgreSQL and MySQL: seconds a new holder waits for a dead holder's migration session "
        "to end before terminating it."
    ),
    "empty_database": (
        "What an empty database gets: every revision (`upgrade`), or the target metadata's "
        "tables created with `create_all` and the heads stamped (`create_all`), under the lock."
    ),
    "refresh_pool": (
        "After another process changed the schema, replace the engine's connection pool so no "
        "pooled connection keeps prepared statements of the old schema (not for SQLite)."
    ),
    "cache_dir": (
        "Where the manifest of the script directory is kept, so that a call at head need not "
        "load every revision file (default: `$XDG_CACHE_HOME/alembic-autolock`, else "
        "`~/.cache/alembic-autolock`); `off` disables it."
    ),
    "schema": (
        "PostgreSQL schema per tenant: the version table lives in this schema, revisions run "
        "with it first on the search path, and the lock and the cache belong to it. Cannot "
        "differ from `version_table_schema`."
    ),
    "ddl_lock_timeout": (
        "Seconds a migration statement waits for a table lock before it gives up (PostgreSQL "
        "`lock_timeout`, MySQL/MariaDB `lock_wait_timeout` on the migration session); `0` waits "
        "as long as the database lets it. See [safe revisions](safe-revisions.md)."
    ),
    "ddl_retries": (
        "How often a revision that failed only on `ddl_lock_timeout` is tried again, with "
        "backoff and jitter, when it ran inside a transaction."
    ),
    "time_budget": (
        "Seconds: start-up refuses (`TimeBudgetExceeded`) a run whose revisions are known, from "
        "earlier runs, to take longer in total; `0` means no limit."
    ),
    "durations_file": (
        "A JSON file of revision durations (`{revision: seconds}`, as "
        "`alembic_autolock.durations()` returns them) counted by `time_budget` besides the "
        "database's own journal."
    ),
    "metrics": (
        "`off`: this run is not counted by the Prometheus metrics and does not start them; "
        "`auto`: they start once the application has imported `prometheus_client`."
    ),
    "alert_webhook": (
        "An `http://` or `https://` URL each alert is POSTed to. Never echoed: its path is "
        "often the secret."
    ),
    "alert_format": "The webhook's body: the alert as JSON, or Slack's `{\"text\": ...}`.",
    "alert_lock_wait": "Seconds of waiting for the lock after which a `lock_wait` alert is raised.",
    "alert_timeout": "The webhook's timeout per attempt, in seconds (it is tried twice).",
    "web_token": (
        "The Bearer token of the web app's `POST /upgrade` and `POST /downgrade`; without one "
        "those routes do not exist. Never echoed."
    ),
}

# Defaults that depend on the environment (resolve_settings decides them).
_DYNAMIC_DEFAULTS = {
    "mode": ("upgrade", "`check` in production, `upgrade` elsewhere"),
    "allow_downgrade": ("true", "`false` in production, `true` elsewhere"),
    "ddl_lock_timeout": ("0", "`5` in production, `0` elsewhere"),
    "environment": (
        "development",
        "`$ALEMBIC_AUTOLOCK_ENV`, else the first set of {platform}, else `development`",
    ),
}


def _settings_module() -> Any:
    from alembic_autolock import _settings

    return _settings


def _default(key: str) -> str:
    """The default as an ini value."""
    s = _settings_module()
    if key in _DYNAMIC_DEFAULTS:
        return _DYNAMIC_DEFAULTS[key][0]
    value = getattr(s.Settings, key) if key != "production_environments" else None
    if key == "production_environments":
        field = next(f for f in s.fields(s.Settings) if f.name == key)
        return ",".join(sorted(field.default, key=lambda n: (-len(n), n)))
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _default_md(key: str) -> str:
    s = _settings_module()
    if key in _DYNAMIC_DEFAULTS:
        platform = ", ".join(f"`${n}`" for n in s.PLATFORM_ENV_VARS)
        return _DYNAMIC_DEFAULTS[key][1].format(platform=platform)
    value = _default(key)
    return f"`{value}`" if value else "none"


def _accepts(key: str) -> str:
    """What values the key's parser takes, read from the parser itself."""
    s = _settings_module()
    parse = s._PARSERS[key]
    name = parse.__name__
    nonlocals = inspect.getclosurevars(parse).nonlocals
    if "choices" in nonlocals:
        return ", ".join(f"`{c}`" for c in nonlocals["choices"])
    if "what" in nonlocals:
        return f"a non-empty {nonlocals['what']}"
    described = {
        "_parse_lock": ", ".join(f"`{n}`" for n in s.LOCK_NAMES)
        + ", or a `redis://`, `rediss://` or `unix://` URL",
        "_lock_url": "an SQLAlchemy URL",
        "_as_seconds": "seconds ≥ 0",
        "_positive_seconds": "seconds > 0",
        "_as_bool": "`true`/`false` (also `yes`/`no`, `on`/`off`, `1`/`0`)",
        "_count": "a whole number ≥ 0",
        "_optional_str": "a string (empty: none)",
        "_parse_envs": "comma-separated names (a list in pyproject.toml or Python)",
        "_empty_database": ", ".join(f"`{c}`" for c in s.EMPTY_DATABASE),
        "_webhook": "an `http://` or `https://` URL",
        "_token": "a string",
        "_schema": "a PostgreSQL schema name (unset: the default schema; an empty name is refused)",
    }
    return described[name]


def env_vars(key: str) -> list[str]:
    s = _settings_module()
    names = [s.ENV_PREFIX + key.upper()]
    names += [alias for alias, target in s._ENV_ALIASES.items() if target == key]
    return names


def setting_keys() -> tuple[str, ...]:
    """Every setting, in the order the dataclass declares them."""
    s = _settings_module()
    return tuple(f.name for f in s.fields(s.Settings) if f.name in s._PARSERS)


def markdown() -> str:
    missing = [k for k in setting_keys() if k not in MEANINGS]
    if missing:
        raise RuntimeError(f"settings without a meaning in {__file__}: {', '.join(missing)}")
    rows = [
        "| key | environment variable | accepts | default | meaning |",
        "|---|---|---|---|---|",
    ]
    for key in setting_keys():
        env = "<br>".join(f"`{n}`" for n in env_vars(key))
        rows.append(f"| `{key}` | {env} | {_accepts(key)} | {_default_md(key)} | {MEANINGS[key]} |")
    return "\n".join(rows)


def _plain(text: str) -> str:
    """A meaning as an ini comment: the first sentence, without markdown links or backticks."""
    import re

    first = re.split(r"(?<=\.)\s", text, maxsplit=1)[0]
    first = re.sub(r"\[([^\]]+)\]\([^)]+\)", r"\1", first)
    return first.replace("`", "")


def ini_section() -> str:
    """The ``[alembic_autolock]`` section alembic.ini and the init template carry."""
    lines = [
        "[alembic_autolock]",
        "# Every setting, with its default (generated from the settings definition by",
        "# docs/_hooks/settings_reference.py; a test keeps this list complete).",
        "# ALEMBIC_AUTOLOCK_<KEY> environment variables and keyword arguments override what",
        "# is set here. The reference: docs/configuration.md.",
    ]
    for key in setting_keys():
        note = _plain(MEANINGS[key])
        if key in _DYNAMIC_DEFAULTS:
            s = _settings_module()
            dynamic = _DYNAMIC_DEFAULTS[key][1].format(
                platform=", ".join(f"${n}" for n in s.PLATFORM_ENV_VARS)
            )
            note += " Default: " + dynamic.replace("`", "") + "."
        wrapped = textwrap.wrap(f"{key}: {note}", width=96)
        lines += ["# " + w for w in wrapped]
        lines.append(f"# {key} = {_default(key)}".rstrip())
    return "\n".join(lines) + "\n"


def on_page_markdown(markdown_text: str, **kwargs: Any) -> str:
    """MkDocs hook: put the generated table where the marker is."""
    if MARKER in markdown_text:
        return markdown_text.replace(MARKER, markdown())
    return markdown_text


if __name__ == "__main__":
    print(ini_section() if sys.argv[1:] == ["ini"] else markdown(), end="")
