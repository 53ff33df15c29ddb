"""Schema per tenant: migrate many PostgreSQL schemas of one database, one lock per schema.

Each schema is one ``ensure_migrated(engine, schema=name)`` (or ``upgrade(...)``): its own
version table and journal in that schema, its revisions run with that schema first on the
search path, its own lock namespace and its own in-process answer. :func:`migrate_schemas` runs
a list of them (given, or read by the operator's query) on a pool of threads and reports each
schema's outcome; a tenant that fails is reported, never hidden, and never stops the others.

Within one process, revision code runs one schema at a time: Alembic's ``op`` and ``context``
are process-wide, so the threads overlap everything else (connecting, reading the heads,
waiting for a lock another process holds). For DDL of several tenants at once, run the fleet
command in several processes: each starts at a random place in the list, so they share the
work instead of queueing behind one another on the same tenants.

A rerun does only what remains: a schema at head answers "current" after one read.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ._config import ConfigLike
from ._results import MigrationResult
from .exceptions import ConfigError

__all__ = ["SchemaResult", "SchemasReport", "migrate_schemas"]

# PostgreSQL keeps the first 63 bytes of a name (NAMEDATALEN - 1): a longer one would name
# another schema than the operator wrote.
_MAX_NAME_BYTES = 63
_EXAMPLE_QUERY = "SELECT schema_name FROM tenants"


@dataclass(frozen=True)
class SchemaResult:
    """One schema's outcome: ``result`` when it is at its target, else ``error`` (the exception;
    ``error_type`` its class name and ``error_message`` its message, passwords masked)."""

    schema: str
    result: MigrationResult | None = None
    error: Exception | None = None
    error_type: str | None = None
    error_message: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def as_dict(self) -> dict[str, Any]:
        """The schema's entry of the CLI's JSON document."""
        r = self.result
        applied: list[str] = list(r.applied) if r is not None else []
        heads: list[str] | None = list(r.heads) if r is not None else None
        if r is None and self.error is not None:  # MigrationFailed says what stayed applied
            applied = list(getattr(self.error, "applied", None) or [])
            found = getattr(self.error, "heads", None)
            heads = list(found) if found is not None else None
        return {
            "schema": self.schema,
            "ok": self.ok,
            "action": r.action if r is not None else "failed",
            "applied": applied,
            "heads": heads,
            "waited_s": round(r.waited_s, 3) if r is not None else None,
            "elapsed_s": round(r.elapsed_s, 3) if r is not None else None,
            "pending": [p.revision for p in r.pending] if r is not None else [],
            "error": (
                {"type": self.error_type, "message": self.error_message}
                if self.error is not None
                else None
            ),
        }


class SchemasReport(Mapping[str, "MigrationResult | Exception"]):
    """What :func:`migrate_schemas` did: a mapping schema -> ``MigrationResult`` or the
    exception that schema raised, in the order the schemas were given.

    ``results`` holds a :class:`SchemaResult` per schema (same order), ``failed`` those that
    raised, ``ok`` whether none did; ``duplicates`` the names given more than once (each is
    migrated once); ``elapsed_s`` the time the whole call took.
    """

    def __init__(
        self, results: Iterable[SchemaResult], duplicates: Iterable[str], elapsed_s: float
    ) -> None:
        self.results = tuple(results)
        self.duplicates = tuple(duplicates)
        self.elapsed_s = elapsed_s
        self._by_schema = {r.schema: r for r in self.results}

    def __getitem__(self, schema: str) -> MigrationResult | Exception:
        entry = self._by_schema[schema]
        found: MigrationResult | Exception | None = entry.result or entry.error
        if found is None:
            raise KeyError(schema)
        return found

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_schema)

    def __len__(self) -> int:
        return len(self._by_schema)

    @property
    def failed(self) -> tuple[SchemaResult, ...]:
        return tuple(r for r in self.results if not r.ok)

    @property
    def ok(self) -> bool:
        return not self.failed

    def counts(self) -> dict[str, int]:
        """How many schemas ended in each action (``failed`` for those that raised)."""
        found: dict[str, int] = {}
        for r in self.results:
            action = r.result.action if r.result is not None else "failed"
            found[action] = found.get(action, 0) + 1
        return dict(sorted(found.items()))

    def as_dict(self) -> dict[str, Any]:
        return {
            "schemas": [r.as_dict() for r in self.results],
            "counts": self.counts(),
            "failed": [r.schema for r in self.failed],
            "duplicates": list(self.duplicates),
            "elapsed_s": round(self.elapsed_s, 3),
        }

    def __repr__(self) -> str:
        return f"<SchemasReport {self.counts()} failed={[r.schema for r in self.failed]}>"


def migrate_schemas(
    engine: Any,
    schemas: Iterable[str] | str,
    *,
    config: ConfigLike = None,
    parallel: int = 4,
    revision: str | None = None,
    target_metadata: Any = None,
    on_result: Callable[[SchemaResult], object] | None = None,
    **settings: Any,
) -> SchemasReport:
    """Migrate every schema of ``schemas`` in the PostgreSQL database of ``engine``, each under
    its own lock, up to ``parallel`` at once, and report each schema's outcome.

    ``schemas`` is an iterable of schema names, or a string: a query the operator wrote
    (``"SELECT schema_name FROM tenants"``), run as given in a read-only transaction, whose
    first column lists the names. Names are used as they are (never folded to lower case) and
    only ever reach SQL as bound parameters or quoted identifiers.

    ``revision`` None brings each schema to head as ``ensure_migrated`` does (``mode``, the
    cache, revisions kept for a job left pending); ``"heads"`` or a revision id upgrades each
    schema to it as ``upgrade()`` does. ``settings`` are those of ``ensure_migrated``, except
    ``schema``. ``on_result(schema_result)`` is called as each schema finishes (in the
    worker's thread), for progress.

    Errors of the whole call (not PostgreSQL, bad settings, a query that fails) raise
    ``ConfigError`` before any schema is touched. A schema's own error (it does not exist, a
    revision fails, its lock times out) is that schema's entry in the report; the other
    schemas go on. Nothing is retried: run it again to finish what failed (what is at head is
    only read).

    .. versionadded:: 0.2
    """
    from ._plan import check_engine

    started = time.perf_counter()
    check_engine(engine)
    _check_postgresql(engine)
    for key in ("schema", "version_table_schema"):
        if key in settings:
            raise ConfigError(
                f"migrate_schemas() takes the schemas as its second argument, not {key}=: "
                "each schema's version table lives in that schema",
                key=key,
                value=settings[key],
                source="keyword argument",
            )
    if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1:
        raise ConfigError(
            f"parallel must be a whole number >= 1, got {parallel!r}",
            key="parallel",
            value=parallel,
            source="keyword argument",
        )
    names = schema_names(engine, schemas)
    unique = list(dict.fromkeys(names))
    duplicates = list(dict.fromkeys(n for i, n in enumerate(names) if n in names[:i]))
    if unique:
        _preflight(engine, config, settings, unique[0], revision)

    def one(schema: str) -> SchemaResult:
        outcome = _migrate_one(engine, schema, config, revision, target_metadata, settings)
        if on_result is not None:
            on_result(outcome)
        return outcome

    # Start at a random place: several processes running the same list share it out.
    start = random.randrange(len(unique)) if unique else 0
    order = unique[start:] + unique[:start]
    workers = min(parallel, len(order)) or 1
    pool = ThreadPoolExecutor(workers, thread_name_prefix="alembic-autolock-schema")
    try:
        done = dict(zip(order, pool.map(one, order), strict=True))
    except BaseException:  # Ctrl-C: running schemas finish their revisions, no new one starts
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()
    return SchemasReport((done[name] for name in unique), duplicates, time.perf_counter() - started)


def _check_postgresql(engine: Any) -> None:
    dialect = engine.dialect.name
    if dialect != "postgresql":
        raise ConfigError(
            f"migrate_schemas() migrates PostgreSQL schemas; this engine is {dialect}. On "
            "MySQL/MariaDB a schema is a database: give each tenant's database its own URL and "
            "migrate each (ensure_migrated(create_engine(url)), or alembic-autolock --url URL "
            "upgrade); on SQLite, a tenant is a file",
            key="schema",
        )


def schema_names(engine: Any, schemas: Iterable[str] | str) -> list[str]:
    """The schema names, in order: given, or read by the operator's query."""
    if isinstance(schemas, str):
        names: list[object] = list(_query(engine, schemas))
        where = "the schemas query"
    else:
        names = list(schemas)
        where = "the schemas given"
    for position, name in enumerate(names, 1):
        if not isinstance(name, str) or not name or "\x00" in name:
            raise ConfigError(
                f"{where}: entry {position} is {name!r}, not a schema name (nothing was "
                "migrated): give non-empty names",
                key="schemas",
                value=name,
            )
    return [str(n) for n in names]


