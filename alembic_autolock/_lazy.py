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
        from ._runner import ensure_migrated

        with self.lock:
            if self.done_in_pid == os.getpid():
                return
            token = _inside.set(True)  # our own connections must not re-enter
            try:
                ensure_migrated(self.engine, config=self.config, **self.settings)
            finally:
                _inside.reset(token)
            self.done_in_pid = os.getpid()


def install(engine: Engine, *, config: ConfigLike = None, **settings: Any) -> None:
    """Run ensure_migrated(engine, ...) on the engine's first connection in each process.

    If it raises (pending migrations in check mode, a lock timeout, a failed migration), that
    first ``engine.connect()`` raises it, and the next connection tries again. Installing twice
    on one engine is a no-op.
    """
    if getattr(engine, "_alembic_autolock_installed", False):
        return
    hook = _Installed(engine, config, settings)
    event.listen(engine, "engine_connect", hook)
    engine._alembic_autolock_installed = True  # type: ignore[attr-defined]
