"""The examples run: each one in examples/ is started as a user would start it (a script, uvicorn,
gunicorn, concurrent processes) against the real PostgreSQL, and what it promises is checked.
examples/gunicorn_metrics.py is run by tests/test_metrics.py."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from support import REPO, worker_env

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.postgresql


def heads(url: str, table: str = "alembic_version") -> list[str]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return sorted(r[0] for r in conn.execute(text(f"SELECT version_num FROM {table}")))
    finally:
        engine.dispose()


def env_for(url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in worker_env().items() if not k.startswith("ALEMBIC_AUTOLOCK_")}
    env.update(DATABASE_URL=url, PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", **extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def get_json(url: str, timeout: float = 30) -> tuple[int, Any]:
    """GET url, retrying while the server is not up yet."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@contextmanager
def server(argv: list[str], env: dict[str, str]) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_quickstart_migrates_then_finds_it_at_head(pg_url: str) -> None:
    """examples/quickstart.py applies the example history, and a second start applies nothing."""
    argv = [sys.executable, "examples/quickstart.py"]
    first = subprocess.run(argv, cwd=REPO, env=env_for(pg_url), capture_output=True, text=True)
    again = subprocess.run(argv, cwd=REPO, env=env_for(pg_url), capture_output=True, text=True)
    assert first.stdout.startswith("upgraded: applied ['0001', '0002', '0003', '0004', '0005']")
    assert again.stdout == "current: applied [], database at ['0005']\n"


