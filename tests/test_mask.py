"""Masking: secrets in URLs, DSNs, echoed values, ini errors and driver messages never shown.

The first part pins each masking rule; the last part (the output scan) drives every output path
of the library with secret-bearing URLs and checks that no secret comes out anywhere.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from structlog.testing import capture_logs
from support import worker_env

from alembic_autolock import (
    AutolockError,
    ConfigError,
    DatabaseUnavailable,
    LockUnavailable,
    PendingMigrations,
    downgrade,
    ensure_migrated,
    status,
)
from alembic_autolock._config import config_sections, ini_section, load_config, main_option
from alembic_autolock._db import unavailable
from alembic_autolock._mask import is_secret_param, mask_text, mask_url, parse_url, url_secrets
from alembic_autolock._settings import Settings, resolve_settings
from alembic_autolock.cli import main

CLI = str(Path(sys.executable).parent / "alembic-autolock")

# --- URLs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        (
            "postgresql+psycopg2://postgres:S3cr3t@127.0.0.1:5432/db",
            "postgresql+psycopg2://postgres:***@127.0.0.1:5432/db",
        ),
        ("postgresql://u:p%40ss%2Fw@h/db", "postgresql://u:***@h/db"),
        ("mysql+pymysql://root:S3cr3t@127.0.0.1:3306", "mysql+pymysql://root:***@127.0.0.1:3306"),
        ("sqlite:////tmp/app.db", "sqlite:////tmp/app.db"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
    ],
)
def test_userinfo_password_is_masked(url: str, masked: str) -> None:
    """The userinfo password, plain or URL-encoded, becomes ***; a URL without one is kept."""
    assert mask_url(url) == masked
    assert mask_url(make_url(url)) == masked


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("postgresql://u:p@ss@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u:p@ss:w@h:5432/db", "postgresql://u:***@h:5432/db"),
        ("postgresql://u:a@[x]@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u:pa/ss?w#rd@h/db", "postgresql://u:***@h/db"),
    ],
)
def test_unencoded_characters_in_the_password(url: str, masked: str) -> None:
    """A password with unencoded @ : / ? # is masked whole, host shown as what follows it."""
    assert mask_url(url) == masked


def test_an_unencoded_at_sign_is_masked_in_the_url_object_too() -> None:
    """SQLAlchemy takes the tail of such a password for the host: the URL object made from it
    masks that tail as well."""
    assert mask_url(make_url("postgresql://u:p@ss@h/db")) == "postgresql://u:***@h/db"


@pytest.mark.parametrize(
    "name",
    [
        "password",
        "PASSWORD",
        "passwd",
        "pwd",
        "pw",
        "pass",
        "token",
        "access_token",
        "sslpassword",
        "client_secret",
        "secret_key",
        "api_key",
        "apikey",
        "api-key",
        "access_key",
        "private_key_file_pwd",
        "passphrase",
        "credentials",
        "odbc_connect",
    ],
)
def test_secret_query_parameters_are_masked(name: str) -> None:
    """Each secret parameter name (module docstring of _mask) has its value masked."""
    assert is_secret_param(name)
    url = f"postgresql://u@h/db?{name}=S3cr3t&zzz=1"
    assert mask_url(url) == f"postgresql://u@h/db?{name}=***&zzz=1"


@pytest.mark.parametrize(
    "name", ["sslmode", "sslkey", "sslcert", "sslrootcert", "passfile", "application_name", "db"]
)
def test_other_query_parameters_stay_visible(name: str) -> None:
    """File names and ordinary options are not secrets."""
    assert not is_secret_param(name)
    assert mask_url(f"postgresql://u@h/db?{name}=x.pem") == f"postgresql://u@h/db?{name}=x.pem"


def test_repeated_and_encoded_query_secrets() -> None:
    """Every value of a repeated parameter is masked, an encoded one too."""
    url = "postgresql://u@h/db?password=a%26b&password=c&x=1"
    assert mask_url(url) == "postgresql://u@h/db?password=***&password=***&x=1"


