"""Start N copies of an "app" at the same instant; each calls ensure_migrated() at start-up.

    python examples/stampede.py --processes 8 --url sqlite:///example.db

Exactly one process applies the pending revisions of the example history (alembic.ini,
alembic/); the others wait for the lock, look again, and go on. Works the same with a
PostgreSQL or MariaDB URL, or with --lock redis://127.0.0.1:6379/0.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent.parent


def app_start(url: str, lock: str | None, barrier: Any, results: Any) -> None:
    """What each copy of the app does when it starts."""
    from sqlalchemy import create_engine

    from alembic_autolock import ensure_migrated

    engine = create_engine(url)
    settings = {"lock": lock} if lock else {}
    barrier.wait()  # everyone starts at once
    result = ensure_migrated(engine, config=str(HERE / "alembic.ini"), **settings)
    results.put(
        (
            os.getpid(),
            result.action,
            result.applied,
            result.heads,
            result.waited_s,
            result.elapsed_s,
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--url", default=f"sqlite:///{HERE / 'example.db'}")
    parser.add_argument("--lock", default=None, help="lock setting (default: auto)")
    args = parser.parse_args()

    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(args.processes)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=app_start, args=(args.url, args.lock, barrier, results))
        for _ in range(args.processes)
    ]
    for p in procs:
        p.start()
    rows = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join()
    print(f"{args.processes} processes started at once against {args.url}:")
    for pid, action, applied, heads, waited, elapsed in sorted(rows, key=lambda r: -len(r[2])):
        what = f"applied {', '.join(applied)}" if applied else "nothing to apply"
        print(
            f"  pid {pid:>7}: {action:<8} {what}; at {', '.join(heads)} "
            f"(waited {waited:.3f}s for the lock, {elapsed:.3f}s in all)"
        )
    migrators = sum(1 for r in rows if r[2])
    print(f"{migrators} process migrated; {len(rows) - migrators} waited and went on.")


if __name__ == "__main__":
    main()
