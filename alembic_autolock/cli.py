"""The ``alembic-autolock`` command: one library function per subcommand.

Human output goes to stdout, ``--json`` output is the only thing on stdout when asked for,
events go to the ``alembic_autolock`` logger, and every AutolockError becomes one line
``FAILED: ...`` on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from alembic.config import Config
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine
from sqlalchemy.exc import ArgumentError
from sqlalchemy.pool import NullPool

from . import _runner
from ._config import load_config, main_option
from ._mask import mask_text, mask_url, parse_url
from ._results import MigrationResult, Status
from ._wait import run_for_engine
from .exceptions import AutolockError, ConfigError

EXIT_OK, EXIT_PENDING, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130

# how `status` and `holders` introduce each kind of session
_ROLE_LABELS = {"lock": "held by", "fence": "migrating", "wait": "waiting"}


def _config(args: argparse.Namespace) -> Config:
    import os

    cfg = load_config(args.config, environ=os.environ)
    cfg.cmd_opts = argparse.Namespace(x=args.x or [])
    return cfg


def _x_url(args: argparse.Namespace) -> str | None:
    for item in args.x or []:
        key, sep, value = item.partition("=")
        if sep and key.strip() == "url":
            return str(value).strip()
    return None


def _engine(args: argparse.Namespace, cfg: Config) -> Engine:
    where = cfg.config_file_name or "the [alembic] section of alembic.ini"
    if args.url:
        text, what = args.url, "--url"
    elif x_url := _x_url(args):
        text, what = x_url, "-x url"
    else:
        text, what = main_option(cfg, "sqlalchemy.url"), f"sqlalchemy.url in {where}"
    if not text:
        raise ConfigError(f"no database URL: pass --url, or set sqlalchemy.url in {where}")
    url = parse_url(text, what)
    try:
        return create_engine(url, poolclass=NullPool)
    except (ArgumentError, ImportError) as exc:
        raise ConfigError(
            f"cannot use the database URL {mask_url(url)}: {mask_text(str(exc), url)}"
        ) from exc


def _with_engine(args: argparse.Namespace, fn: Callable[[Engine, Config], int]) -> int:
    cfg = _config(args)
    engine = _engine(args, cfg)
    try:
        # an async driver's URL (postgresql+asyncpg://...) runs inside an event loop
        return run_for_engine(engine, _and_dispose, fn, engine, cfg)
    finally:
        engine.dispose()


def _and_dispose(fn: Callable[[Engine, Config], int], engine: Engine, cfg: Config) -> int:
    try:
        return fn(engine, cfg)
    finally:
        engine.dispose()  # where the connections can be closed (an async driver's loop)


def _report(result: MigrationResult) -> None:
    heads = ", ".join(result.heads) or "no revision"
    if result.applied:
        verb = "applied" if result.action == "upgraded" else "undid"
        print(
            f"{result.action}: {verb} {', '.join(result.applied)}; database now at {heads} "
            f"(waited {result.waited_s:.2f}s for the lock, {result.elapsed_s:.2f}s in all)"
        )
    elif result.action == "ahead":
        print(f"ahead: the database is at {heads}, which these scripts do not know; untouched")
    else:
        print(f"{result.action}: database at {heads}, nothing to do")


def cmd_upgrade(args: argparse.Namespace) -> int:
    """Upgrade the database to a revision (default: heads), under the migration lock.
    With --sql, print the SQL instead (offline: no lock, no connection)."""
    if args.sql:
        return _offline(args, "upgrade")

    def run(engine: Engine, cfg: Config) -> int:
        _report(_runner.upgrade(engine, args.revision, config=cfg))
        return EXIT_OK

    return _with_engine(args, run)


def cmd_downgrade(args: argparse.Namespace) -> int:
    """Downgrade the database to a revision, under the lock, if allow_downgrade permits.
    With --sql FROM:TO, print the SQL instead (offline: no lock, no connection)."""
    if args.sql:
        return _offline(args, "downgrade")

    def run(engine: Engine, cfg: Config) -> int:
        _report(_runner.downgrade(engine, args.revision, config=cfg))
        return EXIT_OK

    return _with_engine(args, run)


def _offline(args: argparse.Namespace, direction: str) -> int:
    """Alembic's offline mode through env.py: the SQL on stdout, nothing executed."""
    from alembic.util import CommandError

    from alembic import command

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


