"""A real PgBouncer for the tests: Debian's ``pgbouncer`` binary, started on a free port.

    bouncer = start_pgbouncer(pool_mode="transaction", pool_size=5)
    url = bouncer.url_for(pg_url)        # the same database, through PgBouncer
    bouncer.admin("SHOW SERVERS")        # the admin console (database "pgbouncer")
    bouncer.stop()                       # ends the one process that start_pgbouncer started

Every instance forwards every database (``* = host=127.0.0.1 port=5432``) with
``auth_type = trust``; its config, auth_file, log and pid file live in a temp dir of its own.
PgBouncer refuses to run as root, so as root it runs as the ``postgres`` user (the temp dir is
handed to that user). The process asks the kernel for SIGTERM when the test process dies, so a
killed pytest does not leave it behind either (only its temp dir, under /tmp).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

PG_HOST = "127.0.0.1"
PG_PORT = 5432
RUN_AS = "postgres"  # PgBouncer: "FATAL PgBouncer should not run as root"


def pgbouncer_binary() -> str | None:
    """The pgbouncer executable (Debian installs it in /usr/sbin, often not on PATH)."""
    found = shutil.which("pgbouncer")
    if found:
        return found
    for candidate in ("/usr/sbin/pgbouncer", "/usr/local/sbin/pgbouncer", "/usr/bin/pgbouncer"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _child_setup(uid: int | None, gid: int | None) -> Callable[[], None]:
    """What the child runs between fork and exec: become ``uid``/``gid`` (as root), then ask
    for SIGTERM when the test process dies (PR_SET_PDEATHSIG, Linux).

    The switch is done here rather than with Popen(user=...), because a change of credentials
    clears the parent-death signal, and Popen runs preexec_fn before its own switch. libc is
    looked up here, in the parent: the child imports nothing.
    """
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: the fixture's teardown is the cleanup
        prctl = None

    def setup() -> None:  # pragma: no cover - runs in the child
        if gid is not None and uid is not None:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
        if prctl is not None:
            prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG

    return setup


@dataclass
class PgBouncer:
    """One running PgBouncer process (the one this helper started)."""

    binary: str
    workdir: Path
    port: int
    pool_mode: str
    pool_size: int
    proc: subprocess.Popen[bytes] | None = None
    host: str = "127.0.0.1"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def log_path(self) -> Path:
        return self.workdir / "pgbouncer.log"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def url_for(self, url: str) -> str:
        """``url`` (a SQLAlchemy URL for 127.0.0.1:5432) rewritten to go through PgBouncer."""
        return (
            make_url(url).set(host=self.host, port=self.port).render_as_string(hide_password=False)
        )

    def _admin_connect(self, timeout: int = 3) -> Any:
        import psycopg2

        conn = psycopg2.connect(
            host=self.host,
            port=self.port,
            user="postgres",
            dbname="pgbouncer",
            connect_timeout=timeout,
        )
        conn.autocommit = True  # the admin console knows no transactions
        return conn

    def admin(self, command: str) -> list[dict[str, Any]]:
        """Run one admin console command (SHOW SERVERS, KILL db, RESUME db ...)."""
        conn = self._admin_connect()
        try:
            cur = conn.cursor()
            cur.execute(command)
            if cur.description is None:
                return []
            names = [col.name for col in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
        finally:
            conn.close()

    def servers(self, database: str) -> list[dict[str, Any]]:
        """PgBouncer's server connections for ``database`` (SHOW SERVERS)."""
        return [row for row in self.admin("SHOW SERVERS") if row["database"] == database]

    def reset(self, database: str) -> None:
        """Drop every client and server connection PgBouncer has for ``database``.

        So that a test starts with an empty pool, and so that no server connection of PgBouncer
        keeps the test's database busy when it is dropped.
        """
        with contextlib.suppress(Exception):  # an unknown (never used) database: nothing to do
            self.admin(f'KILL "{database}"')
        with contextlib.suppress(Exception):
            self.admin(f'RESUME "{database}"')

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"pgbouncer exited with status {self.proc.returncode} before accepting "
                    f"connections; its log:\n{self.log()}"
                )
            try:
                self._admin_connect(timeout=1).close()
                return
            except Exception as exc:  # not listening yet
                last = exc
                time.sleep(0.05)
        raise RuntimeError(
            f"pgbouncer did not accept connections on port {self.port} within {timeout}s "
            f"({last}); its log:\n{self.log()}"
        )

    def stop(self) -> None:
        """End the process this helper started (SIGTERM: immediate shutdown), then its files."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        shutil.rmtree(self.workdir, ignore_errors=True)


def _config(bouncer: PgBouncer, **settings: Any) -> str:
    options = {
        "listen_addr": bouncer.host,
        "listen_port": bouncer.port,
        "unix_socket_dir": "",
        "auth_type": "trust",
        "auth_file": bouncer.workdir / "userlist.txt",
        "admin_users": "postgres",
        "pool_mode": bouncer.pool_mode,
        "default_pool_size": bouncer.pool_size,
        "min_pool_size": 0,
        "reserve_pool_size": 0,
        "max_client_conn": 500,
        "max_db_connections": 0,
        # Clients queue for a server; a test that deadlocks on the pool fails within this.
        "query_wait_timeout": 60,
        "logfile": bouncer.workdir / "pgbouncer.log",
        "pidfile": bouncer.workdir / "pgbouncer.pid",
        "log_connections": 0,
        "log_disconnections": 0,
        **settings,
    }
    lines = [
        "[databases]",
        f"* = host={PG_HOST} port={PG_PORT}",
        "",
        "[pgbouncer]",
        *(f"{key} = {value}" for key, value in options.items()),
        "",
    ]
    return "\n".join(lines)


def start_pgbouncer(
    *,
    pool_mode: str = "transaction",
    pool_size: int = 20,
    timeout: float = 15,
    attempts: int = 3,
    **settings: Any,
) -> PgBouncer:
    """Start a PgBouncer on a free port of 127.0.0.1 and wait until it accepts connections.

    ``settings`` are further ``[pgbouncer]`` options. Raises RuntimeError (with PgBouncer's log)
    if it does not come up; FileNotFoundError if it is not installed.
    """
    binary = pgbouncer_binary()
    if binary is None:
        raise FileNotFoundError("pgbouncer is not installed")
    as_root = hasattr(os, "geteuid") and os.geteuid() == 0
    error: BaseException | None = None
    for _ in range(attempts):  # another process may take the free port before PgBouncer does
        workdir = Path(tempfile.mkdtemp(prefix="autolock-pgbouncer-"))
        bouncer = PgBouncer(binary, workdir, free_port(), pool_mode, pool_size)
        ini = workdir / "pgbouncer.ini"
        ini.write_text(_config(bouncer, **settings))
        (workdir / "userlist.txt").write_text('"postgres" ""\n')
        uid: int | None = None
        gid: int | None = None
        if as_root:
            account = pwd.getpwnam(RUN_AS)
            uid, gid = account.pw_uid, account.pw_gid
            for path in (workdir, *workdir.iterdir()):
                os.chown(path, uid, gid)
        bouncer.proc = subprocess.Popen(
            [binary, str(ini)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_child_setup(uid, gid),
        )
        try:
            bouncer.wait_ready(timeout)
        except BaseException as exc:
            bouncer.stop()
            error = exc
            if isinstance(exc, RuntimeError) and "already in use" in str(exc):
                continue
            raise
        return bouncer
    raise RuntimeError(f"pgbouncer did not start after {attempts} attempts: {error}")
