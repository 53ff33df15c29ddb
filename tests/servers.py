"""Real, private servers and network faults for the fault-injection tests.

    pg = PrivatePostgres(tmp_path / "pg", max_connections=5)   # initdb'ed and started
    url = pg.url(pg.create_database("app"))                     # postgresql+psycopg2://...
    pg.restart(); pg.kill(); pg.start(); pg.close()

    db = PrivateMariaDB(tmp_path / "my")                        # mariadb-install-db'ed, started
    db.url(db.create_database("app"))                           # mysql+pymysql://root@...

    relay = TcpRelay("127.0.0.1", pg.port)                      # byte forwarding, any protocol
    relay.url_for(url)                                          # the same URL, through the relay
    relay.stall(); relay.resume(); relay.cut(); relay.close()

    with ConnectionSampler(pg.url(), "app") as sampler:         # pg_stat_activity every 20 ms
        ...
    sampler.summary.peak_library

Everything runs as real processes bound to 127.0.0.1 on a free port, with its files in the
directory given (the unix socket in a short directory of its own under /tmp if that path would be
too long for a socket). The shared servers on 5432/3306/6379 are never touched.

Speed: a data directory is initialised once per process (a template: initdb ~0.5 s,
mariadb-install-db ~0.4 s) and copied for each server; data directories and templates live on
tmpfs (/dev/shm) when there is one, as ``directory/data`` -> /dev/shm/autolock-..., because this
VM's disk takes 0.1 to 0.8 s to write a 39 MB cluster and tmpfs 0.05 s (see tmpfs_root()). A new
PostgreSQL is then up in about 0.08 s, a MariaDB in about 0.12 s.

Cleanup: ``close()`` (or the ``with`` block) stops a server and removes the files it made; an
``atexit`` hook closes whatever is still open; and each server has a watchdog process (``sh``,
blocked reading a pipe only this process holds) that kills the server and removes its tmpfs
data when this process dies without cleaning up (SIGKILL, pytest-timeout's ``os._exit``), so no
server outlives its tests. clear_templates() drops the templates early (a session-end helper).

As root, PostgreSQL runs as the ``postgres`` user (initdb and postgres refuse root): its data and
socket directories are handed to that user, and the directories above them get the
"others may traverse" bit (``o+x``) if they lack it (pytest's /tmp/pytest-of-root is 0700, and
every new pytest session makes it 0700 again, so this is redone at each start()).
MariaDB runs as root (``--user=root``), so it needs no such change.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import glob
import json
import os
import pwd
import re
import selectors
import shlex
import shutil
import signal
import socket
import stat
import struct
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar
from urllib.parse import urlsplit, urlunsplit

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.pool import NullPool

HOST = "127.0.0.1"
_SOCKET_PATH_MAX = 100  # sun_path is 108 bytes on Linux; keep a margin
_T = TypeVar("_T")


def free_port() -> int:
    """A TCP port of 127.0.0.1 that was free a moment ago (the server binds it later, so a
    start retries with another port if someone took it meanwhile)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _as_root() -> bool:
    return os.geteuid() == 0


def _wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie is not: it holds no memory or sockets)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _descendants(pid: int) -> list[int]:
    """The live descendants of ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        if fields[0] not in ("Z", "X"):
            children.setdefault(int(fields[1]), []).append(int(entry))
    found: list[int] = []
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _short_socket_dir(preferred: Path, name: str) -> tuple[Path, bool]:
    """``preferred``, or a new short directory under /tmp if a socket path in ``preferred``
    would be too long; the flag says whether the directory is a temporary one of ours."""
    if len(str(preferred / name)) <= _SOCKET_PATH_MAX:
        preferred.mkdir(parents=True, exist_ok=True)
        return preferred, False
    return Path(tempfile.mkdtemp(prefix="autolock-sock-", dir="/tmp")), True


class _Watchdog:
    """A ``sh`` that runs ``script`` when this process dies without closing it.

    It blocks reading a pipe whose only writer is this process (the end is not inherited by
    other children); when this process exits for any reason the read returns and the script
    runs. It is in a session of its own, so a Ctrl-C at the terminal does not reach it.
    """

    def __init__(self, script: str) -> None:
        self.proc = subprocess.Popen(
            ["sh", "-c", f"read _ignored; {script}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            cwd="/",
        )

    def disarm(self) -> None:
        """End the watchdog without running its script."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()


# Everything still open at interpreter exit is closed; a killed process has the watchdogs.
_open_servers: weakref.WeakSet[Any] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for server in list(_open_servers):
        with contextlib.suppress(Exception):
            server.close()
    clear_templates()


# --- where data directories live ------------------------------------------------------------


def tmpfs_root() -> Path | None:
    """/dev/shm if it is a writable tmpfs with at least 1 GB free, else None.

    Data directories (and their templates) go there when it exists: this VM's disk writes a
    39 MB PostgreSQL cluster in 0.1 to 0.8 s, tmpfs in 0.05 s. AUTOLOCK_TEST_TMPFS=0 turns
    that off, AUTOLOCK_TEST_TMPFS=<dir> names another directory to use.
    """
    setting = os.environ.get("AUTOLOCK_TEST_TMPFS", "")
    if setting in ("0", "no", "off", "false"):
        return None
    if setting:
        return Path(setting)
    try:
        with open("/proc/mounts") as f:
            mounts = {line.split()[1]: line.split()[2] for line in f if len(line.split()) > 2}
        st = os.statvfs("/dev/shm")
    except OSError:
        return None
    if mounts.get("/dev/shm") != "tmpfs" or not os.access("/dev/shm", os.W_OK | os.X_OK):
        return None
    return Path("/dev/shm") if st.f_bavail * st.f_frsize >= 1 << 30 else None


def _data_home(kind: str, tmpfs: bool | None) -> Path | None:
    """A new directory on tmpfs for a server's data (traversable by the server's user), or
    None to keep the data in the server's own directory."""
    if tmpfs is False:
        return None
    root = tmpfs_root()
    if root is None:
        if tmpfs:
            raise RuntimeError("tmpfs=True, but there is no usable tmpfs (see tmpfs_root())")
        return None
    home = Path(tempfile.mkdtemp(prefix=f"autolock-{kind}-", dir=root))
    home.chmod(0o755)
    return home


# --- templates: initialise a data directory once per process, copy it per server -----------

_templates: dict[str, tuple[Path, _Watchdog]] = {}
_templates_lock = threading.Lock()


