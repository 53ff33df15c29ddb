"""Fixtures: real PostgreSQL, MariaDB and Redis, a throwaway database per test, the test
migration environment, and real worker processes.

Servers (override with environment variables; see README "Running the tests"):
  PostgreSQL  pytest-postgresql noproc, [tool.pytest.ini_options] postgresql_* (127.0.0.1:5432)
  MariaDB     AUTOLOCK_TEST_MYSQL_URL   (mysql+pymysql://root@127.0.0.1:3306)
  Redis       AUTOLOCK_TEST_REDIS_URL   (redis://127.0.0.1:6379/0)

A server that cannot be reached skips its tests locally, and fails the run when CI is set:
a skipped service test in CI is a failure.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import structlog
from pytest_postgresql import factories
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, Engine
from support import MIGRATIONS, PG_SCHEMES

from alembic_autolock import _state

MYSQL_URL = os.environ.get("AUTOLOCK_TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306")
REDIS_URL = os.environ.get("AUTOLOCK_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
IN_CI = bool(os.environ.get("CI"))

# One database name per pytest process, so that concurrent runs on one server never collide;
# pytest-postgresql creates it from a template before each test and drops it after.
PG_DBNAME = f"autolock_tests_{os.getpid()}"
postgresql_server = factories.postgresql_noproc(dbname=PG_DBNAME)
postgresql_db = factories.postgresql("postgresql_server")


def _drop_stale_pg_databases() -> None:
    """Drop databases left behind by test runs that were killed (their pid is gone)."""
    import psycopg
    from psycopg import sql

    try:
        conn = psycopg.connect(
            host="127.0.0.1",
            port=5432,
            user="postgres",
            dbname="postgres",
            autocommit=True,
            connect_timeout=3,
        )
    except psycopg.Error:
        return
    with conn:
        names = [
            r[0]
            for r in conn.execute(
                "SELECT datname FROM pg_database WHERE datname LIKE 'autolock\\_tests\\_%'"
            )
        ]
        for name in names:
            # autolock_tests_<pid>, its _tmpl, and the extra databases of tests/test_adoption.py
            pid = name.removeprefix("autolock_tests_").split("_")[0]
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                conn.execute(
                    "UPDATE pg_database SET datistemplate = false WHERE datname = %s", (name,)
                )
                conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )


def pytest_sessionstart(session: pytest.Session) -> None:
    _drop_stale_pg_databases()
    # the library's manifests of history heads go to a directory of this run, not the home
    # cache; worker processes inherit it
    os.environ["ALEMBIC_AUTOLOCK_CACHE_DIR"] = tempfile.mkdtemp(prefix="autolock-test-cache-")


# --- services ------------------------------------------------------------------------------


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def need_service(name: str, host: str, port: int) -> None:
    if _reachable(host, port):
        return
    message = (
        f"{name} is not reachable at {host}:{port}; start it (see "
        "../shared/research/services.md or .ci/run) or point the tests at one"
    )
    if IN_CI:
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped:
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if IN_CI and _skipped:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        sys.stderr.write(
            f"\nCI: {len(_skipped)} test(s) were skipped, which fails the run:\n  "
            + "\n  ".join(_skipped)
            + "\n"
        )


@pytest.fixture(autouse=True)
def _fresh_state() -> Iterator[None]:
    """Every test starts with empty caches (the version cache is process-global)."""
    _state.reset()
    yield
    _state.reset()
    structlog.reset_defaults()  # capture_logs() leaves structlog "configured"


# --- databases -----------------------------------------------------------------------------


@pytest.fixture
def pg_url(request: pytest.FixtureRequest) -> str:
    """A fresh PostgreSQL database for this test (created and dropped by pytest-postgresql),
    as a postgresql+psycopg2:// URL, or as postgresql:// (psycopg 3) when the test is
    parametrized indirectly with "psycopg"."""
    need_service("PostgreSQL", "127.0.0.1", 5432)
    conn = request.getfixturevalue("postgresql_db")
    info = conn.info
    return URL.create(
        PG_SCHEMES[getattr(request, "param", "psycopg2")],
        username=info.user,
        password=info.password or PG_PASSWORD,  # trust auth ignores it; masking must not
        host=info.host,
        port=info.port,
        database=info.dbname,
    ).render_as_string(hide_password=False)


@pytest.fixture
def mysql_url() -> Iterator[str]:
    """A fresh MariaDB/MySQL database for this test, dropped afterwards."""
    parts = urlsplit(MYSQL_URL.replace("mysql+pymysql", "mysql"))
    need_service("MariaDB", parts.hostname or "127.0.0.1", parts.port or 3306)
    name = f"autolock_t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(MYSQL_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE `{name}`"))
    try:
        yield f"{MYSQL_URL}/{name}"
    finally:
        with admin.connect() as conn:
            for (cid,) in conn.execute(
                text("SELECT ID FROM information_schema.PROCESSLIST WHERE DB = :db"),
                {"db": name},
            ):
                with contextlib.suppress(Exception):  # it may have ended by itself meanwhile
                    conn.execute(text(f"KILL {int(cid)}"))
            conn.execute(text(f"DROP DATABASE IF EXISTS `{name}`"))
        admin.dispose()


@pytest.fixture
def redis_url() -> str:
    parts = urlsplit(REDIS_URL)
    need_service("Redis", parts.hostname or "127.0.0.1", parts.port or 6379)
    return REDIS_URL


class OwnRedis:
    """A redis-server this test started on a port of its own, to stop and restart at will."""

    def __init__(self, directory: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.directory = directory
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not _reachable("127.0.0.1", self.port):
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    if shutil.which("redis-server") is None:
        message = "redis-server is not installed (apt-get install redis-server)"
        if IN_CI:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    server = OwnRedis(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'app.db'}"


@pytest.fixture
def engines() -> Iterator[list[Engine]]:
    """Engines created by a test are disposed after it (before its database is dropped)."""
    made: list[Engine] = []
    yield made
    for engine in made:
        engine.dispose()


@pytest.fixture
def make_engine(engines: list[Engine]) -> Any:
    def make(url: str, **kw: Any) -> Engine:
        engine = create_engine(url, **kw)
        engines.append(engine)
        return engine

    return make


# --- the migration environment -------------------------------------------------------------


@pytest.fixture
def make_ini(tmp_path: Path) -> Any:
    """Write an alembic.ini for the test migrations: make_ini(url, **autolock_settings)
    (``scripts=`` another history, e.g. support.BATCHES)."""
    counter = iter(range(1000))

    def make(url: str, *, scripts: Path = MIGRATIONS, **settings: Any) -> str:
        path = tmp_path / f"alembic{next(counter)}.ini"
        lines = [
            "[alembic]",
            f"script_location = {scripts}",
            f"prepend_sys_path = {MIGRATIONS}",
            "path_separator = os",
            f"sqlalchemy.url = {url.replace('%', '%%')}",
            "",
            "[alembic_autolock]",
            *(f"{k} = {v}" for k, v in settings.items()),
            "",
        ]
        path.write_text("\n".join(lines))
        return str(path)

    return make


@pytest.fixture
def trace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The trace file every revision body appends to; read it with trace.lines()."""
    path = tmp_path / "trace.log"
    monkeypatch.setenv("AUTOLOCK_TEST_TRACE", str(path))

    class Trace:
        def __init__(self) -> None:
            self.path = path

        def lines(self) -> list[list[str]]:
            if not path.exists():
                return []
            return [line.split() for line in path.read_text().splitlines()]

        def bodies(self, direction: str = "up") -> list[str]:
            return [parts[0] for parts in self.lines() if parts[1] == direction and len(parts) == 3]

    return Trace()


