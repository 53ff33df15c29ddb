"""alembic_autolock.metrics: values after a cached check, an upgrade, a lock wait and a
failure; one registration however many engines; the automatic start; multiprocess mode."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from support import ALL_REVS, finish, start_worker, wait_for, worker_env

from alembic_autolock import MigrationFailed, ensure_migrated, metrics, migration_lock
from alembic_autolock import metrics as metrics_module


@pytest.fixture
def registry() -> Iterator[CollectorRegistry]:
    registry = CollectorRegistry()
    metrics.enable(registry)
    yield registry
    metrics.disable()
    metrics_module._disabled = False  # let the next test's events start them again


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    found = registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def test_names_all_start_with_the_prefix(registry: CollectorRegistry) -> None:
    """Every metric the library registers is named alembic_autolock_*."""
    families = {m.name for m in registry.collect()}
    assert families == {name.removesuffix("_total") for name in metrics.NAMES}
    samples = {s.name for m in registry.collect() for s in m.samples}
    assert all(name.startswith("alembic_autolock_") for name in samples)


def test_an_upgrade_then_a_cached_check(
    registry: CollectorRegistry, sqlite_url: str, make_ini: Any, make_engine: Any
) -> None:
    """An upgrade counts a pending check, five revisions, one lock wait and one migration; the
    next call counts a cached check; the lock gauge is 1 only while the lock is held."""
    engine, ini = make_engine(sqlite_url), make_ini(sqlite_url)
    ensure_migrated(engine, config=ini)
    ensure_migrated(engine, config=ini)
    assert value(registry, "alembic_autolock_checks_total", result="pending") == 1
    assert value(registry, "alembic_autolock_checks_total", result="cached") == 1
    assert value(registry, "alembic_autolock_revisions_applied_total", direction="upgrade") == 5
    assert value(registry, "alembic_autolock_lock_wait_seconds_count", outcome="acquired") == 1
    assert (
        value(registry, "alembic_autolock_migration_duration_seconds_count", outcome="completed")
        == 1
    )
    assert value(registry, "alembic_autolock_pending_revisions", database=sqlite_url) == 0
    assert value(registry, "alembic_autolock_lock_held") == 0
    with migration_lock(engine, config=ini):
        assert value(registry, "alembic_autolock_lock_held") == 1
    assert value(registry, "alembic_autolock_lock_held") == 0
    assert value(registry, "alembic_autolock_failures_total", kind="migration_failed") == 0


def test_a_lock_wait_is_observed(
    registry: CollectorRegistry, pg_url: str, make_ini: Any, make_engine: Any, trace: Any
) -> None:
    """A process that waited while another migrated observes its wait as done_by_other and
    sees no revision pending afterwards."""
    ini = make_ini(pg_url)
    env = worker_env(AUTOLOCK_TEST_SLEEP="0.3", AUTOLOCK_TEST_TRACE=str(trace.path))
    holder = start_worker(ini, pg_url, env=env)
    try:
        assert wait_for(lambda: trace.lines(), 30)
        result = ensure_migrated(make_engine(pg_url), config=ini)
    finally:
        assert finish(holder).returncode == 0
    assert result.action == "current" and result.waited_s > 0.3
    wait_sum = value(registry, "alembic_autolock_lock_wait_seconds_sum", outcome="done_by_other")
    assert wait_sum == pytest.approx(result.waited_s, abs=0.01)
    assert value(registry, "alembic_autolock_checks_total", result="pending") == 1
    assert value(registry, "alembic_autolock_revisions_applied_total", direction="upgrade") == 0
    database = result and next(
        s.labels["database"]
        for m in registry.collect()
        if m.name == "alembic_autolock_pending_revisions"
        for s in m.samples
    )
    assert "***" in database  # masked
    assert value(registry, "alembic_autolock_pending_revisions", database=database) == 0


def test_a_failure_is_counted(
    registry: CollectorRegistry,
    sqlite_url: str,
    make_ini: Any,
    make_engine: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A failed revision counts a failure and a failed migration, and leaves no lock held."""
    monkeypatch.setenv("AUTOLOCK_TEST_FAIL_AT", "r3")
    with pytest.raises(MigrationFailed):
        ensure_migrated(make_engine(sqlite_url), config=make_ini(sqlite_url))
    assert value(registry, "alembic_autolock_failures_total", kind="migration_failed") == 1
    assert (
        value(registry, "alembic_autolock_migration_duration_seconds_count", outcome="failed") == 1
    )
    assert value(registry, "alembic_autolock_revisions_applied_total", direction="upgrade") == 2
    assert value(registry, "alembic_autolock_lock_held") == 0
    assert value(registry, "alembic_autolock_pending_revisions", database=sqlite_url) == 5


