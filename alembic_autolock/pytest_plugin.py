"""pytest plugin: one database at head for a whole test run, migrated once across pytest-xdist.

Registered with the ``pytest11`` entry point ``alembic_autolock``, so every pytest session of
an environment that has the library installed imports this module. Importing it is cheap and
changes nothing: it declares options and fixtures, and does work only when a test asks for
one of them. SQLAlchemy, Alembic and the runner are imported inside the fixtures.

Fixtures (all session-scoped):

``migrated_database_url``
    The URL (a string, password included) of a database at head. The first worker to get there
    takes the migration lock and upgrades; the other workers wait on the same lock, the way
    replicas of an application do, and go on once the database is at head. With
    ``autolock_fresh_database`` the database is created for the run and dropped after it.
``migrated_engine``
    An SQLAlchemy Engine on that database, disposed of at the end of the session.
``autolock_migration``
    The ``MigrationResult`` of this process's call (``action``, ``applied``, ``waited_s``).
``autolock_url``, ``autolock_config``
    Where the URL and the Alembic configuration come from. Override them in a conftest.py to
    take them from other fixtures (pytest-postgresql's ``postgresql_noproc``, for one).

Options (command line, then the ini file; the URL then ``$ALEMBIC_AUTOLOCK_URL``, then
``$DATABASE_URL``): ``--autolock-url`` / ``autolock_url``, ``--autolock-config`` /
``autolock_config``, ``--autolock-fresh-database`` / ``autolock_fresh_database``. The
library's own settings (``lock``, ``timeout``, ...) come from alembic.ini and the environment as
everywhere else. See docs/testing.md.

.. versionadded:: 0.2
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import pytest

if TYPE_CHECKING:
    from sqlalchemy.engine import URL, Engine

    from ._results import MigrationResult

__all__ = [
    "SecretURL",
    "autolock_config",
    "autolock_migration",
    "autolock_url",
    "migrated_database_url",
    "migrated_engine",
]

URL_VARIABLES = ("ALEMBIC_AUTOLOCK_URL", "DATABASE_URL")
# What a created database may be called: letters, digits and underscores, as every supported
# server accepts unquoted (it is quoted anyway), within PostgreSQL's 63 bytes.
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MAX_NAME = 63
_DEFAULT_BASE = "autolock_test"
# what a worker sends the controller (config.workeroutput) and the session keeps
_KEY = "alembic_autolock"


@dataclass
class _Run:
    """What this session did with the fixtures: the databases it created and still has to drop
    (masked URL → URL), and one record per process that migrated or waited."""

    created: dict[str, str] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    drop_errors: list[str] = field(default_factory=list)
    result: MigrationResult | None = None
    run_id: str | None = None


_RUN = pytest.StashKey[_Run]()


def _run(config: pytest.Config) -> _Run:
    run = config.stash.get(_RUN, None)
    if run is None:
        run = config.stash[_RUN] = _Run()
    return run


# --- options -------------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup(
        "alembic-autolock", "alembic-autolock: a database at head for the run (docs/testing.md)"
    )
    group.addoption(
        "--autolock-url",
        dest="autolock_url",
        metavar="URL",
        default=None,
        help="database URL for migrated_database_url (default: the autolock_url ini value, "
        "then $ALEMBIC_AUTOLOCK_URL, then $DATABASE_URL)",
    )
    group.addoption(
        "--autolock-config",
        dest="autolock_config",
        metavar="PATH",
        default=None,
        help="alembic.ini or pyproject.toml of the migrations (default: the autolock_config ini "
        "value, then as ensure_migrated finds it: $ALEMBIC_CONFIG, ./alembic.ini, "
        "./pyproject.toml)",
    )
    group.addoption(
        "--autolock-fresh-database",
        dest="autolock_fresh_database",
        action="store_true",
        default=None,
        help="create a database for this run (named after the URL's database and the run) "
        "and drop it at the end",
    )
    parser.addini("autolock_url", "database URL for migrated_database_url", default=None)
    parser.addini(
        "autolock_config",
        "alembic.ini or pyproject.toml of the migrations, relative to the ini file",
        default=None,
    )
    parser.addini(
        "autolock_fresh_database",
        "create a database for this run and drop it at the end",
        type="bool",
        default=False,
    )


def _fail(message: str) -> NoReturn:
    """Fail the tests that need the database with ``message`` alone: no traceback, whose
    frames would show the URL with its password among their arguments."""
    # from None: the report shows this message alone, not the chain of errors behind it
    raise pytest.fail.Exception(f"alembic-autolock: {message}", pytrace=False) from None


class SecretURL(str):
    """A database URL whose repr hides the password, so that a failing test that takes it as
    an argument does not print it in its report. Everything else sees the whole URL."""

    __slots__ = ()

    def __repr__(self) -> str:
        from ._mask import mask_url

        return repr(mask_url(str(self)))


def _configured_url(config: pytest.Config) -> tuple[str, str]:
    """The URL and where it came from; a UsageError naming the options when there is none."""
    value = config.getoption("autolock_url")
    if value:
        return str(value), "--autolock-url"
    value = config.getini("autolock_url")
    if value:
        return str(value), "the autolock_url ini option"
    for name in URL_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value:
            if value.startswith("postgres://"):  # what Heroku and others set; SQLAlchemy's name
                value = "postgresql://" + value[len("postgres://") :]
            return value, f"${name}"
    _fail(
        "no database URL for migrated_database_url: pass --autolock-url URL, set autolock_url "
        "in the pytest ini file, set $ALEMBIC_AUTOLOCK_URL or $DATABASE_URL, or override the "
        "autolock_url fixture"
    )


def _fresh_database(config: pytest.Config) -> bool:
    value = config.getoption("autolock_fresh_database")
    if value is not None:
        return bool(value)
    return bool(config.getini("autolock_fresh_database"))


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def autolock_url(pytestconfig: pytest.Config) -> str:
    """The database URL the run starts from: ``--autolock-url``, the ``autolock_url`` ini
    option, ``$ALEMBIC_AUTOLOCK_URL`` or ``$DATABASE_URL``. Override this fixture to take it
    from another fixture (a pytest-postgresql server, a container)."""
    return SecretURL(_configured_url(pytestconfig)[0])


@pytest.fixture(scope="session")
def autolock_config(pytestconfig: pytest.Config) -> str | None:
    """The Alembic configuration: ``--autolock-config`` (relative to the directory pytest was
    started in), the ``autolock_config`` ini option (relative to the ini file), else None:
    ``$ALEMBIC_CONFIG``, ./alembic.ini, ./pyproject.toml as ``ensure_migrated`` finds it."""
    value = pytestconfig.getoption("autolock_config")
    if value:
        return str(pytestconfig.invocation_params.dir / str(value))
    value = pytestconfig.getini("autolock_config")
    if value:
        base = pytestconfig.inipath.parent if pytestconfig.inipath else pytestconfig.rootpath
        return str(base / str(value))
    return None


@pytest.fixture(scope="session")
def migrated_database_url(
    pytestconfig: pytest.Config, autolock_url: str, autolock_config: str | None
) -> Iterator[str]:
    """The URL of a database at head, migrated once for the whole run.

    Every pytest-xdist worker calls the library's ``upgrade`` to head: one takes the migration
    lock and applies the revisions, the others wait on that lock and go on when it is done.
    Every revision is applied, ``autolock_manual`` ones too, whatever ``mode`` says: a test
    database is meant to be at head. A failed migration fails every test that uses the
    fixture, in every worker, with the library's message.

    With ``autolock_fresh_database`` the database is created first (named after the URL's
    database and the run, shared by every worker) and dropped when the run ends: by this
    fixture without xdist, by the controller after the last worker with it.
    """
    from ._mask import mask_text, mask_url, parse_url
    from .exceptions import AutolockError

    run = _run(pytestconfig)
    try:
        url = parse_url(str(autolock_url), "the database URL (autolock_url)")
        fresh = _fresh_database(pytestconfig)
        if fresh:
            url = _fresh_url(url, _run_id(pytestconfig))
    except AutolockError as exc:
        _fail(str(exc))
    masked = mask_url(url)
    if fresh:
        # recorded before it exists: a worker that fails after creating it still has it dropped
        text = url.render_as_string(hide_password=False)
        _report(pytestconfig, {"created": [masked, text]})
        run.created[masked] = text
        try:
            _create_database(url)
        except Exception as exc:
            _fail(
                f"cannot create the run's database {masked}: "
                f"{type(exc).__name__}: {mask_text(str(exc), url)}"
            )
    result = _migrate(url, autolock_config, masked)
    run.result = result
    _report(
        pytestconfig,
        {
            "record": {
                "worker": _worker_id(pytestconfig),
                "database": masked,
                "action": result.action,
                "applied": list(result.applied),
                "waited_s": result.waited_s,
                "elapsed_s": result.elapsed_s,
            }
        },
    )
    yield SecretURL(url.render_as_string(hide_password=False))
    if fresh and not hasattr(pytestconfig, "workerinput"):
        _drop_all(run)


@pytest.fixture(scope="session")
def autolock_migration(pytestconfig: pytest.Config, migrated_database_url: str) -> MigrationResult:
    """What this process's call did: ``action`` (``upgraded`` in the process that migrated,
    ``current`` in the others), ``applied``, ``waited_s`` (time spent waiting for the lock)."""
    result = _run(pytestconfig).result
    if result is None:  # pragma: no cover - migrated_database_url sets it or raises
        raise RuntimeError("migrated_database_url did not record its result")
    return result


@pytest.fixture(scope="session")
def migrated_engine(migrated_database_url: str) -> Iterator[Engine]:
    """An SQLAlchemy Engine on ``migrated_database_url``, disposed of at the end."""
    from sqlalchemy import create_engine

    engine = create_engine(migrated_database_url)
    yield engine
    engine.dispose()


# --- creating, migrating, dropping --------------------------------------------------------


def _worker_id(config: pytest.Config) -> str:
    workerinput = getattr(config, "workerinput", None)
    return str(workerinput["workerid"]) if workerinput is not None else "main"


def _run_id(config: pytest.Config) -> str:
    """Twelve hex digits naming this run, the same in every xdist worker: from xdist's
    testrunuid (``--testrunuid`` may be any text: it is then hashed), else made up once."""
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None:
        uid = str(workerinput["testrunuid"])
        if re.fullmatch(r"[0-9a-f]{12,}", uid):
            return uid[:12]
        return hashlib.blake2s(uid.encode(), digest_size=6).hexdigest()
    run = _run(config)
    if run.run_id is None:
        run.run_id = uuid.uuid4().hex[:12]
    return run.run_id


def _fresh_url(url: URL, run_id: str) -> URL:
    """The URL of this run's own database: ``<database>_<run id>`` on the same server (for
    SQLite, a file beside the given one)."""
    from .exceptions import ConfigError

    if url.get_backend_name() == "sqlite":
        database = url.database or ""
        if database in ("", ":memory:") or database.startswith("file:"):
            raise ConfigError(
                "autolock_fresh_database needs an SQLite database file (sqlite:///path/app.db), "
                f"not {database or 'an in-memory database'!r}"
            )
        path = Path(database)
        return url.set(database=str(path.with_name(f"{path.stem}_{run_id}{path.suffix}")))
    if url.get_backend_name() not in ("postgresql", "mysql", "mariadb"):
        raise ConfigError(
            "autolock_fresh_database can create PostgreSQL, MySQL/MariaDB and SQLite databases, "
            f"not {url.get_backend_name()} ones: turn it off and give a database that exists"
        )
    base = url.database or _DEFAULT_BASE
    name = f"{base}_{run_id}"
    if not _NAME.fullmatch(base) or len(name) > _MAX_NAME:
        raise ConfigError(
            f"autolock_fresh_database names the run's database after the URL's database "
            f"({base!r}) and the run; it must be letters, digits and underscores, starting with "
            f"a letter or underscore, and at most {_MAX_NAME - len(run_id) - 1} characters"
        )
    return url.set(database=name)


def _admin_engine(url: URL) -> Engine:
    """An AUTOCOMMIT engine on the server of ``url``, outside the database itself."""
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    if url.get_backend_name() == "postgresql":
        admin = url.set(database="postgres")
    else:
        admin = url._replace(database=None)  # URL.set() would leave None unchanged
    return create_engine(admin, poolclass=NullPool, isolation_level="AUTOCOMMIT")


def _quoted(engine: Engine, name: str) -> str:
    if not _NAME.fullmatch(name):  # never reached with a name _fresh_url made; kept as a guard
        raise ValueError(f"not a database name this plugin creates: {name!r}")
    return str(engine.dialect.identifier_preparer.quote_identifier(name))


def _exists(engine: Engine, name: str) -> bool:
    from sqlalchemy import text

    query = (
        "SELECT 1 FROM pg_database WHERE datname = :name"
        if engine.dialect.name == "postgresql"
        else "SELECT 1 FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = :name"
    )
    with engine.connect() as conn:
        return conn.execute(text(query), {"name": name}).first() is not None


def _create_database(url: URL) -> None:
    """Create the run's database unless another worker did. Creating it is atomic on the
    server: of workers that race, one creates it and the others find it there."""
    from sqlalchemy import text
    from sqlalchemy.exc import DBAPIError

    if url.get_backend_name() == "sqlite":
        return  # the file is made by the first connection
    name = str(url.database)
    engine = _admin_engine(url)
    try:
        if engine.dialect.name == "postgresql":
            try:
                with engine.connect() as conn:
                    conn.execute(text(f"CREATE DATABASE {_quoted(engine, name)}"))
            except DBAPIError:
                if not _exists(engine, name):  # not the race another worker won
                    raise
        else:
            with engine.connect() as conn:
                conn.execute(text(f"CREATE DATABASE IF NOT EXISTS {_quoted(engine, name)}"))
    finally:
        engine.dispose()


def _drop_database(url: URL) -> None:
    from sqlalchemy import text

    if url.get_backend_name() == "sqlite":
        database = str(url.database)
        for path in (database, *(database + s for s in ("-journal", "-wal", "-shm", "-autolock"))):
            Path(path).unlink(missing_ok=True)
        return
    name = str(url.database)
    engine = _admin_engine(url)
    try:
        with engine.connect() as conn:
            force = ""
            if engine.dialect.name == "postgresql" and (
                engine.dialect.server_version_info or (0,)
            ) >= (13,):
                force = " WITH (FORCE)"  # a connection a test leaked does not keep it alive
            conn.execute(text(f"DROP DATABASE IF EXISTS {_quoted(engine, name)}{force}"))
    finally:
        engine.dispose()


def _drop_all(run: _Run) -> None:
    from sqlalchemy.engine import make_url

    from ._mask import mask_text

    for masked, text in list(run.created.items()):
        url = make_url(text)
        try:
            _drop_database(url)
        except Exception as exc:  # reported in the summary; the run's outcome stands
            run.drop_errors.append(f"{masked}: {mask_text(str(exc), url)}")
        else:
            run.dropped.append(masked)
        del run.created[masked]


def _migrate(url: URL, config: str | None, masked: str) -> MigrationResult:
    """Upgrade to every head under the library's lock; a failure fails the caller's tests."""
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    from ._mask import mask_text
    from ._runner import upgrade
    from .exceptions import AutolockError

    try:
        engine = create_engine(url, poolclass=NullPool)
        try:
            return upgrade(engine, "heads", config=config)
        finally:
            engine.dispose()
    except AutolockError as exc:  # the library's messages are masked already
        _fail(f"could not bring {masked} to head: {exc}")
    except Exception as exc:
        _fail(f"could not bring {masked} to head: {type(exc).__name__}: {mask_text(str(exc), url)}")


# --- what workers tell the controller, and the summary -------------------------------------


def _report(config: pytest.Config, item: dict[str, Any]) -> None:
    """Keep ``item`` for the summary; in an xdist worker, also for the controller."""
    run = _run(config)
    if "record" in item:
        run.records.append(item["record"])
    workeroutput = getattr(config, "workeroutput", None)
    if workeroutput is not None:
        out = workeroutput.setdefault(_KEY, {"created": [], "records": []})
        if "created" in item:
            out["created"].append(item["created"])
        if "record" in item:
            out["records"].append(item["record"])


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """xdist's controller: collect what a finished worker created and did."""
    out = getattr(node, "workeroutput", {}).get(_KEY)
    if not out:
        return
    run = _run(node.config)
    for masked, text in out["created"]:
        run.created.setdefault(masked, text)
    run.records.extend(out["records"])


