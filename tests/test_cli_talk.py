"""The command line as an operator meets it: the live line in a real pseudo-terminal, plain lines
off a terminal, Ctrl-C, exit codes, --json documents, the URL from the environment, history."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from support import finish, heads_of, start_worker, wait_for, worker_env

from alembic_autolock.cli import main

CLI = str(Path(sys.executable).parent / "alembic-autolock")
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # anything but \t and \n


class Terminal:
    """The CLI in a real pseudo-terminal: its stdout and stderr are the terminal."""

    def __init__(self, *args: str, env: dict[str, str]) -> None:
        master, slave = pty.openpty()
        self.master = master
        self.proc = subprocess.Popen(
            [CLI, *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env={**env, "TERM": "xterm", "COLUMNS": "200"},
            close_fds=True,
        )
        os.close(slave)
        self.screen = ""

    def read_until(self, pattern: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.screen):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{pattern!r} never appeared in {self.screen!r}")
            ready, _, _ = select.select([self.master], [], [], remaining)
            if ready:
                try:
                    chunk = os.read(self.master, 4096)
                except OSError:  # the process closed the terminal
                    chunk = b""
                if not chunk:
                    break
                self.screen += chunk.decode(errors="replace")
        match = re.search(pattern, self.screen)
        assert match, f"{pattern!r} never appeared in {self.screen!r}"
        return match.group(0)

    def finish(self, timeout: float = 60) -> int:
        code = self.proc.wait(timeout)
        while True:
            ready, _, _ = select.select([self.master], [], [], 0.2)
            if not ready:
                break
            try:
                chunk = os.read(self.master, 4096)
            except OSError:
                break
            if not chunk:
                break
            self.screen += chunk.decode(errors="replace")
        os.close(self.master)
        return code


def test_upgrade_on_a_terminal_shows_who_holds_the_lock_and_what_happened(
    pg_url: str, make_ini: Any, trace: Any
) -> None:
    """While another process migrates, upgrade shows a live line with the elapsed time and
    the holder (process, host, since), then says who migrated and how long it waited."""
    ini = make_ini(pg_url)
    env = worker_env(AUTOLOCK_TEST_SLEEP="0.8", AUTOLOCK_TEST_TRACE=str(trace.path))
    holder = start_worker(ini, pg_url, env=env)
    try:
        assert wait_for(lambda: trace.lines(), 30)  # it holds the lock, in r1
        term = Terminal("-c", ini, "upgrade", env=worker_env())
        line = term.read_until(
            r"waiting \d+\.\d+s for the postgresql migration lock, held by [^\r]*"
        )
        assert f"process {holder.pid} on " in line and " UTC" in line
        term.read_until(r"\r\x1b\[Kwaiting [1-9]\.\ds")  # redrawn in place as time goes by
        assert term.finish() == 0
        assert finish(holder).returncode == 0
    finally:
        if holder.poll() is None:
            holder.kill()
    last = term.screen.replace("\r\x1b[K", "\n").splitlines()[-1]
    assert re.fullmatch(
        rf"current: database at r5, nothing to do: process {holder.pid} on \S+, since "
        r"\S+ UTC migrated it while this process waited \d+\.\ds for the lock",
        last.strip(),
    ), last


def test_off_a_terminal_the_same_wait_is_plain_lines(
    pg_url: str, make_ini: Any, trace: Any
) -> None:
    """Piped, the same wait prints plain lines without a control character; -q prints none."""
    ini = make_ini(pg_url)
    env = worker_env(AUTOLOCK_TEST_SLEEP="0.8", AUTOLOCK_TEST_TRACE=str(trace.path))
    holder = start_worker(ini, pg_url, env=env)
    try:
        assert wait_for(lambda: trace.lines(), 30)
        quiet = subprocess.Popen(
            [CLI, "-c", ini, "upgrade", "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        out = subprocess.run(
            [CLI, "-c", ini, "upgrade"], capture_output=True, text=True, timeout=60, check=False
        )
        q_out, q_err = quiet.communicate(timeout=60)
    finally:
        finish(holder)
    assert out.returncode == 0, out.stderr
    assert not CONTROL.search(out.stdout + out.stderr)
    assert out.stderr.startswith(
        f"waiting for the postgresql migration lock, held by process {holder.pid} on "
    )
    assert "migrated it while this process waited" in out.stdout
    assert (quiet.returncode, q_out, q_err) == (0, b"", b"")


def test_ctrl_c_while_waiting_is_one_line_and_exit_130(
    pg_url: str, make_ini: Any, trace: Any
) -> None:
    """Ctrl-C while waiting for the lock: one 'interrupted' line, exit code 130, no traceback."""
    ini = make_ini(pg_url)
    env = worker_env(AUTOLOCK_TEST_HANG_AT="r1", AUTOLOCK_TEST_TRACE=str(trace.path))
    holder = start_worker(ini, pg_url, env=env)
    try:
        assert wait_for(lambda: ["r1", "up", str(holder.pid), "hang"] in trace.lines(), 30)
        term = Terminal("-c", ini, "upgrade", env=worker_env())
        term.read_until(r"waiting \d+\.\ds for the postgresql migration lock")
        term.proc.send_signal(signal.SIGINT)
        assert term.finish() == 130
    finally:
        holder.kill()
        holder.wait()
    assert "Traceback" not in term.screen
    assert term.screen.rstrip().splitlines()[-1].strip() == "interrupted"


def test_exit_codes_and_json_documents(
    sqlite_url: str, make_ini: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """check, upgrade, wait, status, holders and history each print one JSON document with
    --json, and exit 0 / 1 / 2 as documented."""
    ini = make_ini(sqlite_url)

    def run(*argv: str) -> tuple[int, Any]:
        code = main(["-c", ini, *argv, "--json"])
        return code, json.loads(capsys.readouterr().out)

    code, doc = run("check")
    assert (code, doc["at_head"], [p["revision"] for p in doc["pending"]]) == (
        1,
        False,
        ["r1", "r2", "r3", "r4", "r5"],
    )
    assert doc["exit_code"] == 1
    code, doc = run("wait", "--timeout", "0")
    assert (code, doc["exit_code"], doc["at_head"]) == (1, 1, False)
    code, doc = run("upgrade", "r3")
    assert (code, doc["action"], doc["applied"], doc["heads"]) == (
        0,
        "upgraded",
        ["r1", "r2", "r3"],
        ["r3"],
    )
    assert set(doc) == {
        "action",
        "applied",
        "heads",
        "waited_s",
        "elapsed_s",
        "migrated_by_other",
        "lock_holders_seen",
        "pending",
        "command",
    }
    assert (doc["pending"], doc["command"]) == ([], None)
    code, doc = run("history")
    assert code == 0
    assert [(r["revision"], r["applied"], r["current"], r["head"]) for r in doc["revisions"]] == [
        ("r5", False, False, True),
        ("r4", False, False, False),
        ("r3", True, True, False),
        ("r2", True, False, False),
        ("r1", True, False, False),
    ]
    code, doc = run("status")
    assert (code, doc["current_heads"], doc["url_source"]) == (
        0,
        ["r3"],
        f"sqlalchemy.url in {ini}",
    )
    code, doc = run("holders")
    assert (code, doc["backend"], doc["holders"]) == (0, "file", [])
    code, doc = run("upgrade")
    assert (code, doc["action"], doc["applied"]) == (0, "upgraded", ["r4", "r5"])
    code, doc = run("check")
    assert (code, doc["at_head"]) == (0, True)
    code, doc = run("downgrade", "nope")
    assert code == 2
    assert doc["exit_code"] == 2 and doc["error"]["type"] == "ConfigError"
    assert "unknown revision 'nope'" in doc["error"]["message"]
    assert capsys.readouterr().err == ""  # the FAILED line went to stderr above, read by run()


def test_history_marks_applied_and_pending(
    sqlite_url: str, make_ini: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """history lists the revisions newest first, [x] applied, [ ] pending, with current and
    head marked."""
    ini = make_ini(sqlite_url)
    assert main(["-c", ini, "-q", "upgrade", "r2"]) == 0
    assert main(["-c", ini, "history"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "[ ] r5 (head)  table t5",
        "[ ] r4  index on t1, concurrently on PostgreSQL (outside a transaction, through "
        "autocommit_block)",
        "[ ] r3  table t3",
        "[x] r2 (current)  table t2",
        "[x] r1  table t1",
    ]


def test_url_from_the_environment_and_status_says_which(
    sqlite_url: str,
    tmp_path: Path,
    make_ini: Any,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without --url, $ALEMBIC_AUTOLOCK_URL wins over $DATABASE_URL, which wins over the
    config; status names the source."""
    ini = make_ini("sqlite:///" + str(tmp_path / "from-config.db"))
    other = "sqlite:///" + str(tmp_path / "other.db")
    monkeypatch.setenv("DATABASE_URL", other)
    assert main(["-c", ini, "status"]) == 0
    assert f"database:    {other} (from $DATABASE_URL)" in capsys.readouterr().out
    monkeypatch.setenv("ALEMBIC_AUTOLOCK_URL", sqlite_url)
    assert main(["-c", ini, "-q", "upgrade"]) == 0
    assert heads_of(sqlite_url) == {"r5"}
    assert main(["-c", ini, "status"]) == 0
    assert f"database:    {sqlite_url} (from $ALEMBIC_AUTOLOCK_URL)" in capsys.readouterr().out
    assert main(["-c", ini, "status", "--url", other, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["url_source"] == "--url"


def test_wait_retries_a_refusing_database_until_its_timeout(
    make_ini: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """wait keeps trying a database that refuses connections until --timeout, then exit 2."""
    ini = make_ini("postgresql+psycopg2://u:S3cr3t@127.0.0.1:1/db")
    started = time.monotonic()
    assert main(["-c", ini, "wait", "--timeout", "1.5", "--interval", "0.2"]) == 2
    assert time.monotonic() - started >= 1.5
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith(
        "FAILED: the database was still unreachable after 1.5s: cannot connect to "
        "postgresql+psycopg2://u:***@127.0.0.1:1/db"
    )
    assert "S3cr3t" not in err


def test_any_error_is_one_failed_line_with_exit_2(
    make_ini: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """An error that is not the library's own (an async driver's refused connection) is one
    FAILED line and exit 2, never exit 1 (which check means as pending); --traceback shows it."""
    ini = make_ini("postgresql+asyncpg://u@127.0.0.1:1/db")
    assert main(["-c", ini, "check"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("FAILED: ")
    assert main(["-c", ini, "check", "--traceback"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and err.splitlines()[-1].startswith("FAILED: ")


def test_usage_errors_exit_2_and_help_documents_exit_codes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A bad option prints usage and exits 2; --help lists the exit codes and the units;
    --version names the versions."""
    with pytest.raises(SystemExit) as info:
        main(["wait", "--timeout", "soon"])
    assert info.value.code == 2
    assert "'soon' is not a number of seconds" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["wait", "--help"])
    text = capsys.readouterr().out
    assert "give up after this many seconds (default: 300)" in text
    assert "130  interrupted (Ctrl-C)" in text
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("alembic-autolock ")


def test_verbose_shows_the_events_and_quiet_nothing(
    sqlite_url: str, make_ini: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """-v prints each event on stderr, the result on stdout; -q prints nothing at all."""
    ini = make_ini(sqlite_url)
    assert main(["-c", ini, "-v", "upgrade", "r1"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("upgraded: applied r1; database now at r1")
    events = [line.split()[1] for line in out.err.splitlines()]
    assert events[:2] == ["lock.acquired", "migration.started"]
    assert out.err.splitlines()[0].startswith("info: lock.acquired backend=file")
    assert not CONTROL.search(out.err)
    assert main(["-c", ini, "upgrade", "-q"]) == 0
    assert capsys.readouterr() == ("", "")


def test_warnings_show_unless_the_command_restates_them(
    sqlite_url: str, make_ini: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """A warning the command does not restate (lock = none) is a line on stderr; a refusal's
    warning event is not repeated above its FAILED line."""
    ini = make_ini(sqlite_url, lock="none")
    assert main(["-c", ini, "upgrade", "r1"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("warning: lock.disabled detail=lock = none:")
    production = make_ini(sqlite_url, environment="production")
    assert main(["-c", production, "downgrade", "base"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "FAILED: downgrade refused in environment 'production' (allow_downgrade is false, from "
        "default for environment 'production'). To allow it, set "
        "ALEMBIC_AUTOLOCK_ALLOW_DOWNGRADE=true, or allow_downgrade = true in [alembic_autolock], "
        "or pass allow_downgrade=True."
    ]
