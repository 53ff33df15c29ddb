"""The documentation runs: every fenced Python and shell block of README.md and docs/*.md is
executed against the real servers, the settings reference covers every setting, alembic.ini
and the ``init`` template list every setting with its default, and ``mkdocs build --strict``
passes.

How a page is run (docs/index.md, "About the examples", says the same to readers):

* Each page gets a fresh project directory: the example migration environment (a copy of
  ``alembic.ini`` and ``alembic/``, five revisions, SQLite ``example.db`` by default) and a
  ``myapp`` package whose ``myapp.models`` defines ``Base``. ``DATABASE_URL`` names a fresh,
  empty PostgreSQL database of the page's own.
* The page's blocks run in order in one process, as a reader follows it: ``python`` blocks share
  one namespace; ``sh``/``bash``/``shell`` blocks run with ``bash -euo pipefail``; in
  ``console`` blocks the lines that start with ``$ `` are the commands (the rest is output).
* ``<!-- file: PATH -->`` right before a block writes the block to PATH in the project instead
  of running it (an env.py, a revision module); later blocks use it.
* ``<!-- not-run: REASON -->`` right before a block skips it. It must say why; it is rare
  (installing packages, a command that runs for minutes, a fragment of a larger file).
* Blocks without a language, or in another language (``text``, ``ini``, ``json``, ``yaml``),
  are not run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
PAGES = [REPO / "README.md", *sorted(DOCS.glob("*.md"))]
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"

RUN_LANGS = {"python": "python", "sh": "sh", "bash": "sh", "shell": "sh", "console": "console"}
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>```+|~~~+)\s*(?P<lang>[\w+-]*)")
MARKER = re.compile(r"^\s*<!--\s*(?P<kind>not-run|file):\s*(?P<arg>.*?)\s*-->\s*$")


@dataclass
class Block:
    page: str
    line: int
    lang: str  # python, sh, console, or another language (not run)
    code: str
    skip: str | None = None  # the not-run reason
    file: str | None = None  # written to this path instead of run


def blocks_of(path: Path) -> list[Block]:
    """The fenced blocks of a page, with their markers."""
    lines = path.read_text().splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m["indent"], m["fence"], m["lang"].lower()
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i])
            i += 1
        i += 1
        j = start - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        marker = MARKER.match(lines[j]) if j >= 0 else None
        block = Block(
            page=str(path.relative_to(REPO)) if path.is_relative_to(REPO) else path.name,
            line=start + 1,
            lang=RUN_LANGS.get(lang, lang or "text"),
            code="\n".join(body) + "\n",
        )
        if marker and marker["kind"] == "not-run":
            block.skip = marker["arg"]
        elif marker:
            block.file = marker["arg"]
        found.append(block)
    return found


# The driver runs one page's blocks in order, in one process, and stops at the first failure.
DRIVER = r"""
import json, os, subprocess, sys, traceback
blocks = json.load(open(sys.argv[1]))
namespace = {"__name__": "__main__"}
for b in blocks:
    where = f"{b['page']}:{b['line']}"
    if b["file"]:
        os.makedirs(os.path.dirname(b["file"]) or ".", exist_ok=True)
        with open(b["file"], "w") as f:
            f.write(b["code"])
        continue
    if b["lang"] == "python":
        try:
            exec(compile(b["code"], where, "exec"), namespace)
        except BaseException:
            traceback.print_exc()
            print(f"DOCS-BLOCK-FAILED {where}", file=sys.stderr)
            sys.exit(1)
        continue
    if b["lang"] == "console":
        cmds = [l[2:] for l in b["code"].splitlines() if l.startswith("$ ")]
        script = "\n".join(cmds)
    else:
        script = b["code"]
    sys.stdout.flush(); sys.stderr.flush()
    rc = subprocess.run(["bash", "-euo", "pipefail", "-c", script]).returncode
    if rc != 0:
        print(f"DOCS-BLOCK-FAILED {where} (exit code {rc})", file=sys.stderr)
        sys.exit(1)