def test_a_query_value_that_quotes_a_secret() -> None:
    """A DSN inside a non-secret parameter has its own secrets masked."""
    url = "postgresql://h/db?options=-c%20app.password%3DS3cr3t"
    assert mask_url(url) == "postgresql://h/db?options=-c+app.password%3D***"


def test_a_query_typed_without_its_question_mark() -> None:
    """db&password=... lands in the database name; the password is masked there too."""
    assert mask_url("postgresql://h/db&password=S3cr3t") == "postgresql://h/db%26password%3D***"


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis://:S3cr3t@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("redis://default:S3cr3t@h/0", "redis://default:***@h/0"),
        ("rediss://:S3cr3t@h:6380", "rediss://:***@h:6380"),
        ("redis://h:6379/0?password=S3cr3t", "redis://h:6379/0?password=***"),
        ("unix:///tmp/redis.sock?password=S3cr3t&db=0", "unix:///tmp/redis.sock?db=0&password=***"),
        ("unix://:S3cr3t@/tmp/redis.sock?db=0", "unix://:***@/tmp/redis.sock?db=0"),
        ("redis://name@h/0", "redis://name@h/0"),
    ],
)
def test_redis_urls(url: str, masked: str) -> None:
    """Redis URLs in every form redis-py accepts have their password masked."""
    assert mask_url(url) == masked


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("user:S3cr3t@host/db", "user:***@host/db"),
        ("redis:/:S3cr3t@h:6379", "redis:***@h:6379"),
        ("postgresql//u:S3cr3t@h/db", "postgresql//u:***@h/db"),
        ("postgresql://u:S3cr3t@h:port/db", "postgresql://u:***@h:port/db"),
        (
            "postgresql://u:pw@h:x/db?password=a b&x=1&pwd=zz",
            "postgresql://u:***@h:x/db?password=***&x=1&pwd=***",
        ),
        ("host=h password=S3cr3t dbname=d", "host=h password=*** dbname=d"),
        ("host=h password = 'a b\\'c' dbname=d", "host=h password = *** dbname=d"),
        ("DRIVER={x};SERVER=h;PWD={a;b}}c};UID=u", "DRIVER={x};SERVER=h;PWD=***;UID=u"),
        ("zookeeper", "zookeeper"),
        ("", ""),
        ("a=b, c@d", "a=b, c@d"),
    ],
)
def test_text_that_is_not_a_parseable_url(text: str, masked: str) -> None:
    """No scheme, a mistyped scheme, a bad port, a libpq DSN, an ODBC string: secrets masked,
    the rest shown as written."""
    assert mask_url(text) == masked
    assert mask_url(masked) == masked


def test_masking_twice_changes_nothing() -> None:
    """mask_url is idempotent."""
    for url in (
        "postgresql+psycopg2://postgres:S3cr3t@127.0.0.1:5432/db?password=x&sslmode=require",
        "postgresql://u:p@ss@h/db",
        "postgresql://h/db&password=S3cr3t",
        "user:S3cr3t@host/db",
    ):
        once = mask_url(url)
        assert mask_url(once) == once


def test_mask_text_replaces_every_form_of_a_known_secret() -> None:
    """A driver's message that quotes the password, as is or encoded, is masked."""
    url = "postgresql://u:p@ss word@h/db?sslpassword=k3y-phrase"
    text = "bad p@ss word, p%40ss%20word, p%40ss+word, 'k3y-phrase' at host \"ss word@h\""
    assert mask_text(text, url) == "bad ***, ***, ***, '***' at host \"***@h\""


def test_mask_text_masks_urls_and_dsns_it_quotes() -> None:
    """Without any URL given, a URL or a password=... in the text is still masked."""
    text = "failed: postgresql://u:zz@h/db and password=hello; user=x"
    assert mask_text(text) == "failed: postgresql://u:***@h/db and password=***; user=x"


