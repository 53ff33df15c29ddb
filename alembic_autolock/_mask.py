"""Keeping secrets out of everything the library shows: messages, events, the CLI's output.

Every URL and every echoed value goes through :func:`mask_url`; free text that may quote a
secret (a database driver's error message) goes through :func:`mask_text`, which also replaces
every secret of the URLs it is given. A secret is replaced by ``***``.

What is a secret:

* the password of a URL's userinfo, ``scheme://user:PASSWORD@host``. As SQLAlchemy reads a URL,
  the password runs to the first ``@``; when the host part then holds another ``@`` (a password
  with an unencoded ``@``, ``user:p@ss@host``), the mask runs on to the last ``@`` before the
  path. The same holds for a URL without a scheme (``user:PASSWORD@host/db``) or with a
  mistyped one (``redis:/:PASSWORD@host``). Only a password with both an unencoded ``@`` and an
  unencoded ``/``, ``?`` or ``#`` cannot be told from a path: URL-encode such a password.
* the value of every query parameter and every ``key=value`` pair (a libpq DSN
  ``password=xyz``, an ODBC string ``PWD={xyz}``) whose name, read case-insensitively with
  ``-`` as ``_``, is ``pw``, ``pass`` or ``odbc_connect`` (a whole ODBC connection string), or
  contains ``password`` (``sslpassword``, the passphrase of ``sslkey``), ``passwd``, ``pwd``,
  ``secret``, ``token`` (``access_token``), ``passphrase``, ``credential``, ``apikey`` or
  ``api_key``, ``accesskey`` or ``access_key``, ``privatekey`` or ``private_key``.

File names are not secrets and stay visible: ``sslkey``, ``sslcert``, ``sslrootcert``,
``passfile``. A user name is not a secret either (``redis://name@host`` has no password).

``mask_url`` runs on every first call of ``ensure_migrated``: it costs a few microseconds, and
this module imports nothing that ``sqlalchemy.engine`` has not already imported.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, quote_plus, unquote, unquote_plus

if TYPE_CHECKING:  # SQLAlchemy is imported when a URL is parsed, not with this module (the
    # CLI's fast check and a cold start at head mask nothing)
    from sqlalchemy.engine import URL

from .exceptions import ConfigError

__all__ = ["MASK", "is_secret_param", "mask_text", "mask_url", "parse_url", "url_secrets"]

MASK = "***"

_SECRET_NAMES = frozenset({"pw", "pass", "odbc_connect"})
_SECRET_PART = re.compile(
    "password|passwd|pwd|secret|token|passphrase|credential|apikey|api_key|accesskey|access_key"
    "|privatekey|private_key"
)

# "scheme://" at the start of a value (leading blanks allowed).
_SCHEME = re.compile(r"\s*[A-Za-z][A-Za-z0-9+.\-]*://")

# The patterns below are needed only for text that is not a URL object (not on the path of a
# first ensure_migrated): they are compiled on first use, through re's own cache.

# A URL inside free text: it runs to the next blank or quote.
_EMBEDDED_URL = r"(?<![\w+.\-])[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>]*"
# key=value, as in a query string, a libpq DSN (values may be '...' quoted with \ escapes) or an
# ODBC string (values may be {...} quoted). A plain value ends at a blank, ; or & (an & followed
# by a piece without "=" is taken for part of the value: an unencoded & in a password).
_KEY_VALUE = r"""(?x)(?<![\w.\-%])(?P<key>[A-Za-z_][\w.\-%]*)\s*=\s*
    (?P<value>'(?:[^'\\]|\\.)*'?
             |"(?:[^"\\]|\\.)*"?
             |\{(?:[^}]|\}\})*\}?
             |[^\s;&'"]*(?:&[^\s;&='"]*(?=[\s;&'"]|$))*)"""
# SQLAlchemy's URL pattern (sqlalchemy.engine.url._parse_url). SQLAlchemy only matches it at the
# start of the text and drops whatever it did not match (after "[::1]x", or a newline in the
# query): such text is masked as text, never rendered from the part SQLAlchemy kept.
_SQLALCHEMY_URL = r"""(?x)(?P<name>[\w\+]+)://
    (?:(?P<username>[^:/]*)(?::(?P<password>[^@]*))?@)?
    (?:(?:\[(?P<ipv6host>[^/\?]+)\]|(?P<ipv4host>[^/:\?]+))?(?::(?P<port>[^/\?]*))?)?
    (?:/(?P<database>[^\?]*))?
    (?:\?(?P<query>.*))?"""


def is_secret_param(name: str) -> bool:
    """Whether a query parameter or DSN key of this name holds a secret (module docstring)."""
    key = name.strip().lower().replace("-", "_")
    if "%" in key or "+" in key:
        key = unquote_plus(key)
    return key in _SECRET_NAMES or _SECRET_PART.search(key) is not None


def mask_url(url: str | URL) -> str:
    """``url`` (a URL, or any value that may be one or may be a DSN) with its secrets masked.

    A URL that SQLAlchemy can parse is rendered by SQLAlchemy (so a string and the URL object
    made from it mask alike); any other text keeps its form, with every secret found replaced.
    Masking a masked value changes nothing.
    """
    if not isinstance(url, str):
        return _render_masked(url)
    text = url
    parsed = _parse_quietly(text)
    if parsed is not None:
        return _render_masked(parsed)
    return _mask_spans(text, _loose_spans(text))


def mask_text(text: str, *urls: str | URL | None) -> str:
    """Free text with every secret of ``urls`` replaced (also in its URL-encoded, quoted or
    escaped forms), and every URL or ``key=value`` secret it quotes itself masked.

    A secret of one or two characters is replaced only where it stands alone (not inside a
    word), so that a trivial password does not garble the message.
    """
    for form in _forms(url_secrets(*urls)):
        if len(form) >= 3:
            text = text.replace(form, MASK)
        else:
            text = re.sub(rf"(?<![^\W_]){re.escape(form)}(?![^\W_])", MASK, text)
    if "://" in text:
        text = re.sub(_EMBEDDED_URL, lambda m: _mask_spans(m[0], _loose_spans(m[0])), text)
    if "=" in text:
        text = _mask_spans(text, _key_value_spans(text))
    return text


def url_secrets(*urls: str | URL | None) -> list[str]:
    """Every secret in ``urls``: userinfo passwords and secret query values, as SQLAlchemy reads
    them and, for a string, as written."""
    found: list[str] = []
    for url in urls:
        if url is None:
            continue
        parsed = _parse_quietly(url) if isinstance(url, str) else url
        if parsed is not None:
            found.extend(_parsed_secrets(parsed))
        if isinstance(url, str):
            for start, end in _loose_spans(url):
                found.append(url[start:end])
                found.append(_unquote_value(url[start:end]))
    return [s for s in dict.fromkeys(found) if s and s != MASK]


def parse_url(text: str, what: str, *, key: str | None = None, source: str | None = None) -> URL:
    """``make_url(text)``, with a malformed URL or a port that is not a number turned into a
    ConfigError that names ``what`` (e.g. ``"--url"``) and shows the URL masked."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(text)
    except ArgumentError:
        problem = "is not a URL of the form dialect+driver://user:password@host:port/database"
    except ValueError:  # int() of the port
        problem = "has a port that is not a number"
    masked = mask_url(text)
    raise ConfigError(
        f"{what} {masked!r} {problem}. Characters such as @ : / ? # % in the user name or "
        "password must be URL-encoded (@ as %40, % as %25).",
        key=key,
        value=masked,
        source=source,
    )


