"""The ``alembic-autolock`` command: one library function per subcommand.

Results go to stdout: a human line or two, or with ``--json`` exactly one JSON document (see
docs/cli.md for each command's). What happens meanwhile goes to stderr: on a terminal a live
line (how long this process has waited, and who holds the lock), elsewhere plain lines without
control characters; ``-q`` silences it, ``-v`` shows the events instead. Every error is one
``FAILED: ...`` line on stderr and exit code 2 (``--traceback`` adds the traceback), Ctrl-C
one ``interrupted`` line and 130.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, NoReturn

from . import _events as events
from .exceptions import AutolockError, ConfigError, DatabaseUnavailable

EXIT_OK, EXIT_PENDING, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130

# where --url comes from when it is not given, in order

# how `status` and `holders` introduce each kind of session
_ROLE_LABELS = {"lock": "held by", "fence": "migrating", "wait": "waiting"}

EPILOG = """\
exit codes:
  0    success; the database is at head (check, wait)
  1    revisions are pending (check), or still not at head when wait's --timeout ran out
  2    any error (one FAILED: line on stderr; --traceback for the traceback); bad usage
  130  interrupted (Ctrl-C)

the database URL: --url, else -x url=..., else $ALEMBIC_AUTOLOCK_URL, else $DATABASE_URL,
else sqlalchemy.url of the configuration. Settings come from ALEMBIC_AUTOLOCK_* variables and
[alembic_autolock] in alembic.ini (docs/configuration.md). Every command takes --json: one JSON
document on stdout (docs/cli.md).
"""


# --- output ----------------------------------------------------------------------------------


def _who(description: str) -> str:
    """A holder as an operator wants it: the process and host, and since when, when the
    description carries the library's owner tag (PostgreSQL's application_name, a Redis
    owner); else the description itself."""
    for word in description.replace("'", " ").replace(",", " ").split():
        parts = word.split(":")
        if word.startswith("autolock:") and len(parts) >= 6 and parts[3].isdigit():
            try:
                since = datetime.fromtimestamp(int(parts[4]), UTC)
            except ValueError:
                break
            host = ":".join(parts[5:])
            return f"process {parts[3]} on {host}, since {since:%H:%M:%S} UTC"
    return description


class Progress:
    """What happens while a command runs, on stderr: a live line on a terminal (redrawn by a
    thread of its own), plain lines elsewhere. Fed by the library's events."""

    TICK = 0.1

    def __init__(self, stream: IO[str], *, live: bool, enabled: bool) -> None:
        self.stream = stream
        self.live = live and enabled
        self.enabled = enabled
        self._lock = threading.Lock()
        self._text: Callable[[float], str] | None = None
        self._since = 0.0
        self._shown = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._unsubscribe: Callable[[], None] | None = None
        # the migration in progress: revisions done of how many
        self._steps = 0
        self._count = 0
        # what the run went through, for the summary
        self.waited_for: list[str] = []
        self.migrated_by_other = False
        self.waited_s = 0.0

    def __enter__(self) -> Progress:
        global _current
        _current = self
        self._unsubscribe = events.subscribe(self._on_event, _PROGRESS_EVENTS)
        if self.live:
            self._thread = threading.Thread(target=self._tick, name="alembic-autolock-progress")
            self._thread.daemon = True
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        global _current
        if _current is self:
            _current = None
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        self._stop.set()
        if self._thread is not None:
            self._thread.join(1)
            self._thread = None
        with self._lock:
            self._clear()
            self._text = None

    # live line

    def show(self, text: Callable[[float], str], plain: str | None = None) -> None:
        """Show ``text(elapsed)`` as the live line from now on; off a terminal print ``plain``
        (once) instead."""
        with self._lock:
            self._text = text
            self._since = time.monotonic()
            if self.live:
                self._draw()
            elif plain is not None and self.enabled:
                self._write(plain + "\n")

    def done(self) -> None:
        with self._lock:
            self._clear()
            self._text = None

    def line(self, text: str) -> None:
        """A line that stays (above the live line)."""
        if not self.enabled:
            return
        with self._lock:
            self._clear()
            self._write(text + "\n")
            if self.live and self._text is not None:
                self._draw()

    def _tick(self) -> None:
        while not self._stop.wait(self.TICK):
            with self._lock:
                if self._text is not None:
                    self._draw()

    def _draw(self) -> None:
        if self._text is None:
            return
        text = self._text(time.monotonic() - self._since)
        width = shutil.get_terminal_size((100, 24)).columns - 1
        if len(text) > width:  # a wrapped line could not be redrawn in place
            text = text[: max(0, width - 3)] + "..."
        self._write("\r\x1b[K" + text)
        self._shown = True

    def _clear(self) -> None:
        if self._shown:
            self._write("\r\x1b[K")
            self._shown = False

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # a closed stderr: the result still counts
            pass

    # events

    def _on_event(self, event: str, level: str, fields: Mapping[str, Any]) -> None:
        if event == events.LOCK_WAITING:
            # the lock's session and its migration session (the fence) are one process
            holders = list(dict.fromkeys(_who(h) for h in fields.get("holders") or ()))
            self.waited_for = holders
            who = "; ".join(holders) or "another process"
            backend = fields.get("backend")
            self.show(
                lambda s: f"waiting {s:.1f}s for the {backend} migration lock, held by {who}",
                f"waiting for the {backend} migration lock, held by {who}",
            )
        elif event == events.LOCK_ACQUIRED:
            self.done()
            waited = float(fields.get("waited_s") or 0.0)
            self.waited_s = waited
            if self.waited_for or waited >= 1:
                self.line(f"lock acquired after waiting {waited:.1f}s")
        elif event == events.MIGRATED_BY_OTHER:
            self.done()
            self.migrated_by_other = True
            self.waited_s = float(fields.get("waited_s") or 0.0)
        elif event == events.LOCK_TIMEOUT:
            self.done()
        elif event == events.MIGRATION_STARTED:
            revisions = [str(r) for r in fields.get("revisions") or ()]
            count = int(fields.get("count") or len(revisions))
            direction = "applying" if fields.get("direction") == "upgrade" else "undoing"
            self._steps, self._count = 0, count
            self.show(
                lambda s: f"{direction} {self._count} revision(s): {self._steps} done, {s:.1f}s",
                f"{direction} {', '.join(revisions)}",
            )
        elif event == events.MIGRATION_STEP:
            self._steps += 1
        elif event in (events.MIGRATION_FAILED, events.LOCK_LOST, events.LOCK_RELEASED):
            self.done()


