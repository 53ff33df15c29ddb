"""Property tests: masking over random URLs, settings resolution over random layers, and the
lock identities derived from namespaces."""

from __future__ import annotations

import json
import string
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote, quote_plus, urlencode

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from sqlalchemy.engine import URL, make_url
from support import REPO, worker_env

from alembic_autolock import ConfigError
from alembic_autolock._config import load_config
from alembic_autolock._mask import mask_text, mask_url
from alembic_autolock._plan import derive_namespace
from alembic_autolock._settings import LOCK_NAMES, MODES, ON_AHEAD, TRANSACTIONS, resolve_settings
from alembic_autolock.locks.mysql import lock_name
from alembic_autolock.locks.postgresql import advisory_key
from alembic_autolock.locks.redis import key_name

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- masking -------------------------------------------------------------------------------

# Printable text, the URL delimiters among it, and unicode; "*" is left out so that a password
# can never be mistaken for the mask itself.
_PASSWORD_CHARS = st.one_of(
    st.sampled_from("@:/?#%&=+ ;'\"[]{}\\"),
    st.characters(
        blacklist_categories=("Cs", "Cc"), blacklist_characters="*", max_codepoint=0x2FFFF
    ),
)
PASSWORDS = st.text(_PASSWORD_CHARS, min_size=1, max_size=24)
SCHEMES = st.sampled_from(
    ["postgresql", "postgresql+psycopg2", "mysql+pymysql", "redis", "rediss", "mssql+pyodbc"]
)
HOSTS = st.one_of(
    st.from_regex(r"[a-z0-9]([a-z0-9.\-]{0,14}[a-z0-9])?", fullmatch=True),
    st.sampled_from(["127.0.0.1", "[::1]", "db.example.com"]),
)
NAMES = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}", fullmatch=True)
SECRET_PARAMS = st.sampled_from(
    ["password", "passwd", "pwd", "token", "sslpassword", "client_secret", "api_key", "apikey"]
)
PLAIN_PARAMS = st.sampled_from(["sslmode", "application_name", "db", "charset", "connect_timeout"])


@st.composite
def secret_urls(draw: st.DrawFn) -> tuple[str, str, str]:
    """(URL, the password in it, the same URL with an empty password)."""
    password = draw(PASSWORDS)
    user = draw(st.one_of(st.none(), st.text(_PASSWORD_CHARS, max_size=8)))
    where = draw(st.sampled_from(["userinfo", "query", "both"]))
    host = draw(HOSTS)
    port = draw(st.one_of(st.none(), st.integers(1, 65535)))
    database = draw(st.one_of(st.none(), NAMES))
    plain = draw(st.lists(st.tuples(PLAIN_PARAMS, NAMES), max_size=3))
    secret_key = draw(SECRET_PARAMS)

    def build(pw: str) -> str:
        text = draw_scheme + "://"
        if user is not None or where != "query":
            text += quote(user or "", safe="")
            if where != "query":
                text += ":" + quote(pw, safe="")
            text += "@"
        text += host + (f":{port}" if port is not None else "")
        if database is not None:
            text += "/" + database
        query = list(plain) + ([(secret_key, pw)] if where != "userinfo" else [])
        if query:
            text += ("/" if database is None else "") + "?" + urlencode(query)
        return text

    draw_scheme = draw(SCHEMES)
    return build(password), password, build("")


def _forms(secret: str) -> set[str]:
    return {secret, quote(secret, safe=""), quote(secret, safe=" +"), quote_plus(secret)}


def _hidden(secret: str, rest: str) -> bool:
    """Whether a leak of ``secret`` could be told from the rest of the URL: long enough and in
    none of its forms a part of what surrounds it."""
    return len(secret) >= 4 and not any(form in rest for form in _forms(secret))


@SETTINGS
@given(secret_urls())
@example(("postgresql://u:p%40ss@h/db", "p@ss", "postgresql://u:@h/db"))
def test_masked_url_never_contains_the_password(case: tuple[str, str, str]) -> None:
    """For random URLs (password in the userinfo, a secret query parameter or both; drawn from
    printable and unicode text with every URL delimiter, URL-encoded), the mask never contains
    the password, as given or URL-encoded; for the string and the URL object alike."""
    url, password, rest = case
    assume(_hidden(password, rest))
    for masked in (mask_url(url), mask_url(make_url(url))):
        assert not [form for form in _forms(password) if form in masked], masked


