"""`alembic-autolock check` as a readiness probe: at head it answers from the manifest and one
SELECT over the DBAPI driver, importing neither SQLAlchemy nor Alembic; in every other case it
says exactly what the full path says (the same words, the same exit code, the same JSON)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from support import MIGRATIONS, worker_env

# Runs the CLI as its console script does (alembic_autolock._probe:main) in a fresh process and
# reports on stderr's last line whether SQLAlchemy was imported (the fast path's whole point),
# and whether the command line module was.
PROBE = (
    "import sys\n"
    "from alembic_autolock._probe import main\n"
    "code = main(sys.argv[1:])\n"
    "print('imported:', 'sqlalchemy' in sys.modules, 'alembic_autolock.cli' in sys.modules,"
    " file=sys.stderr)\n"
    "sys.exit(code)\n"
)


class Probe:
    def __init__(self, cache: Path) -> None:
        self.cache = cache

    def run(self, *args: str, fast: bool = True, **env: str) -> tuple[int, str, str, bool]:
        """(exit code, stdout, stderr without the probe's line, whether SQLAlchemy was
        imported). fast=False turns the manifest off: the full path, for comparison."""
        extra = {"XDG_CACHE_HOME": str(self.cache), **env}
        if not fast:
            extra["ALEMBIC_AUTOLOCK_CACHE_DIR"] = "off"
        out = subprocess.run(
            [sys.executable, "-c", PROBE, *args],
            capture_output=True,
            text=True,
            env=worker_env(**extra),
            timeout=120,
            check=False,
        )
        *rest, last = out.stderr.splitlines() or [""]
        assert last.startswith("imported:"), out.stderr
        sqlalchemy, cli = (word == "True" for word in last.split()[1:3])
        if not sqlalchemy:
            assert not cli, "the fast answer came after importing the command line module"
        return out.returncode, out.stdout, "\n".join(rest), sqlalchemy

    def same_as_full(self, *args: str, **env: str) -> tuple[int, str, bool]:
        """Run the check both ways: the same exit code, stdout and stderr."""
        code, out, err, imported = self.run(*args, **env)
        assert (code, out, err) == self.run(*args, fast=False, **env)[:3]
        return code, out, imported


@pytest.fixture
def probe(tmp_path: Path) -> Probe:
    return Probe(tmp_path / "cache")


def history(tmp_path: Path) -> Path:
    """A copy of the test history that a test may add revisions to."""
    scripts = tmp_path / "scripts"
    shutil.copytree(MIGRATIONS, scripts, ignore=shutil.ignore_patterns("__pycache__"))
    return scripts


@pytest.mark.parametrize("server", ["psycopg2", "psycopg", "mysql", "sqlite"])
def test_at_head_the_probe_imports_neither_sqlalchemy_nor_alembic(
    server: str, request: pytest.FixtureRequest, make_ini: Any, probe: Probe
) -> None:
    if server == "mysql":
        url = request.getfixturevalue("mysql_url")
    elif server == "sqlite":
        url = request.getfixturevalue("sqlite_url")
    else:
        url = request.getfixturevalue("pg_url")
        url = url.replace(
            "postgresql+psycopg2://",
            "postgresql+psycopg://" if server == "psycopg" else "postgresql+psycopg2://",
        )
    ini = make_ini(url)
    code, _, err, _ = probe.run("-c", ini, "upgrade")
    assert code == 0, err
    code, out, err, imported = probe.run("-c", ini, "check")
    assert (code, out, err, imported) == (0, "at head: r5\n", "", False)
    # the same answer as the full path, as a JSON document too
    fast = probe.run("-c", ini, "check", "--json")
    full = probe.run("-c", ini, "check", "--json", fast=False)
    assert (fast[0], json.loads(fast[1])) == (full[0], json.loads(full[1]))
    assert (fast[3], full[3]) == (False, True)
    assert probe.run("-c", ini, "-q", "check")[:3] == (0, "", "")
    # the options the entry point reads itself, in any order and form
    assert probe.run("check", f"--config={ini}", "-v", "--allow-manual")[1:] == (
        "at head: r5\n",
        "",
        False,
    )
    assert probe.run("-c", ini, "-x", f"url={url}", "check")[1:] == ("at head: r5\n", "", False)
    # anything it does not read goes to the full command line (here: its usage error, exit 2)
    cli = str(Path(sys.executable).parent / "alembic-autolock")
    bad = subprocess.run(
        [cli, "-c", ini, "check", "--no-such-option"], capture_output=True, text=True, check=False
    )
    assert bad.returncode == 2 and "unrecognized arguments" in bad.stderr


def test_anything_but_head_is_answered_by_the_full_path(
    pg_url: str, tmp_path: Path, make_ini: Any, probe: Probe
) -> None:
    """The manifest says r5; the database is behind, a revision is added, the version table is
    gone: each time the probe says what the full path says, never "at head"."""
    scripts = history(tmp_path)
    ini = make_ini(pg_url, scripts=scripts)
    assert probe.run("-c", ini, "upgrade")[0] == 0
    assert probe.run("-c", ini, "check")[3] is False  # the manifest is there

    assert probe.run("-c", ini, "downgrade", "r3")[0] == 0
    code, out, imported = probe.same_as_full("-c", ini, "check")
    assert (code, out, imported) == (1, "2 pending: r4, r5\n", True)

    assert probe.run("-c", ini, "upgrade")[0] == 0
    (scripts / "versions" / "r6.py").write_text(
        '"""r6: added after the manifest was written"""\n'
        'revision = "r6"\ndown_revision = "r5"\nbranch_labels = None\ndepends_on = None\n\n'
        "def upgrade():\n    pass\n\n\ndef downgrade():\n    pass\n"
    )
    code, out, imported = probe.same_as_full("-c", ini, "check")
    assert (code, out, imported) == (1, "1 pending: r6\n", True)

    from sqlalchemy import create_engine, text

    engine = create_engine(pg_url)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE alembic_version"))
    engine.dispose()
    code, out, imported = probe.same_as_full("-c", ini, "check")
    assert code == 1 and imported
    assert out.startswith("6 pending: r1, r2")


def test_a_version_table_in_a_schema(pg_url: str, make_ini: Any, probe: Probe) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(pg_url)
    with engine.begin() as conn:
        conn.execute(text('CREATE SCHEMA "Meta"'))
    engine.dispose()
    ini = make_ini(pg_url, version_table_schema="Meta", version_table="Versions")
    assert probe.run("-c", ini, "upgrade")[0] == 0
    assert probe.run("-c", ini, "check")[1:] == ("at head: r5\n", "", False)


def test_a_name_it_cannot_quote_itself_goes_the_full_path(
    pg_url: str, make_ini: Any, probe: Probe
) -> None:
    ini = make_ini(pg_url, version_table="alembic-version")
    assert probe.run("-c", ini, "upgrade")[0] == 0
    assert probe.run("-c", ini, "check")[1:] == ("at head: r5\n", "", True)


def test_a_refused_connection_fails_as_before_and_prints_no_password(
    mysql_url: str, make_ini: Any, probe: Probe
) -> None:
    ini = make_ini(mysql_url)
    assert probe.run("-c", ini, "upgrade")[0] == 0
    wrong = mysql_url.replace("root@", "root:not-the-pw-4711@", 1)
    assert wrong != mysql_url
    code, out, err, _ = probe.run("-c", ini, "--url", wrong, "check")
    assert code == 2 and out == ""
    assert err.startswith("FAILED: ") and "not-the-pw-4711" not in err
    assert probe.same_as_full("-c", ini, "--url", wrong, "check")[0] == 2


def test_manual_revisions_are_marked_and_allow_manual_passes(
    pg_url: str, tmp_path: Path, make_ini: Any, probe: Probe
) -> None:
    """A revision kept for a job is listed as (manual); --allow-manual exits 0 where start-up
    has nothing to do, and still 1 when an automatic revision is pending."""
    scripts = history(tmp_path)
    r5 = scripts / "versions" / "r5.py"
    r5.write_text(r5.read_text() + "\nautolock_manual = True\n")
    ini = make_ini(pg_url, scripts=scripts)
    assert probe.run("-c", ini, "upgrade", "r3")[0] == 0
    code, out, _, _ = probe.run("-c", ini, "check")
    assert (code, out) == (1, "2 pending: r4, r5 (manual)\n")
    assert probe.run("-c", ini, "check", "--allow-manual")[:2] == (
        1,
        "2 pending: r4, r5 (manual)\n",
    )
    assert probe.run("-c", ini, "upgrade", "r4")[0] == 0
    code, out, _, _ = probe.run("-c", ini, "check", "--allow-manual")
    assert (code, out) == (0, "at the start-up head: r4; kept for a job: r5 (manual)\n")
    code, out, _, _ = probe.run("-c", ini, "check", "--json")
    assert code == 1
    assert json.loads(out)["pending"] == [
        {"revision": "r5", "message": json.loads(out)["pending"][0]["message"], "manual": True}
    ]
    code, out, _, _ = probe.run("-c", ini, "history")
    assert code == 0 and "r5" in out.splitlines()[0] and "manual" in out.splitlines()[0]
