"""Schema per tenant (alembic_autolock.schemas): one schema's own version table, journal, lock and
cached answer; migrate_schemas and `alembic-autolock schemas upgrade` over many, on real
PostgreSQL and real processes.

The history is tests/migrations_tenants (a1, a2, a3): each revision body appends
"<rev>\t<schema>\t<pid>" to the trace file before its DDL, <schema> being the session's
current_schema(), so the file proves which schema each body ran in and how often.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, inspect, text
from support import REPO, heads_of, worker_env

from alembic_autolock import (
    ConfigError,
    LockTimeout,
    MigrationFailed,
    ensure_migrated,
    migrate_schemas,
    upgrade,
)
from alembic_autolock._mask import mask_url

TENANTS = REPO / "tests" / "migrations_tenants"
REVS = ["a1", "a2", "a3"]
CLI = str(Path(sys.executable).parent / "alembic-autolock")


@pytest.fixture
def tenant_ini(tmp_path: Path) -> Any:
    """Write an alembic.ini for the tenant history: tenant_ini(url, **autolock_settings)."""
    counter = iter(range(1000))

    def make(url: str, **settings: Any) -> str:
        path = tmp_path / f"tenants{next(counter)}.ini"
        lines = [
            "[alembic]",
            f"script_location = {TENANTS}",
            f"prepend_sys_path = {TENANTS}",
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


def create_schemas(url: str, *names: str) -> None:
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            for name in names:
                quoted = engine.dialect.identifier_preparer.quote_identifier(name)
                conn.execute(text(f"CREATE SCHEMA {quoted}"))
    finally:
        engine.dispose()


def traced(trace: Any) -> list[list[str]]:
    """[revision, schema, pid] of every revision body that started, in order."""
    if not trace.path.exists():
        return []
    return [line.split("\t") for line in trace.path.read_text().splitlines()]


def bodies(trace: Any) -> list[tuple[str, str]]:
    """(revision, schema) of every revision body that started, in order."""
    return [(rev, schema) for rev, schema, _ in traced(trace)]


def tables(url: str, schema: str) -> list[str]:
    engine = create_engine(url)
    try:
        return sorted(inspect(engine).get_table_names(schema=schema))
    finally:
        engine.dispose()


def account_name(url: str, schema: str) -> str | None:
    """The row a1 writes: the schema the revision ran in, as current_schema() saw it."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            quoted = engine.dialect.identifier_preparer.quote_identifier(schema)
            return conn.execute(text(f"SELECT name FROM {quoted}.accounts")).scalar()
    finally:
        engine.dispose()


TENANT_TABLES = ["accounts", "alembic_autolock_journal", "alembic_version", "invoices"]


# --- one schema: ensure_migrated(engine, schema=...) ------------------------------------------


def test_two_schemas_at_different_revisions_each_keep_their_own_version_table(
    pg_url: str, tenant_ini: Any, make_engine: Any, trace: Any
) -> None:
    """A schema at head answers from its own version table (and then from the cache); a schema
    of the same engine at a1 is migrated, not answered from the other's cached answer; nothing
    lands in public."""
    create_schemas(pg_url, "tenant_a", "tenant_b")
    ini = tenant_ini(pg_url)
    engine = make_engine(pg_url)
    assert upgrade(engine, config=ini, schema="tenant_a").applied == ("a1", "a2", "a3")
    assert upgrade(engine, "a1", config=ini, schema="tenant_b").applied == ("a1",)

    assert ensure_migrated(engine, config=ini, schema="tenant_a").action == "current"
    assert ensure_migrated(engine, config=ini, schema="tenant_a").action == "cached"
    b = ensure_migrated(engine, config=ini, schema="tenant_b")
    assert (b.action, b.applied, b.heads) == ("upgraded", ("a2", "a3"), ("a3",))
    assert ensure_migrated(engine, config=ini, schema="tenant_b").action == "cached"

    assert bodies(trace) == [
        ("a1", "tenant_a"),
        ("a2", "tenant_a"),
        ("a3", "tenant_a"),
        ("a1", "tenant_b"),
        ("a2", "tenant_b"),
        ("a3", "tenant_b"),
    ]
    assert heads_of(pg_url, schema="tenant_a") == heads_of(pg_url, schema="tenant_b") == {"a3"}
    assert tables(pg_url, "tenant_a") == tables(pg_url, "tenant_b") == TENANT_TABLES
    assert tables(pg_url, "public") == []