def _print_status(st: Status) -> None:
    current = ", ".join(st.current_heads) or "none (empty database)"
    print(f"database:    {st.database}")
    print(f"current:     {current}{' (head)' if st.at_head else ''}")
    print(f"script head: {', '.join(st.script_heads) or 'none'}")
    if st.unknown_heads:
        unknown = ", ".join(st.unknown_heads)
        print(f"AHEAD:       the database is at {unknown}, unknown to these scripts")
    if st.pending:
        print(f"pending:     {len(st.pending)}")
        for p in st.pending:
            print(f"  {p.revision}  {p.message or ''}".rstrip())
    else:
        print("pending:     none")
    print(f"lock:        {st.lock_backend} {st.namespace!r}")
    if st.holders_error:
        print(f"  holders unknown: {st.holders_error}")
    elif not st.holders:
        print("  free")
    for h in st.holders:
        print(f"  {_ROLE_LABELS[h.role]}: {h.describe()}")


def cmd_status(args: argparse.Namespace) -> int:
    """Show the current and script heads, the pending revisions and the lock holders."""

    def run(engine: Engine, cfg: Config) -> int:
        st = _runner.status(engine, config=cfg)
        if args.json:
            print(json.dumps(st.as_dict(), indent=2))
        else:
            _print_status(st)
        return EXIT_OK

    return _with_engine(args, run)


def cmd_check(args: argparse.Namespace) -> int:
    """Exit 0 if the database is at head, 1 if revisions are pending, 2 on error."""

    def run(engine: Engine, cfg: Config) -> int:
        st = _runner.status(engine, config=cfg)
        if st.at_head:
            print(f"at head: {', '.join(st.current_heads)}")
            return EXIT_OK
        if st.unknown_heads:
            print(
                f"ahead: the database is at {', '.join(st.unknown_heads)}, which these scripts "
                "do not know",
                file=sys.stderr,
            )
            return EXIT_ERROR
        print(f"{len(st.pending)} pending: {', '.join(p.revision for p in st.pending)}")
        return EXIT_PENDING

    return _with_engine(args, run)


def cmd_wait(args: argparse.Namespace) -> int:
    """Wait until the database is at head (another process migrates it), up to --timeout."""

    def run(engine: Engine, cfg: Config) -> int:
        deadline = time.monotonic() + args.timeout
        while True:
            st = _runner.status(engine, config=cfg)
            if st.at_head:
                print(f"at head: {', '.join(st.current_heads)}")
                return EXIT_OK
            if st.unknown_heads:
                unknown = ", ".join(st.unknown_heads)
                print(
                    f"FAILED: the database is at {unknown}, unknown to these scripts: it "
                    "will never reach their head",
                    file=sys.stderr,
                )
                return EXIT_ERROR
            if time.monotonic() >= deadline:
                pending = ", ".join(p.revision for p in st.pending) or "unknown revisions"
                print(
                    f"FAILED: still not at head after {args.timeout:g}s (pending: {pending})",
                    file=sys.stderr,
                )
                return EXIT_PENDING
            time.sleep(min(args.interval, max(0.0, deadline - time.monotonic())))

    return _with_engine(args, run)


def cmd_holders(args: argparse.Namespace) -> int:
    """Show who holds the migration lock and who waits for it."""

    def run(engine: Engine, cfg: Config) -> int:
        backend, namespace, found = _runner.lock_holders(engine, config=cfg)
        if args.json:
            doc = {
                "backend": backend,
                "namespace": namespace,
                "holders": [h.as_dict() for h in found],
            }
            print(json.dumps(doc, indent=2))
            return EXIT_OK
        print(f"{backend} lock {namespace!r}: {'free' if not found else ''}".rstrip())
        for h in found:
            print(f"  {_ROLE_LABELS[h.role]}: {h.describe()}")
        return EXIT_OK

    return _with_engine(args, run)


