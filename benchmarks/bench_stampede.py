"""A fleet of N processes starting at once, each calling ensure_migrated() with a NullPool
engine (the serverless shape), against a private server at a stock connection limit.

    .venv/bin/python benchmarks/bench_stampede.py                       # N = 10, 50, 100, 200
    .venv/bin/python benchmarks/bench_stampede.py --processes 200 --backend redis
    .venv/bin/python benchmarks/bench_stampede.py --quick                # N = 10, a smoke run

For each N and backend, in the same run:

* **at head**: the N processes against a database already at head (checks only): how long
  until the last one is done, and the peak of connections;
* **stampede**: the N processes against an empty database (the test history's five
  revisions, each sleeping ``--revision-sleep`` seconds): errors, how many migrated, the peak of
  connections to the database and of sessions the library holds (named ``autolock:*``), the
  connections opened per second while they wait, and the time until the last one is done,
  against the target ``migration time + at-head time + 1 s``;
* **plain Alembic**: the same N processes running ``alembic.command.upgrade`` with no lock on
  an empty database: how many fail.

The server is private (started here, on a free port, ``max_connections = 100`` for PostgreSQL
as installed by default, MariaDB's default 151), so the figures do not depend on what else runs
on the shared servers. Prints a table; ``--json FILE`` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from servers import ConnectionSampler, PrivateMariaDB, PrivatePostgres  # noqa: E402

MIGRATIONS = REPO / "tests" / "migrations"
WORKER = REPO / "tests" / "worker.py"
PLAIN = """
import sys, time
from alembic import command
from alembic.config import Config
cfg = Config(sys.argv[1])
print("ready", flush=True)
sys.stdin.readline()
try:
    command.upgrade(cfg, "head")
except Exception as exc:
    print("ERR", type(exc).__name__, flush=True)
    print('{"finished": %f}' % time.time(), flush=True)
    sys.exit(1)
