"""The environment policy: what each environment lets ensure_migrated, upgrade and downgrade
do, where the environment comes from, and how a refusal reads."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from support import ALL_REVS, heads_of, worker_env

from alembic_autolock import (
    ConfigError,
    GateClosed,
    PendingMigrations,
    downgrade,
    ensure_migrated,
    install,
    upgrade,
)
from alembic_autolock._settings import resolve_settings
from alembic_autolock.cli import main

ALEMBIC = str(Path(__file__).resolve().parents[1] / ".venv" / "bin" / "alembic")


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, ("development", "upgrade", True, "default")),
        ({"APP_ENV": "production"}, ("production", "check", False, "environment variable APP_ENV")),
        (
            {"ENVIRONMENT": "Production"},
            ("Production", "check", False, "environment variable ENVIRONMENT"),
        ),
        ({"ENV": "prod"}, ("prod", "check", False, "environment variable ENV")),
        (
            {"DEPLOY_ENV": "staging"},
            ("staging", "upgrade", True, "environment variable DEPLOY_ENV"),
        ),
        (
            {"ALEMBIC_AUTOLOCK_ENV": "staging", "APP_ENV": "production"},
            ("staging", "upgrade", True, "environment variable ALEMBIC_AUTOLOCK_ENV"),
        ),
        (
            {"APP_ENV": "prod-eu", "ALEMBIC_AUTOLOCK_PRODUCTION_ENVIRONMENTS": "prod*"},
            ("prod-eu", "check", False, "environment variable APP_ENV"),
        ),
        ({"APP_ENV": "prod-eu"}, ("prod-eu", "upgrade", True, "environment variable APP_ENV")),
        (
            {"APP_ENV": "production", "ALEMBIC_AUTOLOCK_MODE": "upgrade"},
            ("production", "upgrade", False, "environment variable APP_ENV"),
        ),
    ],
)
def test_environment_sources_and_their_defaults(
    environ: dict[str, str], expected: tuple[str, str, bool, str]
) -> None:
    """Where the environment is read from (setting, ALEMBIC_AUTOLOCK_ENV, the platforms'
    variables), compared case-insensitively and against glob patterns; production defaults
    mode to check and refuses downgrades."""
    s = resolve_settings({}, None, environ=environ)
    assert (s.environment, s.mode, s.allow_downgrade, s.source("environment")) == expected


# (environment, mode setting, operation) -> what happens, on an empty database
POLICY = [
    ("development", None, "ensure", "upgraded"),
    ("development", "check", "ensure", "PendingMigrations"),
    ("development", "off", "ensure", "skipped"),
    ("development", None, "downgrade", "downgraded"),
    ("production", None, "ensure", "PendingMigrations"),
    ("production", "upgrade", "ensure", "upgraded"),
    ("production", "off", "ensure", "skipped"),
    ("production", None, "upgrade", "upgraded"),  # an explicit upgrade is an operator's decision
    ("production", None, "downgrade", "GateClosed"),
    ("production", "upgrade", "downgrade", "GateClosed"),
]


@pytest.mark.parametrize(("environment", "mode", "operation", "outcome"), POLICY)
def test_policy_table(
    environment: str,
    mode: str | None,
    operation: str,
    outcome: str,
    pg_url: str,
    make_ini: Any,
    make_engine: Any,
    trace: Any,
) -> None:
    """The policy table: environment x mode x operation -> allowed, refused or checked."""
    engine = make_engine(pg_url)
    ini = make_ini(pg_url)
    settings: dict[str, Any] = {"environment": environment}
    if mode is not None:
        settings["mode"] = mode
    if operation == "downgrade":  # from head, in development
        ensure_migrated(engine, config=ini, environment="development")
        trace.path.unlink()
    try:
        if operation == "ensure":
            got = ensure_migrated(engine, config=ini, **settings).action
        elif operation == "upgrade":
            got = upgrade(engine, config=ini, **settings).action
        else:
            got = downgrade(engine, "r4", config=ini, **settings).action
    except (PendingMigrations, GateClosed) as exc:
        got = type(exc).__name__
    assert got == outcome
    expected_heads = {
        "upgraded": {"r5"},
        "downgraded": {"r4"},
        "GateClosed": {"r5"},
        "PendingMigrations": set(),
        "skipped": set(),
    }[outcome]
    assert heads_of(pg_url) == expected_heads
    if outcome in ("PendingMigrations", "skipped", "GateClosed"):
        assert trace.lines() == []  # nothing ran


def test_pending_migrations_names_each_revision_and_where_check_came_from(
    pg_url: str, make_ini: Any, make_engine: Any
) -> None:
    """In production, ensure_migrated lists every pending revision with its message, the
    command that applies them, and the setting that lets this process migrate."""
    with pytest.raises(PendingMigrations) as info:
        ensure_migrated(make_engine(pg_url), config=make_ini(pg_url), environment="production")
    text = str(info.value)
    assert [rev for rev, _ in info.value.pending] == ALL_REVS
    assert "r1 (table t1)" in text
    assert "mode = check, from default for environment 'production'" in text
    assert "ALEMBIC_AUTOLOCK_MODE=upgrade" in text
    assert info.value.command.endswith(" upgrade head")


def test_two_heads_get_a_command_that_works(
    tmp_path: Path, pg_url: str, make_engine: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """A history with two heads: the command PendingMigrations gives applies both (the
    default target of `alembic-autolock upgrade` is heads)."""
    versions = tmp_path / "two" / "versions"
    versions.mkdir(parents=True)
    (tmp_path / "two" / "env.py").write_text(
        "from alembic_autolock.env import run_migrations\nrun_migrations()\n"
    )
    for rev, down in (("a1", None), ("b1", "a1"), ("c1", "a1")):
        (versions / f"{rev}.py").write_text(
            f'"""{rev}"""\nrevision = {rev!r}\ndown_revision = {down!r}\n'
            "branch_labels = None\ndepends_on = None\n"
            "def upgrade():\n    pass\n\ndef downgrade():\n    pass\n"
        )
    ini = tmp_path / "alembic.ini"
    ini.write_text(f"[alembic]\nscript_location = {tmp_path / 'two'}\nsqlalchemy.url = {pg_url}\n")
    with pytest.raises(PendingMigrations) as info:
        ensure_migrated(make_engine(pg_url), config=str(ini), mode="check")
    assert info.value.command == f"alembic-autolock -c {ini} upgrade heads"
    argv = info.value.command.split()[1:]
    assert main(argv) == 0
    assert capsys.readouterr().out.startswith("upgraded: applied a1, ")
    assert heads_of(pg_url) == {"b1", "c1"}


def test_plain_alembic_downgrade_refused_in_production_before_connecting(
    make_ini: Any, tmp_path: Path
) -> None:
    """`alembic downgrade` in production is refused with one line naming the setting, before
    any lock or connection: against a database that does not even exist."""
    ini = make_ini("postgresql+psycopg2://postgres@127.0.0.1:1/nowhere")
    out = subprocess.run(
        [ALEMBIC, "-c", ini, "downgrade", "-1"],
        capture_output=True,
        text=True,
        env=worker_env(APP_ENV="production"),
        timeout=60,
        check=False,
    )
    assert out.returncode == 255
    assert (
        out.stdout.strip()
        .splitlines()[-1]
        .startswith("FAILED: downgrade refused in environment 'production'")
    )
    assert "ALEMBIC_AUTOLOCK_ALLOW_DOWNGRADE=true" in out.stdout
    assert "Traceback" not in out.stdout + out.stderr


def test_cli_downgrade_refused_in_production_before_connecting(
    make_ini: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`alembic-autolock downgrade` in production: one FAILED line, exit 2, no connection."""
    monkeypatch.setenv("ENVIRONMENT", "production")
    ini = make_ini("postgresql+psycopg2://postgres@127.0.0.1:1/nowhere")
    assert main(["-c", ini, "downgrade", "base"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("FAILED: downgrade refused in environment 'production'")


def test_mode_off_touches_no_database(make_ini: Any, make_engine: Any) -> None:
    """mode = off returns skipped without connecting (the database here does not exist)."""
    url = "postgresql+psycopg2://postgres@127.0.0.1:1/nowhere"
    assert ensure_migrated(make_engine(url), config=make_ini(url), mode="off").action == "skipped"


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("mode", "sometimes", "expected one of off, check, upgrade"),
        ("environment", "   ", "environment name"),
        ("production_environments", ",", "at least one environment name"),
    ],
)
def test_bad_policy_values_are_config_errors(setting: str, value: str, message: str) -> None:
    """A mode, environment or production list that makes no sense: ConfigError naming the
    key and what is allowed."""
    with pytest.raises(ConfigError) as info:
        resolve_settings({setting: value}, None, environ={})
    assert info.value.key == setting and message in str(info.value)


def test_install_again_with_other_settings_is_refused(
    pg_url: str, make_ini: Any, make_engine: Any
) -> None:
    """install() twice on one engine: the same arguments are a no-op, others a ConfigError
    naming what differs."""
    engine = make_engine(pg_url)
    ini = make_ini(pg_url)
    install(engine, config=ini, timeout=5)
    install(engine, config=ini, timeout=5)
    with pytest.raises(ConfigError) as info:
        install(engine, config=ini, timeout=10)
    assert "differ in: timeout" in str(info.value)
