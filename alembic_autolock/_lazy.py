"""install(engine): the lazy path. The engine's first connection in a process runs
ensure_migrated once; later connections pay one attribute check."""

from __future__ import annotations

import os
import threading
from contextvars import ContextVar
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from ._config import ConfigLike
from ._wait import acquire
from .exceptions import ConfigError

_inside: ContextVar[bool] = ContextVar("alembic_autolock_inside", default=False)


class _Installed:
    def __init__(self, engine: Engine, config: ConfigLike, settings: dict[str, Any]) -> None:
        self.engine = engine
        self.config = config
        self.settings = settings
        self.done_in_pid: int | None = None
        self.lock = threading.Lock()

    def __call__(self, conn: Connection) -> None:
        if self.done_in_pid == os.getpid() or _inside.get():
            return
        from ._cold import ensure_migrated

        acquire(self.lock, None)  # cooperatively: under an AsyncEngine, tasks share a thread
        try:
            if self.done_in_pid == os.getpid():
                return
            token = _inside.set(True)  # our own connections must not re-enter
            try:
                ensure_migrated(self.engine, config=self.config, **self.settings)
            finally:
                _inside.reset(token)
            self.done_in_pid = os.getpid()
        finally:
            self.lock.release()


def install(engine: Any, *, config: ConfigLike = None, **settings: Any) -> None:
    """Run ensure_migrated(engine, ...) on the engine's first connection in each process.

    ``engine`` may be an AsyncEngine: the check then runs inside its first connection's
    greenlet, awaiting the async driver like the connection itself.

    If it raises (pending migrations in check mode, a lock timeout, a failed migration), that
    first ``engine.connect()`` raises it, and the next connection tries again. Installing twice
    on one engine with the same arguments is a no-op; with other arguments, ConfigError.
    """
    if type(engine).__name__ == "AsyncEngine":  # its events are the sync engine's
        engine = engine.sync_engine
    if not isinstance(engine, Engine):
        raise ConfigError(
            f"install() takes an SQLAlchemy Engine or AsyncEngine, not {type(engine).__name__}"
        )
    installed: _Installed | None = getattr(engine, "_alembic_autolock_installed", None)
    if installed is not None:
        if (installed.config, installed.settings) != (config, settings):
            keys = {"config"} if installed.config != config else set()
            keys |= {
                k
                for k in {*installed.settings, *settings}
                if installed.settings.get(k) != settings.get(k)
            }
            raise ConfigError(
                "install() was already called on this engine with other arguments (they differ "
                f"in: {', '.join(sorted(keys))}); the first call's stand. Call it once per "
                "engine, or create another engine."
            )
        return
    hook = _Installed(engine, config, settings)
    event.listen(engine, "engine_connect", hook)
    engine._alembic_autolock_installed = hook  # type: ignore[attr-defined]