def _query(engine: Any, query: str) -> Iterator[object]:
    """The first column of the operator's query, sent exactly as written (on the driver's
    cursor, without parameters: a ``%`` or ``:name`` in it means what it means to PostgreSQL),
    in a read-only transaction that is rolled back."""
    from ._db import open_connection
    from ._mask import mask_text, mask_url

    if not query.strip() or not any(c.isspace() for c in query.strip()):
        raise ConfigError(
            f"schemas is the string {query!r}, which is read as a query: give a list of names "
            f"([name] for one schema), or a query such as {_EXAMPLE_QUERY!r}",
            key="schemas",
            value=query,
        )
    conn = open_connection(engine, mask_url(engine.url))
    try:
        raw = conn.connection.dbapi_connection
        if raw is None:  # pragma: no cover - a connection just opened has one
            raise ConfigError("the schemas query found no database connection")
        cursor = raw.cursor()
        try:
            cursor.execute("SET TRANSACTION READ ONLY")
            cursor.execute(query)
            rows = cursor.fetchall() if cursor.description else []
        except engine.dialect.loaded_dbapi.Error as exc:
            first = (str(exc).strip().splitlines() or [""])[0]
            raise ConfigError(
                f"the schemas query failed (nothing was migrated): {mask_text(first, engine.url)}",
                key="schemas",
            ) from None
        finally:
            cursor.close()
            raw.rollback()
    finally:
        conn.close()
    for row in rows:
        yield row[0] if len(row) else None


