"""The pytest plugin (alembic_autolock/pytest_plugin.py): real pytest sessions, with and without
pytest-xdist, run in subprocesses on a sample project against the real servers.

The sample project's revisions append "<revision> <pid>" to a trace file when their body runs
(and one of them can be made to fail); its tests check the schema at head and append what they
saw (worker, database, what this process's call did) to a report file.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import MYSQL_URL, PG_PASSWORD, need_service
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from support import REPO

REVISIONS = ["a1", "a2", "a3"]
PG_BASE = f"postgresql+psycopg2://postgres:{PG_PASSWORD}@127.0.0.1:5432"
RUN_ID = re.compile(r"[0-9a-f]{12}")

ENV_PY = """\
from alembic_autolock.env import run_migrations

run_migrations()
"""

REVISION = """\
import os
import time

import sqlalchemy as sa
from alembic import op

revision = {rev!r}
down_revision = {down!r}
branch_labels = None
depends_on = None


def upgrade() -> None:
    with open(os.environ["SAMPLE_TRACE"], "a") as trace:
        trace.write(f"{{revision}} {{os.getpid()}}\\n")
    if os.environ.get("SAMPLE_FAIL") == revision:
        raise RuntimeError(f"{{revision}} is broken on purpose")
    if revision == "a2":  # long enough for the other workers to be waiting on the lock
        time.sleep(float(os.environ.get("SAMPLE_SLOW", "0")))
    op.create_table("t_{rev}", sa.Column("id", sa.Integer, primary_key=True))


def downgrade() -> None:
    op.drop_table("t_{rev}")
"""

SAMPLE_TESTS = """\
import json
import os

import pytest


@pytest.mark.parametrize("n", range(32))
def test_schema_at_head(n, migrated_engine, migrated_database_url, autolock_migration):
    from sqlalchemy import inspect, text  # here: test_plain.py checks that none was imported

    with migrated_engine.connect() as conn:
        version = conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one()
    tables = set(inspect(migrated_engine).get_table_names())
    assert version == "a3"
    assert {"t_a1", "t_a2", "t_a3"} <= tables
    record = {
        "worker": os.environ.get("PYTEST_XDIST_WORKER", "main"),
        "database": migrated_engine.url.database,
        "url_is_engine_url": migrated_database_url
        == migrated_engine.url.render_as_string(hide_password=False),
        "action": autolock_migration.action,
        "applied": list(autolock_migration.applied),
        "waited_s": autolock_migration.waited_s,
    }
    with open(os.environ["SAMPLE_REPORT"], "a") as report:
        report.write(json.dumps(record) + "\\n")
"""

SHOWING_TESTS = """\
def test_a_failure_that_shows_the_url(migrated_database_url):
    assert migrated_database_url.endswith("/elsewhere")
"""

PLAIN_TESTS = """\
import sys


def test_nothing_of_the_plugin_was_imported():
    loaded = {m.split(".")[0] for m in sys.modules}
    assert "alembic_autolock.pytest_plugin" in sys.modules
    assert loaded & {"sqlalchemy", "alembic"} == set()