# --- secrets: a safety net over the whole suite ---------------------------------------------
#
# Every event the library logs during the session is recorded and, at the end, searched for the
# secrets the tests use: the password every pg_url carries (PostgreSQL's trust auth accepts any
# password, so each PostgreSQL test exercises masking) and those of tests/test_mask.py. The
# dedicated output scan is tests/test_mask.py::test_no_output_path_shows_a_secret.

PG_PASSWORD = f"autolock-pw-{uuid.uuid4().hex[:8]}"
TEST_SECRETS = (PG_PASSWORD, "S3cr3t", "sekrit-pw")


class _EventRecorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.texts: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "autolock_fields", None)
        self.texts.append(f"{record.getMessage()} {fields!r}")


@pytest.fixture(scope="session", autouse=True)
def _no_secret_in_events() -> Iterator[None]:
    """Fail the session if any event of the library carried a test secret."""
    logger = logging.getLogger("alembic.autolock")
    recorder, level = _EventRecorder(), logger.level
    logger.addHandler(recorder)
    logger.setLevel(logging.DEBUG)
    yield
    logger.removeHandler(recorder)
    logger.setLevel(level)
    leaked = [t for t in recorder.texts if any(s in t for s in TEST_SECRETS)]
    if leaked:
        pytest.fail(f"{len(leaked)} event(s) carried a test secret, e.g. {leaked[0]!r}")