_PROGRESS_EVENTS = (
    events.LOCK_WAITING,
    events.LOCK_ACQUIRED,
    events.MIGRATED_BY_OTHER,
    events.LOCK_TIMEOUT,
    events.MIGRATION_STARTED,
    events.MIGRATION_STEP,
    events.MIGRATION_FAILED,
    events.LOCK_LOST,
    events.LOCK_RELEASED,
)


# the Progress of the command running now, if any
_current: Progress | None = None


# Warnings and errors the command restates itself (its result line, or the FAILED line of the
# error that follows them): shown only with -v.
_RESTATED = frozenset(
    {
        events.GATE_CLOSED,
        events.CHECK_AHEAD,
        events.LOCK_CLEARED,
        events.MIGRATION_RESOLVED,
        events.LOCK_TIMEOUT,
        events.LOCK_LOST,
        events.MIGRATION_FAILED,
        events.MIGRATION_INTERRUPTED,
    }
)


class _EventLines(logging.Handler):
    """The library's log records as lines above the live line: the warnings the command does
    not restate itself (an orphaned session, a failed release, a failed alert), every event
    with -v."""

    def __init__(self, fallback: Progress, level: int) -> None:
        super().__init__(level)
        self.fallback = fallback
        self.verbose = level < logging.WARNING

    def emit(self, record: logging.LogRecord) -> None:
        if not self.verbose and getattr(record, "autolock_event", None) in _RESTATED:
            return
        try:
            message = record.getMessage()
        except Exception:  # a broken record must not break the command
            return
        (_current or self.fallback).line(f"{record.levelname.lower()}: {message}")