print("DOCS-PAGE-OK")
"""

MODELS = '''\
"""The application's models, as the docs' examples import them."""

from sqlalchemy import Integer, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "notes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    body: Mapped[str] = mapped_column(String(200))
'''


def make_project(directory: Path) -> None:
    """The reader's project: the example environment and a models module."""
    shutil.copy(REPO / "alembic.ini", directory / "alembic.ini")
    shutil.copytree(REPO / "alembic", directory / "alembic", ignore=_no_pycache)
    (directory / "myapp").mkdir()
    (directory / "myapp" / "__init__.py").write_text("")
    (directory / "myapp" / "models.py").write_text(MODELS)


def _no_pycache(_: str, names: list[str]) -> list[str]:
    return [n for n in names if n == "__pycache__"]


def _admin(sql: str) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql)  # type: ignore[arg-type]


def page_env(directory: Path, database_url: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("ALEMBIC_AUTOLOCK_") and k not in ("DATABASE_URL", "ALEMBIC_CONFIG")
    }
    env.update(
        DATABASE_URL=database_url,
        PYTHONPATH=str(directory),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        REPO=str(REPO),
        XDG_CACHE_HOME=str(directory / ".cache"),
        PYTHONUNBUFFERED="1",
    )
    env.pop("COVERAGE_PROCESS_START", None)
    return env