"""


@dataclass
class Session:
    """A finished pytest session of the sample project."""

    returncode: int
    output: str
    trace: list[list[str]]
    report: list[dict[str, Any]]


class Sample:
    """The sample project in a directory of its own; ``run`` runs pytest in it."""

    def __init__(self, root: Path, ini: str = "", conftest: str = "") -> None:
        self.root = root
        versions = root / "migrations" / "versions"
        versions.mkdir(parents=True)
        (root / "alembic.ini").write_text(
            "[alembic]\nscript_location = %(here)s/migrations\npath_separator = os\n"
        )
        (root / "migrations" / "env.py").write_text(ENV_PY)
        for down, rev in zip([None, *REVISIONS], REVISIONS, strict=False):
            (versions / f"{rev}.py").write_text(REVISION.format(rev=rev, down=down))
        (root / "tests").mkdir()
        (root / "tests" / "test_sample.py").write_text(SAMPLE_TESTS)
        (root / "tests" / "test_plain.py").write_text(PLAIN_TESTS)
        (root / "tests" / "shows_url.py").write_text(SHOWING_TESTS)
        (root / "pytest.ini").write_text(
            "[pytest]\naddopts = -p no:cacheprovider -p no:randomly\n"
            "autolock_config = alembic.ini\n" + textwrap.dedent(ini)
        )
        (root / "conftest.py").write_text(textwrap.dedent(conftest))
        self.trace_path = root / "trace.log"
        self.report_path = root / "report.jsonl"

    def run(self, *args: str, timeout: float = 240, **env: str) -> Session:
        for path in (self.trace_path, self.report_path):
            path.unlink(missing_ok=True)
        environ = {
            k: v
            for k, v in os.environ.items()
            if k not in ("DATABASE_URL", "ALEMBIC_AUTOLOCK_URL", "ALEMBIC_CONFIG")
            and not k.startswith("PYTEST_")
        }
        environ.update(
            SAMPLE_TRACE=str(self.trace_path), SAMPLE_REPORT=str(self.report_path), **env
        )
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-v", "-p", "no:randomly", *args],
            cwd=self.root,
            env=environ,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        return Session(
            proc.returncode,
            proc.stdout + proc.stderr,
            _lines(self.trace_path),
            [json.loads(line) for line in _text(self.report_path).splitlines()],
        )


def _text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def _lines(path: Path) -> list[list[str]]:
    return [line.split() for line in _text(path).splitlines()]


def _pg_databases(prefix: str) -> list[str]:
    engine = create_engine(f"{PG_BASE}/postgres")
    try:
        with engine.connect() as conn:
            return list(
                conn.execute(
                    text("SELECT datname FROM pg_database WHERE datname LIKE :p"),
                    {"p": prefix + "%"},
                ).scalars()
            )
    finally:
        engine.dispose()


def _mysql_databases(prefix: str) -> list[str]:
    engine = create_engine(MYSQL_URL)
    try:
        with engine.connect() as conn:
            return list(
                conn.execute(
                    text(
                        "SELECT SCHEMA_NAME FROM information_schema.SCHEMATA "
                        "WHERE SCHEMA_NAME LIKE :p"
                    ),
                    {"p": prefix + "%"},
                ).scalars()
            )
    finally:
        engine.dispose()


def _base_name() -> str:
    return f"autolock_pt{uuid.uuid4().hex[:8]}"


def _assert_migrated_once(session: Session, workers: list[str]) -> str:
    """Every revision ran once, in one process; every worker's tests saw the schema at head,
    one worker's call applied the revisions and the others' found them applied. Returns the
    name of the database the tests used."""
    assert session.returncode == 0, session.output
    assert [line[0] for line in session.trace] == REVISIONS
    assert len({line[1] for line in session.trace}) == 1
    assert len(session.report) == 32
    assert {r["worker"] for r in session.report} == set(workers)
    assert all(r["url_is_engine_url"] for r in session.report)
    by_worker = {r["worker"]: (r["action"], r["applied"]) for r in session.report}
    assert sorted(by_worker.values()) == sorted(
        [("upgraded", REVISIONS)] + [("current", [])] * (len(workers) - 1)
    )
    (database,) = {r["database"] for r in session.report}
    assert PG_PASSWORD not in session.output
    return str(database)


def _gw(n: int) -> list[str]:
    return [f"gw{i}" for i in range(n)]


@pytest.fixture
def sample(tmp_path: Path) -> Sample:
    return Sample(tmp_path / "sample")


# --- PostgreSQL ----------------------------------------------------------------------------


@pytest.mark.postgresql
@pytest.mark.parametrize("workers", [4, 8])
def test_xdist_workers_share_one_fresh_database_migrated_once(sample: Sample, workers: int) -> None:
    """-n 4 / -n 8 with a fresh database: the revisions run once, every worker's tests see
    the schema at head, and the run's database is dropped at the end."""
    need_service("PostgreSQL", "127.0.0.1", 5432)
    base = _base_name()
    session = sample.run(
        "-n",
        str(workers),
        "--autolock-fresh-database",
        "--autolock-url",
        f"{PG_BASE}/{base}",
        SAMPLE_SLOW="1",
    )
    database = _assert_migrated_once(session, _gw(workers))
    assert database.removeprefix(base + "_") != database
    assert RUN_ID.fullmatch(database.removeprefix(base + "_"))
    assert _pg_databases(base) == []
    masked = f"postgresql+psycopg2://postgres:***@127.0.0.1:5432/{database}"
    assert f"dropped the run's database {masked}" in session.output
    assert f"{workers - 1} processes found it at head" in session.output