def test_mask_text_leaves_short_secrets_inside_words() -> None:
    """A one- or two-character password is masked where it stands alone, not inside words."""
    assert mask_text("password x rejected (x)", "postgresql://u:x@h/db") == (
        "password *** rejected (***)"
    )


def test_url_secrets_lists_userinfo_and_query_secrets() -> None:
    """url_secrets finds the password, the unencoded-@ tail and secret query values."""
    assert url_secrets("postgresql://u:p@ss@h/db?token=t0k&x=1", None) == [
        "p",
        "ss",
        "p@ss",
        "t0k",
    ]


# --- parse_url -----------------------------------------------------------------------------


def test_parse_url_returns_the_url() -> None:
    """A good URL comes back as SQLAlchemy's URL."""
    assert parse_url("postgresql://u:pw@h:5432/db", "--url") == make_url(
        "postgresql://u:pw@h:5432/db"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "u:S3cr3t@h/db",
            "--url 'u:***@h/db' is not a URL of the form "
            "dialect+driver://user:password@host:port/database.",
        ),
        (
            "postgresql://u:S3cr@t@h:x/db",
            "--url 'postgresql://u:***@h:x/db' has a port that is not a number.",
        ),
    ],
)
def test_parse_url_errors_are_config_errors_without_the_password(text: str, message: str) -> None:
    """A malformed URL or a non-numeric port is a ConfigError showing the URL masked."""
    with pytest.raises(ConfigError) as info:
        parse_url(text, "--url")
    assert str(info.value) == (
        message + " Characters such as @ : / ? # % in the user name or password must be "
        "URL-encoded (@ as %40, % as %25)."
    )
    assert info.value.__suppress_context__ or info.value.__context__ is None


# --- alembic.ini interpolation --------------------------------------------------------------


def _write_ini(tmp_path: Path, body: str) -> str:
    path = tmp_path / "alembic.ini"
    path.write_text(body)
    return str(path)


def test_a_bare_percent_in_the_ini_is_a_config_error(tmp_path: Path) -> None:
    """A % in sqlalchemy.url gives a ConfigError naming file, section and key, not the value."""
    ini = _write_ini(
        tmp_path, "[alembic]\nscript_location = m\nsqlalchemy.url = postgresql://u:S3%40cr@h/db\n"
    )
    cfg = load_config(ini, environ={})
    expected = (
        f"{ini}: the value of 'sqlalchemy.url' in section [alembic] cannot be read, because a % "
        "in an ini value starts a substitution. Write a literal % as %% (a URL-encoded password "
        "such as p%40ss becomes p%%40ss); %(name)s may only name another key of [alembic] or "
        "of [DEFAULT]."
    )
    for read in (lambda: main_option(cfg, "sqlalchemy.url"), lambda: ini_section(cfg, "alembic")):
        with pytest.raises(ConfigError) as info:
            read()
        assert str(info.value) == expected
        assert (info.value.key, info.value.source) == ("sqlalchemy.url", f"{ini} [alembic]")


def test_a_bare_percent_in_the_autolock_section(tmp_path: Path) -> None:
    """A % in [alembic_autolock] (a lock_url) is reported the same way by resolve_settings."""
    ini = _write_ini(
        tmp_path,
        "[alembic]\nscript_location = m\n\n[alembic_autolock]\n"
        "lock_url = postgresql://u:S3%40cr@h/db\n",
    )
    with pytest.raises(ConfigError) as info:
        config_sections(load_config(ini, environ={}))
    assert "S3" not in str(info.value)
    assert (info.value.key, info.value.source) == ("lock_url", f"{ini} [alembic_autolock]")


def test_a_missing_interpolation_key_is_reported_too(tmp_path: Path) -> None:
    """%(name)s naming no key is the same kind of error, again without the raw value."""
    ini = _write_ini(tmp_path, "[alembic]\nscript_location = %(nowhere)s/S3cr3t\n")
    with pytest.raises(ConfigError) as info:
        status(create_engine("sqlite://"), config=ini)
    assert "S3cr3t" not in str(info.value)
    assert info.value.key == "script_location"