def _preflight(
    engine: Any,
    config: ConfigLike,
    settings: Mapping[str, Any],
    schema: str,
    revision: str | None,
) -> None:
    """Errors of the configuration, the settings, the scripts or the revision are the call's,
    raised once, before any schema is touched (no database is read here)."""
    from ._plan import prepare
    from ._runner import _check_revision

    plan = prepare(engine, config, {**settings, "schema": schema})
    if revision is not None:
        _check_revision(plan, revision)


def _migrate_one(
    engine: Any,
    schema: str,
    config: ConfigLike,
    revision: str | None,
    target_metadata: Any,
    settings: Mapping[str, Any],
) -> SchemaResult:
    """One schema. Its failure is its own entry: a tenant whose revision fails is reported,
    and the other tenants, each in its own schema under its own lock, go on. Nothing here goes
    on with the failed tenant itself."""
    from ._cold import ensure_migrated
    from ._mask import mask_text
    from ._runner import upgrade

    try:
        if schema != schema.strip():
            raise ConfigError(
                f"schema name {schema!r} begins or ends with white space; names are used "
                "exactly as given (nothing was applied)",
                key="schema",
                value=schema,
            )
        if len(schema.encode()) > _MAX_NAME_BYTES:
            raise ConfigError(
                f"schema name {schema[:20]!r}... is {len(schema.encode())} bytes long; "
                f"PostgreSQL names hold at most {_MAX_NAME_BYTES} (nothing was applied)",
                key="schema",
                value=schema,
            )
        if revision is None:
            result = ensure_migrated(
                engine, config=config, target_metadata=target_metadata, schema=schema, **settings
            )
        else:
            result = upgrade(
                engine,
                revision,
                config=config,
                target_metadata=target_metadata,
                schema=schema,
                **settings,
            )
    except Exception as exc:  # reported as this schema's outcome, never swallowed
        secrets = (engine.url, settings.get("lock_url"), settings.get("lock"))
        message = mask_text(str(exc).strip(), *secrets)
        return SchemaResult(schema, None, exc, type(exc).__name__, message)
    return SchemaResult(schema, result)