@SETTINGS
@given(secret_urls())
def test_masking_is_idempotent(case: tuple[str, str, str]) -> None:
    """Masking a masked URL changes nothing, and a string and its URL object mask alike."""
    url = case[0]
    masked = mask_url(url)
    assert mask_url(masked) == masked
    assert mask_url(make_url(url)) == masked


@SETTINGS
@given(
    password=st.text(
        st.characters(
            blacklist_categories=("Cs", "Cc", "Zl", "Zp"),
            blacklist_characters="*/?#",
            max_codepoint=0x2FFFF,
        ),
        min_size=1,
        max_size=24,
    ),
    host=HOSTS,
    port=st.one_of(st.none(), st.integers(1, 65535)),
    scheme=st.sampled_from(["postgresql://", "redis://", ""]),
)
@example(password="p@ss", host="h", port=None, scheme="postgresql://")
@example(password="a@[x]", host="h", port=5432, scheme="postgresql://")
def test_unencoded_password_is_masked(
    password: str, host: str, port: int | None, scheme: str
) -> None:
    """A password written without URL-encoding (with @ : % & = [ ] and unicode, but no / ? #,
    which cannot be told from a path) is masked whole, with or without a scheme."""
    prefix = scheme
    tail = f"{host}{f':{port}' if port is not None else ''}/db"
    url = f"{prefix}user:{password}@{tail}"
    assume(_hidden(password, f"{prefix}user:@{tail}"))
    masked = mask_url(url)
    assert password not in masked, masked
    assert masked.endswith("@" + tail) or masked.endswith("@" + tail.replace("[", "%5B")), masked
    assert mask_url(masked) == masked


@SETTINGS
@given(secret_urls())
def test_mask_text_removes_every_secret_of_the_url(case: tuple[str, str, str]) -> None:
    """A driver message quoting the password (as is, URL-encoded, repr-quoted) is masked."""
    url, password, _ = case
    assume(len(password) >= 3)
    frame = "driver said <{}> and {} and {!r}"
    assume(not any(form in frame.format("", "", "") for form in _forms(password)))
    text = frame.format(password, quote(password, safe=""), password)
    masked = mask_text(text, url)
    assert password not in masked
    assert quote(password, safe="") not in masked
    assert masked.startswith("driver said <")


# --- settings ------------------------------------------------------------------------------

LAYERS = ("keyword argument", "environment", "ini", "toml")

_SAFE_TEXT = st.text(string.ascii_letters + string.digits + "-_.", min_size=1, max_size=12)


def _cased(word: str) -> st.SearchStrategy[str]:
    return st.sampled_from([word, word.upper(), word.capitalize(), word.replace("-", "_")])


def _seconds() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.integers(0, 10**6),
        st.floats(0, 1e6, allow_nan=False, allow_infinity=False),
        st.sampled_from([0, 0.0, "0", "0.0", "1.5"]),
    )


def _bools() -> st.SearchStrategy[Any]:
    words = ["1", "true", "yes", "on", "0", "false", "no", "off"]
    return st.one_of(st.booleans(), st.sampled_from(words).flatmap(_cased))


def _choice(choices: tuple[str, ...]) -> st.SearchStrategy[Any]:
    return st.sampled_from(choices).flatmap(_cased)


VALID: dict[str, st.SearchStrategy[Any]] = {
    "lock": st.one_of(
        _choice(LOCK_NAMES), st.sampled_from(["redis://h:6379/0", "rediss://:pw@h/1"])
    ),
    "lock_url": st.sampled_from(["", "postgresql://u@h:5432/db", "mysql+pymysql://u:p@h/d"]),
    "timeout": _seconds(),
    "cache_ttl": _seconds(),
    "mode": _choice(MODES),
    "environment": _SAFE_TEXT,
    "production_environments": st.lists(_SAFE_TEXT, min_size=1, max_size=3).map(",".join),
    "allow_downgrade": _bools(),
    "transaction": _choice(TRANSACTIONS),
    "namespace": st.one_of(st.just(""), _SAFE_TEXT),
    "version_table": _SAFE_TEXT,
    "version_table_schema": st.one_of(st.just(""), _SAFE_TEXT),
    "on_ahead": _choice(ON_AHEAD),
    "lock_ttl": _seconds(),
    "orphan_wait": _seconds(),
}