def test_doubled_percent_reads_back_as_one(tmp_path: Path) -> None:
    """%% is the documented way to write a %: it reads back as one."""
    ini = _write_ini(tmp_path, "[alembic]\nsqlalchemy.url = postgresql://u:S3%%40cr@h/db\n")
    assert main_option(load_config(ini, environ={}), "sqlalchemy.url") == (
        "postgresql://u:S3%40cr@h/db"
    )


# --- settings ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "shown"),
    [
        ("lock", "redis:/:S3cr3t@h:6379", "'redis:***@h:6379'"),
        ("lock", "redis://:S3cr3t@h:port/0", "'redis://:***@h:port/0'"),
        ("lock_url", "postgres:S3cr3t@h/db", "'postgres:***@h/db'"),
        ("lock_url", "postgresql://u:S3cr3t@h:port/db", "'postgresql://u:***@h:port/db'"),
        ("lock_url", "not a url with password S3cr3t", "<redacted>"),
        ("mode", "password=S3cr3t", "'password=***'"),
    ],
)
def test_invalid_setting_values_are_echoed_masked(key: str, value: str, shown: str) -> None:
    """A bad value is shown masked in the message and in ConfigError.value."""
    with pytest.raises(ConfigError) as info:
        resolve_settings({key: value}, None, environ={})
    assert str(info.value).startswith(f"invalid value {shown} for setting {key!r} (from keyword")
    assert "S3cr3t" not in str(info.value)
    assert "S3cr3t" not in repr(info.value.value)


def test_a_list_value_quoting_a_url_is_masked() -> None:
    """A non-string value (a TOML list) is shown by its masked repr."""
    with pytest.raises(ConfigError) as info:
        resolve_settings({"lock": ["redis://:S3cr3t@h"]}, None, environ={})
    assert info.value.value == "['redis://:***@h']"


def test_settings_repr_masks_the_urls() -> None:
    """repr(Settings) shows lock and lock_url masked."""
    s = resolve_settings(
        {"lock": "redis://:S3cr3t@h/0", "lock_url": "postgresql://u:S3cr3t@h/db"},
        None,
        environ={},
    )
    assert s.lock == "redis://:S3cr3t@h/0"
    assert repr(s).startswith(
        "Settings(lock='redis://:***@h/0', lock_url='postgresql://u:***@h/db', timeout=30.0,"
    )
    assert "S3cr3t" not in repr(s)
    assert repr(Settings()).startswith("Settings(lock='auto', lock_url=None,")


# --- exceptions ----------------------------------------------------------------------------


def test_database_unavailable_masks_what_the_driver_echoed() -> None:
    """A driver error quoting the password, or the part SQLAlchemy took for the host, is
    masked in DatabaseUnavailable."""
    engine = create_engine("postgresql+psycopg2://postgres:S3cr@t-pw@127.0.0.1:5432/db")
    orig = Exception('could not translate host name "t-pw@127.0.0.1" to address\nmore')
    exc = unavailable(engine, OperationalError("SELECT 1", None, orig))
    assert str(exc) == (
        "cannot connect to postgresql+psycopg2://postgres:***@127.0.0.1:5432/db: could not "
        'translate host name "***@127.0.0.1" to address. Nothing was applied. Check that the '
        "server is running and that the URL, user and password are right."
    )
    assert isinstance(exc, DatabaseUnavailable)
    assert exc.url == "postgresql+psycopg2://postgres:***@127.0.0.1:5432/db"