def _template(kind: str, build: Callable[[Path], None]) -> Path:
    """A data directory of ``kind`` initialised once per process by ``build(path)`` and kept
    in /tmp until exit (or clear_templates()); servers start from a copy (``cp -a``)."""
    with _templates_lock:
        found = _templates.get(kind)
        if found is not None and found[0].exists():
            return found[0]
        root = Path(tempfile.mkdtemp(prefix=f"autolock-{kind}-template-", dir=tmpfs_root()))
        root.chmod(0o755)  # traversable by the server's user
        watchdog = _Watchdog(f"rm -rf {shlex.quote(str(root))}")
        try:
            build(root / "data")
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            watchdog.disarm()
            raise
        _templates[kind] = (root / "data", watchdog)
        return root / "data"


def clear_templates() -> None:
    """Remove the template data directories this process made (a session-end helper)."""
    with _templates_lock:
        for data, watchdog in _templates.values():
            shutil.rmtree(data.parent, ignore_errors=True)
            watchdog.disarm()
        _templates.clear()


def _remove_data(data_dir: Path, home: Path | None) -> None:
    """Remove a data directory: the tmpfs directory holding it and the symlink to it, or the
    directory itself."""
    if home is not None:
        shutil.rmtree(home, ignore_errors=True)
        with contextlib.suppress(OSError):
            data_dir.unlink()
    else:
        shutil.rmtree(data_dir, ignore_errors=True)


def _copy_tree(source: Path, target: Path) -> None:
    """Copy a data directory, keeping owners and modes (``cp -a`` is several times faster
    than shutil.copytree plus a chown of every file)."""
    subprocess.run(["cp", "-a", str(source), str(target)], check=True)


# --- PostgreSQL ------------------------------------------------------------------------------


def postgres_bindir() -> Path | None:
    """The directory of initdb/pg_ctl/postgres: $AUTOLOCK_TEST_PG_BINDIR, else the newest
    /usr/lib/postgresql/*/bin (Debian), else wherever ``initdb`` is on PATH."""
    candidates = []
    if os.environ.get("AUTOLOCK_TEST_PG_BINDIR"):
        candidates.append(Path(os.environ["AUTOLOCK_TEST_PG_BINDIR"]))

    def version(path: str) -> float:
        with contextlib.suppress(ValueError):
            return float(Path(path).parent.name)
        return 0.0

    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version)][
        ::-1
    ]
    found = shutil.which("initdb")
    if found:
        candidates.append(Path(found).parent)
    for candidate in candidates:
        if all(os.access(candidate / tool, os.X_OK) for tool in ("initdb", "pg_ctl", "postgres")):
            return candidate
    return None


def postgres_unavailable() -> str | None:
    """Why a PrivatePostgres cannot run here, or None if it can."""
    if postgres_bindir() is None:
        return "PostgreSQL server binaries (initdb, pg_ctl) not found; set AUTOLOCK_TEST_PG_BINDIR"
    if _as_root():
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root, and there is no 'postgres' user to run PostgreSQL as"
    return None


_CONNECTION_AUTHORIZED = re.compile(r"connection authorized: user=(\S+) database=(\S+)")