def run_page(page: Path, tmp: Path) -> subprocess.CompletedProcess[str]:
    blocks = [b for b in blocks_of(page) if b.lang in ("python", "sh", "console") or b.file]
    runnable = [b for b in blocks if b.skip is None]
    slug = re.sub(r"\W", "_", page.stem.lower())
    dbname = f"autolock_docs_{os.getpid()}_{slug}"
    _admin(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
    _admin(f'CREATE DATABASE "{dbname}"')
    try:
        make_project(tmp)
        (tmp / ".blocks.json").write_text(json.dumps([b.__dict__ for b in runnable]))
        (tmp / ".driver.py").write_text(DRIVER)
        return subprocess.run(
            [sys.executable, ".driver.py", ".blocks.json"],
            cwd=tmp,
            env=page_env(tmp, f"postgresql://postgres@127.0.0.1:5432/{dbname}"),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        _admin(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')


def _runnable_pages() -> list[Path]:
    return [p for p in PAGES if any(b.lang in ("python", "sh", "console") for b in blocks_of(p))]


@pytest.mark.postgresql
@pytest.mark.redis
@pytest.mark.mysql
@pytest.mark.parametrize("page", _runnable_pages(), ids=lambda p: p.name)
def test_page_blocks_run(page: Path, tmp_path: Path) -> None:
    """Every runnable block of the page runs, in order, against the real servers."""
    started = time.monotonic()
    proc = run_page(page, tmp_path)
    output = proc.stdout[-4000:] + proc.stderr[-6000:]
    took = time.monotonic() - started
    assert proc.returncode == 0, f"{page.name} failed ({took:.1f}s):\n{output}"
    assert "DOCS-PAGE-OK" in proc.stdout


def test_not_run_markers_are_rare_and_say_why() -> None:
    """A block is skipped only with a reason, and skipped blocks stay a small minority."""
    all_blocks = [b for p in PAGES for b in blocks_of(p) if b.lang in ("python", "sh", "console")]
    skipped = [b for b in all_blocks if b.skip is not None]
    assert [b for b in skipped if len(b.skip or "") < 10] == []
    assert len(skipped) * 5 <= len(all_blocks), [f"{b.page}:{b.line}" for b in skipped]


def test_markers_stand_before_a_block() -> None:
    """Every marker in a page is followed by a fenced block (a marker never silently does
    nothing)."""
    loose = []
    for page in PAGES:
        lines = page.read_text().splitlines()
        for i, line in enumerate(lines):
            if MARKER.match(line):
                rest = [text for text in lines[i + 1 :] if text.strip()]
                if not rest or not FENCE.match(rest[0]):
                    loose.append(f"{page.name}:{i + 1}")
    assert loose == []


def _reference() -> Any:
    path = DOCS / "_hooks" / "settings_reference.py"
    spec = importlib.util.spec_from_file_location("settings_reference", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_settings_reference_covers_every_setting() -> None:
    """The generated configuration table has one row per setting, with its variable and
    default, and configuration.md includes it."""
    from alembic_autolock._settings import _PARSERS, Settings

    ref = _reference()
    table = ref.markdown()
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert sorted(r.split("`")[1] for r in rows) == sorted(_PARSERS)
    for key in _PARSERS:
        row = next(r for r in rows if r.startswith(f"| `{key}` |"))
        assert f"`ALEMBIC_AUTOLOCK_{key.upper()}`" in row
    assert "| `timeout` | `ALEMBIC_AUTOLOCK_TIMEOUT` | seconds ≥ 0 | `30` |" in table
    assert Settings.timeout == 30.0
    assert ref.MARKER in (DOCS / "configuration.md").read_text()


@pytest.mark.parametrize(
    "ini",
    [REPO / "alembic.ini", *sorted((REPO / "alembic_autolock" / "templates").glob("*/*.ini.mako"))],
    ids=lambda p: str(p.relative_to(REPO)),
)
def test_ini_lists_every_setting_with_its_default(ini: Path) -> None:
    """alembic.ini and the init template carry the generated [alembic_autolock] section:
    every setting, commented out, with its default."""
    ref = _reference()
    section = ref.ini_section()
    assert section in ini.read_text(), (
        f"regenerate with: python docs/_hooks/settings_reference.py ini ({ini.name})"
    )
    for key in ref.setting_keys():
        assert f"\n# {key} =" in section


def test_ini_defaults_are_the_resolved_defaults(tmp_path: Path) -> None:
    """Uncommenting every line of the section changes nothing: each value is the default
    a development environment resolves."""
    from alembic_autolock._settings import resolve_settings

    ref = _reference()
    lines = [
        line[2:]
        for line in ref.ini_section().splitlines()
        if re.match(r"# \w+ = ", line) or re.match(r"# \w+ =$", line)
    ]
    ini = tmp_path / "alembic.ini"
    ini.write_text("[alembic]\nscript_location = x\n\n[alembic_autolock]\n" + "\n".join(lines))
    from alembic.config import Config

    uncommented = resolve_settings({}, Config(str(ini)), environ={})
    defaults = resolve_settings({}, None, environ={})
    assert uncommented == defaults


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    """The site builds with --strict: no broken link, anchor or reference."""
    if not os.environ.get("CI"):  # in CI the docs extra is installed (the test extra pulls it in)
        pytest.importorskip("mkdocs", reason="the docs extra: pip install -e '.[docs]'")
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "site" / "configuration" / "index.html").exists()
    assert time.monotonic() - started < 60


def test_blocks_parser_reads_markers(tmp_path: Path) -> None:
    """The collector sees languages, indented blocks and both markers."""
    page = tmp_path / "p.md"
    page.write_text(
        textwrap.dedent(
            """\
            ```python
            x = 1
            ```
            <!-- not-run: runs for two minutes -->

            ```sh
            sleep 120
            ```
            1. a step

               <!-- file: alembic/env.py -->
               ```python
               run()
               ```
            ```
            plain text
            ```
            """
        )
    )
    got = [(b.lang, b.code, b.skip, b.file) for b in blocks_of(page)]
    assert got == [
        ("python", "x = 1\n", None, None),
        ("sh", "sleep 120\n", "runs for two minutes", None),
        ("python", "run()\n", None, "alembic/env.py"),
        ("text", "plain text\n", None, None),
    ]


def test_every_event_is_documented() -> None:
    """Each event name the library emits has a row in docs/events.md."""
    from alembic_autolock import _events

    names = {
        value
        for key, value in vars(_events).items()
        if key.isupper() and isinstance(value, str) and "." in value and key != "LOGGER_NAME"
    }
    page = (DOCS / "events.md").read_text()
    assert sorted(n for n in names if f"| `{n}` |" not in page) == []


def test_every_metric_is_documented() -> None:
    """Each metric in alembic_autolock.metrics.NAMES has a row in docs/metrics.md."""
    from alembic_autolock import metrics

    page = (DOCS / "metrics.md").read_text()
    assert [n for n in metrics.NAMES if f"| `{n}` |" not in page] == []
