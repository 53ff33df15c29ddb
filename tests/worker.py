"""A real process that calls alembic_autolock, for the concurrency tests.

    python tests/worker.py CONFIG URL [--op ensure|upgrade|downgrade] [--rev REV]
                                      [--setting key=value ...] [--barrier] [--nullpool]

With --barrier it imports everything, connects nothing, prints "ready" and waits for a line on
stdin, so that a test can release many workers at the same instant. It prints one JSON line:
the MigrationResult, or {"error": class name, "message": ...}. Exit status 0 on success, 1 on an
AutolockError, 2 on anything else.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("url")
    parser.add_argument("--op", default="ensure", choices=["ensure", "upgrade", "downgrade"])
    parser.add_argument("--rev", default=None)
    parser.add_argument("--setting", action="append", default=[])
    parser.add_argument("--barrier", action="store_true")
    parser.add_argument("--nullpool", action="store_true", help="a NullPool engine (serverless)")
    args = parser.parse_args()

    from sqlalchemy import create_engine

    import alembic_autolock
    from alembic_autolock import AutolockError

    settings = dict(item.split("=", 1) for item in args.setting)
    if args.nullpool:
        from sqlalchemy.pool import NullPool

        engine = create_engine(args.url, poolclass=NullPool)
    else:
        engine = create_engine(args.url)
    if args.barrier:
        print("ready", flush=True)
        sys.stdin.readline()
    started = time.time()
    try:
        if args.op == "ensure":
            result = alembic_autolock.ensure_migrated(engine, config=args.config, **settings)
        elif args.op == "upgrade":
            result = alembic_autolock.upgrade(
                engine, args.rev or "head", config=args.config, **settings
            )
        else:
            result = alembic_autolock.downgrade(engine, args.rev, config=args.config, **settings)
    except AutolockError as exc:
        out = {
            "error": type(exc).__name__,
            "message": str(exc),
            "pid": os.getpid(),
            "finished": time.time(),
        }
        for attr in ("revision", "applied", "heads", "state"):
            if hasattr(exc, attr):
                value = getattr(exc, attr)
                out[attr] = list(value) if isinstance(value, tuple) else value
        print(json.dumps(out), flush=True)
        return 1
    print(
        json.dumps(
            {
                "action": result.action,
                "applied": list(result.applied),
                "heads": list(result.heads),
                "waited_s": result.waited_s,
                "elapsed_s": result.elapsed_s,
                "started": started,
                "finished": time.time(),
                "pid": os.getpid(),
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