class Output:
    """Where a command's result goes: one JSON document, or human lines (none with -q)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.json = bool(args.json)
        self.quiet = bool(args.quiet)

    def result(self, doc: Mapping[str, Any], *lines: str, stream: IO[str] | None = None) -> None:
        if self.json:
            print(json.dumps(doc, indent=2, default=str))
        elif not self.quiet:
            for line in lines:
                print(line, file=stream or sys.stdout)


# --- configuration and engine ---------------------------------------------------------------


def _config(args: argparse.Namespace) -> Any:
    from ._config import load_config

    cfg = load_config(args.config, environ=os.environ)
    cfg.cmd_opts = argparse.Namespace(x=args.x or [])
    if not any(not x.startswith("url=") for x in args.x or []):
        # read from its files only: a full load keeps the manifest that `check` answers from
        from ._manifest import FROM_FILES

        cfg.attributes[FROM_FILES] = True
    return cfg


def _x_url(args: argparse.Namespace) -> str | None:
    for item in args.x or []:
        key, sep, value = item.partition("=")
        if sep and key.strip() == "url":
            return str(value).strip()
    return None


def database_url(args: argparse.Namespace, cfg: Any) -> tuple[str | None, str]:
    """The database URL and where it came from (see EPILOG for the order)."""
    if args.url:
        return args.url, "--url"
    if x_url := _x_url(args):
        return x_url, "-x url"
    from ._fastcheck import environment_url

    found = environment_url()
    if found is not None:
        return found
    from ._config import main_option

    where = cfg.config_file_name or "the [alembic] section of alembic.ini"
    return main_option(cfg, "sqlalchemy.url"), f"sqlalchemy.url in {where}"


def _engine(args: argparse.Namespace, cfg: Any) -> Any:
    from sqlalchemy import create_engine
    from sqlalchemy.exc import ArgumentError
    from sqlalchemy.pool import NullPool

    from ._mask import mask_text, mask_url, parse_url

    text, what = database_url(args, cfg)
    args.url_source = what
    if not text:
        where = cfg.config_file_name or "the [alembic] section of alembic.ini"
        raise ConfigError(
            "no database URL: pass --url, set $ALEMBIC_AUTOLOCK_URL or $DATABASE_URL, or set "
            f"sqlalchemy.url in {where}"
        )
    url = parse_url(text, what)
    args.secret_url = text
    try:
        return create_engine(url, poolclass=NullPool)
    except (ArgumentError, ImportError) as exc:
        raise ConfigError(
            f"cannot use the database URL {mask_url(url)}: {mask_text(str(exc), url)} "
            f"(the URL came from {what})"
        ) from exc


def _with_engine(args: argparse.Namespace, fn: Callable[[Any, Any], int]) -> int:
    from ._wait import run_for_engine

    cfg = _config(args)
    engine = _engine(args, cfg)
    try:
        # an async driver's URL (postgresql+asyncpg://...) runs inside an event loop
        return run_for_engine(engine, _and_dispose, fn, engine, cfg)
    finally:
        engine.dispose()


def _and_dispose(fn: Callable[[Any, Any], int], engine: Any, cfg: Any) -> int:
    try:
        return fn(engine, cfg)
    finally:
        engine.dispose()  # where the connections can be closed (an async driver's loop)


# --- commands --------------------------------------------------------------------------------


def _result_doc(result: Any, progress: Progress) -> dict[str, Any]:
    doc = asdict(result)
    doc["applied"] = list(result.applied)
    doc["heads"] = list(result.heads)
    doc["pending"] = [asdict(p) for p in result.pending]
    doc["migrated_by_other"] = progress.migrated_by_other
    doc["lock_holders_seen"] = progress.waited_for
    return doc


def _report(result: Any, progress: Progress) -> list[str]:
    heads = ", ".join(result.heads) or "no revision"
    if result.applied:
        verb = {"upgraded": "applied", "created": "created the tables and stamped"}.get(
            result.action, "undid"
        )
        return [
            f"{result.action}: {verb} {', '.join(result.applied)}; database now at {heads} "
            f"(waited {result.waited_s:.2f}s for the lock, {result.elapsed_s:.2f}s in all)"
        ]
    if result.action == "ahead":
        return [f"ahead: the database is at {heads}, which these scripts do not know; untouched"]
    if progress.migrated_by_other:
        who = "; ".join(progress.waited_for) or "another process"
        return [
            f"{result.action}: database at {heads}, nothing to do: {who} migrated it while this "
            f"process waited {result.waited_s:.1f}s for the lock"
        ]
    return [f"{result.action}: database at {heads}, nothing to do"]


def _migrating(args: argparse.Namespace, run: Callable[[Any, Any], Any]) -> int:
    out = Output(args)
    with _progress(args) as progress:

        def go(engine: Any, cfg: Any) -> int:
            result = run(engine, cfg)
            progress.close()
            out.result(_result_doc(result, progress), *_report(result, progress))
            return EXIT_OK

        return _with_engine(args, go)


def cmd_upgrade(args: argparse.Namespace) -> int:
    """Upgrade the database to a revision (default: heads), under the migration lock; while
    another process holds the lock, show who and for how long. With --sql, print the SQL
    instead (offline: no lock, no connection)."""
    if args.sql:
        return _offline(args, "upgrade")
    from . import _runner

    return _migrating(args, lambda engine, cfg: _runner.upgrade(engine, args.revision, config=cfg))


def cmd_downgrade(args: argparse.Namespace) -> int:
    """Downgrade the database to a revision, under the lock, if allow_downgrade permits.
    With --sql FROM:TO, print the SQL instead (offline: no lock, no connection)."""
    if args.sql:
        return _offline(args, "downgrade")
    from . import _runner

    return _migrating(
        args, lambda engine, cfg: _runner.downgrade(engine, args.revision, config=cfg)
    )


def _offline(args: argparse.Namespace, direction: str) -> int:
    """Alembic's offline mode through env.py: the SQL on stdout, nothing executed."""
    from alembic.util import CommandError

    from alembic import command

    if args.json:
        raise ConfigError("--sql prints SQL on stdout: it cannot be combined with --json")
    revision = args.revision
    if direction == "downgrade" and ":" not in revision:
        raise ConfigError(
            f"downgrade --sql needs FROM:TO (for example r5:{revision}): offline, the "
            "database is not read, so its current revision must be given"
        )
    cfg = _config(args)
    url = args.url or _x_url(args)
    if url:
        cfg.set_main_option("sqlalchemy.url", str(url).replace("%", "%%"))
    if not args.quiet:
        print(
            f"offline {direction} to {revision}: printing SQL only; no lock is taken and no "
            "connection is made",
            file=sys.stderr,
        )
    try:
        getattr(command, direction)(cfg, revision, sql=True)
    except CommandError as exc:
        raise ConfigError(str(exc)) from exc
    return EXIT_OK


