"""What the test revisions do besides DDL, steered by environment variables of the process.

AUTOLOCK_TEST_TRACE    file to which every revision body appends "<rev> <direction> <pid>"
                       when it starts (outside any transaction: a body that ran and was rolled
                       back still leaves its line, so the file proves how often bodies ran)
AUTOLOCK_TEST_SLEEP    seconds each revision body sleeps (widens race windows)
AUTOLOCK_TEST_FAIL_AT  revision that raises after its first DDL statement
AUTOLOCK_TEST_HANG_AT  revision that writes "hang" to the trace and sleeps for a minute (in Python)
AUTOLOCK_TEST_PAUSE_AT "<rev>:<point>": where a revision calls pause(rev, point), it writes
                       "pause-<point>" to the trace and sleeps for a minute (in Python, its
                       migration session idle, outside any transaction if the revision is in
                       an autocommit block)
AUTOLOCK_TEST_SERVER_SLEEP_AT  revision that, after its first DDL statement, writes
                       "server-sleep" to the trace and runs pg_sleep(60) / SLEEP(60) in the server;
                       "<rev>:before" does it before the DDL (MySQL commits each DDL at once)
"""

import os
import time

from alembic import op


def trace(rev: str, direction: str, what: str = "") -> None:
    path = os.environ.get("AUTOLOCK_TEST_TRACE")
    if path:
        line = f"{rev} {direction} {os.getpid()}{(' ' + what) if what else ''}\n"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


def body(rev: str, direction: str = "up") -> None:
    trace(rev, direction)
    delay = float(os.environ.get("AUTOLOCK_TEST_SLEEP", "0") or 0)
    if delay:
        time.sleep(delay)
    if os.environ.get("AUTOLOCK_TEST_HANG_AT") == rev and direction == "up":
        trace(rev, direction, "hang")
        time.sleep(60)
    if os.environ.get("AUTOLOCK_TEST_SERVER_SLEEP_AT") == f"{rev}:before" and direction == "up":
        _server_sleep(rev)


def pause(rev: str, point: str) -> None:
    if os.environ.get("AUTOLOCK_TEST_PAUSE_AT") == f"{rev}:{point}":
        trace(rev, "up", f"pause-{point}")
        time.sleep(60)


def _server_sleep(rev: str) -> None:
    trace(rev, "up", "server-sleep")
    dialect = op.get_context().dialect.name
    op.execute("SELECT pg_sleep(60)" if dialect == "postgresql" else "SELECT SLEEP(60)")


def after_ddl(rev: str) -> None:
    """Runs after the revision's first DDL statement, inside its transaction."""
    if os.environ.get("AUTOLOCK_TEST_SERVER_SLEEP_AT") == rev:
        _server_sleep(rev)
    if os.environ.get("AUTOLOCK_TEST_FAIL_AT") == rev:
        raise RuntimeError(f"revision {rev} failed on purpose")
