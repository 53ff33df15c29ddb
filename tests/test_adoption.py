"""Adoption without surprises: existing env.py shapes, each replaced by run_migrations(...).

For every shape the project is built as its authors had it (Alembic's or Flask-Migrate's own
generated files, with the project's edits), then copied with env.py's body replaced. The
original env.py builds the schema on one database, single process and unlocked; the adopted one
runs as 8 concurrent processes on another. Then:

1. exactly once: every revision body ran once (the trace, tests/migrations/autolock_test_behaviour);
2. the same schema: tables, columns with types, indexes, keys and the version table's rows, as
   the inspector reads them (the library's journal table is left out: it is the library's);
3. the same failure: with a revision that raises, the original and the adopted env.py leave the
   same heads and tables, and the library says so in one line (the plain ``alembic`` command:
   one ``FAILED:`` line, exit status 255, no traceback).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from alembic.config import Config
from servers import ConnectionSampler
from sqlalchemy import create_engine, event, inspect, text
from sqlalchemy.engine import Engine, make_url
from support import (
    ALL_REVS,
    MIGRATIONS,
    PG_DRIVERS,
    heads_of,
    with_driver,
    worker_env,
)

from alembic import command
from alembic_autolock import ensure_migrated

BIN = Path(sys.executable).parent
ALEMBIC = str(BIN / "alembic")
FLASK = str(BIN / "flask")
CLI = str(BIN / "alembic-autolock")
JOURNAL = "alembic_autolock_journal"
HOLDERS = "alembic_autolock_holders"  # MySQL/MariaDB: who holds the named lock
FLEET = 8

# --- projects --------------------------------------------------------------------------------


def revision(rev: str, down: str | None, ddl: str, rest: str = "") -> str:
    """A revision file: its body is traced, ``ddl`` runs, then the injected failure point
    (AUTOLOCK_TEST_FAIL_AT), then ``rest``."""
    body = textwrap.indent(textwrap.dedent(ddl).strip(), "    ")
    after = textwrap.indent(textwrap.dedent(rest).strip(), "    ") if rest else ""
    return (
        f'"""{rev}"""\n\nimport sqlalchemy as sa\nfrom alembic import op\n\n'
        "import autolock_test_behaviour as behaviour\n\n"
        f"revision = {rev!r}\ndown_revision = {down!r}\nbranch_labels = None\n"
        "depends_on = None\n\n\ndef upgrade():\n    behaviour.body(revision)\n"
        f"{body}\n    behaviour.after_ddl(revision)\n{after}\n\n\ndef downgrade():\n    pass\n"
    )


def alembic_project(root: Path, url: str, *, revisions: dict[str, str] | None = None) -> Path:
    """``alembic init`` with the installed Alembic's generic template (its alembic.ini and
    env.py, unchanged), sqlalchemy.url pointed at ``url``, and the revisions (default: the
    suite's r1..r5)."""
    root.mkdir(parents=True)
    ini = root / "alembic.ini"
    command.init(Config(str(ini)), str(root / "migrations"))
    ini.write_text(
        ini.read_text()
        .replace("driver://user:pass@localhost/dbname", url.replace("%", "%%"))
        .replace(
            f"script_location = {root / 'migrations'}", "script_location = %(here)s/migrations"
        )
    )
    versions = root / "migrations" / "versions"
    if revisions is None:
        for path in sorted((MIGRATIONS / "versions").glob("r*.py")):
            shutil.copy(path, versions)
    else:
        for rev, source in revisions.items():
            (versions / f"{rev}.py").write_text(source)
    return root


def edit(path: Path, *replacements: tuple[str, str]) -> None:
    """The project's own edits of a generated file; each must apply."""
    content = path.read_text()
    for old, new in replacements:
        assert old in content, (path, old)
        content = content.replace(old, new)
    path.write_text(content)


def copy_project(source: Path, copy: Path, url: str) -> Path:
    """The project copied as it is, its alembic.ini pointed at ``url``."""
    shutil.copytree(source, copy)
    ini = copy / "alembic.ini"
    content = ini.read_text()
    old = original_url(content)
    ini.write_text(content.replace(old.replace("%", "%%"), url.replace("%", "%%")))
    return copy


def adopt(original: Path, copy: Path, url: str, env_py: str, *, autolock: str = "") -> Path:
    """A copy of the project whose env.py body is replaced, pointed at ``url``, with an
    [alembic_autolock] section if given. Everything else stays as it was."""
    copy_project(original, copy, url)
    if autolock:
        with (copy / "alembic.ini").open("a") as f:
            f.write(f"\n[alembic_autolock]\n{textwrap.dedent(autolock).strip()}\n")
    (copy / "migrations" / "env.py").write_text(textwrap.dedent(env_py).lstrip())
    return copy


def original_url(ini_text: str) -> str:
    match = re.search(r"^sqlalchemy\.url = (.*)$", ini_text, re.MULTILINE)
    assert match is not None
    return match.group(1).replace("%%", "%")


def project_env(root: Path, **extra: str) -> dict[str, str]:
    """The environment the project's processes run in: its root and the test revisions'
    helper module importable, tracing as the test's trace fixture says."""
    env = worker_env(**extra)
    env["PYTHONPATH"] = os.pathsep.join([str(root), str(MIGRATIONS), env["PYTHONPATH"]])
    return env


def run(argv: list[str], root: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, cwd=root, env=env, capture_output=True, text=True, timeout=120, check=False
    )


def fleet(
    argv: list[str], root: Path, env: dict[str, str], n: int = FLEET
) -> list[subprocess.CompletedProcess[str]]:
    """``n`` processes of ``argv`` started together; their outcomes."""
    procs = [
        subprocess.Popen(
            argv, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(n)
    ]
    try:
        done = []
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            done.append(subprocess.CompletedProcess(argv, proc.returncode, out, err))
        return done
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()


def untraced(root: Path, **extra: str) -> dict[str, str]:
    """The environment of the original project's runs: its revision bodies are not traced."""
    return project_env(root, AUTOLOCK_TEST_TRACE="", **extra)


def failing(root: Path, rev: str) -> dict[str, str]:
    return project_env(root, AUTOLOCK_TEST_TRACE="", AUTOLOCK_TEST_FAIL_AT=rev)


def all_succeeded(runs: list[subprocess.CompletedProcess[str]]) -> None:
    problems = [r.stderr[-1500:] for r in runs if r.returncode != 0 or "Traceback" in r.stderr]
    assert problems == []


def one_failed_line(result: subprocess.CompletedProcess[str]) -> str:
    """The plain alembic command's report of a library error: Alembic's one FAILED: line on
    stdout, exit status 255, no traceback anywhere."""
    assert result.returncode == 255, (result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    [line] = [line for line in result.stdout.splitlines() if line.startswith("FAILED:")]
    return line


# --- databases -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dropper() -> Iterator[ThreadPoolExecutor]:
    """Drops databases in the background (a PostgreSQL DROP DATABASE waits for a checkpoint,
    most of a second), all of them before the module's tests end."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        yield pool


@pytest.fixture
def databases(pg_url: str, dropper: ThreadPoolExecutor) -> Iterator[Callable[..., list[str]]]:
    """make(n, base=pg_url): n fresh databases beside ``base``'s, on the same server and with
    the same URL but the database name; dropped after the test."""
    made: list[str] = []

    def make(n: int, base: str = pg_url) -> list[str]:
        url = make_url(base)
        names = [f"{url.database}_{uuid.uuid4().hex[:8]}" for _ in range(n)]
        admin = create_engine(base, isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                for name in names:
                    quoted = f'"{name}"' if url.get_backend_name() == "postgresql" else f"`{name}`"
                    conn.execute(text(f"CREATE DATABASE {quoted}"))
        finally:
            admin.dispose()
        urls = [url.set(database=name).render_as_string(hide_password=False) for name in names]
        made.extend(urls)
        return urls

    yield make
    for url in made:
        dropper.submit(drop_database, url)


def drop_database(url: str) -> None:
    parsed = make_url(url)
    name = parsed.database
    admin = create_engine(parsed.set(database=None), isolation_level="AUTOCOMMIT")
    if parsed.get_backend_name() == "postgresql":
        admin = create_engine(parsed.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            if parsed.get_backend_name() == "postgresql":
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            else:
                for (cid,) in conn.execute(
                    text("SELECT ID FROM information_schema.PROCESSLIST WHERE DB = :db"),
                    {"db": name},
                ):
                    conn.execute(text(f"KILL {int(cid)}"))
                conn.execute(text(f"DROP DATABASE IF EXISTS `{name}`"))
    finally:
        admin.dispose()


def execute(url: str, *statements: str) -> None:
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            for statement in statements:
                conn.execute(text(statement))
    finally:
        engine.dispose()


def schema(
    url: str, schemas: tuple[str | None, ...] = (None,), version_schema: str | None = None
) -> dict[str, Any]:
    """What the inspector reads: per table its columns (name, type, nullable, default),
    primary key, foreign keys, unique constraints and indexes; and the version table's rows.
    The library's own tables (the journal, MySQL's lock holders) are left out."""
    engine = create_engine(url)
    try:
        look = inspect(engine)
        found: dict[str, Any] = {}
        for where in schemas:
            for table in sorted(look.get_table_names(schema=where)):
                if table in (JOURNAL, HOLDERS):
                    continue
                found[f"{where or ''}.{table}"] = {
                    "columns": [
                        (c["name"], str(c["type"]), c["nullable"], str(c.get("default")))
                        for c in look.get_columns(table, schema=where)
                    ],
                    "pk": look.get_pk_constraint(table, schema=where)["constrained_columns"],
                    "fks": sorted(
                        (
                            tuple(fk["constrained_columns"]),
                            fk["referred_schema"],
                            fk["referred_table"],
                            tuple(fk["referred_columns"]),
                        )
                        for fk in look.get_foreign_keys(table, schema=where)
                    ),
                    "unique": sorted(
                        tuple(u["column_names"])
                        for u in look.get_unique_constraints(table, schema=where)
                    ),
                    "indexes": sorted(
                        (i["name"], tuple(i["column_names"]), bool(i["unique"]))
                        for i in look.get_indexes(table, schema=where)
                    ),
                }
    finally:
        engine.dispose()
    found["versions"] = sorted(heads_of(url, schema=version_schema))
    return found


def same_failure(
    original: subprocess.CompletedProcess[str],
    original_url: str,
    adopted_url: str,
    **schema_args: Any,
) -> None:
    """The original env.py failed too (its own traceback), and both left the same state."""
    assert original.returncode != 0
    assert schema(adopted_url, **schema_args) == schema(original_url, **schema_args)


# --- a. Flask-Migrate ------------------------------------------------------------------------

FLASK_APP = '''
"""A Flask application factory with Flask-SQLAlchemy models and Flask-Migrate."""

import os

from flask import Flask
from flask_migrate import Migrate
from flask_sqlalchemy import SQLAlchemy

db = SQLAlchemy()
migrate = Migrate()


class User(db.Model):
    __tablename__ = "users"
    id = db.Column(db.Integer, primary_key=True)
    email = db.Column(db.String(120), unique=True, nullable=False)
    name = db.Column(db.String(80))


class Post(db.Model):
    __tablename__ = "posts"
    id = db.Column(db.Integer, primary_key=True)
    user_id = db.Column(db.Integer, db.ForeignKey("users.id"), nullable=False, index=True)
    title = db.Column(db.String(200), nullable=False)


def create_app():
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = os.environ["DATABASE_URL"]
    db.init_app(app)
    migrate.init_app(app, db)
    return app
'''

FLASK_REVISIONS = {
    "f1": revision(
        "f1",
        None,
        """
        op.create_table(
            "users",
            sa.Column("id", sa.Integer(), primary_key=True),
            sa.Column("email", sa.String(length=120), nullable=False),
            sa.UniqueConstraint("email"),
        )
        """,
    ),
    "f2": revision(
        "f2",
        "f1",
        """
        op.create_table(
            "posts",
            sa.Column("id", sa.Integer(), primary_key=True),
            sa.Column("user_id", sa.Integer(), sa.ForeignKey("users.id"), nullable=False),
            sa.Column("title", sa.String(length=200), nullable=False),
        )
        """,
    ),
    # a large table's index, built without locking writes: outside a transaction
    "f3": revision(
        "f3",
        "f2",
        """
        with op.get_context().autocommit_block():
            op.create_index(
                "ix_posts_user_id", "posts", ["user_id"], postgresql_concurrently=True
            )
        """,
        'op.add_column("users", sa.Column("name", sa.String(length=80), nullable=True))',
    ),
}

# The documented recipe (docs/guide.md, "Flask-Migrate"): the app's engine handed over, the
# models' metadata and Flask-Migrate's configure arguments passed on, its "no empty revision"
# hook carried over.
FLASK_ENV = '''
"""Flask-Migrate's env.py, adopted: the application's engine, under the migration lock."""

import logging

from alembic import context
from flask import current_app

from alembic_autolock.env import run_migrations

config = context.config
logger = logging.getLogger("alembic.env")
migrate = current_app.extensions["migrate"]


def process_revision_directives(context, revision, directives):
    # from Flask-Migrate's env.py: `flask db migrate` writes no empty revision
    if getattr(config.cmd_opts, "autogenerate", False):
        script = directives[0]
        if script.upgrade_ops.is_empty():
            directives[:] = []
            logger.info("No changes in schema detected.")


options = {"process_revision_directives": process_revision_directives}
options.update({k: v for k, v in migrate.configure_args.items() if v is not None})
config.attributes.setdefault("connection", migrate.db.engine)
run_migrations(target_metadata=migrate.db.metadata, **options)
'''


@pytest.fixture(scope="module")
def flask_skeleton(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Flask project as `flask db init` leaves it, with its hand-written revisions."""
    root = tmp_path_factory.mktemp("flask") / "project"
    (root / "flaskapp").mkdir(parents=True)
    (root / "flaskapp" / "__init__.py").write_text(textwrap.dedent(FLASK_APP).lstrip())
    env = project_env(root, FLASK_APP="flaskapp:create_app", DATABASE_URL="sqlite://")
    out = run([FLASK, "db", "init"], root, env)
    assert out.returncode == 0, out.stderr
    for rev, source in FLASK_REVISIONS.items():
        (root / "migrations" / "versions" / f"{rev}.py").write_text(source)
    return root


def flask_env(root: Path, url: str, **extra: str) -> dict[str, str]:
    return project_env(root, FLASK_APP="flaskapp:create_app", DATABASE_URL=url, **extra)


def test_flask_migrate(flask_skeleton: Path, tmp_path: Path, databases: Any, trace: Any) -> None:
    """Flask-Migrate: 8 concurrent `flask db upgrade` with the app's engine handed over run
    each revision once and build what Flask-Migrate's own env.py builds; `--sql` renders the
    same script; `flask db migrate` finds no changes (the journal table is not the models');
    a failing revision leaves the same state and one error line, no traceback."""
    original_db, adopted_db, original_fail_db, adopted_fail_db = databases(4)
    original = tmp_path / "original"
    shutil.copytree(flask_skeleton, original)
    adopted = tmp_path / "adopted"  # the database comes from the app's config (DATABASE_URL)
    shutil.copytree(original, adopted)
    (adopted / "migrations" / "env.py").write_text(textwrap.dedent(FLASK_ENV).lstrip())
    # Flask-Migrate's alembic.ini names no database: the application's config does
    assert "sqlalchemy.url" not in (adopted / "migrations" / "alembic.ini").read_text()

    upgrade = [FLASK, "db", "upgrade"]
    assert (
        run(upgrade, original, flask_env(original, original_db, AUTOLOCK_TEST_TRACE="")).returncode
        == 0
    )
    all_succeeded(fleet(upgrade, adopted, flask_env(adopted, adopted_db)))
    assert trace.bodies() == ["f1", "f2", "f3"]
    assert schema(adopted_db) == schema(original_db)
    assert inspect_has(adopted_db, JOURNAL)  # f3 ran outside a transaction: journalled

    sql = [FLASK, "db", "upgrade", "--sql"]
    offline_original = run(
        sql, original, flask_env(original, original_fail_db, AUTOLOCK_TEST_TRACE="")
    )
    offline_adopted = run(sql, adopted, flask_env(adopted, adopted_fail_db, AUTOLOCK_TEST_TRACE=""))
    assert offline_adopted.returncode == 0, offline_adopted.stderr
    assert offline_adopted.stdout == offline_original.stdout
    assert "CREATE INDEX CONCURRENTLY ix_posts_user_id" in offline_adopted.stdout

    migrate = run(
        [FLASK, "db", "migrate", "-m", "nothing"], adopted, flask_env(adopted, adopted_db)
    )
    assert migrate.returncode == 0, migrate.stderr
    assert "No changes in schema detected." in migrate.stderr
    assert sorted(p.name for p in (adopted / "migrations" / "versions").glob("*.py")) == [
        "f1.py",
        "f2.py",
        "f3.py",
    ]

    failed = run(upgrade, adopted, flask_env(adopted, adopted_fail_db, AUTOLOCK_TEST_FAIL_AT="f2"))
    # Flask-Migrate reports Alembic's CommandError (which the library's errors also are) as
    # one "Error:" line and exits 1, as it reports the revision's own RuntimeError
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    [line] = [x for x in failed.stderr.splitlines() if "[flask_migrate] Error:" in x]
    assert "migration f2 failed: RuntimeError: revision f2 failed on purpose" in line
    assert "database unchanged at no revision" in line
    same_failure(
        run(upgrade, original, flask_env(original, original_fail_db, AUTOLOCK_TEST_FAIL_AT="f2")),
        original_fail_db,
        adopted_fail_db,
    )


def inspect_has(url: str, table: str, schema_name: str | None = None) -> bool:
    engine = create_engine(url)
    try:
        return inspect(engine).has_table(table, schema=schema_name)
    finally:
        engine.dispose()


# --- b. include_schemas, two schemas, a version table in a schema of its own --------------------

SCHEMAS_MODELS = """
import sqlalchemy as sa

metadata = sa.MetaData()
sa.Table(
    "orders",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("ref", sa.String(20), nullable=False),
    schema="sales",
)
sa.Table(
    "invoices",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("order_id", sa.Integer, sa.ForeignKey("sales.orders.id"), nullable=False),
    sa.Index("ix_invoices_order_id", "order_id"),
    schema="billing",
)
"""

SCHEMAS_REVISIONS = {
    "s1": revision(
        "s1",
        None,
        """
        op.create_table(
            "orders",
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("ref", sa.String(20), nullable=False),
            schema="sales",
        )
        """,
    ),
    "s2": revision(
        "s2",
        "s1",
        """
        op.create_table(
            "invoices",
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column(
                "order_id", sa.Integer, sa.ForeignKey("sales.orders.id"), nullable=False
            ),
            schema="billing",
        )
        """,
    ),
    "s3": revision(
        "s3",
        "s2",
        """
        with op.get_context().autocommit_block():
            op.create_index(
                "ix_invoices_order_id",
                "invoices",
                ["order_id"],
                schema="billing",
                postgresql_concurrently=True,
            )
        """,
    ),
}

SCHEMAS_ENV = """
from alembic_autolock.env import run_migrations
from models_schemas import metadata

run_migrations(target_metadata=metadata, include_schemas=True)
"""

ALL_SCHEMAS = (None, "sales", "billing", "meta")


def test_include_schemas_with_a_version_table_schema(
    pg_url: str, tmp_path: Path, databases: Any, trace: Any
) -> None:
    """include_schemas=True over two schemas, the version table in a third set in
    [alembic_autolock] (with postgresql:// URLs: psycopg 3): exactly once, the same schemas,
    the journal beside the version table and out of autogenerate, the same failure."""
    urls = [with_driver(u, "psycopg") for u in databases(4)]
    original_db, adopted_db, original_fail_db, adopted_fail_db = urls
    for url in urls:
        execute(url, "CREATE SCHEMA meta", "CREATE SCHEMA sales", "CREATE SCHEMA billing")
    original = alembic_project(tmp_path / "original", original_db, revisions=SCHEMAS_REVISIONS)
    (original / "models_schemas.py").write_text(textwrap.dedent(SCHEMAS_MODELS).lstrip())
    configured = (
        'target_metadata=target_metadata, include_schemas=True, version_table_schema="meta"'
    )
    edit(
        original / "migrations" / "env.py",
        ("target_metadata = None", "from models_schemas import metadata as target_metadata"),
        ("target_metadata=target_metadata", configured),
    )
    adopted = adopt(
        original,
        tmp_path / "adopted",
        adopted_db,
        SCHEMAS_ENV,
        autolock="version_table_schema = meta",
    )

    upgrade = [ALEMBIC, "upgrade", "head"]
    assert run(upgrade, original, untraced(original)).returncode == 0
    all_succeeded(fleet(upgrade, adopted, project_env(adopted)))
    assert trace.bodies() == ["s1", "s2", "s3"]
    assert schema(adopted_db, ALL_SCHEMAS, "meta") == schema(original_db, ALL_SCHEMAS, "meta")
    assert schema(adopted_db, ALL_SCHEMAS, "meta")["versions"] == ["s3"]
    assert inspect_has(adopted_db, JOURNAL, "meta")

    autogen = run(
        [ALEMBIC, "revision", "--autogenerate", "-m", "none"], adopted, project_env(adopted)
    )
    assert autogen.returncode == 0, autogen.stderr
    [generated] = (adopted / "migrations" / "versions").glob("*none.py")
    assert "op." not in generated.read_text().split("def upgrade")[1]

    generated.unlink()

    upgrade_fail = [ALEMBIC, "upgrade", "head"]
    adopted_fail = copy_project(adopted, tmp_path / "adopted-fail", adopted_fail_db)
    line = one_failed_line(run(upgrade_fail, adopted_fail, failing(adopted_fail, "s2")))
    assert line.startswith(
        "FAILED: migration s2 failed: RuntimeError: revision s2 failed on purpose"
    )
    original_fail = copy_project(original, tmp_path / "original-fail", original_fail_db)
    same_failure(
        run(upgrade_fail, original_fail, failing(original_fail, "s2")),
        original_fail_db,
        adopted_fail_db,
        schemas=ALL_SCHEMAS,
        version_schema="meta",
    )


# --- c. Alembic's own env.py: offline --sql with literal_binds, and online, on both servers ----

OFFLINE_REVISIONS = {
    "c1": revision(
        "c1",
        None,
        """
        op.create_table(
            "items",
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("name", sa.String(40), nullable=False),
            sa.Column("price", sa.Numeric(10, 2)),
        )
        """,
    ),
    # bound values: rendered as literals in --sql thanks to literal_binds
    "c2": revision(
        "c2",
        "c1",
        """
        items = sa.table(
            "items",
            sa.column("id", sa.Integer),
            sa.column("name", sa.String),
            sa.column("price", sa.Numeric),
        )
        op.execute(items.insert().values(id=1, name="tea", price=2.5))
        """,
        'op.execute(items.update().where(items.c.id == 1).values(name="green tea"))',
    ),
    "c3": revision(
        "c3",
        "c2",
        """
        if op.get_context().dialect.name == "postgresql":
            with op.get_context().autocommit_block():
                op.create_index("ix_items_name", "items", ["name"], postgresql_concurrently=True)
        else:
            op.create_index("ix_items_name", "items", ["name"])
        """,
    ),
}

# literal_binds and dialect_opts are what Alembic's env.py passes for --sql; run_migrations()
# uses them only there, so one env.py serves both modes
OFFLINE_ENV = """
from alembic_autolock.env import run_migrations

run_migrations(target_metadata=None, literal_binds=True, dialect_opts={"paramstyle": "named"})
"""


@pytest.mark.parametrize("server", ["postgresql", "mysql"])
def test_offline_sql_and_online_with_one_env_py(
    server: str, request: pytest.FixtureRequest, tmp_path: Path, databases: Any, trace: Any
) -> None:
    """Alembic's own env.py (generic template): `upgrade head --sql` renders exactly what the
    original renders, bound values as literals, with no database; the same env.py online, 8
    processes: exactly once, the same schema, the same failure state (MariaDB: DDL commits)."""
    base = request.getfixturevalue("mysql_url") if server == "mysql" else None
    original_db, adopted_db, original_fail_db, adopted_fail_db = (
        databases(4, base) if base else databases(4)
    )
    original = alembic_project(tmp_path / "original", original_db, revisions=OFFLINE_REVISIONS)
    adopted = adopt(original, tmp_path / "adopted", adopted_db, OFFLINE_ENV)

    sql = [ALEMBIC, "upgrade", "head", "--sql"]
    offline = run(sql, adopted, untraced(adopted))
    assert offline.returncode == 0, offline.stderr
    assert offline.stdout == run(sql, original, untraced(original)).stdout
    assert "VALUES (1, 'tea', 2.5)" in offline.stdout
    assert "lock." not in offline.stdout + offline.stderr
    assert not inspect_has(adopted_db, "alembic_version")  # --sql connects to nothing

    upgrade = [ALEMBIC, "upgrade", "head"]
    assert run(upgrade, original, untraced(original)).returncode == 0
    all_succeeded(fleet(upgrade, adopted, project_env(adopted)))
    assert trace.bodies() == ["c1", "c2", "c3"]
    assert schema(adopted_db) == schema(original_db)

    # c3 fails after its index: on PostgreSQL it was built outside the run's transaction, on
    # MariaDB every DDL statement commits; either way both env.py leave the same state
    adopted_fail = copy_project(adopted, tmp_path / "adopted-fail", adopted_fail_db)
    line = one_failed_line(run(upgrade, adopted_fail, failing(adopted_fail, "c3")))
    assert line.startswith("FAILED: migration c3 failed: RuntimeError: revision c3 failed")
    original_fail = copy_project(original, tmp_path / "original-fail", original_fail_db)
    same_failure(
        run(upgrade, original_fail, failing(original_fail, "c3")), original_fail_db, adopted_fail_db
    )
    assert schema(adopted_fail_db)["versions"] == ["c2"]


@pytest.mark.parametrize(
    ("per_migration", "fail_at", "left_at"), [(False, "r5", ["r3"]), (True, "r3", ["r2"])]
)
def test_transaction_choice_is_carried_over(
    per_migration: bool,
    fail_at: str,
    left_at: list[str],
    tmp_path: Path,
    databases: Any,
) -> None:
    """Alembic's default (one transaction for the run) and transaction_per_migration=True
    passed in env.py leave what the original leaves after a failure: r4's autocommit_block
    commits what came before it; per migration, every revision before the failed one stays."""
    original_db, adopted_db = databases(2)
    original = alembic_project(tmp_path / "original", original_db)
    option = ", transaction_per_migration=True" if per_migration else ""
    if per_migration:
        edit(
            original / "migrations" / "env.py",
            (
                "connection=connection, target_metadata=target_metadata",
                "connection=connection, target_metadata=target_metadata" + option,
            ),
        )
    adopted = adopt(
        original,
        tmp_path / "adopted",
        adopted_db,
        "from alembic_autolock.env import run_migrations\n\n"
        f"run_migrations({option.lstrip(', ')})\n",
    )
    upgrade = [ALEMBIC, "upgrade", "head"]
    line = one_failed_line(run(upgrade, adopted, failing(adopted, fail_at)))
    assert f"State left behind: database at revision {left_at[0]}" in line
    same_failure(run(upgrade, original, failing(original, fail_at)), original_db, adopted_db)
    assert schema(adopted_db)["versions"] == left_at


# --- d. SET statement_timeout / lock_timeout on the migration connection ---------------------

SETTINGS_REVISIONS = {
    "d1": revision(
        "d1",
        None,
        """
        op.create_table(
            "seen",
            sa.Column("statement_timeout", sa.String(20)),
            sa.Column("lock_timeout", sa.String(20)),
            sa.Column("session", sa.String(64)),
            sa.Column("pid", sa.Integer),
            sa.Column("lock_sessions", sa.Integer),
        )
        """,
        """
        op.execute(
            "INSERT INTO seen SELECT current_setting('statement_timeout'), "
            "current_setting('lock_timeout'), current_setting('application_name'), "
            "pg_backend_pid(), (SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name LIKE 'autolock:lock:%')"
        )
        """,
    ),
    "d2": revision(
        "d2", "d1", 'op.create_table("d2", sa.Column("id", sa.Integer, primary_key=True))'
    ),
}

SETTINGS_ENV = """
from alembic_autolock.env import run_migrations


def session_settings(connection):
    connection.exec_driver_sql("SET statement_timeout = '4s'")
    connection.exec_driver_sql("SET lock_timeout = '3s'")


run_migrations(connection_setup=session_settings)
"""

ORIGINAL_SETTINGS = """    with connectable.connect() as connection:
        connection.exec_driver_sql("SET statement_timeout = '4s'")
        connection.exec_driver_sql("SET lock_timeout = '3s'")
        connection.commit()
"""


def seen(url: str) -> list[tuple[Any, ...]]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(row) for row in conn.execute(text("SELECT * FROM seen"))]
    finally:
        engine.dispose()


def settings_project(root: Path, url: str) -> Path:
    original = alembic_project(root, url, revisions=SETTINGS_REVISIONS)
    edit(
        original / "migrations" / "env.py",
        ("    with connectable.connect() as connection:\n", ORIGINAL_SETTINGS),
    )
    return original


def test_connection_setup_sets_the_migration_session(
    tmp_path: Path, databases: Any, trace: Any
) -> None:
    """SET statement_timeout / lock_timeout, done by the original env.py on its connection, done
    by connection_setup=: the revisions see them, on the migration session (the lock session
    is another one, and exactly one); exactly once, same schema, same failure."""
    original_db, adopted_db, original_fail_db, adopted_fail_db = databases(4)
    original = settings_project(tmp_path / "original", original_db)
    adopted = adopt(original, tmp_path / "adopted", adopted_db, SETTINGS_ENV)

    upgrade = [ALEMBIC, "upgrade", "head"]
    assert run(upgrade, original, untraced(original)).returncode == 0
    all_succeeded(fleet(upgrade, adopted, project_env(adopted)))
    assert trace.bodies() == ["d1", "d2"]
    assert schema(adopted_db) == schema(original_db)
    [(timeout, lock_timeout, *_)] = seen(original_db)
    [(a_timeout, a_lock_timeout, session, _, lock_sessions)] = seen(adopted_db)
    assert (a_timeout, a_lock_timeout) == (timeout, lock_timeout) == ("4s", "3s")
    assert session.startswith("autolock:migrate:") and lock_sessions == 1

    adopted_fail = copy_project(adopted, tmp_path / "adopted-fail", adopted_fail_db)
    line = one_failed_line(run(upgrade, adopted_fail, failing(adopted_fail, "d2")))
    assert line.startswith("FAILED: migration d2 failed: RuntimeError: revision d2 failed")
    original_fail = copy_project(original, tmp_path / "original-fail", original_fail_db)
    same_failure(
        run(upgrade, original_fail, failing(original_fail, "d2")), original_fail_db, adopted_fail_db
    )


@pytest.mark.parametrize("pg_url", PG_DRIVERS, indirect=True)
def test_connection_setup_never_reaches_the_lock_or_the_pool(
    pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In-process, with the application's engine handed over: the SET statements go to the
    migration session only (never to the lock session), and the application's pool gets back
    none of the migration session's settings or name."""
    project = adopt(
        settings_project(tmp_path / "original", pg_url), tmp_path / "adopted", pg_url, SETTINGS_ENV
    )
    monkeypatch.syspath_prepend(str(MIGRATIONS))
    engine = create_engine(pg_url, connect_args={"application_name": "myapp"})
    sent: list[tuple[int, str]] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        sent.append((cursor.connection.info.backend_pid, statement))

    cfg = Config(str(project / "alembic.ini"))
    cfg.attributes["connection"] = engine
    event.listen(Engine, "before_cursor_execute", record)
    try:
        command.upgrade(cfg, "head")
    finally:
        event.remove(Engine, "before_cursor_execute", record)
    [(_, _, _, migration_pid, _)] = seen(pg_url)
    set_on = {pid for pid, sql in sent if sql.startswith("SET ")}
    lock_sessions = {
        pid for pid, sql in sent if "pg_try_advisory_lock(" in sql and "AS waiter" in sql
    }
    assert set_on == {migration_pid}
    assert lock_sessions and migration_pid not in lock_sessions
    with engine.connect() as conn:
        after = conn.execute(
            text(
                "SELECT current_setting('application_name'), current_setting('statement_timeout'),"
                " current_setting('lock_timeout')"
            )
        ).one()
    engine.dispose()
    assert tuple(after) == ("myapp", "0", "0")


# --- e. an application that calls alembic.command.upgrade with its own logging ----------------

LOGGING_APP = '''
"""An application that migrates in-process, with its own logging: root at DEBUG, its handler."""

import json
import logging
import sys

import alembic.command
import alembic.config
import sqlalchemy  # noqa: F401  (its loggers exist before the migration, as in an app)

handler = logging.StreamHandler(sys.stderr)
handler.setFormatter(logging.Formatter("APP %(name)s %(levelname)s %(message)s"))
root = logging.getLogger()
root.addHandler(handler)
root.setLevel(logging.DEBUG)
logging.getLogger("myapp").setLevel(logging.INFO)


def state():
    loggers = {
        name: [lg.level, lg.disabled, lg.propagate, [id(h) for h in lg.handlers]]
        for name, lg in logging.Logger.manager.loggerDict.items()
        if isinstance(lg, logging.Logger)
    }
    return [root.level, [id(h) for h in root.handlers]], loggers


root_before, before = state()
alembic.command.upgrade(alembic.config.Config("alembic.ini"), "head")
root_after, after = state()
changed = sorted(name for name in before if after[name] != before[name])
print(json.dumps({"root_unchanged": root_before == root_after, "changed": changed}))
'''


def test_in_process_application_keeps_its_logging(
    tmp_path: Path, databases: Any, trace: Any
) -> None:
    """An app that calls alembic.command.upgrade(Config("alembic.ini")) with its own logging:
    afterwards its logging configuration is as it was (Alembic's stock env.py replaces it) and
    its handler got the library's events; through the `alembic` command the project's
    unchanged alembic.ini ([logger_alembic] at INFO) shows them."""
    original_db, adopted_db, original_fail_db, adopted_fail_db = databases(4)
    original = alembic_project(tmp_path / "original", original_db)
    (original / "app.py").write_text(textwrap.dedent(LOGGING_APP).lstrip())
    adopted = adopt(original, tmp_path / "adopted", adopted_db, RUN_MIGRATIONS_ONLY)

    app = [sys.executable, "app.py"]
    before = run(app, original, untraced(original))
    assert before.returncode == 0, before.stderr
    assert json.loads(before.stdout.splitlines()[-1])["root_unchanged"] is False  # fileConfig()
    runs = fleet(app, adopted, project_env(adopted))
    all_succeeded(runs)
    assert trace.bodies() == ALL_REVS
    assert schema(adopted_db) == schema(original_db)
    for result in runs:
        assert json.loads(result.stdout.splitlines()[-1]) == {
            "root_unchanged": True,
            "changed": [],
        }
    app_events = Counter(
        line.split()[3]
        for r in runs
        for line in r.stderr.splitlines()
        if line.startswith("APP alembic.autolock ")
    )
    assert app_events["migration.started"] == 1 and app_events["lock.acquired"] >= 1

    adopted_fail = copy_project(adopted, tmp_path / "adopted-fail", adopted_fail_db)
    failed = run([ALEMBIC, "upgrade", "head"], adopted_fail, failing(adopted_fail, "r3"))
    assert one_failed_line(failed).startswith("FAILED: migration r3 failed")
    assert "INFO  [alembic.autolock] lock.acquired backend=postgresql" in failed.stderr
    assert "ERROR [alembic.autolock] migration.failed revision=r3" in failed.stderr
    original_fail = copy_project(original, tmp_path / "original-fail", original_fail_db)
    same_failure(
        run([ALEMBIC, "upgrade", "head"], original_fail, failing(original_fail, "r3")),
        original_fail_db,
        adopted_fail_db,
    )


RUN_MIGRATIONS_ONLY = """
from alembic_autolock.env import run_migrations

run_migrations()
"""


# --- f. create_all + stamp on an empty database -------------------------------------------------

MODELS = """
import sqlalchemy as sa

metadata = sa.MetaData()
sa.Table(
    "t1",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("note", sa.String(50)),
    sa.Index("ix_t1_note", "note"),
)
for name in ("t2", "t3", "t5"):
    sa.Table(
        name,
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("note", sa.String(50)),
    )
"""

# The Alembic cookbook's "building an up to date database from scratch", as the project did it.
COOKBOOK = """
from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, inspect

from models import metadata

config = Config("alembic.ini")
engine = create_engine(config.get_main_option("sqlalchemy.url"))
if not inspect(engine).has_table("alembic_version"):
    metadata.create_all(engine)
    command.stamp(config, "head")
else:
    command.upgrade(config, "head")
"""

CREATE_ALL_ENV = """
from alembic_autolock.env import run_migrations
from models import metadata

run_migrations(target_metadata=metadata)
"""


def test_create_all_and_stamp_on_an_empty_database(
    tmp_path: Path, databases: Any, trace: Any
) -> None:
    """empty_database = create_all with env.py's target_metadata: 8 `alembic upgrade head` on
    an empty database create the tables and stamp head once, no revision body runs, and the
    schema is the cookbook's (create_all + command.stamp). A database with the models' tables
    but no version table is refused with UnversionedDatabase, untouched."""
    original_db, adopted_db, unversioned_db = databases(3)
    original = alembic_project(tmp_path / "original", original_db)
    (original / "models.py").write_text(textwrap.dedent(MODELS).lstrip())
    (original / "cookbook.py").write_text(textwrap.dedent(COOKBOOK).lstrip())
    edit(
        original / "migrations" / "env.py",
        ("target_metadata = None", "from models import metadata as target_metadata"),
    )
    adopted = adopt(
        original,
        tmp_path / "adopted",
        adopted_db,
        CREATE_ALL_ENV,
        autolock="empty_database = create_all",
    )

    assert run([sys.executable, "cookbook.py"], original, untraced(original)).returncode == 0
    runs = fleet([ALEMBIC, "upgrade", "head"], adopted, project_env(adopted))
    all_succeeded(runs)
    assert sum(r.stderr.count("migration.created tables=4") for r in runs) == 1
    assert trace.bodies() == []
    assert schema(adopted_db) == schema(original_db)
    assert schema(adopted_db)["versions"] == ["r5"]

    engine = create_engine(unversioned_db)
    with engine.begin() as conn:
        exec_models(conn, original)
    engine.dispose()
    unversioned = copy_project(adopted, tmp_path / "unversioned", unversioned_db)
    before = schema(unversioned_db)
    line = one_failed_line(run([ALEMBIC, "upgrade", "head"], unversioned, project_env(unversioned)))
    assert line.startswith(
        "FAILED: the database has 4 table(s) of the models (t1, t2, t3, t5) but no alembic_version"
    )
    assert schema(unversioned_db) == before


def exec_models(conn: Any, root: Path) -> None:
    """The project's models, created as an application's create_all() would."""
    namespace: dict[str, Any] = {}
    exec((root / "models.py").read_text(), namespace)  # noqa: S102  # the test's own file
    namespace["metadata"].create_all(conn)


# --- g. a custom MigrationContext with its own fn, under migration_lock() ----------------------

CUSTOM = '''
"""The project migrates by its own path: a MigrationContext with its own fn."""

import sys

from alembic.config import Config
from alembic.operations import Operations
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

config = Config("alembic.ini")
script = ScriptDirectory.from_config(config)
engine = create_engine(config.get_main_option("sqlalchemy.url"), poolclass=NullPool)


def upgrade(heads, context):
    return script._upgrade_revs("head", heads)


def migrate(connection):
    context = MigrationContext.configure(connection, opts={"fn": upgrade, "script": script})
    with Operations.context(context), context.begin_transaction():
        context.run_migrations()


if sys.argv[1:] == ["--locked"]:  # the adoption: the same code inside migration_lock()
    import alembic_autolock

    with alembic_autolock.migration_lock(engine) as connection:
        migrate(connection)
else:
    with engine.connect() as connection:
        migrate(connection)
'''


def test_custom_migration_context_under_migration_lock(
    tmp_path: Path, databases: Any, trace: Any
) -> None:
    """A custom MigrationContext with its own fn= inside `with migration_lock(engine) as conn:`
    in 8 processes: each revision once, the schema the unlocked original builds, the same
    failure. run_migrations(fn=...) in env.py is refused with a message that points there."""
    original_db, adopted_db, original_fail_db, adopted_fail_db = databases(4)
    original = alembic_project(tmp_path / "original", original_db)
    (original / "custom.py").write_text(textwrap.dedent(CUSTOM).lstrip())
    adopted = copy_project(original, tmp_path / "adopted", adopted_db)

    custom = [sys.executable, "custom.py"]
    assert run(custom, original, untraced(original)).returncode == 0
    all_succeeded(fleet([*custom, "--locked"], adopted, project_env(adopted)))
    assert trace.bodies() == ALL_REVS
    assert schema(adopted_db) == schema(original_db)

    adopted_fail = copy_project(adopted, tmp_path / "adopted-fail", adopted_fail_db)
    failed = run([*custom, "--locked"], adopted_fail, failing(adopted_fail, "r3"))
    assert failed.returncode == 1 and "RuntimeError: revision r3 failed on purpose" in failed.stderr
    original_fail = copy_project(original, tmp_path / "original-fail", original_fail_db)
    same_failure(
        run(custom, original_fail, failing(original_fail, "r3")), original_fail_db, adopted_fail_db
    )

    (adopted / "migrations" / "env.py").write_text(
        "from alembic_autolock.env import run_migrations\n\n"
        "run_migrations(fn=lambda heads, context: [])\n"
    )
    line = one_failed_line(run([ALEMBIC, "upgrade", "head"], adopted, project_env(adopted)))
    assert "run_migrations() does not take 'fn'" in line
    assert "with alembic_autolock.migration_lock(engine) as conn:" in line


# --- the plain alembic command's cost ---------------------------------------------------------


def test_plain_alembic_at_head_takes_no_lock(
    pg_url: str, tmp_path: Path, make_engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """30 plain `alembic upgrade head` against a database at head: the lock is taken 0 times
    (no lock.acquired event, no autolock:lock session) and each process opens no more
    sessions than `alembic-autolock upgrade` does."""
    project = adopt(
        alembic_project(tmp_path / "original", pg_url),
        tmp_path / "adopted",
        pg_url,
        RUN_MIGRATIONS_ONLY,
    )
    env = project_env(project)
    monkeypatch.syspath_prepend(str(MIGRATIONS))
    assert (
        ensure_migrated(make_engine(pg_url), config=str(project / "alembic.ini")).action
        == "upgraded"
    )
    database = make_url(pg_url).database
    assert database is not None

    with ConnectionSampler(pg_url, database) as plain:
        runs = fleet([ALEMBIC, "upgrade", "head"], project, env, n=30)
    all_succeeded(runs)
    assert sum(r.stderr.count("lock.acquired") for r in runs) == 0
    assert all("Context impl PostgresqlImpl" in r.stderr for r in runs)  # Alembic did run
    with ConnectionSampler(pg_url, database) as cli:
        all_succeeded(fleet([CLI, "upgrade"], project, env, n=5))
    assert plain.summary is not None and cli.summary is not None
    assert plain.summary.exact_connection_count and cli.summary.exact_connection_count
    assert plain.summary.peak_library == 0  # no lock, wait or migration session, ever
    # one session per process, the least a process that reads the database can use
    assert plain.summary.connections_opened == 30, plain.summary.connections_opened
    per_plain = plain.summary.connections_opened / 30
    per_cli = cli.summary.connections_opened / 5
    assert per_plain <= per_cli, (plain.summary.connections_opened, cli.summary.connections_opened)


class SessionsPerProcess:
    """Every 10 ms: the database's sessions, each attributed to the process at the client end
    of its connection (pg_stat_activity.client_port matched with the processes' own sockets in
    /proc); the most any process held at once."""

    def __init__(self, admin_url: str, database: str) -> None:
        self.engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
        self.database = database
        self.pids: list[int] = []
        self.peak: Counter[int] = Counter()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _ports(self) -> dict[int, int]:
        sockets: dict[int, int] = {}
        for pid in self.pids:
            try:
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if link.startswith("socket:["):
                        sockets[int(link[8:-1])] = pid
            except OSError:  # the process ended, or the descriptor closed meanwhile
                continue
        ports: dict[int, int] = {}
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with open(table) as f:
                for line in f.readlines()[1:]:
                    fields = line.split()
                    if int(fields[9]) in sockets:
                        ports[int(fields[1].rsplit(":", 1)[1], 16)] = sockets[int(fields[9])]
        return ports

    def _run(self) -> None:
        query = text(
            "SELECT client_port FROM pg_stat_activity "
            "WHERE datname = :db AND pid <> pg_backend_pid() AND client_port IS NOT NULL"
        )
        with self.engine.connect() as conn:
            while not self._stop.wait(0.01):
                clients = conn.execute(query, {"db": self.database}).scalars().all()
                ports = self._ports()
                held = Counter(ports[p] for p in clients if p in ports)
                for pid, n in held.items():
                    self.peak[pid] = max(self.peak[pid], n)
                self.samples += 1

    def __enter__(self) -> SessionsPerProcess:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self.engine.dispose()


def test_plain_alembic_on_an_empty_database(pg_url: str, tmp_path: Path, trace: Any) -> None:
    """8 plain `alembic upgrade head` on an empty database: every revision body once, and no
    process holds more than 2 sessions at any moment (the holder: its lock session and its
    migration session; a waiter: one)."""
    project = adopt(
        alembic_project(tmp_path / "original", pg_url),
        tmp_path / "adopted",
        pg_url,
        RUN_MIGRATIONS_ONLY,
    )
    database = make_url(pg_url).database
    assert database is not None
    argv = [ALEMBIC, "upgrade", "head"]
    env = project_env(project, AUTOLOCK_TEST_SLEEP="0.05")
    with SessionsPerProcess(pg_url, database) as sessions:
        procs = [
            subprocess.Popen(
                argv,
                cwd=project,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(FLEET)
        ]
        sessions.pids = [p.pid for p in procs]
        results = [(p.communicate(timeout=120), p.returncode) for p in procs]
    assert [code for _, code in results] == [0] * FLEET, [err[-800:] for (_, err), _ in results]
    assert trace.bodies() == ALL_REVS
    assert heads_of(pg_url) == {"r5"}
    assert sessions.samples > 20
    assert sessions.peak.most_common(1)[0][1] == 2  # the holder
    assert max(sessions.peak.values()) <= 2, sessions.peak