def test_a_holder_of_one_schema_s_lock_does_not_block_another_schema(
    pg_url: str, tenant_ini: Any, make_engine: Any
) -> None:
    """Another process holds tenant_a's migration lock: tenant_b migrates at once, tenant_a
    times out naming that process."""
    create_schemas(pg_url, "tenant_a", "tenant_b")
    ini = tenant_ini(pg_url)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys\n"
            "from alembic_autolock import migration_lock\n"
            "with migration_lock(sys.argv[1], config=sys.argv[2], schema='tenant_a'):\n"
            "    print('held', flush=True)\n"
            "    sys.stdin.read()\n",
            pg_url,
            ini,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=worker_env(),
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        engine = make_engine(pg_url)
        b = ensure_migrated(engine, config=ini, schema="tenant_b", timeout=20)
        assert (b.action, b.applied) == ("upgraded", ("a1", "a2", "a3"))
        with pytest.raises(LockTimeout) as info:
            ensure_migrated(engine, config=ini, schema="tenant_a", timeout=0.5)
        assert str(holder.pid) in str(info.value)
        assert heads_of(pg_url, schema="tenant_a") == set()
    finally:
        holder.communicate("", timeout=30)
    assert ensure_migrated(make_engine(pg_url), config=ini, schema="tenant_a").action == "upgraded"


def test_an_empty_schema_name_is_refused_not_read_as_the_default_schema(
    pg_url: str, tenant_ini: Any, make_engine: Any
) -> None:
    """ensure_migrated(engine, schema="") (a tenant whose name came out empty) is a
    ConfigError: nothing is applied to the default schema."""
    with pytest.raises(ConfigError) as info:
        ensure_migrated(make_engine(pg_url), config=tenant_ini(pg_url), schema="")
    assert str(info.value) == (
        "invalid value '' for setting 'schema' (from keyword argument): expected a schema name "
        "(None for the default schema)"
    )
    assert tables(pg_url, "public") == []