def _status_lines(st: Any, url_source: str) -> list[str]:
    current = ", ".join(st.current_heads) or "none (empty database)"
    lines = [
        f"database:    {st.database} (from {url_source})",
        f"current:     {current}{' (head)' if st.at_head else ''}",
        f"script head: {', '.join(st.script_heads) or 'none'}",
    ]
    if st.unknown_heads:
        unknown = ", ".join(st.unknown_heads)
        lines.append(f"AHEAD:       the database is at {unknown}, unknown to these scripts")
    if st.pending:
        lines.append(f"pending:     {len(st.pending)}")
        lines += [f"  {p.revision}  {p.message or ''}".rstrip() for p in st.pending]
    else:
        lines.append("pending:     none")
    lines.append(f"environment: {st.environment} (mode {st.mode})")
    lines.append(f"lock:        {st.lock_backend} {st.namespace!r}")
    if st.holders_error:
        lines.append(f"  holders unknown: {st.holders_error}")
    elif not st.holders:
        lines.append("  free")
    lines += [f"  {_ROLE_LABELS[h.role]}: {h.describe()}" for h in st.holders]
    return lines


def cmd_status(args: argparse.Namespace) -> int:
    """Show the current and script heads, the pending revisions, the environment and mode,
    and who holds the lock. Exit 0 (also when revisions are pending: see check)."""
    from . import _runner

    def run(engine: Any, cfg: Any) -> int:
        st = _runner.status(engine, config=cfg)
        doc = {**st.as_dict(), "url_source": args.url_source}
        Output(args).result(doc, *_status_lines(st, args.url_source))
        return EXIT_OK

    return _with_engine(args, run)


def _check_doc(st: Any, code: int) -> dict[str, Any]:
    return {
        "at_head": st.at_head,
        "ahead": st.ahead,
        "current_heads": list(st.current_heads),
        "script_heads": list(st.script_heads),
        "unknown_heads": list(st.unknown_heads),
        "pending": [
            {"revision": p.revision, "message": p.message, "manual": p.manual} for p in st.pending
        ],
        "exit_code": code,
    }


def cmd_check(args: argparse.Namespace) -> int:
    """Exit 0 if the database is at head, 1 if revisions are pending, 2 if it is ahead of
    these scripts or on error. With --allow-manual, revisions kept for a job (autolock_manual)
    and those after them do not count as pending: exit 0 where start-up has nothing to do."""
    # at head, the console script's entry point (_probe.py) answered before this module was
    # imported; here every other case, with its words and exit codes
    out = Output(args)
    from . import _runner

    def run(engine: Any, cfg: Any) -> int:
        st = _runner.status(engine, config=cfg)
        if st.at_head:
            out.result(_check_doc(st, EXIT_OK), f"at head: {', '.join(st.current_heads)}")
            return EXIT_OK
        if st.unknown_heads:
            out.result(
                _check_doc(st, EXIT_ERROR),
                f"ahead: the database is at {', '.join(st.unknown_heads)}, which these "
                "scripts do not know",
                stream=sys.stderr,
            )
            return EXIT_ERROR
        listed = ", ".join(p.revision + (" (manual)" if p.manual else "") for p in st.pending)
        if args.allow_manual and all(p.manual for p in st.pending):
            out.result(
                _check_doc(st, EXIT_OK),
                f"at the start-up head: {', '.join(st.current_heads) or 'no revision'}; "
                f"kept for a job: {listed}",
            )
            return EXIT_OK
        out.result(_check_doc(st, EXIT_PENDING), f"{len(st.pending)} pending: {listed}")
        return EXIT_PENDING

    return _with_engine(args, run)