def test_database_unavailable_masks_a_query_password() -> None:
    """A ?password= secret is masked in the URL and in the driver's text."""
    engine = create_engine("postgresql+psycopg2://postgres@127.0.0.1:5432/db?password=S3cr3t-q")
    orig = Exception('missing "=" after "S3cr3t-q" in connection info string')
    exc = unavailable(engine, OperationalError("SELECT 1", None, orig))
    assert str(exc) == (
        "cannot connect to postgresql+psycopg2://postgres@127.0.0.1:5432/db?password=***: "
        'missing "=" after "***" in connection info string. Nothing was applied. Check that '
        "the server is running and that the URL, user and password are right."
    )


def test_lock_unavailable_masks_the_redis_password() -> None:
    """LockUnavailable masks the Redis URL and any secret the client's error repeats."""
    from alembic_autolock.locks.redis import RedisLock

    lock = RedisLock("redis://:S3cr3t-r@127.0.0.1:1/0?password=S3cr3t-q", "ns", ttl=15)
    exc = lock.unavailable(Exception("AUTH S3cr3t-r / S3cr3t-q refused"))
    assert str(exc) == (
        "cannot reach the Redis lock server at redis://:***@127.0.0.1:1/0?password=*** "
        "(Exception: AUTH *** / *** refused); nothing was applied without the lock. Check that "
        "Redis is running and that the lock URL is right."
    )
    assert (exc.backend, exc.url) == ("redis", "redis://:***@127.0.0.1:1/0?password=***")


# --- the command line ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["--url", "postgres:S3cr3t@127.0.0.1/db", "status"],
            "FAILED: --url 'postgres:***@127.0.0.1/db' is not a URL",
        ),
        (
            ["--url", "postgresql://u:S3cr@t@127.0.0.1:x/db", "status"],
            "FAILED: --url 'postgresql://u:***@127.0.0.1:x/db' has a port that is not a number",
        ),
        (
            ["-x", "url=postgresql://u:S3cr3t@h:x/db", "check"],
            "FAILED: -x url 'postgresql://u:***@h:x/db' has a port that is not a number",
        ),
        (
            ["--url", "nosuchdialect://u:S3cr3t@h/db", "status"],
            "FAILED: cannot use the database URL nosuchdialect://u:***@h/db: Can't load plugin",
        ),
    ],
)
def test_cli_url_errors_are_masked(
    argv: list[str], expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad --url or -x url is one FAILED line with the URL masked, exit status 2."""
    ini = _write_ini(tmp_path, "[alembic]\nscript_location = m\n")
    assert main(["-c", ini, *argv]) == 2
    out = capsys.readouterr()
    assert out.err.startswith(expected)
    assert "S3cr" not in out.err + out.out


def test_cli_ini_percent_is_one_failed_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A % in sqlalchemy.url is a FAILED line naming file, section and key (no traceback)."""
    ini = _write_ini(
        tmp_path, "[alembic]\nscript_location = m\nsqlalchemy.url = postgresql://u:S3%40cr@h/db\n"
    )
    assert main(["-c", ini, "status"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"FAILED: {ini}: the value of 'sqlalchemy.url' in section [alembic]")
    assert "S3" not in err


def test_cli_argument_errors_are_masked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """argparse's "unrecognized arguments" echo of a mistyped option's URL is masked."""
    with pytest.raises(SystemExit) as info:
        main(["status", "--ulr", "postgresql://u:S3cr3t@h/db"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (
        "alembic-autolock: error: unrecognized arguments: --ulr postgresql://u:***@h/db"
    )


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "postgresql+psycopg2://u:S3cr@t@127.0.0.1:x/db",
            "FAILED: the database URL 'postgresql+psycopg2://u:***@127.0.0.1:x/db' has a "
            "port that is not a number.",
        ),
        (
            "postgresql+psycopg2://u:S3cr%40t@127.0.0.1/db",
            "FAILED: {ini}: the value of 'sqlalchemy.url' in section [alembic] cannot be "
            "read, because a % in an ini value starts a substitution.",
        ),
    ],
)
def test_plain_alembic_cli_reports_bad_urls_masked(url: str, expected: str, tmp_path: Path) -> None:
    """`alembic upgrade` through the hook: a bad port or a bare % in sqlalchemy.url ends in a
    ConfigError, reported as Alembic's one FAILED line, that does not show the password."""
    ini = _ini(tmp_path, "alembic.ini", url)
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "alembic"), "-c", ini, "upgrade", "head"],
        capture_output=True,
        text=True,
        env=worker_env(),
        timeout=60,
        check=False,
    )
    assert proc.returncode == 255  # Alembic's exit status for a CommandError
    assert expected.format(ini=ini) in proc.stdout.splitlines()[-1]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "S3cr" not in proc.stderr + proc.stdout
    assert "t@127" not in proc.stderr