# --- internals -----------------------------------------------------------------------------


def _parse_quietly(text: str) -> URL | None:
    """The URL that SQLAlchemy reads from all of ``text``; None if it reads none or only part."""
    if "://" not in text:
        return None
    match = re.match(_SQLALCHEMY_URL, text)
    if match is None or match.end() != len(text):
        return None
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(text)
    except (ArgumentError, ValueError):  # a port that is not a number
        return None


def _render_masked(url: URL) -> str:
    changes: dict[str, Any] = {}
    host = url.host
    if host is not None and "@" in host:
        # SQLAlchemy ends the password at its first "@": the rest of a password with an
        # unencoded "@" is taken for the start of the host. Show only what follows the last "@".
        changes["host"] = host.rpartition("@")[2]
    database = url.database
    if database is not None and ("=" in database or "@" in database):
        masked = _mask_spans(database, _loose_spans(database))
        if masked != database:  # a query typed without its "?": db&password=...
            changes["database"] = masked
    query = url.query
    if query and any(is_secret_param(k) or _suspect(v) for k, v in query.items()):
        changes["query"] = {k: _masked_param(k, v) for k, v in query.items()}
    text = (url.set(**changes) if changes else url).render_as_string(hide_password=True)
    # SQLAlchemy URL-encodes the mask in a query value or a database name: show it as ***.
    return text.replace("%2A%2A%2A", MASK) if "%2A%2A%2A" in text else text