def cmd_wait(args: argparse.Namespace) -> int:
    """Wait until the database is at head (another process migrates it), up to --timeout
    seconds, reading it every --interval seconds; a database that cannot be reached yet is
    retried until the timeout. Exit 0 at head, 1 on timeout, 2 if it is ahead or still
    unreachable."""
    from . import _runner

    out = Output(args)
    started = time.monotonic()
    deadline = started + args.timeout

    def doc(st: Any, code: int, error: str | None = None) -> dict[str, Any]:
        base = (
            _check_doc(st, code)
            if st is not None
            else {"at_head": False, "current_heads": [], "pending": [], "exit_code": code}
        )
        return {**base, "waited_s": round(time.monotonic() - started, 3), "error": error}

    def run(engine: Any, cfg: Any) -> int:
        with _progress(args) as progress:
            last: str | None = None
            while True:
                try:
                    st = _runner.status(engine, config=cfg)
                    error = None
                except DatabaseUnavailable as exc:  # not up yet: keep trying until the deadline
                    st, error = None, str(exc)
                if st is not None and st.at_head:
                    progress.close()
                    out.result(doc(st, EXIT_OK), f"at head: {', '.join(st.current_heads)}")
                    return EXIT_OK
                if st is not None and st.unknown_heads:
                    progress.close()
                    unknown = ", ".join(st.unknown_heads)
                    raise _Failed(
                        f"the database is at {unknown}, unknown to these scripts: it will "
                        "never reach their head",
                        doc(st, EXIT_ERROR),
                    )
                if time.monotonic() >= deadline:
                    progress.close()
                    if st is None:
                        raise _Failed(
                            f"the database was still unreachable after {args.timeout:g}s: {error}",
                            doc(None, EXIT_ERROR, error),
                        )
                    pending = ", ".join(p.revision for p in st.pending) or "unknown revisions"
                    out.result(doc(st, EXIT_PENDING))
                    if not args.json:
                        print(
                            f"FAILED: still not at head after {args.timeout:g}s (pending: "
                            f"{pending})",
                            file=sys.stderr,
                        )
                    return EXIT_PENDING
                text = _wait_text(st, error)
                if text != last:
                    last = text
                    progress.show(
                        lambda s, t=text: f"waiting {s:.0f}s (of {args.timeout:g}s): {t}",  # type: ignore[misc]
                        f"waiting (up to {args.timeout:g}s): {text}",
                    )
                time.sleep(min(args.interval, max(0.0, deadline - time.monotonic())))

    return _with_engine(args, run)


def _wait_text(st: Any, error: str | None) -> str:
    if st is None:
        return f"database unreachable, retrying: {(error or '').split('. ')[0]}"
    pending = ", ".join(p.revision for p in st.pending)
    holders = [h for h in st.holders if not h.waiting]
    who = f"; lock held by {_who(holders[0].describe())}" if holders else ""
    return f"pending {pending}{who}"


def cmd_holders(args: argparse.Namespace) -> int:
    """Show who holds the migration lock and who waits for it."""
    from . import _runner

    def run(engine: Any, cfg: Any) -> int:
        backend, namespace, found = _runner.lock_holders(engine, config=cfg)
        doc = {"backend": backend, "namespace": namespace, "holders": [h.as_dict() for h in found]}
        lines = [f"{backend} lock {namespace!r}: {'free' if not found else ''}".rstrip()]
        lines += [f"  {_ROLE_LABELS[h.role]}: {h.describe()}" for h in found]
        Output(args).result(doc, *lines)
        return EXIT_OK

    return _with_engine(args, run)


