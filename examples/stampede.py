"""Start N copies of an "app" at the same instant; each calls ensure_migrated() at start-up.

    python examples/stampede.py --processes 8 --url sqlite:///example.db

Exactly one process applies the pending revisions of the example history (alembic.ini,
alembic/); the others find the database at head, or wait for the lock, look again, and go on.
Works the same with a PostgreSQL or MariaDB URL, or with --lock redis://127.0.0.1:6379/0.

If any copy fails (a database that does not exist, a lock timeout), the others are stopped,
the first error is printed as one line and the exit code is 1.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import sys
import time
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

HERE = Path(__file__).resolve().parent.parent

# A copy that waited less than this for the lock did not really wait: the lock was free.
WAITED = 0.005


def app_start(url: str, lock: str | None, barrier: Any, results: Any) -> None:
    """What each copy of the app does when it starts."""
    try:
        from sqlalchemy import create_engine

        from alembic_autolock import ensure_migrated

        engine = create_engine(url)
        settings = {"lock": lock} if lock else {}
        barrier.wait(timeout=60)  # everyone starts at once
        result = ensure_migrated(engine, config=str(HERE / "alembic.ini"), **settings)
    except BaseException as exc:  # reported to the parent, which stops everyone
        first = (str(exc).strip().splitlines() or [""])[0]
        results.put((os.getpid(), "error", f"{type(exc).__name__}: {first}"))
        raise SystemExit(1) from None
    row = (result.action, result.applied, result.heads, result.waited_s, result.elapsed_s)
    results.put((os.getpid(), "ok", row))


def describe(action: str, applied: tuple[str, ...], waited: float) -> str:
    """What one copy really did, in words."""
    if applied:
        return f"applied {', '.join(applied)}"
    if waited >= WAITED:
        return "waited for the lock, then found the database at head"
    if action == "cached":
        return "answered from the in-process cache"
    return "found the database at head without waiting"


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--url", default=f"sqlite:///{HERE / 'example.db'}")
    parser.add_argument("--lock", default=None, help="lock setting (default: auto)")
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="give up after this many seconds"
    )
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
    rows: list[tuple[int, tuple[Any, ...]]] = []
    error: str | None = None
    deadline = time.monotonic() + args.timeout
    while len(rows) < len(procs) and error is None:
        try:
            pid, kind, payload = results.get(timeout=0.2)
        except queue.Empty:
            if time.monotonic() > deadline:
                error = f"not every process finished within {args.timeout:g}s"
            elif any(p.exitcode not in (None, 0) for p in procs):
                # died without a word (killed, or failed before it could report)
                dead = next(p for p in procs if p.exitcode not in (None, 0))
                error = f"process {dead.pid} exited with code {dead.exitcode}"
            continue
        if kind == "error":
            error = f"process {pid}: {payload}"
        else:
            rows.append((pid, payload))
    if error is not None:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(5)
        print(f"FAILED: {error}", file=sys.stderr)
        return 1
    for p in procs:
        p.join()

    shown = make_url(args.url).render_as_string(hide_password=True)
    print(f"{args.processes} processes started at once against {shown}:")
    for pid, (action, applied, heads, waited, elapsed) in sorted(rows, key=lambda r: -len(r[1][1])):
        print(
            f"  pid {pid:>7}: {action:<8} {describe(action, applied, waited)}; "
            f"at {', '.join(heads)} (waited {waited:.3f}s for the lock, {elapsed:.3f}s in all)"
        )
    migrated = sum(1 for _, r in rows if r[1])
    waited = sum(1 for _, r in rows if not r[1] and r[3] >= WAITED)
    direct = len(rows) - migrated - waited
    print(
        f"{migrated} process{'es' if migrated != 1 else ''} migrated; "
        f"{waited} waited for the lock, then went on; "
        f"{direct} found the database at head without waiting."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
