"""The ``alembic-autolock`` console script's entry point.

A readiness probe runs ``alembic-autolock check`` every few seconds on every pod, so what it
imports is its cost. A ``check`` whose options this module reads exactly (``-c/--config``,
``--url``, ``-x url=...``, ``--json``, ``-q``, and the flags that change nothing at head) is
answered here at head (``_fastcheck.at_head``) before the command line module, argparse and
logging are imported. Everything else, and every answer but "at head", is ``cli.main``'s.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

# flags that change nothing about the answer "at head"
_NEUTRAL = frozenset({"-v", "--verbose", "--traceback", "--allow-manual"})
_VALUED = {"-c": "config", "--config": "config", "--url": "url"}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    code = _check_at_head(args)
    if code is not None:
        return code
    from .cli import main as full

    return full(args)


def _check_at_head(args: list[str]) -> int | None:
    options: dict[str, str | None] = {"config": None, "url": None}
    as_json = quiet = command = False
    i = 0
    while i < len(args):
        arg = args[i]
        name, eq, value = arg.partition("=")
        if arg == "check" and not command:
            command = True
        elif name in _VALUED and name.startswith("--") and eq:
            options[_VALUED[name]] = value
        elif arg in _VALUED and i + 1 < len(args):
            options[_VALUED[arg]] = args[i + 1]
            i += 1
        elif arg == "-x" and i + 1 < len(args) and args[i + 1].startswith("url="):
            options["url"] = options["url"] or args[i + 1][len("url=") :].strip()
            i += 1
        elif arg == "--json":
            as_json = True
        elif arg in ("-q", "--quiet"):
            quiet = True
        elif arg not in _NEUTRAL:
            return None  # anything else (help, another command, a typo): the full CLI
        i += 1
    if not command:
        return None
    from ._fastcheck import at_head, at_head_document

    current = at_head(options["config"], options["url"])
    if current is None:
        return None
    if as_json:
        import json

        print(json.dumps(at_head_document(current), indent=2))
    elif not quiet:
        print(f"at head: {', '.join(current)}")
    return 0