def cmd_unlock(args: argparse.Namespace) -> int:
    """Clear a stuck lock of this namespace (Redis: by owner; --force: any holder, ending the
    holding PostgreSQL/MySQL session)."""

    def run(engine: Engine, cfg: Config) -> int:
        backend, namespace, found = _runner.lock_holders(engine, config=cfg)
        held = [h for h in found if not h.waiting]
        if not held:
            print(f"{backend} lock {namespace!r} is free; nothing to do")
            return EXIT_OK
        for h in held:
            print(f"{backend} lock {namespace!r} held by: {h.describe()}")
        if args.force and not args.yes:
            if not sys.stdin.isatty():
                raise ConfigError("no terminal to confirm on: pass --yes with --force")
            answer = input("End that holder and clear the lock? [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                print("nothing done")
                return EXIT_PENDING
        cleared = _runner.unlock(engine, owner=args.owner, force=args.force, config=cfg)
        for h in cleared:
            print(f"cleared: {h.describe()}")
        return EXIT_OK

    return _with_engine(args, run)


def cmd_resolve(args: argparse.Namespace) -> int:
    """Say what state an interrupted revision left, so that upgrades go on: --applied (its
    changes are in place, or you completed them: the version table is stamped to show it) or
    --not-applied (you undid them: it runs again). Takes the migration lock."""

    def run(engine: Engine, cfg: Config) -> int:
        heads = _runner.resolve(engine, args.revision, applied=args.applied, config=cfg)
        what = "applied" if args.applied else "not applied"
        print(
            f"resolved: {args.revision} recorded as {what}; database at "
            f"{', '.join(heads) or 'no revision'}"
        )
        return EXIT_OK

    return _with_engine(args, run)


def cmd_init(args: argparse.Namespace) -> int:
    """Create a new migration environment whose env.py uses alembic_autolock."""
    from alembic import command

    template = Path(__file__).parent / "templates" / "autolock"
    config_path = args.config or "alembic.ini"
    cfg = Config(config_path)
    try:
        command.init(cfg, args.directory, template=str(template))
    except Exception as exc:
        raise ConfigError(f"cannot create {args.directory}: {exc}") from exc
    print(
        f"Created {args.directory} (env.py calls alembic_autolock.env.run_migrations). "
        f"Set sqlalchemy.url in {config_path}, then `alembic revision -m ...`."
    )
    return EXIT_OK


def _positive_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse echoes arguments it rejects (``unrecognized arguments: --url ...``): mask them."""

    def error(self, message: str) -> NoReturn:
        super().error(mask_text(message))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="alembic-autolock",
        description="Alembic migrations under a distributed lock.",
    )
    parser.add_argument(
        "-c", "--config", help="alembic.ini or pyproject.toml (default: as alembic finds it)"
    )
    parser.add_argument("--url", help="database URL (default: sqlalchemy.url of the config)")
    parser.add_argument(
        "-x", action="append", metavar="KEY=VALUE", help="passed to env.py, as with alembic -x"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
        doc = (fn.__doc__ or "").strip()
        p = sub.add_parser(name, help=doc, description=doc)
        p.set_defaults(func=fn)
        return p

    p_upgrade = add("upgrade", cmd_upgrade)
    p_upgrade.add_argument(
        "revision",
        nargs="?",
        default="heads",
        help="the target revision (default: heads, every branch's head; with --sql it may be "
        "FROM:TO)",
    )
    sql_help = "print the SQL instead of running it (offline: no lock, no connection)"
    p_upgrade.add_argument("--sql", action="store_true", help=sql_help)
    p_downgrade = add("downgrade", cmd_downgrade)
    p_downgrade.add_argument(
        "revision", help="the target revision: an id, -N, base (with --sql: FROM:TO)"
    )
    p_downgrade.add_argument("--sql", action="store_true", help=sql_help)
    add("status", cmd_status).add_argument("--json", action="store_true", help="JSON on stdout")
    add("check", cmd_check)
    p_wait = add("wait", cmd_wait)
    p_wait.add_argument("--timeout", type=_positive_float, default=300.0)
    p_wait.add_argument("--interval", type=_positive_float, default=1.0)
    add("holders", cmd_holders).add_argument("--json", action="store_true", help="JSON on stdout")
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
    add("init", cmd_init).add_argument("directory")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except AutolockError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:  # `alembic-autolock status | head`
        sys.stderr.close()
        return EXIT_OK
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # never a traceback: one line, and the exit code of an error
        from ._mask import mask_text

        detail = (str(exc).strip().splitlines() or [""])[0]
        print(f"FAILED: {type(exc).__name__}: {mask_text(detail, args.url)}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