def test_many_engines_one_registration(
    registry: CollectorRegistry, sqlite_url: str, make_ini: Any, make_engine: Any
) -> None:
    """Enabling again, and runs on several engines, never register twice."""
    metrics.enable(registry)
    ini = make_ini(sqlite_url)
    for _ in range(3):
        ensure_migrated(make_engine(sqlite_url), config=ini)
    metrics.enable(registry)
    assert value(registry, "alembic_autolock_checks_total", result="current") == 2


def run_python(code: str, **env: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=worker_env(**env),
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_automatic_start_only_when_the_app_imported_prometheus_client(
    sqlite_url: str, make_ini: Any
) -> None:
    """The library never imports prometheus_client; once the application has, the metrics
    start by themselves in the default registry, unless metrics = off."""
    ini = make_ini(sqlite_url)
    run = (
        "import sys\n"
        "from sqlalchemy import create_engine\n"
        "from alembic_autolock import ensure_migrated\n"
        f"ensure_migrated(create_engine({sqlite_url!r}), config={ini!r}, cache_ttl=0)\n"
    )
    assert run_python(run + "print('prometheus_client' in sys.modules)").split() == ["False"]
    show = (
        "from prometheus_client import REGISTRY\n"
        "print(REGISTRY.get_sample_value('alembic_autolock_checks_total', "
        "{'result': 'current'}))\n"
    )
    assert run_python("import prometheus_client\n" + run + show).split() == ["1.0"]
    off = run_python("import prometheus_client\n" + run + show, ALEMBIC_AUTOLOCK_METRICS="off")
    assert off.split() == ["None"]


def test_multiprocess_mode_aggregates_workers(
    tmp_path: Path, sqlite_url: str, make_ini: Any
) -> None:
    """Under PROMETHEUS_MULTIPROC_DIR (gunicorn), each worker's counts add up and the
    gauges aggregate as declared."""
    ini = make_ini(sqlite_url)
    directory = tmp_path / "prom"
    directory.mkdir()
    code = (
        "import prometheus_client\n"
        "from sqlalchemy import create_engine\n"
        "from alembic_autolock import ensure_migrated\n"
        f"ensure_migrated(create_engine({sqlite_url!r}), config={ini!r})\n"
    )
    for _ in range(2):
        run_python(code, PROMETHEUS_MULTIPROC_DIR=str(directory))
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(directory))
    assert value(registry, "alembic_autolock_checks_total", result="pending") == 1
    assert value(registry, "alembic_autolock_checks_total", result="current") == 1
    assert value(registry, "alembic_autolock_revisions_applied_total", direction="upgrade") == len(
        ALL_REVS
    )


def test_the_gunicorn_example_serves_every_workers_metrics(tmp_path: Path, sqlite_url: str) -> None:
    """examples/gunicorn_metrics.py, imported by two "workers" sharing PROMETHEUS_MULTIPROC_DIR
    (as gunicorn's workers do), serves both workers' counts on /metrics, and the status."""
    directory = tmp_path / "prom"
    directory.mkdir()
    env = {"PROMETHEUS_MULTIPROC_DIR": str(directory), "DATABASE_URL": sqlite_url}
    worker = "import sys\nsys.path.insert(0, 'examples')\nimport gunicorn_metrics as example\n"
    run_python(worker, **env)
    scrape = worker + (
        "import wsgiref.util\n"
        "def get(path):\n"
        "    environ = {}\n"
        "    wsgiref.util.setup_testing_defaults(environ)\n"
        "    environ['PATH_INFO'] = path\n"
        "    got = []\n"
        "    body = b''.join(example.app(environ, lambda status, headers: got.append(status)))\n"
        "    return got[0], body.decode()\n"
        "status, text = get('/metrics')\n"
        "print(status)\n"
        "for line in text.splitlines():\n"
        "    if line.startswith('alembic_autolock_checks_total') and not line.endswith(' 0.0'):\n"
        "        print(line)\n"
        "print(get('/migrations/status')[0])\n"
    )
    lines = run_python(scrape, **env).splitlines()
    assert (lines[0], lines[-1]) == ("200 OK", "200 OK")
    assert sorted(lines[1:-1]) == [  # one worker migrated, the other found it at head
        'alembic_autolock_checks_total{result="current"} 1.0',
        'alembic_autolock_checks_total{result="pending"} 1.0',
    ]
