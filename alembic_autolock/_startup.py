"""What start-up applies: everything pending except revisions kept for an operator's job.

A revision module that sets ``autolock_manual = True`` (plain Alembic ignores the attribute) is
never applied by the start-up paths (``ensure_migrated``, ``install``, the web trigger): a long
backfill, an index build on a big table, anything that must not run inside a pod's start-up or a
serverless function's 10 to 60 seconds. Start-up applies every pending revision that does not
come after one (through ``down_revision`` or ``depends_on``), and reports the rest as pending
with the command that applies them; ``alembic-autolock upgrade``, ``upgrade(...)`` and the plain
``alembic upgrade`` apply everything, the marked ones included.

``time_budget`` (seconds) makes start-up refuse a run whose revisions are known, from earlier
runs, to take longer than that in total: durations are recorded in the library's journal after
each successful run (those of this database) and can be carried from another database (staging)
in a file written by ``alembic-autolock durations --json`` and named by ``durations_file``.
A revision with no known duration counts as free.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic.script import ScriptDirectory

from ._results import PendingRevision
from .exceptions import ConfigError

FLAG = "autolock_manual"


def manual_revisions(script: ScriptDirectory) -> frozenset[str]:
    """The revisions whose module sets ``autolock_manual`` to a true value."""
    return frozenset(
        sc.revision for sc in script.walk_revisions() if _flagged(getattr(sc, "module", None))
    )


def _flagged(module: Any) -> bool:
    value = getattr(module, FLAG, False)
    return value is True or (isinstance(value, str) and value.strip().lower() == "true")


@dataclass(frozen=True)
class StartupPlan:
    """What start-up does from given heads: ``destination`` (``heads``, a tuple of revisions,
    or None when nothing may be applied), the revisions it applies in order, and those it
    leaves for a job (marked ones and everything after them) with their messages."""

    destination: str | tuple[str, ...] | None
    applies: tuple[str, ...]
    held_back: tuple[PendingRevision, ...]


def startup_plan(
    script: ScriptDirectory, heads: tuple[str, ...], manual: frozenset[str]
) -> StartupPlan:
    steps = script._upgrade_revs("heads", heads)  # type: ignore[arg-type]  # as command.upgrade
    pending = [step.revision for step in steps]  # ancestors before descendants
    if not manual:
        return StartupPlan("heads", tuple(r.revision for r in pending), ())
    blocked: set[str] = set()
    for rev in pending:
        parents = getattr(rev, "_all_down_revisions", None) or ()
        if rev.revision in manual or any(p in blocked for p in parents):
            blocked.add(rev.revision)
    if not blocked:
        return StartupPlan("heads", tuple(r.revision for r in pending), ())
    allowed = [r for r in pending if r.revision not in blocked]
    held = tuple(
        PendingRevision(r.revision, r.doc, manual=True) for r in pending if r.revision in blocked
    )
    if not allowed:
        return StartupPlan(None, (), held)
    below = {p for r in allowed for p in (getattr(r, "_all_down_revisions", None) or ())}
    targets = tuple(sorted(r.revision for r in allowed if r.revision not in below))
    return StartupPlan(targets, tuple(r.revision for r in allowed), held)


def read_durations_file(path: str) -> dict[str, float]:
    """``{revision: seconds}`` from a file that ``alembic-autolock durations --json`` wrote."""
    try:
        data = json.loads(Path(path).read_text())
        found = data["durations"] if isinstance(data, Mapping) and "durations" in data else data
        return {str(k): float(v) for k, v in dict(found).items()}
    except FileNotFoundError:
        raise ConfigError(
            f"durations_file {path!r} does not exist: write it with "
            "`alembic-autolock --url <staging> durations --json > FILE`, or unset durations_file",
            key="durations_file",
            value=path,
        ) from None
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ConfigError(
            f"durations_file {path!r} is not a durations document ({type(exc).__name__}: "
            f"{exc}): expected the JSON that `alembic-autolock durations --json` prints",
            key="durations_file",
            value=path,
        ) from None


def known_durations(revisions: tuple[str, ...], *sources: Mapping[str, float]) -> dict[str, float]:
    """The longest duration each revision is known to have taken, where known."""
    known: dict[str, float] = {}
    for source in sources:
        for rev in revisions:
            if rev in source:
                known[rev] = max(known.get(rev, 0.0), source[rev])
    return known
