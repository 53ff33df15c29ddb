"""What the tenant test revisions do besides DDL, steered by environment variables.

AUTOLOCK_TEST_TRACE        file to which every revision body appends "<rev>\t<schema>\t<pid>" when
                           it starts, outside any transaction (a body that ran and was rolled
                           back still leaves its line): the file proves how often each schema's
                           bodies ran; <schema> is the session's current_schema()
AUTOLOCK_TEST_SLEEP        seconds each revision body sleeps (widens race windows)
AUTOLOCK_TEST_FAIL_SCHEMA  schema in which revision a2 raises after its DDL
"""

import os
import time

import sqlalchemy as sa

from alembic import op


def body(rev: str) -> str:
    schema = str(op.get_bind().execute(sa.text("SELECT current_schema()")).scalar())
    path = os.environ.get("AUTOLOCK_TEST_TRACE")
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{rev}\t{schema}\t{os.getpid()}\n".encode())
        finally:
            os.close(fd)
    delay = float(os.environ.get("AUTOLOCK_TEST_SLEEP", "0") or 0)
    if delay:
        time.sleep(delay)
    return schema


def fail_here(rev: str, schema: str) -> None:
    if os.environ.get("AUTOLOCK_TEST_FAIL_SCHEMA") == schema:
        raise RuntimeError(f"revision {rev} failed on purpose in schema {schema}")