def test_threads_migrating_different_schemas_keep_each_revision_in_its_schema(
    pg_url: str, tenant_ini: Any, make_engine: Any, trace: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four threads of one process migrate four schemas at once (Alembic's op and context are
    process-wide): every revision body ran once, in its own schema, and each schema's first
    row names that schema."""
    names = [f"tenant_{i}" for i in range(4)]
    create_schemas(pg_url, *names)
    monkeypatch.setenv("AUTOLOCK_TEST_SLEEP", "0.05")
    ini = tenant_ini(pg_url)
    engine = make_engine(pg_url)
    go = threading.Barrier(len(names))

    def migrate(schema: str) -> str:
        go.wait()
        return ensure_migrated(engine, config=ini, schema=schema).action

    with ThreadPoolExecutor(len(names)) as pool:
        assert list(pool.map(migrate, names)) == ["upgraded"] * 4
    assert sorted(bodies(trace)) == sorted((rev, name) for name in names for rev in REVS)
    for name in names:
        assert (account_name(pg_url, name), heads_of(pg_url, schema=name)) == (name, {"a3"})
        assert tables(pg_url, name) == TENANT_TABLES


# --- migrate_schemas ---------------------------------------------------------------------------


def test_migrate_schemas_reports_each_schema_and_a_rerun_does_only_what_remains(
    pg_url: str, tenant_ini: Any, make_engine: Any, trace: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A revision fails in one tenant: the others are migrated, the report names the failed
    one with its error; once fixed, a rerun migrates only that one."""
    names = [f"tenant_{i}" for i in range(6)]
    create_schemas(pg_url, *names)
    ini = tenant_ini(pg_url)
    engine = make_engine(pg_url)
    monkeypatch.setenv("AUTOLOCK_TEST_FAIL_SCHEMA", "tenant_3")

    report = migrate_schemas(engine, names, config=ini, parallel=3)
    assert list(report) == names  # the order given, whatever order they ran in
    assert [r.schema for r in report.failed] == ["tenant_3"]
    assert report.counts() == {"failed": 1, "upgraded": 5}
    error = report["tenant_3"]
    assert isinstance(error, MigrationFailed) and error.revision == "a2"
    entry = report.as_dict()["schemas"][3]
    assert (entry["schema"], entry["ok"], entry["action"]) == ("tenant_3", False, "failed")
    assert entry["error"]["type"] == "MigrationFailed"
    assert "failed on purpose in schema tenant_3" in entry["error"]["message"]
    for name in names:
        expected = set() if name == "tenant_3" else {"a3"}  # one transaction: all rolled back
        assert heads_of(pg_url, schema=name) == expected

    monkeypatch.delenv("AUTOLOCK_TEST_FAIL_SCHEMA")
    again = migrate_schemas(engine, names, config=ini, parallel=3)
    assert again.ok and again.counts() == {"cached": 5, "upgraded": 1}
    assert again["tenant_3"].applied == ("a1", "a2", "a3")  # type: ignore[union-attr]
    ran = Counter(bodies(trace))
    assert ran == Counter(
        {(rev, name): 1 for name in names for rev in REVS}
        | {("a1", "tenant_3"): 2, ("a2", "tenant_3"): 2}
    )


def test_bad_tenant_names_are_that_tenant_s_error_and_nothing_lands_elsewhere(
    pg_url: str, tenant_ini: Any, make_engine: Any, trace: Any
) -> None:
    """A schema that does not exist, one whose name needs quoting, a duplicate, a name too long
    for PostgreSQL, one with a stray space (which would name another schema once stripped):
    per-schema outcomes; only the existing schemas got tables, each once."""
    create_schemas(pg_url, "Tenant-B c", "plain")
    ini = tenant_ini(pg_url)
    engine = make_engine(pg_url)
    long_name = "t" * 64
    given = ["plain", "missing", "Tenant-B c", "plain", long_name, " plain"]
    report = migrate_schemas(engine, given, config=ini)
    assert list(report) == ["plain", "missing", "Tenant-B c", long_name, " plain"]
    assert report.duplicates == ("plain",)
    assert [r.schema for r in report.failed] == ["missing", long_name, " plain"]
    assert "begins or ends with white space" in str(report[" plain"])
    missing = report["missing"]
    assert isinstance(missing, ConfigError)
    assert str(missing).startswith("schema 'missing' does not exist in this database")
    assert "PostgreSQL names hold at most 63" in str(report[long_name])
    assert account_name(pg_url, "Tenant-B c") == "Tenant-B c"
    assert sorted(bodies(trace)) == sorted(
        (rev, name) for name in ["Tenant-B c", "plain"] for rev in REVS
    )
    assert tables(pg_url, "public") == []


def test_schemas_from_the_operator_s_query(pg_url: str, tenant_ini: Any, make_engine: Any) -> None:
    """The query runs as written (a % pattern, a :: cast) and reads the names from its first
    column; it runs read-only, and one that fails is a ConfigError before any schema is
    touched, its message masked."""
    create_schemas(pg_url, "acme", "globex", "other")
    engine = make_engine(pg_url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE tenants (schema_name text, active bool)"))
        conn.execute(text("INSERT INTO tenants VALUES ('acme', true), ('globex', true)"))
    ini = tenant_ini(pg_url)
    query = "SELECT schema_name::text FROM tenants WHERE schema_name LIKE '%e%' ORDER BY 1"
    report = migrate_schemas(engine, query, config=ini)
    assert (list(report), report.counts()) == (["acme", "globex"], {"upgraded": 2})
    assert heads_of(pg_url, schema="other") == set()

    with pytest.raises(ConfigError) as info:
        migrate_schemas(engine, "DELETE FROM tenants RETURNING schema_name", config=ini)
    assert "read-only transaction" in str(info.value)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM tenants")).scalar() == 2
    with pytest.raises(ConfigError) as info:
        migrate_schemas(engine, "SELECT nope FROM tenants", config=ini)
    assert str(info.value).startswith("the schemas query failed (nothing was migrated): ")
    assert mask_url(pg_url) != pg_url and pg_url not in str(info.value)


@pytest.mark.parametrize(
    ("schemas", "says"),
    [
        ("tenant_a", "which is read as a query: give a list of names"),
        (["tenant_a", ""], "entry 2 is '', not a schema name"),
        (["tenant_a", None], "entry 2 is None, not a schema name"),
    ],
)
def test_bad_schema_lists_are_refused_before_anything_runs(
    pg_url: str, tenant_ini: Any, make_engine: Any, schemas: Any, says: str
) -> None:
    """A bare name where a list is expected, an empty name (which would mean the default
    schema), a null: ConfigError, and no schema was touched."""
    create_schemas(pg_url, "tenant_a")
    with pytest.raises(ConfigError) as info:
        migrate_schemas(make_engine(pg_url), schemas, config=tenant_ini(pg_url))
    assert says in str(info.value)
    assert heads_of(pg_url, schema="tenant_a") == set()


def test_migrate_schemas_refuses_databases_without_schemas(
    sqlite_url: str, tenant_ini: Any, make_engine: Any
) -> None:
    """SQLite (and MySQL, where a schema is a database): a ConfigError saying what to do."""
    for url in (sqlite_url, "mysql+pymysql://root@127.0.0.1:3306/app"):
        with pytest.raises(ConfigError) as info:
            migrate_schemas(make_engine(url), ["a"], config=tenant_ini(url))
        assert "give each tenant's database its own URL" in str(info.value)


# --- the fleet command -------------------------------------------------------------------------


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, *args], capture_output=True, text=True, env=env or worker_env(), timeout=300
    )