class PrivatePostgres:
    """A PostgreSQL server of its own: initdb'ed (trust, superuser ``postgres``) and started.

    ``directory`` holds ``data/`` (the cluster, or a symlink to it on tmpfs: ``tmpfs=None``
    decides by tmpfs_root(), True insists, False keeps it in ``directory``), ``postgres.log``
    (the server's stderr, appended to across restarts) and ``run/`` (the unix socket). Listens on
    127.0.0.1:``port`` (a free one unless given; it stays the same across restarts). An existing
    ``directory/data`` is started as it is.

    ``max_connections`` counts every client: ``superuser_reserved_connections`` is 0. The tests
    connect as the superuser ``postgres``, who may use the reserved slots too, so the reserve
    changes nothing for them; but with PostgreSQL's default reserve of 3 the server refuses to
    start with max_connections <= 3.

    With ``log_connections`` every connection is logged, and :meth:`count_connections_since`
    counts them exactly (no sampling gaps). ``settings`` are further ``-c`` settings (e.g.
    ``{"idle_session_timeout": "1s"}``). ``timings`` records how long init, start, stop and
    restart took.

    The postmaster is a child of this process (see start()); stop(), restart() and kill() signal
    it as ``pg_ctl stop`` would.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        max_connections: int = 30,
        port: int | None = None,
        log_connections: bool = False,
        settings: Mapping[str, str | int] | None = None,
        template: bool = True,
        tmpfs: bool | None = None,
        start: bool = True,
    ) -> None:
        bindir = postgres_bindir()
        if bindir is None:
            raise FileNotFoundError(postgres_unavailable())
        self.bindir = bindir
        self.directory = Path(directory).resolve()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.directory / "data"
        self.log_path = self.directory / "postgres.log"
        self.host = HOST
        self.port = port or free_port()
        self._fixed_port = port is not None
        self.max_connections = max_connections
        self.log_connections = log_connections
        self.settings = dict(settings or {})
        self.timings: dict[str, float] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        self._leftovers: list[int] = []  # backends of a killed postmaster, until they are gone
        self._closed = False

        self._uid: int | None = None
        self._gid: int | None = None
        if _as_root():
            account = pwd.getpwnam("postgres")
            self._uid, self._gid = account.pw_uid, account.pw_gid
            self._make_traversable(self.directory)
        self.socket_dir, self._own_socket_dir = _short_socket_dir(
            self.directory / "run", ".s.PGSQL.65535.lock"
        )
        self._chown(self.socket_dir)
        if not self.log_path.exists():
            self.log_path.touch()
        self._chown(self.log_path)

        # The data lives on tmpfs when there is one (directory/data is then a symlink to it).
        if self.data_dir.is_symlink() and not self.data_dir.exists():
            self.data_dir.unlink()  # left by a server whose tmpfs data is gone
        self._data_home = None if self.data_dir.exists() else _data_home("pg-data", tmpfs)
        real_data = self._data_home / "data" if self._data_home else self.data_dir
        self._watchdog = _Watchdog(
            # SIGQUIT is PostgreSQL's immediate shutdown: the postmaster ends its backends too.
            f'kill -QUIT "$(head -n1 {shlex.quote(str(real_data / "postmaster.pid"))})"'
            + "".join(
                f"; rm -rf {shlex.quote(str(path))}"
                for path in (self.socket_dir if self._own_socket_dir else None, self._data_home)
                if path is not None
            )
        )
        _open_servers.add(self)
        try:
            began = time.monotonic()
            if not (self.data_dir / "PG_VERSION").exists():
                if template:
                    _copy_tree(_template(f"pg{bindir.parent.name}", self._initdb), real_data)
                else:
                    self._initdb(real_data)
                if self._data_home:
                    self.data_dir.symlink_to(real_data, target_is_directory=True)
            self.timings["init"] = time.monotonic() - began
            if start:
                self.start()
        except BaseException:
            self.close()
            raise

    # -- running the tools as the postgres user --

    def _chown(self, path: Path) -> None:
        if self._uid is not None and self._gid is not None:
            os.chown(path, self._uid, self._gid)

    def _make_traversable(self, directory: Path) -> None:
        """Give the postgres user a way through every directory above its own (o+x)."""
        for path in (directory, *directory.parents):
            st = path.stat()
            if st.st_uid == self._uid or st.st_mode & stat.S_IXOTH:
                continue
            if st.st_gid == self._gid and st.st_mode & stat.S_IXGRP:
                continue
            path.chmod(stat.S_IMODE(st.st_mode) | stat.S_IXOTH)

    def _run(self, *argv: str, check: bool = True, timeout: float = 60) -> str:
        proc = subprocess.run(
            argv,
            cwd=self.directory,  # a directory the postgres user may enter
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
            user=self._uid,
            group=self._gid,
            extra_groups=[] if self._uid is not None else None,
            start_new_session=True,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"{Path(argv[0]).name} failed ({proc.returncode}):\n{proc.stdout}")
        return proc.stdout

    def _initdb(self, data: Path) -> None:
        data.mkdir(mode=0o700)
        self._chown(data)
        self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-locale",
            "--no-sync",
            "--no-instructions",
        )

    # -- state --

    @property
    def pid(self) -> int | None:
        """The postmaster's pid, if it is running."""
        if self.proc is None or self.proc.poll() is not None:
            return None
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.pid is not None

    def url(self, database: str = "postgres", driver: str = "postgresql+psycopg2") -> str:
        """A SQLAlchemy URL for ``database`` on this server, as the superuser postgres."""
        return f"{driver}://postgres@{self.host}:{self.port}/{database}"

    def connect(self, database: str = "postgres", **kwargs: Any) -> Any:
        """A psycopg2 connection (autocommit) to ``database``."""
        import psycopg2

        kwargs.setdefault("connect_timeout", 5)
        conn = psycopg2.connect(
            host=self.host, port=self.port, user="postgres", dbname=database, **kwargs
        )
        conn.autocommit = True
        return conn

    def execute(self, sql: str, database: str = "postgres") -> list[tuple[Any, ...]]:
        """Run one statement on a fresh connection; its rows, if it returns any."""
        conn = self.connect(database)
        try:
            cur = conn.cursor()
            cur.execute(sql)
            return list(cur.fetchall()) if cur.description is not None else []
        finally:
            conn.close()

    def create_database(self, name: str) -> str:
        """Create database ``name``; returns ``name``."""
        self.execute(f'CREATE DATABASE "{name}"')
        return name

    # -- start / stop --

    def _argv(self) -> list[str]:
        settings: dict[str, str | int] = {
            "listen_addresses": self.host,
            "port": self.port,
            "unix_socket_directories": str(self.socket_dir),
            "max_connections": self.max_connections,
            "superuser_reserved_connections": 0,
            "fsync": "off",
            "shared_buffers": "32MB",
            "log_connections": "on" if self.log_connections else "off",
            **self.settings,
        }
        argv = [str(self.bindir / "postgres"), "-D", str(self.data_dir)]
        for key, value in settings.items():
            argv += ["-c", f"{key}={value}"]
        return argv

    def _ready(self) -> bool:
        """What ``pg_ctl -w`` waits for: postmaster.pid names this postmaster and says
        "ready" (the server accepts connections)."""
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        return (
            self.proc is not None
            and len(lines) >= 8
            and lines[0].strip() == str(self.proc.pid)
            and lines[7].strip() == "ready"
        )

    def start(self, timeout: float = 30) -> None:
        """Start the server; returns once it accepts connections. After kill() this is crash
        recovery (a second or less with fsync off).

        The postmaster is started as a child of this process (in a session of its own), not
        through ``pg_ctl start``: pg_ctl leaves it to PID 1, and where PID 1 is slow to reap
        (here about 1.2 s) a killed postmaster stays a zombie that the next postmaster's lock
        file check takes for a running server. As our child it is reaped at once.
        """
        if self._closed:
            raise RuntimeError("this PrivatePostgres is closed")
        if self.running:
            return
        self._wait_gone(timeout)
        if self._uid is not None:
            # Again: a pytest session that starts meanwhile makes /tmp/pytest-of-<user> 0700.
            self._make_traversable(self.socket_dir)
        for attempt in range(3):
            began = time.monotonic()
            offset = self.log_offset()
            with self.log_path.open("ab") as log:
                self.proc = subprocess.Popen(
                    self._argv(),
                    cwd=self.directory,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    user=self._uid,
                    group=self._gid,
                    extra_groups=[] if self._uid is not None else None,
                    start_new_session=True,  # its own process group; Ctrl-C is for pytest
                )
            deadline = time.monotonic() + timeout
            while self.proc.poll() is None and not self._ready():
                if time.monotonic() > deadline:
                    self.proc.kill()
                    break
                time.sleep(0.01)
            if self.proc.poll() is None:
                self.timings["start"] = time.monotonic() - began
                return
            self.proc.wait()
            self.proc = None
            text = self.log_since(offset)
            if "Address already in use" in text and not self._fixed_port and attempt < 2:
                self.port = free_port()  # taken since we picked it: nobody has our URL yet
                continue
            raise RuntimeError(f"PostgreSQL did not start on port {self.port}:\n{text}")

    _STOP_SIGNALS: ClassVar[dict[str, signal.Signals]] = {
        "smart": signal.SIGTERM,
        "fast": signal.SIGINT,
        "immediate": signal.SIGQUIT,
    }

    def stop(
        self, mode: Literal["smart", "fast", "immediate"] = "fast", timeout: float = 60
    ) -> None:
        """Stop the server (the signals ``pg_ctl stop -m mode`` sends): "fast" ends sessions
        and checkpoints, "immediate" ends everything without a checkpoint (the next start
        recovers, as after a crash), "smart" waits for the sessions to end."""
        proc = self.proc
        if proc is None:
            return
        began = time.monotonic()
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(self._STOP_SIGNALS[mode])
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._wait_gone(30)
        self.timings[f"stop_{mode}"] = time.monotonic() - began

    def restart(self, mode: Literal["smart", "fast", "immediate"] = "fast") -> None:
        """stop(mode), then start() on the same port."""
        began = time.monotonic()
        self.stop(mode)
        self.start()
        self.timings["restart"] = time.monotonic() - began

    def kill(self, *, children: bool = True) -> None:
        """Crash the server: SIGKILL the postmaster and, with ``children``, every backend and
        auxiliary process at the same moment, as if the host lost the server; without, only
        the postmaster (its backends notice and exit by themselves, a backend may still answer
        a query meanwhile). Returns once they are all gone. The next start() runs crash
        recovery.

        Backends are not in the postmaster's process group (each calls setsid()), so they are
        found in /proc while the postmaster is stopped (SIGSTOP: it cannot fork meanwhile).
        """
        proc = self.proc
        if proc is None:
            return
        others: list[int] = []
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                if children:
                    os.kill(proc.pid, signal.SIGSTOP)
                others = _descendants(proc.pid)
                if children:
                    for pid in others:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                proc.kill()
        self._wait_gone(30, others)

    def _wait_gone(self, timeout: float, others: list[int] | None = None) -> None:
        """Reap the postmaster, and wait until none of ``others`` (its backends) is alive: a new
        postmaster refuses to start while an old backend still holds the shared memory."""
        proc, self.proc = self.proc, None
        if proc is not None:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._leftovers += others or []
        if not _wait_until(lambda: not any(_alive(pid) for pid in self._leftovers), timeout):
            alive = [pid for pid in self._leftovers if _alive(pid)]
            raise RuntimeError(f"processes of the old server still alive: {alive}")
        self._leftovers = []

    def close(self) -> None:
        """Stop the server (immediate) and remove its data, socket directory and log."""
        if self._closed:
            return
        try:
            if self.running:
                try:
                    self.stop("immediate")
                except Exception:
                    self.kill()
        finally:
            self._closed = True
            self._watchdog.disarm()
            _open_servers.discard(self)
            _remove_data(self.data_dir, self._data_home)
            if self._own_socket_dir:
                shutil.rmtree(self.socket_dir, ignore_errors=True)
            else:
                shutil.rmtree(self.directory / "run", ignore_errors=True)
            with contextlib.suppress(OSError):
                self.log_path.unlink()

    def __enter__(self) -> PrivatePostgres:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the log: exact connection counts --

    def log_offset(self) -> int:
        """The current end of the server log, to read or count from later."""
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def log_since(self, offset: int = 0) -> str:
        try:
            with self.log_path.open("rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def count_connections_since(self, offset: int, database: str | None = None) -> int:
        """Connections authorized since log ``offset`` (to ``database``, or any), exactly.

        Needs ``log_connections=True``. The line is written before the client gets its first
        ReadyForQuery, so a connection that has been opened is always counted. Refused
        attempts ("too many clients") are not counted.
        """
        if not self.log_connections:
            raise RuntimeError(
                "count_connections_since needs PrivatePostgres(log_connections=True)"
            )
        return sum(
            1
            for m in _CONNECTION_AUTHORIZED.finditer(self.log_since(offset))
            if database is None or m.group(2) == database
        )

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<PrivatePostgres {self.host}:{self.port} {state} {self.directory}>"


# --- MariaDB ---------------------------------------------------------------------------------


def mariadb_binaries() -> tuple[str, str] | None:
    """(mariadbd, mariadb-install-db), if both are installed."""
    server = shutil.which("mariadbd") or next(
        (p for p in ("/usr/sbin/mariadbd", "/usr/libexec/mariadbd") if os.access(p, os.X_OK)),
        None,
    )
    install = shutil.which("mariadb-install-db") or shutil.which("mysql_install_db")
    return (server, install) if server and install else None


def mariadb_unavailable() -> str | None:
    """Why a PrivateMariaDB cannot run here, or None if it can."""
    if mariadb_binaries() is None:
        return "MariaDB server binaries (mariadbd, mariadb-install-db) not found"
    return None


# InnoDB and Aria settings shared by mariadb-install-db and mariadbd; kept small (the server
# needs about 70 MB of memory with them).
_MARIADB_STORAGE = (
    "--innodb-buffer-pool-size=16M",
    "--innodb-log-file-size=8M",
    "--innodb-log-buffer-size=1M",
    "--key-buffer-size=1M",
    "--aria-pagecache-buffer-size=1M",
)


class PrivateMariaDB:
    """A MariaDB server of its own: mariadb-install-db'ed and started (``mariadbd``).

    ``directory`` holds ``data/``, ``error.log``, ``mariadbd.pid`` and the unix socket; the server
    reads no option file (``--no-defaults``), listens on 127.0.0.1:``port`` (free one unless
    given, kept across restarts), has no binary log and small buffers. ``root`` has an empty
    password over TCP (``--auth-root-authentication-method=normal``). As root, the server runs
    as root (``--user=root``). ``max_connections`` is MariaDB's: at least 10 (MariaDB raises a
    smaller value to 10), and a SUPER user such as root may open one more than that.

    Commits are written to the OS at once and never fsynced
    (``innodb_flush_log_at_trx_commit=2``): they survive kill(), not a host crash.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        port: int | None = None,
        max_connections: int | None = None,
        options: tuple[str, ...] = (),
        template: bool = True,
        tmpfs: bool | None = None,
        start: bool = True,
    ) -> None:
        binaries = mariadb_binaries()
        if binaries is None:
            raise FileNotFoundError(mariadb_unavailable())
        self.server_binary, self.install_binary = binaries
        self.directory = Path(directory).resolve()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.directory / "data"
        self.log_path = self.directory / "error.log"
        self.pid_path = self.directory / "mariadbd.pid"
        self.host = HOST
        self.port = port or free_port()
        self._fixed_port = port is not None
        self.max_connections = max_connections
        self.options = options
        self.timings: dict[str, float] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        self._closed = False
        socket_dir, self._own_socket_dir = _short_socket_dir(self.directory, "mariadbd.sock")
        self.socket_path = socket_dir / "mariadbd.sock"

        if self.data_dir.is_symlink() and not self.data_dir.exists():
            self.data_dir.unlink()  # left by a server whose tmpfs data is gone
        self._data_home = None if self.data_dir.exists() else _data_home("mariadb-data", tmpfs)
        real_data = self._data_home / "data" if self._data_home else self.data_dir
        self._watchdog = _Watchdog(
            f'kill -KILL "$(cat {shlex.quote(str(self.pid_path))})"'
            + "".join(
                f"; rm -rf {shlex.quote(str(path))}"
                for path in (socket_dir if self._own_socket_dir else None, self._data_home)
                if path is not None
            )
        )
        _open_servers.add(self)
        try:
            began = time.monotonic()
            if not (self.data_dir / "mysql").exists():
                if template:
                    _copy_tree(_template("mariadb", self._install), real_data)
                else:
                    self._install(real_data)
                if self._data_home:
                    self.data_dir.symlink_to(real_data, target_is_directory=True)
            self.timings["init"] = time.monotonic() - began
            if start:
                self.start()
        except BaseException:
            self.close()
            raise

    def _user_option(self) -> list[str]:
        return ["--user=root"] if _as_root() else []

    def _install(self, data: Path) -> None:
        proc = subprocess.run(
            [
                self.install_binary,
                "--no-defaults",
                f"--datadir={data}",
                *self._user_option(),
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
                "--skip-name-resolve",
                *_MARIADB_STORAGE,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=120,
            start_new_session=True,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"mariadb-install-db failed ({proc.returncode}):\n{proc.stdout}")

    # -- state --

    @property
    def pid(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.pid is not None

    def url(self, database: str | None = None, driver: str = "mysql+pymysql") -> str:
        """A SQLAlchemy URL for ``database`` (or no database) on this server, as root."""
        return f"{driver}://root@{self.host}:{self.port}" + (f"/{database}" if database else "")

    def connect(self, database: str | None = None, **kwargs: Any) -> Any:
        """A PyMySQL connection (autocommit) to ``database``."""
        import pymysql

        kwargs.setdefault("connect_timeout", 5)
        return pymysql.connect(
            host=self.host,
            port=self.port,
            user="root",
            database=database,
            autocommit=True,
            **kwargs,
        )

    def execute(self, sql: str, database: str | None = None) -> list[tuple[Any, ...]]:
        """Run one statement on a fresh connection; its rows, if it returns any."""
        conn = self.connect(database)
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
                return list(cur.fetchall()) if cur.description is not None else []
        finally:
            conn.close()

    def create_database(self, name: str) -> str:
        """Create database ``name``; returns ``name``."""
        self.execute(f"CREATE DATABASE `{name}`")
        return name

    def connections_total(self) -> int:
        """MariaDB's ``Connections`` status: connection attempts since the server started,
        server-wide (this query's own connection included), exact."""
        rows = self.execute("SHOW GLOBAL STATUS LIKE 'Connections'")
        return int(rows[0][1])

    # -- start / stop --

    def _argv(self) -> list[str]:
        argv = [
            self.server_binary,
            "--no-defaults",
            *self._user_option(),
            f"--datadir={self.data_dir}",
            f"--bind-address={self.host}",
            f"--port={self.port}",
            f"--socket={self.socket_path}",
            f"--pid-file={self.pid_path}",
            f"--log-error={self.log_path}",
            "--skip-log-bin",
            "--skip-name-resolve",
            "--performance-schema=OFF",
            "--innodb-flush-log-at-trx-commit=2",
            "--innodb-use-native-aio=OFF",  # no kernel AIO contexts per private server
            "--character-set-server=utf8mb4",  # Debian's configured default; --no-defaults
            "--collation-server=utf8mb4_general_ci",  # would leave latin1
            *_MARIADB_STORAGE,
        ]
        if self.max_connections is not None:
            argv.append(f"--max-connections={self.max_connections}")
        return argv + list(self.options)

    def _ready(self) -> bool:
        try:
            self.connect(connect_timeout=1).close()
        except Exception:
            return False
        return True

    def start(self, timeout: float = 30) -> None:
        """Start mariadbd and return once it accepts connections on its port."""
        if self._closed:
            raise RuntimeError("this PrivateMariaDB is closed")
        if self.running:
            return
        for attempt in range(3):
            began = time.monotonic()
            offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            self.proc = subprocess.Popen(
                self._argv(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C at the terminal is for pytest, not for it
            )
            deadline = time.monotonic() + timeout
            while self.proc.poll() is None and time.monotonic() < deadline:
                if self._ready():
                    self.timings["start"] = time.monotonic() - began
                    return
                time.sleep(0.02)
            log = self._log_since(offset)
            self._reap()
            if "Address already in use" in log and not self._fixed_port and attempt < 2:
                self.port = free_port()
                continue
            raise RuntimeError(f"mariadbd did not start on port {self.port}:\n{log}")

    def _log_since(self, offset: int) -> str:
        try:
            with self.log_path.open("rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def _reap(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)
        with contextlib.suppress(OSError):
            self.pid_path.unlink()  # a pid file left by a killed server names a dead pid

    def stop(self, mode: Literal["fast", "immediate"] = "fast") -> None:
        """Stop the server: "fast" is a clean shutdown (SIGTERM); "immediate" is SIGKILL, the
        only way MariaDB has to stop without a clean shutdown (the next start recovers)."""
        if self.proc is None:
            return
        began = time.monotonic()
        if self.proc.poll() is None:
            if mode == "immediate":
                self.proc.kill()
            else:
                self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._reap()
        self.timings[f"stop_{mode}"] = time.monotonic() - began

    def restart(self, mode: Literal["fast", "immediate"] = "fast") -> None:
        began = time.monotonic()
        self.stop(mode)
        self.start()
        self.timings["restart"] = time.monotonic() - began

    def kill(self) -> None:
        """Crash the server (SIGKILL of mariadbd, which is one process); returns once it is
        gone. The next start() runs InnoDB's crash recovery."""
        self.stop("immediate")

    def close(self) -> None:
        """Stop the server (SIGKILL: its data is thrown away) and remove its files."""
        if self._closed:
            return
        try:
            self.kill()
        finally:
            self._closed = True
            self._watchdog.disarm()
            _open_servers.discard(self)
            _remove_data(self.data_dir, self._data_home)
            if self._own_socket_dir:
                shutil.rmtree(self.socket_path.parent, ignore_errors=True)
            for path in (self.log_path, self.socket_path):
                with contextlib.suppress(OSError):
                    path.unlink()

    def __enter__(self) -> PrivateMariaDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<PrivateMariaDB {self.host}:{self.port} {state} {self.directory}>"


# --- a TCP relay that can cut or black-hole the network --------------------------------------

_LINGER_RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST, not FIN
_BUFFER_LIMIT = 1 << 20  # per direction; reading stops above it until the peer catches up


def _reset(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    sock.close()


class _Link:
    """One relayed connection: the client's socket, ours to the server, and what each side
    sent that the other has not taken yet."""

    def __init__(self, client: socket.socket) -> None:
        self.client = client
        self.server: socket.socket | None = None
        self.connecting = False
        self.upstream = bytearray()  # client -> server
        self.downstream = bytearray()  # server -> client
        self.client_eof = False  # the client shut down its sending side
        self.server_eof = False
        self.server_shut = False  # we passed the client's EOF on to the server
        self.client_shut = False
        self.events: dict[socket.socket, int] = {}

    def sockets(self) -> list[socket.socket]:
        return [s for s in (self.client, self.server) if s is not None]


class TcpRelay:
    """A real TCP relay on 127.0.0.1:``port`` (free one unless given) to ``target``.

    One background thread runs a selector loop over every connection; bytes are forwarded
    both ways, half-closes are passed on, and any protocol works (PostgreSQL, MariaDB, Redis).
    Faults, each applied by the loop before the call returns:

    ``cut()``     reset every relayed connection at once (RST to the client and to the server,
                  like a network drop noticed by both ends); later connections are relayed.
    ``stall()``   black-hole the network: nothing is forwarded either way, the sockets stay
                  open, new connections are accepted but not forwarded (and not connected to
                  the server) until resume(). Clients hang until their own timeout.
    ``refuse()``  cut(), then reset every new connection as soon as it is accepted, like a
                  server whose port is closed, until resume().
    ``resume()``  forward again: stalled connections go on where they were (what was sent
                  during the stall is delivered), connections accepted meanwhile are connected.
    """

    def __init__(
        self, target_host: str, target_port: int, *, host: str = HOST, port: int = 0
    ) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, port))
        self._listener.listen(512)
        self._listener.setblocking(False)
        self.host: str = host
        self.port: int = self._listener.getsockname()[1]
        self.mode: Literal["forward", "stall", "refuse"] = "forward"
        self.accepted = 0  # connections accepted since the relay started
        self._links: set[_Link] = set()
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector.register(self._listener, selectors.EVENT_READ, "listener")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._commands: list[tuple[Callable[[], Any], list[Any], threading.Event]] = []
        self._commands_lock = threading.Lock()
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name=f"tcp-relay:{self.port}")
        self._thread.daemon = True
        self._thread.start()
        _open_servers.add(self)

    # -- the public controls (run by the loop thread) --

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def url_for(self, url: str) -> str:
        """``url`` (SQLAlchemy, redis://, or any scheme://[user@]host:port/...) rewritten to
        connect through the relay. The rest of the URL is kept byte for byte."""
        parts = urlsplit(url)
        userinfo, at, _ = parts.netloc.rpartition("@")
        return urlunsplit(parts._replace(netloc=f"{userinfo}{at}{self.host}:{self.port}"))

    @property
    def connections(self) -> int:
        """Relayed connections open right now (including ones held by a stall)."""
        return self._call(lambda: len(self._links))

    def stall(self) -> None:
        self._call(self._do_stall)

    def resume(self) -> None:
        self._call(self._do_resume)

    def cut(self) -> int:
        """Reset every relayed connection; returns how many there were."""
        return self._call(self._do_cut)

    def refuse(self) -> int:
        """cut(), and reset new connections at once until resume(); returns how many were cut."""

        def refuse() -> int:
            self.mode = "refuse"
            return self._do_cut()

        return self._call(refuse)

    def close(self) -> None:
        """Reset every connection, stop listening and end the thread."""
        if self._thread.is_alive():
            self._call(self._do_close)
            self._thread.join(10)
        _open_servers.discard(self)

    def __enter__(self) -> TcpRelay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"<TcpRelay {self.host}:{self.port} -> {self.target[0]}:{self.target[1]} {self.mode}>"
        )

    def _call(self, fn: Callable[[], _T]) -> _T:
        """Run ``fn`` in the loop thread and return its result."""
        if threading.current_thread() is self._thread:
            return fn()
        if not self._thread.is_alive():
            raise RuntimeError("the relay is closed")
        done = threading.Event()
        result: list[Any] = []
        with self._commands_lock:
            self._commands.append((fn, result, done))
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if not done.wait(10):
            raise RuntimeError("the relay thread did not answer")
        if isinstance(result[0], BaseException):
            raise result[0]
        return result[0]  # type: ignore[no-any-return]

    # -- the loop --

    def _loop(self) -> None:
        try:
            while not self._closing:
                for key, mask in self._selector.select():
                    if key.data == "listener":
                        self._accept()
                    elif key.data == "wake":
                        self._run_commands()
                    else:
                        link = key.data
                        if link in self._links:
                            self._service(link, key.fileobj, mask)  # type: ignore[arg-type]
        finally:
            for link in list(self._links):
                self._drop(link, reset=True)
            self._selector.close()
            self._listener.close()
            self._wake_r.close()
            self._wake_w.close()
            with self._commands_lock:  # answer anyone still waiting
                for _, result, done in self._commands:
                    result.append(RuntimeError("the relay is closed"))
                    done.set()
                self._commands.clear()

    def _run_commands(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while self._wake_r.recv(4096):
                pass
        with self._commands_lock:
            commands, self._commands = self._commands, []
        for fn, result, done in commands:
            try:
                result.append(fn())
            except BaseException as exc:
                result.append(exc)
            done.set()

    def _do_stall(self) -> None:
        self.mode = "stall"
        for link in list(self._links):
            self._update(link)

    def _do_resume(self) -> None:
        self.mode = "forward"
        for link in list(self._links):
            if link.server is None:
                self._connect(link)
            if link in self._links:
                self._pump(link)

    def _do_cut(self) -> int:
        count = len(self._links)
        for link in list(self._links):
            self._drop(link, reset=True)
        return count

    def _do_close(self) -> None:
        self._closing = True

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # e.g. ECONNABORTED, EMFILE: try again at the next event
                return
            self.accepted += 1
            if self.mode == "refuse":
                _reset(client)
                continue
            client.setblocking(False)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link = _Link(client)
            self._links.add(link)
            if self.mode == "forward":
                self._connect(link)
            if link in self._links:
                self._update(link)

    def _connect(self, link: _Link) -> None:
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        server.setblocking(False)
        server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link.server = server
        err = server.connect_ex(self.target)
        if err in (errno.EINPROGRESS, errno.EWOULDBLOCK):
            link.connecting = True
        elif err != 0:  # the server is not there: the client sees a reset
            self._drop(link, reset=True)
            return
        self._update(link)

    def _service(self, link: _Link, sock: socket.socket, mask: int) -> None:
        if sock is link.server and link.connecting:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err != 0:
                self._drop(link, reset=True)
                return
            link.connecting = False
        if mask & selectors.EVENT_READ:
            try:
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError:  # reset by that side: reset the other side too
                self._drop(link, reset=True)
                return
            if data == b"":
                if sock is link.client:
                    link.client_eof = True
                else:
                    link.server_eof = True
            elif data:
                (link.upstream if sock is link.client else link.downstream).extend(data)
        self._pump(link)

    def _pump(self, link: _Link) -> None:
        """Write what can be written, pass EOFs on, and close the link when both sides are
        done; then update what the selector watches."""
        if self.mode == "forward":
            try:
                if link.server is not None and not link.connecting and link.upstream:
                    del link.upstream[: link.server.send(link.upstream)]
                if link.downstream:
                    del link.downstream[: link.client.send(link.downstream)]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                self._drop(link, reset=True)
                return
            server_ready = link.server is not None and not link.connecting
            with contextlib.suppress(OSError):
                if link.client_eof and not link.upstream and server_ready and not link.server_shut:
                    link.server.shutdown(socket.SHUT_WR)  # type: ignore[union-attr]
                    link.server_shut = True
                if link.server_eof and not link.downstream and not link.client_shut:
                    link.client.shutdown(socket.SHUT_WR)
                    link.client_shut = True
            if link.server_shut and link.client_shut:
                self._drop(link, reset=False)
                return
        self._update(link)

    def _update(self, link: _Link) -> None:
        forward = self.mode == "forward"
        wanted: dict[socket.socket, int] = {link.client: 0}
        if forward and not link.client_eof and len(link.upstream) < _BUFFER_LIMIT:
            wanted[link.client] |= selectors.EVENT_READ
        if forward and link.downstream:
            wanted[link.client] |= selectors.EVENT_WRITE
        if link.server is not None:
            events = 0
            if forward and link.connecting:
                events = selectors.EVENT_WRITE
            elif forward:
                if not link.server_eof and len(link.downstream) < _BUFFER_LIMIT:
                    events |= selectors.EVENT_READ
                if link.upstream:
                    events |= selectors.EVENT_WRITE
            wanted[link.server] = events
        for sock, events in wanted.items():
            current = link.events.get(sock, 0)
            if events == current:
                continue
            if current == 0:
                self._selector.register(sock, events, link)
            elif events == 0:
                self._selector.unregister(sock)
            else:
                self._selector.modify(sock, events, link)
            link.events[sock] = events

    def _drop(self, link: _Link, *, reset: bool) -> None:
        for sock in link.sockets():
            if link.events.get(sock):
                with contextlib.suppress(KeyError, ValueError):
                    self._selector.unregister(sock)
            if reset:
                _reset(sock)
            else:
                sock.close()
        link.events.clear()
        self._links.discard(link)


# --- sampling the sessions of one database ---------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One look at the database: ``t`` seconds after start()."""

    t: float
    total: int
    library: int
    by_role: dict[str, int]


@dataclass(frozen=True)
class Summary:
    """What a ConnectionSampler saw between start() and stop().

    ``peak_*`` are maxima over the samples; ``new_sessions`` counts sessions first seen after
    the first sample (sessions shorter than the interval can be missed);
    ``connections_opened`` is exact where the server counts connections per database
    (PostgreSQL 14+: ``pg_stat_database.sessions``), else equal to ``new_sessions``;
    ``connects_per_second[i]`` is how many of those were opened in second i.
    """

    peak_total: int
    peak_library: int
    peak_by_role: dict[str, int]
    samples: int
    series: list[Sample]
    duration: float
    new_sessions: int
    connections_opened: int
    connects_per_second: list[int]
    peak_connects_per_second: int
    exact_connection_count: bool
    errors: int = 0
    last_error: str | None = None


# A session is the library's if its application_name is autolock:<role>:... (the PostgreSQL
# lock, wait and migration sessions). MySQL has no application_name: given the lock names
# (mysql_locks), the sessions that hold them are counted exactly; otherwise a session blocked in
# GET_LOCK('autolock:... counts as a waiter.
_APP_ROLE = re.compile(r"^(autolock:[^:]*)")
_GET_LOCK = re.compile(r"GET_LOCK\(\s*'autolock:", re.IGNORECASE)

_PG_SAMPLE = text(
    """
    SELECT (SELECT sessions FROM pg_stat_database WHERE datname = :db),
           coalesce(json_agg(json_build_array(
               pid, backend_start, application_name, state, left(query, 80))), '[]')
    FROM pg_stat_activity
    WHERE datname = :db AND pid <> pg_backend_pid() AND backend_type = 'client backend'
    """
)
_MYSQL_SAMPLE = text(
    "SELECT ID, COMMAND, LEFT(INFO, 200) FROM information_schema.PROCESSLIST "
    "WHERE DB = :db AND ID <> CONNECTION_ID()"
)


def _pg_role(application_name: str | None) -> str | None:
    if application_name:
        m = _APP_ROLE.match(application_name)
        if m:
            return m.group(1)
    return None


def _mysql_role(info: str | None) -> str | None:
    if info and _GET_LOCK.search(info):
        return "autolock:wait"
    return None


class ConnectionSampler:
    """Every ``interval`` seconds (20 ms), a look at the sessions connected to ``database``:
    how many, and how many are the library's, by role (``autolock:lock``, ``autolock:wait``,
    ``autolock:migrate``); peaks, the time series, and connections opened per second.

    ``admin_url`` is a SQLAlchemy URL of the same server (any database); the sampler's own
    session is never counted. PostgreSQL reads ``pg_stat_activity``; MySQL/MariaDB (the twin,
    same API) reads ``information_schema.PROCESSLIST``.

    What counts as the library's: on PostgreSQL, an ``application_name`` ``autolock:<role>:...``
    (lock and wait sessions), or a session busy with (or idle in the transaction of) a statement
    tagged ``/* autolock:<role>:...`` (migration sessions). MySQL has no application_name: only
    tagged statements running right now and sessions blocked in ``GET_LOCK('autolock:...')``
    (counted as ``autolock:wait``) are seen, so a lock holder sitting idle counts as 0 there.

    New connections: a session (PostgreSQL: pid and backend_start; MySQL: the connection id,
    never reused) seen for the first time counts as opened; sessions that begin and end
    between two samples (under ~20 ms) are missed. On PostgreSQL 14+ the exact number comes
    from ``pg_stat_database.sessions`` (a session is counted once it is ready for its first
    query; the counter is lost when the server crashes, so do not kill the server while
    sampling if you need it exact). For exact per-connection records on a PrivatePostgres, use
    ``log_connections=True`` and ``count_connections_since()``.

    The sampler survives the server going away (restart, kill): failed samples are counted in
    ``errors`` and it reconnects at the next tick.
    """

    def __init__(
        self,
        admin_url: str,
        database: str,
        *,
        interval: float = 0.02,
        mysql_locks: Mapping[str, str] | None = None,
    ) -> None:
        self.admin_url = admin_url
        self.database = database
        self.interval = interval
        self.mysql_locks = dict(mysql_locks or {})  # role -> GET_LOCK name
        backend = make_url(admin_url).get_backend_name()
        if backend not in ("postgresql", "mysql", "mariadb"):
            raise ValueError(f"ConnectionSampler: PostgreSQL or MySQL/MariaDB, not {backend}")
        self.postgresql = backend == "postgresql"
        self.summary: Summary | None = None
        self._engine = self._make_engine()
        self._conn: Connection | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = 0.0
        self._series: list[Sample] = []
        self._seen: set[Any] = set()
        self._baseline: set[Any] | None = None
        self._new_at: list[float] = []
        self._counter: list[tuple[float, int]] = []  # (t, pg_stat_database.sessions)
        self._errors = 0
        self._last_error: str | None = None
        self._own_database = make_url(admin_url).database == database
        self._reconnects: list[float] = []

    def _make_engine(self) -> Engine:
        driver = make_url(self.admin_url).get_driver_name()
        args: dict[str, Any] = {"connect_timeout": 2}
        if self.postgresql and driver in ("psycopg2", "psycopg"):
            args["application_name"] = "connection-sampler"
            args["options"] = "-c statement_timeout=2000"
        elif driver == "pymysql":
            args.update(read_timeout=2, write_timeout=2)
        return create_engine(self.admin_url, poolclass=NullPool, connect_args=args)

    def start(self) -> ConnectionSampler:
        """Take the first sample (the sessions already there are the baseline, not new), then
        sample in a background thread."""
        if self._thread is not None:
            raise RuntimeError("a ConnectionSampler starts once")
        self._started = time.monotonic()
        self._sample()
        if self._errors:
            raise RuntimeError(f"ConnectionSampler cannot sample: {self._last_error}")
        self._thread = threading.Thread(target=self._run, name="connection-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> Summary:
        """Stop sampling (after one last sample) and summarise."""
        if self._thread is None:
            raise RuntimeError("the sampler was not started")
        self._stop.set()
        self._thread.join(10)
        if not self._thread.is_alive():  # else it is stuck in a query: leave its connection be
            self._sample()
            self._disconnect()
            self._engine.dispose()
        self.summary = self._summarise()
        return self.summary

    @property
    def latest(self) -> Sample | None:
        """The most recent sample (to wait until the sampler has seen something)."""
        return self._series[-1] if self._series else None

    def __enter__(self) -> ConnectionSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.summary is None and self._thread is not None:
            self.stop()

    def _run(self) -> None:
        next_at = time.monotonic() + self.interval
        while not self._stop.wait(max(0.0, next_at - time.monotonic())):
            self._sample()
            next_at = max(next_at + self.interval, time.monotonic())

    def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.invalidate()
                conn.close()

    def _sample(self) -> None:
        t = time.monotonic() - self._started
        try:
            if self._conn is None:
                self._conn = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
                if self._series and self._own_database:
                    self._reconnects.append(t)  # our own session, counted in the counter
            rows = list(
                self._conn.execute(
                    _PG_SAMPLE if self.postgresql else _MYSQL_SAMPLE, {"db": self.database}
                )
            )
        except Exception as exc:
            self._errors += 1
            self._last_error = f"{type(exc).__name__}: {exc}".splitlines()[0]
            self._disconnect()
            return
        by_role: dict[str, int] = {}
        keys: set[Any] = set()
        if self.postgresql:
            counter, sessions = rows[0]
            if isinstance(sessions, str):  # a driver that does not decode json
                sessions = json.loads(sessions)
            if counter is not None:
                self._counter.append((t, int(counter)))
            for pid, backend_start, application_name, _state, _query in sessions:
                keys.add((pid, backend_start))
                role = _pg_role(application_name)
                if role:
                    by_role[role] = by_role.get(role, 0) + 1
        else:
            for ident, _command, info in rows:
                keys.add(ident)
                role = None if self.mysql_locks else _mysql_role(info)
                if role:
                    by_role[role] = by_role.get(role, 0) + 1
            if self.mysql_locks:
                try:
                    owners = self._conn.execute(
                        text(
                            "SELECT "
                            + ", ".join(
                                f"IS_USED_LOCK(:n{i})" for i in range(len(self.mysql_locks))
                            )
                        ),
                        {f"n{i}": name for i, name in enumerate(self.mysql_locks.values())},
                    ).one()
                except Exception:
                    owners = ()
                for role, owner in zip(self.mysql_locks, owners, strict=False):
                    if owner is not None:
                        by_role[role] = by_role.get(role, 0) + 1
        if self._baseline is None:
            self._baseline = set(keys)
        for _new in keys - self._seen - self._baseline:
            self._new_at.append(t)
        self._seen |= keys
        self._series.append(Sample(t, len(keys), sum(by_role.values()), by_role))

    def _summarise(self) -> Summary:
        series = self._series
        duration = series[-1].t if series else 0.0
        peak_by_role: dict[str, int] = {}
        for sample in series:
            for role, n in sample.by_role.items():
                peak_by_role[role] = max(peak_by_role.get(role, 0), n)
        buckets = [0] * (int(duration) + 1)
        exact = len(self._counter) >= 2 and all(
            b[1] >= a[1] for a, b in zip(self._counter, self._counter[1:], strict=False)
        )
        if exact:
            # The sampler's own session is in the first reading; when it reconnects to the
            # same database (after a restart), that session is not one of the tested code's.
            opened = self._counter[-1][1] - self._counter[0][1] - len(self._reconnects)
            for (_, before), (t, after) in zip(self._counter, self._counter[1:], strict=False):
                buckets[min(int(t), len(buckets) - 1)] += after - before
            for t in self._reconnects:
                buckets[min(int(t), len(buckets) - 1)] -= 1
        else:
            opened = len(self._new_at)
            for t in self._new_at:
                buckets[min(int(t), len(buckets) - 1)] += 1
        return Summary(
            peak_total=max((s.total for s in series), default=0),
            peak_library=max((s.library for s in series), default=0),
            peak_by_role=peak_by_role,
            samples=len(series),
            series=list(series),
            duration=duration,
            new_sessions=len(self._new_at),
            connections_opened=opened,
            connects_per_second=buckets,
            peak_connects_per_second=max(buckets, default=0),
            exact_connection_count=exact,
            errors=self._errors,
            last_error=self._last_error,
        )