def test_stampede_one_migrates_and_the_summary_counts_real_waits(pg_url: str) -> None:
    """examples/stampede.py: exactly one process applies the history; the summary's counts add
    up and a process counted as waiting did wait."""
    proc = subprocess.run(
        [sys.executable, "examples/stampede.py", "--processes", "5", "--url", pg_url],
        cwd=REPO,
        env=env_for(pg_url),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "***" in lines[0]  # the URL is shown masked
    assert sum("applied 0001, 0002, 0003, 0004, 0005" in line for line in lines) == 1
    for line in lines:
        if "waited for the lock, then" in line:
            assert "(waited 0.000s" not in line
    summary = lines[-1]
    counts = [int(word) for word in summary.replace(";", " ").split() if word.isdigit()]
    assert summary.startswith("1 process migrated;")
    assert sum(counts) == 5


def test_stampede_fails_fast_when_a_worker_fails(tmp_path: Path) -> None:
    """A worker that cannot connect stops the run at once: exit 1 and one FAILED line, not a
    two-minute hang."""
    started = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "examples/stampede.py",
            "--processes",
            "3",
            "--url",
            "postgresql://postgres:secret@127.0.0.1:5432/autolock_no_such_database",
        ],
        cwd=REPO,
        env=env_for("sqlite://"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("FAILED: process ")
    assert "DatabaseUnavailable" in proc.stderr
    assert "secret" not in proc.stderr
    assert time.monotonic() - started < 30


def test_demo_runs_stampede_and_status_on_sqlite(tmp_path: Path) -> None:
    """What scripts/demo runs after installing (8 processes on the SQLite example, then status):
    one migrates, every other one is accounted for, and status shows the head."""
    demo = (REPO / "scripts" / "demo").read_text()
    assert "examples/stampede.py --processes 8 --url sqlite:///example.db" in demo
    assert "alembic-autolock -c alembic.ini status" in demo
    url = f"sqlite:///{tmp_path / 'example.db'}"
    proc = subprocess.run(
        [sys.executable, "examples/stampede.py", "--processes", "8", "--url", url],
        cwd=REPO,
        env=env_for(url),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1].startswith("1 process migrated; ")
    status = subprocess.run(
        [str(BIN / "alembic-autolock"), "-c", "alembic.ini", "--url", url, "status"],
        cwd=REPO,
        env=env_for(url),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "current:     0005 (head)" in status.stdout


def test_fastapi_async_engine_migrates_in_the_lifespan(pg_url: str) -> None:
    """examples/fastapi_app.py under uvicorn with two workers (asyncpg): the lifespan brings the
    schema to head before the first request; the status endpoint answers 200."""
    port = free_port()
    argv = [str(BIN / "uvicorn"), "--workers", "2", "--port", str(port), "examples.fastapi_app:app"]
    with server(argv, env_for(pg_url)) as proc:
        status, body = get_json(f"http://127.0.0.1:{port}/tasks", timeout=60)
        assert (status, body["tasks"]) == (200, 0), proc
        status, body = get_json(f"http://127.0.0.1:{port}/migrations/status")
        assert (status, body["at_head"], body["current_heads"]) == (200, True, ["0005"])
    assert heads(pg_url) == ["0005"]


@pytest.mark.parametrize("preload", [False, True], ids=["workers-migrate", "preload"])
def test_flask_under_gunicorn(pg_url: str, preload: bool) -> None:
    """examples/flask_app.py under gunicorn with three workers: every request is served, by
    several workers; with --preload the master migrated before forking and the workers use
    fresh connections (the library's after-fork hook)."""
    port = free_port()
    argv = [str(BIN / "gunicorn"), "-w", "3", "-b", f"127.0.0.1:{port}"]
    argv += ["--preload"] if preload else []
    argv += ["examples.flask_app:create_app()"]
    with server(argv, env_for(pg_url)) as proc:
        get_json(f"http://127.0.0.1:{port}/health", timeout=60)
        answers = [get_json(f"http://127.0.0.1:{port}/health") for _ in range(30)]
        status, doc = get_json(f"http://127.0.0.1:{port}/migrations/status")
        assert proc.poll() is None
    assert {code for code, _ in answers} == {200}
    assert {body["tasks"] for _, body in answers} == {0}
    assert (status, doc["at_head"]) == (200, True)
    assert heads(pg_url) == ["0005"]


def test_serverless_cold_starts_migrate_once(pg_url: str) -> None:
    """examples/serverless.py: four cold starts at once (processes importing the module and
    calling the handler) all answer 200; the history is applied once."""
    code = (
        "import json, sys\n"
        "sys.path.insert(0, 'examples')\n"
        "import serverless\n"
        "print(json.dumps(serverless.handler({'project': 1})))\n"
        "print(json.dumps(serverless.handler({'project': 2})))\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            cwd=REPO,
            env=env_for(pg_url),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], [err for _, err in outputs]
    for out, _ in outputs:
        docs = [json.loads(line) for line in out.splitlines()]
        assert [d["statusCode"] for d in docs] == [200, 200]
    assert heads(pg_url) == ["0005"]
    engine = create_engine(pg_url)
    try:
        with engine.connect() as conn:
            runs = conn.execute(
                text("SELECT count(*) FROM alembic_autolock_journal WHERE revision = '0001'")
            ).scalar_one()
    finally:
        engine.dispose()
    assert runs == 1


def test_kubernetes_simulation(pg_url: str) -> None:
    """examples/kubernetes/simulate.sh runs the manifests' commands locally: init containers
    (one migrates), app containers, readiness probes, then the Job shape with waiters."""
    proc = subprocess.run(
        ["bash", "examples/kubernetes/simulate.sh"],
        cwd=REPO,
        env=env_for(pg_url, PODS="3", WORKERS="1", PORT0=str(free_port() + 100)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "init containers that migrated: 1 of 3" in proc.stdout
    assert proc.stdout.rstrip().endswith("simulation passed")
    manifest = (REPO / "examples" / "kubernetes" / "deployment.yaml").read_text()
    assert '"upgrade", "heads"]' in manifest
    assert '"check", "--allow-manual"]' in manifest


def test_adopted_project_migrates_once_from_concurrent_alembic_commands(
    pg_url: str, tmp_path: Path
) -> None:
    """examples/adopting: four plain `alembic upgrade head` at once with the adopted env.py all
    succeed and apply each revision once; `--sql` still renders offline."""
    project = tmp_path / "adopting"
    shutil.copytree(REPO / "examples" / "adopting", project)
    env = env_for(pg_url, MYPROJECT_DB_URL=pg_url, PYTHONPATH=str(project))
    procs = [
        subprocess.Popen(
            [str(BIN / "alembic"), "upgrade", "head"],
            cwd=project,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], [err for _, err in outputs]
    applied = sum(err.count("Running upgrade  -> a1") for _, err in outputs)
    assert applied == 1
    assert heads(pg_url) == ["a2"]
    sql = subprocess.run(
        [str(BIN / "alembic"), "upgrade", "head", "--sql"],
        cwd=project,
        env={**env, "MYPROJECT_DB_URL": ""},
        capture_output=True,
        text=True,
    )
    assert sql.returncode == 0, sql.stderr
    assert "CREATE TABLE users" in sql.stdout
    assert "ALTER TABLE users ADD COLUMN email VARCHAR(200)" in sql.stdout