def test_fifty_schemas_four_processes_every_schema_migrated_exactly_once(
    pg_url: str, tenant_ini: Any, trace: Any
) -> None:
    """Four processes run the same `schemas upgrade --schemas-query` at once over 50 tenant
    schemas: every revision body ran exactly once per schema, each schema was upgraded by
    exactly one process (the others found it current), all are at head, none failed, and more
    than one process did work."""
    names = [f"tenant_{i:02d}" for i in range(50)]
    create_schemas(pg_url, *names)
    admin = create_engine(pg_url)
    with admin.begin() as conn:
        conn.execute(text("CREATE TABLE tenants (schema_name text)"))
        for name in names:
            conn.execute(text("INSERT INTO tenants VALUES (:name)"), {"name": name})
    admin.dispose()
    ini = tenant_ini(pg_url)
    env = worker_env(AUTOLOCK_TEST_SLEEP="0.05")
    command = [
        CLI,
        "-c",
        ini,
        "schemas",
        "upgrade",
        "--schemas-query",
        "SELECT schema_name FROM tenants ORDER BY 1",
        "--parallel",
        "4",
        "--json",
    ]
    procs = [
        subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        for _ in range(4)
    ]
    outputs = [proc.communicate(timeout=600) for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * 4, [err for _, err in outputs]
    docs = [json.loads(out) for out, _ in outputs]

    assert Counter(bodies(trace)) == Counter({(rev, name): 1 for name in names for rev in REVS})
    for doc in docs:
        assert [s["schema"] for s in doc["schemas"]] == names and doc["failed"] == []
        assert doc["database"] == mask_url(pg_url)
    for i, name in enumerate(names):
        outcomes = sorted(
            (d["schemas"][i]["action"], tuple(d["schemas"][i]["applied"])) for d in docs
        )
        assert outcomes == [("current", ())] * 3 + [("upgraded", tuple(REVS))], name
        assert heads_of(pg_url, schema=name) == {"a3"}
    assert len({pid for _, _, pid in traced(trace)}) > 1  # the work was shared


def test_fleet_command_with_a_failing_tenant_then_a_rerun(
    pg_url: str, tenant_ini: Any, trace: Any
) -> None:
    """One tenant's revision fails: the others migrate, the command names the failed tenant
    (stdout line, FAILED line), exits 2; after the fix a rerun migrates just that one."""
    names = ["acme", "globex", "initech", "umbrella"]
    create_schemas(pg_url, *names)
    ini = tenant_ini(pg_url)
    given = [arg for name in names for arg in ("--schema", name)]

    out = cli(
        "-c", ini, "schemas", "upgrade", *given, env=worker_env(AUTOLOCK_TEST_FAIL_SCHEMA="initech")
    )
    assert out.returncode == 2, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "acme: upgraded: applied a1, a2, a3; now at a3"
    assert lines[2].startswith("initech: FAILED MigrationFailed: migration a2 failed: ")
    assert lines[-1] == "4 schema(s): 1 failed, 3 upgraded"
    failed = [line for line in out.stderr.splitlines() if line.startswith("FAILED:")]
    assert failed == [
        "FAILED: 1 of 4 schema(s) failed: initech (the others went on; fix them and run the "
        "command again: it does only what remains)"
    ]
    assert "Traceback" not in out.stderr
    assert heads_of(pg_url, schema="initech") == set()

    out = cli("-c", ini, "schemas", "upgrade", *given, "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert (doc["counts"], doc["exit_code"]) == ({"current": 3, "upgraded": 1}, 0)
    assert [s["action"] for s in doc["schemas"]] == ["current", "current", "upgraded", "current"]
    assert Counter(bodies(trace)) == Counter(
        {(rev, name): 1 for name in names for rev in REVS}
        | {("a1", "initech"): 2, ("a2", "initech"): 2}
    )


def test_fleet_command_bad_input(pg_url: str, tenant_ini: Any, sqlite_url: str) -> None:
    """A schema that does not exist is that tenant's FAILED entry (JSON: its error), not a
    crash; a non-PostgreSQL URL and a missing list are one FAILED line and exit 2."""
    create_schemas(pg_url, "acme")
    ini = tenant_ini(pg_url)
    out = cli("-c", ini, "schemas", "upgrade", "--schema", "acme", "--schema", "ghost", "--json")
    assert out.returncode == 2
    doc = json.loads(out.stdout)
    assert [(s["schema"], s["action"]) for s in doc["schemas"]] == [
        ("acme", "upgraded"),
        ("ghost", "failed"),
    ]
    assert doc["schemas"][1]["error"]["type"] == "ConfigError"
    assert "schema 'ghost' does not exist" in doc["schemas"][1]["error"]["message"]
    assert doc["error"]["message"].startswith("1 of 2 schema(s) failed: ghost")

    out = cli("-c", ini, "--url", sqlite_url, "schemas", "upgrade", "--schema", "acme")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("FAILED: migrate_schemas() migrates PostgreSQL schemas; this")
    assert "Traceback" not in out.stderr

    out = cli("-c", ini, "schemas", "upgrade")
    assert out.returncode == 2
    assert out.stderr.startswith("FAILED: schemas upgrade needs the tenants' schemas")


# --- the example -------------------------------------------------------------------------------


def test_example_tenants_runs_twice(pg_url: str) -> None:
    """examples/tenants.py against a fresh database: the first tenant alone, then the fleet;
    the second run only reads (every tenant at the example history's head)."""
    env = worker_env(DATABASE_URL=pg_url)
    example = str(REPO / "examples" / "tenants.py")
    first = subprocess.run(
        [sys.executable, example], capture_output=True, text=True, env=env, cwd=REPO, timeout=120
    )
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == [
        "acme alone: upgraded, at 0005",
        "acme: cached (applied nothing)",
        "globex: upgraded (applied 0001, 0002, 0003, 0004, 0005)",
        "initech: upgraded (applied 0001, 0002, 0003, 0004, 0005)",
        "3 tenants: {'cached': 1, 'upgraded': 2}",
    ]
    again = subprocess.run(
        [sys.executable, example], capture_output=True, text=True, env=env, cwd=REPO, timeout=120
    )
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[-1] == "3 tenants: {'cached': 1, 'current': 2}"
    for name in ("acme", "globex", "initech"):
        assert heads_of(pg_url, schema=name) == {"0005"}
    assert tables(pg_url, "public") == []
