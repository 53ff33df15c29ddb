"""A real process that migrates under alembic_autolock, for the fault-injection suite
(tests/test_faults.py).

    python tests/fault_worker.py CONFIG URL [--op ensure|resolve-applied|resolve-not-applied]
                                            [--rev REV] [--setting key=value ...]

``AUTOLOCK_FAULT_AT = "<event>[:<revision>]=<action>"`` acts when the library emits that event
(``lock.waiting``, ``lock.acquired``, ``migration.started``, ``migration.step`` of a revision,
...), through the library's public listener API (``alembic_autolock.subscribe``), so the fault
lands at that exact point of the run without any hook in the library. Actions: ``SIGKILL``,
``SIGTERM`` or ``SIGSTOP`` sent to this process (SIGTERM raises SystemExit, as the handlers of
web servers and job runners do), or ``pause`` (trace "pause", then wait for "<trace>.go").
Every event this process sees is traced ("event <name> <pid> <ns>").

It prints one JSON line: the MigrationResult, or the error (type, message, revision, state),
including a BaseException such as SystemExit. Then, with ``--linger``, it reports whether this
process still holds the in-process lock, prints "lingering" and waits for a line on stdin before
it exits, so that the test can look at the servers while the process is still alive.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "migrations_faults"))

import faults_behaviour


def _on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(143)


def _listener(spec: str | None) -> Any:
    target, action = [*spec.split("=", 1), ""][:2] if spec else ("", "")
    name, _, revision = target.partition(":")
    fired = []

    def listen(event: str, level: str, fields: Any) -> None:
        faults_behaviour.trace("event", event)
        if event != name or fired:
            return
        if revision and fields.get("revision") != revision:
            return
        fired.append(True)
        faults_behaviour.trace("fault", event, action)
        if action == "pause":
            faults_behaviour.trace("pause", event, "listener")
            go = os.environ["AUTOLOCK_FAULT_TRACE"] + ".go"
            deadline = time.monotonic() + 120
            while not os.path.exists(go) and time.monotonic() < deadline:
                time.sleep(0.01)
        elif action:
            os.kill(os.getpid(), getattr(signal, action))
            time.sleep(0.05)  # a signal handler runs at the next bytecode; SIGSTOP stops here

    return listen


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("url")
    parser.add_argument("--op", default="ensure")
    parser.add_argument("--rev", default=None)
    parser.add_argument("--setting", action="append", default=[])
    parser.add_argument("--linger", action="store_true")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _on_sigterm)

    from sqlalchemy import create_engine

    import alembic_autolock
    from alembic_autolock import _runner, _state

    alembic_autolock.subscribe(_listener(os.environ.get("AUTOLOCK_FAULT_AT")))
    settings: dict[str, Any] = dict(item.split("=", 1) for item in args.setting)
    engine = create_engine(args.url)
    out: dict[str, Any] = {"pid": os.getpid()}
    code = 0
    try:
        if args.op == "ensure":
            result = alembic_autolock.ensure_migrated(engine, config=args.config, **settings)
            out.update(action=result.action, applied=list(result.applied), heads=list(result.heads))
        else:
            heads = _runner.resolve(
                engine,
                args.rev,
                applied=args.op == "resolve-applied",
                config=args.config,
                **settings,
            )
            out.update(action="resolved", heads=list(heads))
    except BaseException as exc:  # SystemExit from SIGTERM too: report it like the rest
        code = 1
        out.update(error=type(exc).__name__, message=str(exc))
        for attr in ("revision", "applied", "heads", "state", "during", "failed"):
            if hasattr(exc, attr):
                value = getattr(exc, attr)
                out[attr] = list(value) if isinstance(value, tuple) else value
        out["cause"] = type(exc.__cause__).__name__ if exc.__cause__ is not None else None
        del exc
    out["process_lock_held"] = sorted(_state.process_lock_owners)
    print(json.dumps(out, default=str), flush=True)
    if args.linger:
        print("lingering", flush=True)
        sys.stdin.readline()
    engine.dispose()
    return code


if __name__ == "__main__":
    sys.exit(main())