def _expected(key: str, value: Any) -> Any:
    """What resolve_settings should make of a valid ``value`` (the spec, written out)."""
    text = value.strip() if isinstance(value, str) else value
    if key in ("timeout", "cache_ttl", "lock_ttl", "orphan_wait"):
        return float(text)
    if key == "allow_downgrade":
        return text if isinstance(text, bool) else text.lower() in ("1", "true", "yes", "on")
    if key in ("mode", "transaction", "on_ahead"):
        return text.lower().replace("_", "-")
    if key == "lock":
        return text.lower() if text.lower() in LOCK_NAMES else text
    if key == "production_environments":
        return frozenset(t.strip().lower() for t in text.split(",") if t.strip())
    if key in ("lock_url", "namespace", "version_table_schema"):
        return text or None
    return text


def _as_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(value)  # a TOML basic string is JSON-escaped


class Layers:
    """Values per layer, written where they belong: kwargs, an environ, alembic.ini, pyproject."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.values: dict[str, dict[str, Any]] = {layer: {} for layer in LAYERS}

    def resolve(self) -> Any:
        ini = self.directory / "alembic.ini"
        lines = ["[alembic]", "script_location = m", "", "[alembic_autolock]"]
        lines += [f"{k} = {_as_text(v).replace('%', '%%')}" for k, v in self.values["ini"].items()]
        ini.write_text("\n".join(lines) + "\n")
        toml = ["[tool.alembic_autolock]"]
        toml += [f"{k} = {_toml_value(v)}" for k, v in self.values["toml"].items()]
        (self.directory / "pyproject.toml").write_text("\n".join(toml) + "\n")
        environ = {
            f"ALEMBIC_AUTOLOCK_{k.upper()}": _as_text(v)
            for k, v in self.values["environment"].items()
        }
        cfg = load_config(str(ini), environ={})
        return resolve_settings(self.values["keyword argument"], cfg, environ=environ)

    def label(self, layer: str, key: str) -> str:
        return {
            "keyword argument": "keyword argument",
            "environment": f"environment variable ALEMBIC_AUTOLOCK_{key.upper()}",
            "ini": f"{self.directory / 'alembic.ini'} [alembic_autolock]",
            "toml": f"{self.directory / 'pyproject.toml'} [tool.alembic_autolock]",
        }[layer]


@st.composite
def layered_values(draw: st.DrawFn) -> dict[str, dict[str, Any]]:
    """For each layer, valid values for a random subset of the keys."""
    chosen: dict[str, dict[str, Any]] = {layer: {} for layer in LAYERS}
    for key, values in VALID.items():
        for layer in draw(st.lists(st.sampled_from(LAYERS), unique=True, max_size=4)):
            chosen[layer][key] = draw(values)
    return chosen


@SETTINGS
@given(layered_values())
def test_precedence_kwargs_env_ini_toml_default(chosen: dict[str, dict[str, Any]]) -> None:
    """For random layers of valid values, each key takes the value of the highest layer that
    sets it (kwargs > env > ini > toml > default), coerced, with that layer as its source; a 0
    or "" there means what it says rather than falling through."""
    with tempfile.TemporaryDirectory() as tmp:
        layers = Layers(Path(tmp))
        layers.values = chosen
        s = layers.resolve()
        default = type(s)()
        for key in VALID:
            top = next((layer for layer in LAYERS if key in chosen[layer]), None)
            if top is None:
                if key == "allow_downgrade":  # defaults follow the environment
                    assert s.allow_downgrade is (not s.is_production)
                    continue
                if key == "mode":
                    assert s.mode == ("check" if s.is_production else "upgrade")
                    assert s.source(key) == f"default for environment {s.environment!r}"
                    continue
                assert getattr(s, key) == getattr(default, key), key
                assert s.source(key) == "default"
            else:
                assert getattr(s, key) == _expected(key, chosen[top][key]), key
                assert s.source(key) == layers.label(top, key)


@SETTINGS
@given(
    key=st.sampled_from(["timeout", "cache_ttl", "namespace", "lock_url", "version_table_schema"]),
    top=st.sampled_from(LAYERS),
    lower=st.sampled_from(["7", "db-x"]),
)
def test_zero_and_empty_mean_what_they_say(key: str, top: str, lower: str) -> None:
    """0 or "" in a higher layer is that value (0 seconds, no namespace, no lock_url), even
    when a lower layer sets something else."""
    numeric = key in ("timeout", "cache_ttl")
    if numeric:
        lower = "7"
    elif key == "lock_url":
        lower = "postgresql://u@h/db"
    with tempfile.TemporaryDirectory() as tmp:
        layers = Layers(Path(tmp))
        layers.values[top][key] = "0" if numeric else ""
        for below in LAYERS[LAYERS.index(top) + 1 :]:
            layers.values[below][key] = lower
        s = layers.resolve()
        assert getattr(s, key) == (0.0 if numeric else None)
        assert s.source(key) == layers.label(top, key)


def _invalid_seconds() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.floats(max_value=-1e-9, allow_nan=False, allow_infinity=False),
        st.sampled_from(["nan", "inf", "-inf", "-1", "soon", "1s", "", "password=S3cr3tX"]),
        st.text(string.ascii_letters, min_size=1, max_size=6),  # no word of letters is a number
    )


def _not_in(choices: tuple[str, ...]) -> st.SearchStrategy[str]:
    return st.text(string.printable.strip(), max_size=12).filter(
        lambda t: t.strip().lower().replace("_", "-") not in choices
    )


_BOOL_WORDS = ("1", "true", "yes", "on", "0", "false", "no", "off")
INVALID: dict[str, st.SearchStrategy[Any]] = {
    "timeout": _invalid_seconds(),
    "cache_ttl": _invalid_seconds(),
    "lock_ttl": _invalid_seconds(),
    "orphan_wait": _invalid_seconds(),
    "mode": _not_in(MODES),
    "transaction": _not_in(TRANSACTIONS),
    "on_ahead": _not_in(ON_AHEAD),
    "allow_downgrade": _not_in(_BOOL_WORDS),
    "lock": st.one_of(
        _not_in(LOCK_NAMES).filter(
            lambda t: not t.strip().lower().startswith(("redis://", "rediss://", "unix://"))
        ),
        st.sampled_from(["redis:/:S3cr3tX@h", "redis://:S3cr3tX@h:port/0", "zookeeper"]),
    ),
    "lock_url": st.sampled_from(
        ["u:S3cr3tX@h/db", "postgresql://u:S3cr3tX@h:port/db", "S3cr3tX", "postgres//u:S3cr3tX@h"]
    ),
    "environment": st.sampled_from(["", "   "]),
    "version_table": st.sampled_from(["", "   "]),
    "production_environments": st.sampled_from(["", " , ", ",,"]),
}


@SETTINGS
@given(
    key=st.sampled_from(sorted(INVALID)),
    data=st.data(),
    layer=st.sampled_from(LAYERS),
    others=layered_values(),
)
def test_invalid_values_raise_config_error_naming_key_and_source(
    key: str, data: st.DataObject, layer: str, others: dict[str, dict[str, Any]]
) -> None:
    """An invalid value in any layer (not shadowed by a higher one) raises ConfigError naming
    the key and its source, whatever valid values the other keys have; a secret in the value
    is never shown."""
    value = data.draw(INVALID[key])
    with tempfile.TemporaryDirectory() as tmp:
        layers = Layers(Path(tmp))
        layers.values = others
        for higher in LAYERS[: LAYERS.index(layer)]:
            layers.values[higher].pop(key, None)
        layers.values[layer][key] = value
        with pytest.raises(ConfigError) as info:
            layers.resolve()
        error = info.value
        assert (error.key, error.source) == (key, layers.label(layer, key))
        assert repr(key) in str(error) and layers.label(layer, key) in str(error)
        assert "S3cr3tX" not in str(error) and "S3cr3tX" not in repr(error.value)


# --- namespaces and lock keys --------------------------------------------------------------

NAMESPACES = st.text(st.characters(blacklist_categories=("Cs",)), max_size=200)


@SETTINGS
@given(NAMESPACES)
def test_lock_keys_are_in_range(namespace: str) -> None:
    """advisory_key is a signed 64-bit integer, the MySQL name at most 64 characters, the Redis
    key has exactly one non-empty {hash tag}; each the same on every call."""
    key = advisory_key(namespace)
    assert -(2**63) <= key < 2**63 and key == advisory_key(namespace)
    name = lock_name(namespace)
    assert len(name) <= 64 and name.startswith("autolock:") and name == lock_name(namespace)
    redis_key = "lock:" + key_name(namespace)
    assert redis_key.count("{") == 1 and redis_key.count("}") == 1
    tag = redis_key[redis_key.index("{") + 1 : redis_key.index("}")]
    assert tag and key_name(namespace) == key_name(namespace)


@SETTINGS
@given(st.lists(NAMESPACES, min_size=2, max_size=20, unique=True))
def test_different_namespaces_give_different_keys(namespaces: list[str]) -> None:
    """Distinct namespaces get distinct keys in every backend (for the sampled space)."""
    for derive in (advisory_key, lock_name, key_name):
        assert len({derive(ns) for ns in namespaces}) == len(namespaces), derive


# Settings strip their values, so the schema and the table are drawn stripped.
_COMPONENT = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters=":"), max_size=20
).map(str.strip)


def _engine(database: str | None, host: str = "h") -> Any:
    return SimpleNamespace(url=URL.create("postgresql+psycopg2", host=host, database=database))


@SETTINGS
@given(
    first=st.tuples(_COMPONENT.filter(bool), _COMPONENT, _COMPONENT.filter(bool)),
    second=st.tuples(_COMPONENT.filter(bool), _COMPONENT, _COMPONENT.filter(bool)),
    hosts=st.tuples(HOSTS, HOSTS),
)
def test_derived_namespace_is_the_database_schema_and_table(
    first: tuple[str, str, str], second: tuple[str, str, str], hosts: tuple[str, str]
) -> None:
    """The namespace depends on the database, the version table's schema and the version table
    (without ":" in them, different triples never collide), and not on the host."""

    def derive(triple: tuple[str, str, str], host: str) -> str:
        database, schema, table = triple
        s = resolve_settings(
            {"version_table": table, "version_table_schema": schema}, None, environ={}
        )
        return derive_namespace(s, _engine(database, host))

    assert derive(first, hosts[0]) == derive(first, hosts[1])
    if first != second:
        assert derive(first, hosts[0]) != derive(second, hosts[0])


def test_colons_in_names_can_make_two_namespaces_one() -> None:
    """Pinned, as found while writing the property above (hence its ":"-free names): the
    namespace joins its parts with ":", so (a:b, "", t) and (a, b:, t) share one lock. Only
    more serialisation results (never two migrators at once), and changing the format would
    split the lock between versions during a rolling deploy, so it stays."""

    def derive(database: str, schema: str) -> str:
        s = resolve_settings({"version_table_schema": schema}, None, environ={})
        return derive_namespace(s, _engine(database))

    assert derive("a:b", "") == derive("a", "b:") == "alembic_autolock:a:b::alembic_version"


_SAMPLES = [
    "",
    "alembic_autolock:app::alembic_version",
    "alembic_autolock:/srv/app.db::alembic_version",
    "ünïcödé:名前:🔒",
    "x" * 500,
    "a:b",
    "a\x00b",
]


def test_keys_are_the_same_in_another_process() -> None:
    """A fresh interpreter (another hash seed) derives the same keys: the lock is shared."""
    code = (
        "import json, sys\n"
        "from alembic_autolock.locks.postgresql import advisory_key\n"
        "from alembic_autolock.locks.mysql import lock_name\n"
        "from alembic_autolock.locks.redis import key_name\n"
        "names = json.loads(sys.stdin.read())\n"
        "print(json.dumps([[advisory_key(n), lock_name(n), key_name(n)] for n in names]))\n"
    )
    for seed in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-c", code],
            input=json.dumps(_SAMPLES),
            capture_output=True,
            text=True,
            env=worker_env(PYTHONHASHSEED=seed),
            cwd=REPO,
            timeout=60,
            check=True,
        )
        theirs = json.loads(out.stdout)
        ours = [[advisory_key(n), lock_name(n), key_name(n)] for n in _SAMPLES]
        assert theirs == ours