@pytest.mark.postgresql
def test_a_failing_revision_fails_every_worker(sample: Sample) -> None:
    """A revision that raises fails the tests of every worker with the library's message
    naming it (no worker hangs), and the run's database is still dropped."""
    need_service("PostgreSQL", "127.0.0.1", 5432)
    base = _base_name()
    session = sample.run(
        "-n",
        "4",
        "tests/test_sample.py",
        "--autolock-fresh-database",
        "--autolock-url",
        f"{PG_BASE}/{base}",
        SAMPLE_FAIL="a2",
    )
    assert session.returncode == 1, session.output
    errors = re.findall(r"^\[(gw\d)\] \[\s*\d+%\] ERROR tests/test_sample.py", session.output, re.M)
    assert len(errors) == 32
    assert set(errors) == set(_gw(4))
    assert " PASSED " not in session.output
    masked = f"postgresql+psycopg2://postgres:***@127.0.0.1:5432/{base}_"
    reported = re.findall(
        r"^alembic-autolock: could not bring (\S+) to head: (.*)$", session.output, re.M
    )
    assert len(reported) == 32
    assert {database.startswith(masked) for database, _ in reported} == {True}
    assert {message.split(". ")[0] for _, message in reported} == {
        "migration a2 failed: RuntimeError: a2 is broken on purpose"
    }
    assert "During handling of the above exception" not in session.output
    assert session.report == []
    assert _pg_databases(base) == []
    assert PG_PASSWORD not in session.output


@pytest.mark.postgresql
def test_without_xdist_the_session_migrates_and_drops(sample: Sample) -> None:
    """A plain session (no -n) migrates its fresh database once and drops it at the end."""
    need_service("PostgreSQL", "127.0.0.1", 5432)
    base = _base_name()
    # the URL from $DATABASE_URL, the switch from the ini option
    session = sample.run(
        "-p", "no:xdist", "-o", "autolock_fresh_database=true", DATABASE_URL=f"{PG_BASE}/{base}"
    )
    database = _assert_migrated_once(session, ["main"])
    assert database.startswith(base + "_")
    assert _pg_databases(base) == []
    assert "dropped the run's database" in session.output


@pytest.mark.postgresql
def test_an_existing_database_is_migrated_once_and_kept(sample: Sample, pg_url: str) -> None:
    """Without a fresh database the given one is migrated (once, under -n 2) and kept; the
    next run finds it at head and applies nothing."""
    first = sample.run("-n", "2", "tests/test_sample.py", ALEMBIC_AUTOLOCK_URL=pg_url)
    database = _assert_migrated_once(first, _gw(2))
    assert database == make_url(pg_url).database
    second = sample.run("-n", "2", "tests/test_sample.py", ALEMBIC_AUTOLOCK_URL=pg_url)
    assert second.returncode == 0, second.output
    assert second.trace == []
    assert {(r["action"], tuple(r["applied"])) for r in second.report} == {("current", ())}
    assert "dropped" not in second.output


@pytest.mark.postgresql
def test_with_pytest_postgresql_noproc(sample: Sample) -> None:
    """The URL taken from pytest-postgresql's postgresql_noproc (by overriding autolock_url):
    two workers share one fresh database on that server."""
    need_service("PostgreSQL", "127.0.0.1", 5432)
    base = _base_name()
    sample = Sample(
        sample.root.parent / "noproc",
        ini=f"""\
        postgresql_host = 127.0.0.1
        postgresql_port = 5432
        postgresql_user = postgres
        postgresql_password = {PG_PASSWORD}
        autolock_fresh_database = true
        """,
        conftest=f"""\
        import pytest
        from sqlalchemy.engine import URL


        @pytest.fixture(scope="session")
        def autolock_url(postgresql_noproc):
            server = postgresql_noproc
            return URL.create(
                "postgresql+psycopg",
                username=server.user,
                password=server.password,
                host=server.host,
                port=server.port,
                database={base!r},
            ).render_as_string(hide_password=False)
        """,
    )
    session = sample.run("-n", "2", "tests/test_sample.py")
    database = _assert_migrated_once(session, _gw(2))
    assert database.startswith(base + "_")
    assert _pg_databases(base) == []


# --- MariaDB and SQLite --------------------------------------------------------------------


