"""Masking secrets in URLs and in text that may echo them (placeholder: see the mask branch)."""

from __future__ import annotations

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from .exceptions import ConfigError


def mask_url(url: str | URL) -> str:
    """Render a database or Redis URL with its password replaced by ***."""
    try:
        parsed = make_url(url) if isinstance(url, str) else url
    except Exception:  # not an SQLAlchemy URL (e.g. redis://): mask by hand
        return _mask_generic(str(url))
    return parsed.render_as_string(hide_password=True)


def _mask_generic(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    creds, _, host = rest.rpartition("@")
    user, colon, _password = creds.partition(":")
    return f"{scheme}://{user}{':***' if colon else ''}@{host}"


def mask_text(text: str, *urls: str | URL | None) -> str:
    """``text`` with every password of ``urls`` replaced by ***."""
    for url in urls:
        if url is None:
            continue
        try:
            password = (make_url(url) if isinstance(url, str) else url).password
        except Exception:  # noqa: S112 - not a URL: nothing known to mask
            continue
        if password:
            text = text.replace(str(password), "***")
    return text


def parse_url(text: str | URL, what: str) -> URL:
    """An SQLAlchemy URL, or ConfigError naming ``what`` with the text masked."""
    if isinstance(text, URL):
        return text
    try:
        return make_url(text)
    except (ArgumentError, ValueError):
        raise ConfigError(
            f"invalid {what} {mask_url(text)!r}: expected a URL of the form "
            "dialect+driver://user:password@host:port/database"
        ) from None
