"""Shared helpers for the benchmarks: timing, statistics, the result table, throwaway databases
and the two Alembic environments (ours and a stock one) pointing at the same revision files.

Only the standard library is imported at module level, so that the fresh-process benchmark can
time the heavy imports itself.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SCRIPT_LOCATION = REPO / "alembic"
VERSIONS = SCRIPT_LOCATION / "versions"
REPO_INI = REPO / "alembic.ini"

PG_SERVER = os.environ.get("AUTOLOCK_BENCH_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432")
MYSQL_SERVER = os.environ.get("AUTOLOCK_BENCH_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306")
REDIS_URL = os.environ.get("AUTOLOCK_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")

DB_PREFIX = "autolock_bench_"


def bench_name() -> str:
    """The name of this process's throwaway database: ``autolock_bench_<pid>``."""
    return f"{DB_PREFIX}{os.getpid()}"


def unique_namespace(tag: str) -> str:
    """A lock namespace no other process (or earlier run) uses."""
    return f"{DB_PREFIX}{os.getpid()}_{tag}_{uuid.uuid4().hex[:8]}"


# --------------------------------------------------------------------------------------------
# Timing and statistics


@dataclass(frozen=True)
class Sample:
    """Per-iteration timings of one measured operation, in nanoseconds."""

    n: int
    median_ns: float
    p95_ns: float
    min_ns: float

    @classmethod
    def of(cls, timings: list[int]) -> Sample:
        ordered = sorted(timings)
        p95_index = max(0, -(-95 * len(ordered) // 100) - 1)  # nearest-rank percentile
        return cls(
            n=len(ordered),
            median_ns=float(statistics.median(ordered)),
            p95_ns=float(ordered[p95_index]),
            min_ns=float(ordered[0]),
        )


def measure(
    fn: Callable[[], object],
    *,
    iterations: int,
    warmup: int,
    after: Callable[[], object] | None = None,
) -> Sample:
    """Time ``fn()`` once per iteration with perf_counter_ns, after ``warmup`` untimed calls.

    ``after`` runs untimed after every call (to undo a side effect such as sys.path growth).
    The garbage collector is collected before the run but left enabled during it.
    """
    for _ in range(warmup):
        fn()
        if after is not None:
            after()
    gc.collect()
    timings: list[int] = []
    clock = time.perf_counter_ns
    for _ in range(iterations):
        start = clock()
        fn()
        timings.append(clock() - start)
        if after is not None:
            after()
    return Sample.of(timings)


def timer_overhead_ns() -> float:
    """The median cost of two back-to-back perf_counter_ns() calls (included in every figure)."""
    clock = time.perf_counter_ns
    timings = []
    for _ in range(20_000):
        start = clock()
        timings.append(clock() - start)
    return float(statistics.median(timings))


def fmt_ns(ns: float | None) -> str:
    """``ns`` in the unit that reads best (ns, µs, ms or s), three significant digits."""
    if ns is None:
        return "-"
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
        if ns >= scale:
            value = ns / scale
            return f"{value:.3g} {unit}" if value < 1000 else f"{value:.0f} {unit}"
    return f"{ns:.0f} ns"


def restore_sys_path(saved: list[str]) -> Callable[[], None]:
    """An ``after`` hook that puts sys.path back (plain Alembic's prepend_sys_path grows it)."""

    def restore() -> None:
        sys.path[:] = saved

    return restore


# --------------------------------------------------------------------------------------------
# Results


@dataclass
class Row:
    """One line of a result table: our figure beside the plain (or raw) figure for the same work."""

    group: str
    name: str
    ours: Sample
    baseline_name: str
    baseline: Sample | None
    target_ns: float | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.baseline is None or self.baseline.median_ns == 0:
            return None
        return self.ours.median_ns / self.baseline.median_ns

    @property
    def verdict(self) -> str:
        if self.target_ns is None:
            return "-"
        return "PASS" if self.ours.median_ns <= self.target_ns else "FAIL"

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ratio"] = self.ratio
        data["verdict"] = self.verdict
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Row:
        base = data.get("baseline")
        return cls(
            group=data["group"],
            name=data["name"],
            ours=Sample(**data["ours"]),
            baseline_name=data["baseline_name"],
            baseline=Sample(**base) if base else None,
            target_ns=data.get("target_ns"),
            note=data.get("note", ""),
        )


def _fmt_ratio(ratio: float | None) -> str:
    if ratio is None:
        return "-"
    if ratio < 0.01:
        return f"1/{1 / ratio:,.0f}"
    return f"{ratio:.2f}x"


def render_table(rows: list[Row]) -> str:
    """A plain-text table: one line per row; ratio = ours median / baseline median."""
    header = (
        "measurement",
        "n",
        "ours median",
        "ours p95",
        "plain / raw baseline",
        "n",
        "base median",
        "base p95",
        "ratio",
        "target",
        "result",
    )
    lines: list[tuple[str, ...]] = []
    for r in rows:
        b = r.baseline
        lines.append(
            (
                r.name,
                str(r.ours.n),
                fmt_ns(r.ours.median_ns),
                fmt_ns(r.ours.p95_ns),
                r.baseline_name,
                str(b.n) if b else "-",
                fmt_ns(b.median_ns) if b else "-",
                fmt_ns(b.p95_ns) if b else "-",
                _fmt_ratio(r.ratio),
                f"<= {fmt_ns(r.target_ns)}" if r.target_ns is not None else "-",
                r.verdict,
            )
        )
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    numeric = {1, 2, 3, 5, 6, 7, 8}

    def fmt(cells: tuple[str, ...]) -> str:
        out = [
            c.rjust(widths[i]) if i in numeric else c.ljust(widths[i]) for i, c in enumerate(cells)
        ]
        return "  ".join(out).rstrip()

    text = [fmt(header), "  ".join("-" * w for w in widths)]
    group = None
    for r, line in zip(rows, lines, strict=True):
        if r.group != group:
            group = r.group
            text.append(f"[{group}]")
        text.append(fmt(line))
    notes = list(dict.fromkeys(f"  * {r.name}: {r.note}" for r in rows if r.note))
    if notes:
        text.append("")
        text.extend(notes)
    return "\n".join(text)


def library_line() -> str:
    """Where alembic_autolock was imported from, and the git state of that tree."""
    import subprocess
    from importlib.util import find_spec

    spec = find_spec("alembic_autolock")
    origin = Path(spec.origin).parent if spec and spec.origin else None
    if origin is None:
        return "library: alembic_autolock not found"
    try:
        head = subprocess.run(
            ["git", "-C", str(origin), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(origin), "status", "--porcelain", "--", "."],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        state = f"git {head}{' + uncommitted changes' if dirty else ''}"
    except (OSError, subprocess.CalledProcessError):
        state = "not a git checkout"
    return f"library: {origin} ({state})"


def render_markdown(rows: list[Row]) -> str:
    """The rows as a Markdown table (one table, a bold line per group)."""
    out = [
        "| measurement | ours median (p95) | plain / raw baseline | baseline median (p95) "
        "| ratio | target | result |",
        "|---|---|---|---|---|---|---|",
    ]
    group = None
    for r in rows:
        if r.group != group:
            group = r.group
            title = re.sub(r" \([a-z0-9+]+://[^)]*\)", "", group)  # no per-run database names
            out.append(f"| **{title}** | | | | | | |")
        b = r.baseline
        base = f"{fmt_ns(b.median_ns)} ({fmt_ns(b.p95_ns)})" if b else "-"
        target = f"<= {fmt_ns(r.target_ns)}" if r.target_ns is not None else "-"
        out.append(
            f"| {r.name} (n={r.ours.n}) | {fmt_ns(r.ours.median_ns)} ({fmt_ns(r.ours.p95_ns)}) "
            f"| {r.baseline_name}{f' (n={b.n})' if b else ''} | {base} | {_fmt_ratio(r.ratio)} "
            f"| {target} | {r.verdict} |"
        )
    return "\n".join(out)


def machine_line() -> str:
    """Python version, cores, load average and bytecode setting, for the report header."""
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    dont_write = os.environ.get("PYTHONDONTWRITEBYTECODE", "")
    return (
        f"Python {platform.python_version()} on {platform.system()} {platform.machine()}, "
        f"{os.cpu_count()} cores, load average {load} (at the end of the run); "
        f"PYTHONDONTWRITEBYTECODE={dont_write!r}"
    )


def report(
    title: str,
    rows: list[Row],
    *,
    json_path: str | None,
    extra: Sequence[str] = (),
    components: Sequence[tuple[str, Sample]] = (),
) -> None:
    """Print the table, the notes and the component timings; write the rows as JSON when
    ``json_path`` is given."""
    print()
    print(f"== {title} ==")
    print(machine_line())
    print(library_line())
    for line in extra:
        print(line)
    print("ratio = ours median / baseline median (below 1: ours is faster). Times are wall-clock.")
    print()
    print(render_table(rows))
    if components:
        print()
        print("Where the time goes (components, measured in the same run):")
        width = max(len(label) for label, _ in components)
        for label, sample in components:
            print(
                f"  {label.ljust(width)}  median {fmt_ns(sample.median_ns):>9}  "
                f"p95 {fmt_ns(sample.p95_ns):>9}  (n={sample.n})"
            )
    print(flush=True)
    if json_path:
        data = {
            "title": title,
            "rows": [r.as_dict() for r in rows],
            "components": [{"label": label, **asdict(sample)} for label, sample in components],
        }
        Path(json_path).write_text(json.dumps(data, indent=1))


def parse_args(description: str) -> argparse.Namespace:
    """The options every benchmark script takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--json", metavar="PATH", help="also write the rows to PATH as JSON")
    parser.add_argument(
        "--quick", action="store_true", help="fewer iterations (a smoke run, not for figures)"
    )
    return parser.parse_args()


def scaled(n: int, quick: bool) -> int:
    """``n`` iterations, or a tenth of them (at least 3) for a quick run."""
    return max(3, n // 10) if quick else n


# --------------------------------------------------------------------------------------------
# Throwaway databases


def _dead_pid(name: str) -> bool:
    suffix = name.removeprefix(DB_PREFIX)
    return suffix.isdigit() and int(suffix) != os.getpid() and not Path(f"/proc/{suffix}").exists()


@contextmanager
def pg_database() -> Iterator[str]:
    """Create PostgreSQL database ``autolock_bench_<pid>``, yield its URL, drop it afterwards.

    Databases left behind by killed runs (their pid is gone) are dropped first.
    """
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    name = bench_name()
    admin = create_engine(f"{PG_SERVER}/postgres", isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin.connect() as conn:
        stale = conn.execute(
            text("SELECT datname FROM pg_database WHERE datname LIKE :p"), {"p": f"{DB_PREFIX}%"}
        ).scalars()
        for old in [s for s in stale if _dead_pid(s)] + [name]:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{old}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"{PG_SERVER}/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextmanager
def mysql_database() -> Iterator[str]:
    """Create MariaDB database ``autolock_bench_<pid>``, yield its URL, drop it afterwards."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    name = bench_name()
    admin = create_engine(MYSQL_SERVER, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin.connect() as conn:
        stale = conn.execute(
            text("SELECT SCHEMA_NAME FROM information_schema.SCHEMATA WHERE SCHEMA_NAME LIKE :p"),
            {"p": f"{DB_PREFIX}%"},
        ).scalars()
        for old in [s for s in stale if _dead_pid(s)] + [name]:
            conn.execute(text(f"DROP DATABASE IF EXISTS `{old}`"))
        conn.execute(text(f"CREATE DATABASE `{name}`"))
    try:
        yield f"{MYSQL_SERVER}/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS `{name}`"))
        admin.dispose()


# --------------------------------------------------------------------------------------------
# Alembic environments

_LOGGING = """
[loggers]
keys = root,sqlalchemy,alembic

[handlers]
keys = console

[formatters]
keys = generic

[logger_root]
level = WARNING
handlers = console
qualname =

[logger_sqlalchemy]
level = WARNING
handlers =
qualname = sqlalchemy.engine

[logger_alembic]
level = WARNING
handlers =
qualname = alembic

[handler_console]
class = StreamHandler
args = (sys.stderr,)
level = NOTSET
formatter = generic

[formatter_generic]
format = %(levelname)-5.5s [%(name)s] %(message)s
datefmt = %H:%M:%S
"""

# Alembic's generic template env.py, plus the cookbook's "Sharing a Connection across one or more
# programmatic migration commands" (a Connection in config.attributes is used as is).
PLAIN_ENV_PY = '''"""Stock env.py (Alembic generic template + cookbook connection sharing)."""

from logging.config import fileConfig

from sqlalchemy import engine_from_config, pool

from alembic import context

config = context.config

if config.config_file_name is not None:
    fileConfig(config.config_file_name)

target_metadata = None


def run_migrations_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connectable = config.attributes.get("connection", None)
    if connectable is not None:
        context.configure(connection=connectable, target_metadata=target_metadata)
        with context.begin_transaction():
            context.run_migrations()
        return
    connectable = engine_from_config(
        config.get_section(config.config_ini_section, {}),
        prefix="sqlalchemy.",
        poolclass=pool.NullPool,
    )
    with connectable.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
'''


@dataclass
class Environments:
    """Two ini files over the same revision files (/work/main/alembic/versions).

    ``ours``: script_location = the repo's alembic/ (its env.py is alembic_autolock's), with the
    namespace in ``[alembic_autolock]``. ``plain``: a stock env.py in a temp dir, with
    ``version_locations`` pointing at the repo's versions directory.
    """

    ours: Path
    plain: Path
    url: str
    namespace: str
    extra: dict[str, str] = field(default_factory=dict)


def write_environments(tmp: Path, url: str, namespace: str) -> Environments:
    """Write both ini files (and the stock env.py) under ``tmp``."""
    ours = tmp / "autolock.ini"
    ours.write_text(
        "[alembic]\n"
        f"script_location = {SCRIPT_LOCATION}\n"
        "prepend_sys_path = .\n"
        "path_separator = os\n"
        f"sqlalchemy.url = {url}\n\n"
        "[alembic_autolock]\n"
        f"namespace = {namespace}\n"
    )
    plain_dir = tmp / "plain_env"
    plain_dir.mkdir()
    (plain_dir / "env.py").write_text(PLAIN_ENV_PY)
    plain = tmp / "plain.ini"
    plain.write_text(
        "[alembic]\n"
        f"script_location = {plain_dir}\n"
        f"version_locations = {VERSIONS}\n"
        "prepend_sys_path = .\n"
        "path_separator = os\n"
        f"sqlalchemy.url = {url}\n" + _LOGGING
    )
    return Environments(ours=ours, plain=plain, url=url, namespace=namespace)


def migrate_to_head(envs: Environments) -> str:
    """Bring the database to head with ensure_migrated (cache off); return the action taken."""
    from sqlalchemy import create_engine

    from alembic_autolock import _state, ensure_migrated

    engine = create_engine(envs.url)
    try:
        result = ensure_migrated(engine, config=str(envs.ours), cache_ttl=0)
    finally:
        engine.dispose()
        _state.reset()
    return str(result.action)


def masked(url: str) -> str:
    """``url`` without a password, for printing."""
    return re.sub(r"://([^:@/]+):[^@/]*@", r"://\1:***@", url)