@pytest.mark.mysql
def test_mysql_workers_share_one_fresh_database(sample: Sample) -> None:
    """MariaDB: four workers, one fresh database migrated once under GET_LOCK, then dropped."""
    parts = make_url(MYSQL_URL)
    need_service("MariaDB", parts.host or "127.0.0.1", parts.port or 3306)
    base = _base_name()
    session = sample.run(
        "-n", "4", "--autolock-fresh-database", "--autolock-url", f"{MYSQL_URL}/{base}"
    )
    database = _assert_migrated_once(session, _gw(4))
    assert database.startswith(base + "_")
    assert _mysql_databases(base) == []


def test_sqlite_workers_share_one_fresh_file(sample: Sample, tmp_path: Path) -> None:
    """SQLite: four workers share one fresh database file beside the given one (under the
    file lock), which is removed at the end with its lock file."""
    data = tmp_path / "data"
    data.mkdir()
    session = sample.run(
        "-n", "4", "--autolock-fresh-database", "--autolock-url", f"sqlite:///{data}/app.db"
    )
    database = _assert_migrated_once(session, _gw(4))
    assert Path(database).parent == data
    assert RUN_ID.fullmatch(Path(database).name.removeprefix("app_").removesuffix(".db"))
    assert list(data.iterdir()) == []


# --- bad input and sessions that do not use the plugin -------------------------------------


def test_no_url_is_a_usage_error_naming_the_options(sample: Sample) -> None:
    """No URL anywhere: the tests that need the database fail with a message that names the
    option, the ini key and the variables; the others still pass."""
    session = sample.run()
    assert session.returncode == 1, session.output
    assert "no database URL for migrated_database_url: pass --autolock-url URL" in session.output
    assert "autolock_url" in session.output
    assert "$DATABASE_URL" in session.output
    assert "1 passed, 32 errors" in session.output
    assert session.trace == []


def test_a_database_name_that_cannot_be_used_is_refused(sample: Sample) -> None:
    """A fresh database is named after the URL's database: one that is not letters, digits and
    underscores is refused before anything is created."""
    session = sample.run(
        "tests/test_sample.py",
        "--autolock-fresh-database",
        "--autolock-url",
        f'{PG_BASE}/bad";name',
    )
    assert session.returncode == 1, session.output
    assert "must be letters, digits and underscores" in session.output
    assert session.trace == []
    assert PG_PASSWORD not in session.output


def test_a_session_that_does_not_use_the_fixtures_is_unchanged(sample: Sample) -> None:
    """With no URL configured, a session whose tests use no fixture of the plugin passes,
    imports neither SQLAlchemy nor Alembic, and prints nothing of the plugin."""
    session = sample.run("-n", "2", "tests/test_plain.py")
    assert session.returncode == 0, session.output
    assert "1 passed" in session.output
    assert not re.search(r"^=+ alembic-autolock =+$", session.output, re.M)


def test_importing_the_plugin_imports_neither_sqlalchemy_nor_alembic() -> None:
    """What every pytest session pays for the entry point: no SQLAlchemy, no Alembic."""
    code = (
        "import sys, alembic_autolock.pytest_plugin; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'sqlalchemy', 'alembic'}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    ).stdout
    assert out.strip() == "[]"


@pytest.mark.postgresql
def test_a_failing_test_does_not_show_the_password(sample: Sample, pg_url: str) -> None:
    """A failing test that takes migrated_database_url shows it with the password masked."""
    session = sample.run("-p", "no:xdist", "tests/shows_url.py", "--autolock-url", pg_url)
    assert session.returncode == 1, session.output
    assert "migrated_database_url = 'postgresql+psycopg2://postgres:***@127.0.0.1" in (
        session.output
    )
    assert PG_PASSWORD not in session.output


# --- the example ---------------------------------------------------------------------------


@pytest.mark.postgresql
def test_the_pytest_xdist_example_runs(tmp_path: Path) -> None:
    """examples/pytest_xdist, as docs/testing.md runs it: -n 4 against a fresh database."""
    need_service("PostgreSQL", "127.0.0.1", 5432)
    base = _base_name()
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    environ["DATABASE_URL"] = f"{PG_BASE}/{base}"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-n", "4", "-p", "no:cacheprovider"],
        cwd=REPO / "examples" / "pytest_xdist",
        env=environ,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert re.search(r"\b\d+ passed\b", output)
    assert "dropped the run's database" in output
    assert _pg_databases(base) == []
    assert PG_PASSWORD not in output