# --- the output scan -----------------------------------------------------------------------
#
# Every output path, driven with secret-bearing URLs: events (stdlib records and structlog),
# every exception's text and attributes, the CLI in-process and as a subprocess. Nothing that
# comes out may contain a secret, in any of its encoded forms.

SECRETS = ("S3cr3t-pw", "S3cr3t-q", "S3cr3t-r", "S3cr3t-l", "S3cr3t-m", "S3cr3t@pc")


def _forms(secret: str) -> set[str]:
    return {secret, quote(secret, safe=""), quote(secret, safe=" +"), quote_plus(secret)}


class Outputs:
    """Everything the library emitted during the scan."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def add(self, *texts: object) -> None:
        self.texts.extend(str(t) for t in texts)

    def add_error(self, exc: BaseException) -> None:
        self.add(str(exc), repr(exc), repr(vars(exc)))

    def expect_error(self, kind: type[AutolockError], fn: Any, *args: Any, **kw: Any) -> None:
        with pytest.raises(kind) as info:
            fn(*args, **kw)
        self.add_error(info.value)

    def cli(self, capsys: pytest.CaptureFixture[str], *argv: str) -> int:
        code = main(list(argv))
        out = capsys.readouterr()
        self.add(out.out, out.err)
        return code

    def leaks(self, secrets: tuple[str, ...]) -> list[tuple[str, str]]:
        return [
            (form, text)
            for text in self.texts
            for secret in secrets
            for form in _forms(secret)
            if form in text
        ]


@pytest.fixture
def secret_redis(own_redis: Any) -> str:
    """A Redis that requires the password S3cr3t-r; its URL carries it."""
    import redis

    client = redis.Redis(port=own_redis.port)
    client.config_set("requirepass", "S3cr3t-r")
    client.close()
    return f"redis://:S3cr3t-r@127.0.0.1:{own_redis.port}/0"


def _ini(tmp_path: Path, name: str, url: str, **settings: str) -> str:
    """An ini for the test migrations; url is written as given (a bare % stays bare)."""
    from support import MIGRATIONS

    path = tmp_path / name
    lines = [
        "[alembic]",
        f"script_location = {MIGRATIONS}",
        f"prepend_sys_path = {MIGRATIONS}",
        "path_separator = os",
        f"sqlalchemy.url = {url}",
        "",
        "[alembic_autolock]",
        *(f"{k} = {v.replace('%', '%%')}" for k, v in settings.items()),
        "",
    ]
    path.write_text("\n".join(lines))
    return str(path)


@pytest.mark.postgresql
@pytest.mark.redis
def test_no_output_path_shows_a_secret(
    pg_url: str,
    secret_redis: str,
    tmp_path: Path,
    make_engine: Any,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Events, exceptions, status, status --json, check, holders --json and the CLI process:
    no secret of any URL appears in anything the library emits."""
    base = make_url(pg_url)
    userinfo = base.set(password="S3cr3t-pw").render_as_string(hide_password=False)
    query = base.set(password=None).update_query_dict({"password": "S3cr3t-q"})
    query_url = query.render_as_string(hide_password=False)
    lock_url = base.set(password="S3cr3t-l").render_as_string(hide_password=False)
    unreachable = base.set(port=1, password="S3cr3t-pw").render_as_string(hide_password=False)
    out = Outputs()

    with caplog.at_level(logging.DEBUG, logger="alembic.autolock"):
        # check mode: a % in the ini's sqlalchemy.url, then events and PendingMigrations
        bad_percent = _ini(tmp_path, "percent.ini", "postgresql://u:S3cr3t%40pc@h/db")
        out.expect_error(
            ConfigError, ensure_migrated, make_engine(userinfo), config=bad_percent, mode="check"
        )
        ini = _ini(tmp_path, "check.ini", userinfo.replace("%", "%%"))
        out.expect_error(
            PendingMigrations, ensure_migrated, make_engine(userinfo), config=ini, mode="check"
        )
        # the Redis lock with its password, the database password in the query
        ini_redis = _ini(tmp_path, "redis.ini", query_url.replace("%", "%%"), lock=secret_redis)
        with capture_logs() as logs:
            result = ensure_migrated(make_engine(query_url), config=ini_redis)
        out.add(repr(logs), result)
        # a lock_url with its own password
        ini_lock = _ini(tmp_path, "lock.ini", userinfo.replace("%", "%%"), lock_url=lock_url)
        out.add(ensure_migrated(make_engine(userinfo), config=ini_lock))

        # the CLI, in-process
        assert out.cli(capsys, "-c", ini_redis, "--url", query_url, "status") == 0
        assert out.cli(capsys, "-c", ini_redis, "--url", query_url, "status", "--json") == 0
        assert out.cli(capsys, "-c", ini_redis, "check") == 0
        assert out.cli(capsys, "-c", ini_redis, "holders", "--json") == 0
        assert out.cli(capsys, "-c", ini_lock, "holders", "--json") == 0
        assert out.cli(capsys, "-c", ini_lock, "--url", unreachable, "status") == 2

        # errors
        out.expect_error(DatabaseUnavailable, ensure_migrated, make_engine(unreachable), config=ini)
        wrong = secret_redis.replace("S3cr3t-r", "S3cr3t-m")
        out.expect_error(
            LockUnavailable, downgrade, make_engine(userinfo), "r4", config=ini, lock=wrong
        )
        engine = make_engine(userinfo)
        out.expect_error(
            ConfigError, ensure_migrated, engine, config=ini, lock="redis:/:S3cr3t-m@h"
        )
        out.expect_error(ConfigError, ensure_migrated, engine, config=ini, lock_url="u:S3cr3t-l@h")
        assert out.cli(capsys, "-c", bad_percent, "status") == 2

    # a status --json whose lock server refuses the password
    st = status(make_engine(userinfo), config=ini, lock=wrong)
    out.add(json.dumps(st.as_dict()), st)

    # the CLI as a process
    for argv in (
        ["-c", ini_redis, "--url", query_url, "status", "--json"],
        ["-c", ini_lock, "--url", userinfo, "check"],
        ["-c", bad_percent, "status"],
        ["-c", ini, "status", "--ulr", userinfo],
    ):
        proc = subprocess.run(
            [CLI, *argv], capture_output=True, text=True, env=worker_env(), timeout=60, check=False
        )
        out.add(proc.stdout, proc.stderr)

    records = [r for r in caplog.records if r.name == "alembic.autolock"]
    out.add(*(r.getMessage() for r in records))
    out.add(*(repr(getattr(r, "autolock_fields", None)) for r in records))

    assert out.leaks(SECRETS) == []
    scanned = "\n".join(out.texts)
    # the scan saw what it was meant to see
    for seen in (
        "check.pending",
        "lock.acquired",
        "migration.completed",
        "password=***",
        ":***@",
        "cannot connect to",
        "cannot reach the Redis lock server",
        "invalid value 'redis:***@h'",
        "section [alembic]",
        "unrecognized arguments",
        '"backend": "redis"',
        '"backend": "postgresql"',
    ):
        assert seen in scanned, seen