def cmd_unlock(args: argparse.Namespace) -> int:
    """Clear a stuck lock of this namespace (Redis: by owner; --force: any holder, ending the
    holding PostgreSQL/MySQL session). Asks first on a terminal unless --yes."""
    from . import _runner

    out = Output(args)

    def run(engine: Any, cfg: Any) -> int:
        backend, namespace, found = _runner.lock_holders(engine, config=cfg)
        held = [h for h in found if not h.waiting]
        doc: dict[str, Any] = {
            "backend": backend,
            "namespace": namespace,
            "held": [h.as_dict() for h in held],
            "cleared": [],
        }
        if not held:
            out.result(doc, f"{backend} lock {namespace!r} is free; nothing to do")
            return EXIT_OK
        if not args.json and not args.quiet:
            for h in held:
                print(f"{backend} lock {namespace!r} held by: {h.describe()}")
        if args.force and not args.yes:
            if args.json or not sys.stdin.isatty():
                raise ConfigError("no terminal to confirm on: pass --yes with --force")
            answer = input("End that holder and clear the lock? [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                print("nothing done")
                return EXIT_PENDING
        cleared = _runner.unlock(engine, owner=args.owner, force=args.force, config=cfg)
        doc["cleared"] = [h.as_dict() for h in cleared]
        out.result(doc, *[f"cleared: {h.describe()}" for h in cleared])
        return EXIT_OK

    return _with_engine(args, run)


def cmd_resolve(args: argparse.Namespace) -> int:
    """Say what state an interrupted revision left, so that upgrades go on: --applied (its
    changes are in place, or you completed them: the version table is stamped to show it) or
    --not-applied (you undid them: it runs again). Takes the migration lock."""
    from . import _runner

    def run(engine: Any, cfg: Any) -> int:
        heads = _runner.resolve(engine, args.revision, applied=args.applied, config=cfg)
        what = "applied" if args.applied else "not applied"
        Output(args).result(
            {"revision": args.revision, "applied": args.applied, "heads": list(heads)},
            f"resolved: {args.revision} recorded as {what}; database at "
            f"{', '.join(heads) or 'no revision'}",
        )
        return EXIT_OK

    return _with_engine(args, run)


def cmd_durations(args: argparse.Namespace) -> int:
    """Print how long each revision took when it was applied to this database (from the
    library's journal). The --json document is what the durations_file setting reads: carry a
    staging database's durations to production so that time_budget knows them."""
    from . import _runner

    out = Output(args)

    def run(engine: Any, cfg: Any) -> int:
        from ._mask import mask_url

        found = _runner.durations(engine, config=cfg)
        doc = {
            "database": mask_url(engine.url),
            "durations": {rev: round(seconds, 3) for rev, seconds in sorted(found.items())},
        }
        lines = [f"{rev}  {seconds:.2f}s" for rev, seconds in sorted(found.items())] or [
            "no durations recorded: a revision's time is recorded when a run of this library "
            "applies it"
        ]
        out.result(doc, *lines)
        return EXIT_OK

    return _with_engine(args, run)


def cmd_history(args: argparse.Namespace) -> int:
    """List the revisions, newest first, each marked applied [x] or pending [ ], with the
    database's current revision and the heads."""
    from alembic.script import ScriptDirectory

    from . import _runner
    from ._startup import _flagged

    def run(engine: Any, cfg: Any) -> int:
        st = _runner.status(engine, config=cfg)
        script = ScriptDirectory.from_config(cfg)
        pending = {p.revision for p in st.pending}
        revisions = []
        for rev in script.walk_revisions():
            down = rev.down_revision
            revisions.append(
                {
                    "revision": rev.revision,
                    "down_revision": (
                        list(down) if isinstance(down, tuple) else ([down] if down else [])
                    ),
                    "message": rev.doc,
                    "applied": None if st.unknown_heads else rev.revision not in pending,
                    "current": rev.revision in st.current_heads,
                    "head": rev.is_head,
                    "manual": _flagged(rev.module),
                }
            )
        doc = {
            "database": st.database,
            "current_heads": list(st.current_heads),
            "unknown_heads": list(st.unknown_heads),
            "revisions": revisions,
        }
        lines = []
        if st.unknown_heads:
            lines.append(
                f"the database is at {', '.join(st.unknown_heads)}, unknown to these scripts: "
                "applied marks are unknown"
            )
        for r in revisions:
            mark = "[?]" if r["applied"] is None else ("[x]" if r["applied"] else "[ ]")
            flags = (("current", r["current"]), ("head", r["head"]), ("manual", r["manual"]))
            tags = [t for t, on in flags if on]
            tag = f" ({', '.join(tags)})" if tags else ""
            lines.append(f"{mark} {r['revision']}{tag}  {r['message'] or ''}".rstrip())
        Output(args).result(doc, *lines)
        return EXIT_OK

    return _with_engine(args, run)


def cmd_init(args: argparse.Namespace) -> int:
    """Create a new migration environment whose env.py uses alembic_autolock."""
    from alembic.config import Config

    from alembic import command

    template = Path(__file__).parent / "templates" / "autolock"
    config_path = args.config or "alembic.ini"
    cfg = Config(config_path)
    try:
        command.init(cfg, args.directory, template=str(template))
    except Exception as exc:
        raise ConfigError(f"cannot create {args.directory}: {exc}") from exc
    Output(args).result(
        {"directory": args.directory, "config": config_path},
        f"Created {args.directory} (env.py calls alembic_autolock.env.run_migrations). "
        f"Set sqlalchemy.url in {config_path}, then `alembic revision -m ...`.",
    )
    return EXIT_OK


def _schema_line(entry: Any) -> str:
    d = entry.as_dict()
    if not entry.ok:
        return f"{entry.schema}: FAILED {entry.error_type}: {_first_line_of(entry.error_message)}"
    heads = ", ".join(d["heads"] or []) or "no revision"
    if d["applied"]:
        return f"{entry.schema}: {d['action']}: applied {', '.join(d['applied'])}; now at {heads}"
    held = f"; kept for a job: {', '.join(d['pending'])}" if d["pending"] else ""
    return f"{entry.schema}: {d['action']}: at {heads}{held}"


def _first_line_of(text: str | None) -> str:
    return ((text or "").strip().splitlines() or [""])[0]


def cmd_schemas_upgrade(args: argparse.Namespace) -> int:
    """Upgrade many PostgreSQL schemas of one database (a schema per tenant) to a revision
    (default: heads), each with its own version table and its own lock, --parallel at a time.
    The schemas come from --schema (repeatable) or from --schemas-query, the operator's own
    SQL, run as given in a read-only transaction. A tenant that fails is reported and the
    others go on; run it again to finish what failed. Exit 0 when every schema is at its
    target, 2 when any schema failed (each is listed) or on any other error."""
    from . import schemas as tenants

    if bool(args.schema_names) == bool(args.schemas_query):
        raise ConfigError(
            "schemas upgrade needs the tenants' schemas: --schema NAME (repeatable) or "
            "--schemas-query SQL (e.g. --schemas-query 'SELECT schema_name FROM tenants'), "
            "not both"
        )
    out = Output(args)
    progress = _progress(args)  # its live line only: lock events of many schemas would mingle
    counter = threading.Lock()
    finished: list[Any] = []

    def on_result(entry: Any) -> None:
        with counter:
            finished.append(entry)
            done, failed = len(finished), sum(1 for e in finished if not e.ok)
        progress.show(lambda s: f"schemas: {done} done, {failed} failed, {s:.1f}s")

    def run(engine: Any, cfg: Any) -> int:
        from ._mask import mask_url

        try:
            report = tenants.migrate_schemas(
                engine,
                args.schema_names or args.schemas_query,
                config=cfg,
                parallel=args.parallel,
                revision=args.revision,
                on_result=on_result,
            )
        finally:
            progress.close()
        code = EXIT_ERROR if report.failed else EXIT_OK
        doc = {"database": mask_url(engine.url), **report.as_dict(), "exit_code": code}
        counts = ", ".join(f"{n} {action}" for action, n in report.counts().items())
        lines = [_schema_line(entry) for entry in report.results]
        if report.duplicates:
            lines.append(f"given more than once (migrated once): {', '.join(report.duplicates)}")
        lines.append(f"{len(report)} schema(s): {counts or 'none given'}")
        if not report.failed:
            out.result(doc, *lines)
            return EXIT_OK
        if not args.json:
            out.result(doc, *lines)
        failed = [entry.schema for entry in report.failed]
        raise _Failed(
            f"{len(failed)} of {len(report)} schema(s) failed: {', '.join(failed)} (the others "
            "went on; fix them and run the command again: it does only what remains)",
            doc,
        )

    return _with_engine(args, run)


def _parallel(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _add_schemas(sub: Any, common: argparse.ArgumentParser) -> None:
    """``schemas upgrade``: the tenant fleet (alembic_autolock.schemas)."""
    p_schemas = sub.add_parser(
        "schemas",
        help="Migrate PostgreSQL schemas, one per tenant (schemas upgrade).",
        description="Migrate PostgreSQL schemas of one database, one per tenant.",
        parents=[common],
    )
    commands = p_schemas.add_subparsers(dest="schemas_command", required=True, metavar="COMMAND")
    doc = " ".join((cmd_schemas_upgrade.__doc__ or "").split())
    p = commands.add_parser(
        "upgrade",
        help=doc.split(". ")[0] + ".",
        description=doc,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    p.set_defaults(func=cmd_schemas_upgrade)
    p.add_argument(
        "revision", nargs="?", default="heads", help="the target revision (default: heads)"
    )
    p.add_argument(
        "--schema",
        action="append",
        dest="schema_names",
        metavar="NAME",
        help="a tenant's schema, exactly as named in the database (repeatable)",
    )
    p.add_argument(
        "--schemas-query",
        "--query",
        dest="schemas_query",
        metavar="SQL",
        help="your query whose first column lists the schemas, run as given (read-only)",
    )
    p.add_argument(
        "--parallel",
        type=_parallel,
        default=4,
        metavar="N",
        help="schemas handled at once by this process (default: 4)",
    )


# --- the parser and main ---------------------------------------------------------------------


class _Failed(Exception):
    """A command's own failure: one FAILED line, exit 2, and its JSON document."""

    def __init__(self, message: str, doc: dict[str, Any]) -> None:
        super().__init__(message)
        self.doc = doc


def _progress(args: argparse.Namespace) -> Progress:
    stream = sys.stderr
    live = _is_terminal(stream) and not args.verbose
    return Progress(stream, live=live, enabled=not args.quiet and not args.json)


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty() and os.environ.get("TERM", "") != "dumb"
    except (AttributeError, ValueError):
        return False


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError("must be a number of seconds >= 0")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse echoes arguments it rejects (``unrecognized arguments: --url ...``): mask them."""

    def error(self, message: str) -> NoReturn:
        from ._mask import mask_text

        super().error(mask_text(message))


class _Version(argparse.Action):
    def __call__(self, parser: Any, namespace: Any, values: Any, option: Any = None) -> None:
        from importlib.metadata import version

        from . import __version__

        print(
            f"alembic-autolock {__version__} (alembic {version('alembic')}, SQLAlchemy "
            f"{version('SQLAlchemy')}, Python {sys.version.split()[0]})"
        )
        parser.exit()


def _common(*, top: bool) -> _Parser:
    """The options every command takes, before or after its name."""
    common = _Parser(add_help=False)
    default: Any = False if top else argparse.SUPPRESS
    common.add_argument(
        "--json", action="store_true", default=default, help="one JSON document on stdout"
    )
    common.add_argument(
        "-q", "--quiet", action="store_true", default=default, help="only errors on stderr"
    )
    common.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=default,
        help="show the library's events on stderr",
    )
    common.add_argument(
        "--traceback",
        action="store_true",
        default=default,
        help="on an error, print the traceback before the FAILED line",
    )
    none: Any = None if top else argparse.SUPPRESS
    common.add_argument(
        "-c",
        "--config",
        default=none,
        help="alembic.ini or pyproject.toml (default: as alembic finds it)",
    )
    common.add_argument(
        "--url",
        default=none,
        help="database URL (default: $ALEMBIC_AUTOLOCK_URL, then $DATABASE_URL, then "
        "sqlalchemy.url of the config)",
    )
    common.add_argument(
        "-x",
        action="append",
        default=none,
        metavar="KEY=VALUE",
        help="passed to env.py, as with alembic -x",
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="alembic-autolock",
        description="Alembic migrations under a distributed lock: exactly one process migrates.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[_common(top=True)],
    )
    parser.add_argument("--version", action=_Version, nargs=0, help="print the versions and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _common(top=False)

    def add(name: str, fn: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
        doc = " ".join((fn.__doc__ or "").split())
        p = sub.add_parser(
            name,
            help=doc.split(". ")[0].rstrip(".") + ".",
            description=doc,
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            parents=[common],
        )
        p.set_defaults(func=fn)
        return p

    sql_help = "print the SQL instead of running it (offline: no lock, no connection)"
    p_upgrade = add("upgrade", cmd_upgrade)
    p_upgrade.add_argument(
        "revision",
        nargs="?",
        default="heads",
        help="the target revision: an id, heads (the default: every branch's head), head, +N, "
        "branch@head; with --sql it may be FROM:TO",
    )
    p_upgrade.add_argument("--sql", action="store_true", help=sql_help)
    p_downgrade = add("downgrade", cmd_downgrade)
    p_downgrade.add_argument(
        "revision", help="the target revision: an id, -N, base (with --sql: FROM:TO)"
    )
    p_downgrade.add_argument("--sql", action="store_true", help=sql_help)
    add("status", cmd_status)
    add("check", cmd_check).add_argument(
        "--allow-manual",
        action="store_true",
        help="exit 0 when only revisions kept for a job (autolock_manual) are pending",
    )
    p_wait = add("wait", cmd_wait)
    p_wait.add_argument(
        "--timeout",
        type=_seconds,
        default=300.0,
        metavar="SECONDS",
        help="give up after this many seconds (default: 300)",
    )
    p_wait.add_argument(
        "--interval",
        type=_seconds,
        default=1.0,
        metavar="SECONDS",
        help="read the database every this many seconds (default: 1)",
    )
    add("holders", cmd_holders)
    p_unlock = add("unlock", cmd_unlock)
    p_unlock.add_argument("--owner", help="Redis: delete the key only while it holds this owner")
    p_unlock.add_argument(
        "--force", action="store_true", help="clear whoever holds it (ends a database session)"
    )
    p_unlock.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p_resolve = add("resolve", cmd_resolve)
    p_resolve.add_argument("revision", help="the revision the journal says was interrupted")
    state = p_resolve.add_mutually_exclusive_group(required=True)
    state.add_argument(
        "--applied", dest="applied", action="store_true", help="its changes are in place"
    )
    state.add_argument(
        "--not-applied", dest="applied", action="store_false", help="its changes were undone"
    )
    add("history", cmd_history)
    add("durations", cmd_durations)
    add("init", cmd_init).add_argument(
        "directory", help="the directory to create (as alembic init)"
    )
    _add_schemas(sub, common)
    return parser


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.url_source = "--url" if args.url else None
    args.secret_url = args.url
    func: Callable[[argparse.Namespace], int] = args.func
    logger = logging.getLogger(events.LOGGER_NAME)
    lines = _EventLines(
        Progress(sys.stderr, live=False, enabled=not args.quiet),
        logging.INFO if args.verbose else logging.WARNING,
    )
    level = logger.level
    if args.verbose and logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    logger.addHandler(lines)
    try:
        return func(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `alembic-autolock status | head`
        sys.stderr.close()
        return EXIT_OK
    except Exception as exc:  # never a traceback unless asked: one line, and exit code 2
        return _fail(args, exc)
    finally:
        logger.removeHandler(lines)
        logger.setLevel(level)


def _fail(args: argparse.Namespace, exc: Exception) -> int:
    from ._mask import mask_text

    if args.traceback:
        import traceback

        traceback.print_exc()
    if isinstance(exc, AutolockError | _Failed):
        message = str(exc)
        kind = type(exc).__name__ if isinstance(exc, AutolockError) else "Failed"
    else:
        message = f"{type(exc).__name__}: {_first_line(exc)}"
        kind = type(exc).__name__
    message = mask_text(message, args.secret_url)
    if args.json:
        doc = exc.doc if isinstance(exc, _Failed) else {}
        print(json.dumps({**doc, "error": {"type": kind, "message": message}, "exit_code": 2}))
    print(f"FAILED: {message}", file=sys.stderr)
    return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