print("OK", flush=True)
print('{"finished": %f}' % time.time(), flush=True)
"""


@dataclass
class Run:
    backend: str
    processes: int
    phase: str
    errors: int
    migrators: int
    elapsed_s: float
    peak_connections: int
    peak_library_sessions: int
    connects_per_s: float
    error_kinds: dict[str, int]
    peak_by_role: dict[str, int]
    migrator_done_s: float
    median_done_s: float


def write_ini(directory: Path, url: str, settings: dict[str, str], name: str) -> str:
    path = directory / f"{name}.ini"
    lines = [
        "[alembic]",
        f"script_location = {MIGRATIONS}",
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


def release(argvs: list[list[str]], env: dict[str, str]) -> tuple[float, list[tuple[int, str]]]:
    """Start every process, wait until each is ready, release them at once; (the wall-clock
    time of the release, [(exit code, stdout)])."""
    procs = [
        subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        for argv in argvs
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"a process did not start: {line!r}")
        started = time.time()
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        outs = [(proc.wait(timeout=300), proc.stdout.read()) for proc in procs]  # type: ignore[union-attr]
        return started, outs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()


def measure(
    backend: str,
    n: int,
    phase: str,
    argv: list[str],
    env: dict[str, str],
    sampler: ConnectionSampler | None,
) -> Run:
    if sampler is not None:
        sampler.start()
    released, outs = release([argv] * n, env)
    summary = sampler.stop() if sampler is not None else None
    errors, migrators, kinds = 0, 0, {}
    last = released
    done: list[float] = []
    migrator_done = 0.0
    for code, out in outs:
        lines = [line for line in out.splitlines() if line.startswith("{")]
        data = json.loads(lines[-1]) if lines else {}
        # done when its call returned (a process's exit, while the others still run, can take
        # a while on two cores and is not part of the start-up)
        finished = float(data.get("finished", released))
        last = max(last, finished)
        done.append(finished - released)
        if data.get("action") == "upgraded":
            migrator_done = finished - released
        if phase == "plain":
            failed = code != 0
            kind = out.split()[1] if failed and out.startswith("ERR") else "exit"
        else:
            failed = code != 0 or "error" in data
            kind = data.get("error", f"exit {code}")
            migrators += data.get("action") == "upgraded"
        if failed:
            errors += 1
            kinds[kind] = kinds.get(kind, 0) + 1
    return Run(
        backend=backend,
        processes=n,
        phase=phase,
        errors=errors,
        migrators=migrators,
        elapsed_s=round(last - released, 2),
        peak_connections=summary.peak_total if summary else -1,
        peak_library_sessions=summary.peak_library if summary else -1,
        connects_per_s=round(summary.connections_opened / max(summary.duration, 1e-9), 1)
        if summary
        else -1,
        error_kinds=kinds,
        peak_by_role=dict(summary.peak_by_role) if summary else {},
        migrator_done_s=round(migrator_done, 2),
        median_done_s=round(sorted(done)[len(done) // 2], 2) if done else 0.0,
    )


def bench(backend: str, n: int, revision_sleep: float, work: Path) -> list[Run]:
    server: Any
    if backend == "mysql":
        server = PrivateMariaDB(work / f"my-{n}")
    else:
        server = PrivatePostgres(work / f"pg-{n}", max_connections=100)
    runs = []
    try:
        settings = {"timeout": "120"}
        if backend == "redis":
            settings.update(
                lock="redis://127.0.0.1:6379/0", namespace=f"bench-stampede-{os.getpid()}-{n}"
            )
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        env["AUTOLOCK_TEST_SLEEP"] = str(revision_sleep)

        def sampler(db: str) -> ConnectionSampler:
            return ConnectionSampler(server.url(), db)

        head_db = server.create_database("at_head")
        head_ini = write_ini(work, server.url(head_db), settings, f"head-{backend}-{n}")
        subprocess.run(
            [sys.executable, str(WORKER), head_ini, server.url(head_db)],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        argv = [
            sys.executable,
            str(WORKER),
            head_ini,
            server.url(head_db),
            "--barrier",
            "--nullpool",
        ]
        runs.append(measure(backend, n, "at head", argv, env, sampler(head_db)))

        db = server.create_database("empty")
        ini = write_ini(work, server.url(db), settings, f"empty-{backend}-{n}")
        argv = [sys.executable, str(WORKER), ini, server.url(db), "--barrier", "--nullpool"]
        runs.append(measure(backend, n, "stampede", argv, env, sampler(db)))

        plain_db = server.create_database("plain")
        plain_ini = write_ini(work, server.url(plain_db), {}, f"plain-{backend}-{n}")
        plain_env = dict(env)
        plain_env["ALEMBIC_AUTOLOCK_LOCK"] = "none"  # the test env.py is ours: no lock at all
        argv = [sys.executable, "-c", PLAIN, plain_ini]
        runs.append(measure(backend, n, "plain", argv, plain_env, None))
    finally:
        server.close()
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, action="append")
    parser.add_argument("--backend", action="append", choices=["postgresql", "mysql", "redis"])
    parser.add_argument("--revision-sleep", type=float, default=0.2)
    parser.add_argument("--quick", action="store_true", help="N = 10, PostgreSQL only")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    sizes = args.processes or ([10] if args.quick else [10, 50, 100, 200])
    backends = args.backend or (["postgresql"] if args.quick else ["postgresql", "mysql", "redis"])
    migration_s = 5 * args.revision_sleep
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="autolock-stampede-") as tmp:
        for backend in backends:
            for n in sizes:
                runs += bench(backend, n, args.revision_sleep, Path(tmp))
    print(
        f"{'backend':10} {'N':>4} {'phase':9} {'errors':>6} {'migr.':>5} {'time s':>7} "
        f"{'target s':>8} {'peak conn':>9} {'peak lib':>8} {'conn/s':>7}  error kinds"
    )
    head: dict[tuple[str, int], float] = {}
    for r in runs:
        if r.phase == "at head":
            head[(r.backend, r.processes)] = r.elapsed_s
        target = ""
        if r.phase == "stampede":
            target = f"{migration_s + head[(r.backend, r.processes)] + 1:.2f}"
        print(
            f"{r.backend:10} {r.processes:>4} {r.phase:9} {r.errors:>6} {r.migrators:>5} "
            f"{r.elapsed_s:>7.2f} {target:>8} {r.peak_connections:>9} "
            f"{r.peak_library_sessions:>8} {r.connects_per_s:>7}  {r.error_kinds or ''}"
        )
        if r.phase == "stampede":
            print(
                f"{'':16} migrator done at {r.migrator_done_s:.2f} s, median process at "
                f"{r.median_done_s:.2f} s; library sessions at their peak: {r.peak_by_role}"
            )
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in runs], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