def _suspect(value: str | tuple[str, ...]) -> bool:
    """A query value that may itself carry a secret (a DSN, a URL)."""
    values = (value,) if isinstance(value, str) else value
    return any("=" in v or "@" in v for v in values)


def _masked_param(key: str, value: str | tuple[str, ...]) -> str | tuple[str, ...]:
    if is_secret_param(key):
        return MASK if isinstance(value, str) else tuple(MASK for _ in value)
    if isinstance(value, str):
        return _mask_spans(value, _loose_spans(value))
    return tuple(_mask_spans(v, _loose_spans(v)) for v in value)


def _parsed_secrets(url: URL) -> list[str]:
    found = []
    if url.password is not None:
        found.append(str(url.password))
    host = url.host
    if host is not None and "@" in host:  # see _render_masked
        head = host.rpartition("@")[0]
        found.append(head)
        if url.password is not None:
            found.append(f"{url.password}@{head}")
    for key, value in url.query.items():
        values = (value,) if isinstance(value, str) else value
        if is_secret_param(key):
            found.extend(values)
        else:
            for v in values:
                found.extend(v[start:end] for start, end in _loose_spans(v))
    return found


def _forms(secrets: Iterable[str]) -> list[str]:
    """Each secret as it may be quoted: as is, URL-encoded (three ways), by repr(), escaped for
    a libpq DSN; the longest first, so that no longer form is left half replaced."""
    forms: set[str] = set()
    for secret in secrets:
        for form in (
            secret,
            unquote(secret),
            quote(secret, safe=""),
            quote(secret, safe=" +"),
            quote_plus(secret),
            repr(secret)[1:-1],
            secret.replace("\\", "\\\\").replace("'", "\\'"),
        ):
            if form.strip("* \t\r\n"):
                forms.add(form)
    return sorted(forms, key=lambda f: (-len(f), f))


def _loose_spans(text: str) -> list[tuple[int, int]]:
    """Where the secrets of a value are: the userinfo password and secret key=value values."""
    spans = _key_value_spans(text) if "=" in text else []
    if "@" not in text:
        return spans
    scheme = _SCHEME.match(text)
    start = scheme.end() if scheme else 0
    at = text.find("@", start)
    colon = text.find(":", start, at) if at >= 0 else -1
    if colon >= 0:
        stop = len(text)
        for sep in "/?":
            found = text.find(sep, at + 1)
            if 0 <= found < stop:
                stop = found
        last = text.rfind("@", at + 1, stop)
        end = last if last >= 0 else at
        if end > colon + 1:
            spans.append((colon + 1, end))
            start = end
    if scheme:
        query = text.find("?", start)
        if query >= 0:
            spans.extend(_query_spans(text, query + 1))
    return spans


def _query_spans(text: str, start: int) -> list[tuple[int, int]]:
    """The secret values of a query string: each runs to the next & (blanks included), and on
    over any piece without "=" (an unencoded & in the value)."""
    spans = []
    pieces = text[start:].split("&")
    pos = start
    secret_from: int | None = None
    for piece in pieces:
        key, eq, _ = piece.partition("=")
        if eq:
            if secret_from is not None:
                spans.append((secret_from, pos - 1))
                secret_from = None
            if is_secret_param(key):
                secret_from = pos + len(key) + 1
        pos += len(piece) + 1
    if secret_from is not None:
        spans.append((secret_from, len(text)))
    return spans


def _key_value_spans(text: str) -> list[tuple[int, int]]:
    spans = []
    for m in re.finditer(_KEY_VALUE, text):
        if m["value"] and is_secret_param(m["key"]):
            spans.append(m.span("value"))
    return spans


def _mask_spans(text: str, spans: list[tuple[int, int]]) -> str:
    """``text`` with each span (merged where they overlap) replaced by ``***``."""
    merged: list[list[int]] = []
    for start, end in sorted(spans):
        if end <= start:
            continue
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    if not merged:
        return text
    parts = []
    last = 0
    for start, end in merged:
        parts.append(text[last:start])
        parts.append(MASK)
        last = end
    parts.append(text[last:])
    return "".join(parts)


def _unquote_value(value: str) -> str:
    """A DSN value without its quotes and escapes (``'a\\'b'`` is ``a'b``)."""
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    if len(value) >= 2 and value[0] == "{" and value[-1] == "}":
        return value[1:-1].replace("}}", "}")
    return value
