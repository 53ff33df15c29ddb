"""What the fault-injection revisions (tests/test_faults.py) do besides their SQL.

AUTOLOCK_FAULT_TRACE  file each revision appends "<kind> <rev> <pid> <monotonic ns> [what]" to:
                      "begin" when its body starts, "did" after each of its statements returned
                      (outside any transaction: the file proves who ran what, and when)
AUTOLOCK_FAULT_PAUSE  "<rev>:<point>": at that point the revision writes "pause" and waits,
                      its migration session idle, until the file "<trace>.go" exists
AUTOLOCK_FAULT_FAIL   revision that raises after its first statement
AUTOLOCK_FAULT_SLOW   "<rev>:<what>": after that statement, one that runs for 10 s
                      (``pg_sleep``: PostgreSQL only), for a statement_timeout to end
AUTOLOCK_FAULT_STATEMENT_TIMEOUT  milliseconds: env.py's connection_setup sets
                      ``statement_timeout`` on the migration connection (PostgreSQL only)
"""

import os
import time

from alembic import op


def trace(kind: str, rev: str, what: str = "") -> None:
    path = os.environ.get("AUTOLOCK_FAULT_TRACE")
    if not path:
        return
    line = f"{kind} {rev} {os.getpid()} {time.monotonic_ns()}{(' ' + what) if what else ''}\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def begin(rev: str) -> None:
    trace("begin", rev)


def run(rev: str, sql: str, what: str) -> None:
    """One statement of the revision, traced once it returned."""
    op.execute(sql)
    trace("did", rev, what)
    if os.environ.get("AUTOLOCK_FAULT_FAIL") == rev:
        raise RuntimeError(f"revision {rev} failed on purpose")
    if os.environ.get("AUTOLOCK_FAULT_SLOW") == f"{rev}:{what}":
        op.execute("SELECT pg_sleep(10)")
        trace("did", rev, "slow")


def pause(rev: str, point: str) -> None:
    if os.environ.get("AUTOLOCK_FAULT_PAUSE") != f"{rev}:{point}":
        return
    trace("pause", rev, point)
    go = os.environ["AUTOLOCK_FAULT_TRACE"] + ".go"
    deadline = time.monotonic() + 120
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.01)