def pytest_sessionfinish(session: pytest.Session) -> None:
    """The controller drops the run's database once every worker is done with it."""
    config = session.config
    run = config.stash.get(_RUN, None)
    if run is not None and run.created and not hasattr(config, "workerinput"):
        _drop_all(run)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    run = config.stash.get(_RUN, None)
    if run is None or hasattr(config, "workerinput") or config.get_verbosity() < 0:
        return
    if not (run.records or run.dropped or run.drop_errors):
        return
    terminalreporter.section("alembic-autolock")
    by_database: dict[str, list[dict[str, Any]]] = {}
    for record in run.records:
        by_database.setdefault(record["database"], []).append(record)
    for database, records in by_database.items():
        migrated = [r for r in records if r["applied"]]
        others = [r for r in records if not r["applied"]]
        parts = []
        for r in migrated:
            parts.append(
                f"{r['worker']} applied {', '.join(r['applied'])} "
                f"({r['elapsed_s']:.2f} s, {r['waited_s']:.2f} s waiting for the lock)"
            )
        if others:
            waited = max(r["waited_s"] for r in others)
            parts.append(
                f"{len(others)} {'process' if len(others) == 1 else 'processes'} found it at "
                f"head (waited at most {waited:.2f} s)"
            )
        terminalreporter.write_line(f"{database}: {'; '.join(parts)}")
    for masked in run.dropped:
        terminalreporter.write_line(f"dropped the run's database {masked}")
    for problem in run.drop_errors:
        terminalreporter.write_line(f"could not drop the run's database {problem}", red=True)
