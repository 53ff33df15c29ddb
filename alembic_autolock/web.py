"""Status and trigger endpoints: framework-neutral WSGI and ASGI applications.

::

    from alembic_autolock.web import make_asgi_app, make_wsgi_app

    app.mount("/migrations", make_asgi_app(engine))              # FastAPI / Starlette
    DispatcherMiddleware(flask_app.wsgi_app, {"/migrations": make_wsgi_app(engine)})  # Flask

Routes (relative to where the application is mounted):

* ``GET /status`` (and ``HEAD``): the JSON of :meth:`alembic_autolock.Status.as_dict` (current
  and script heads, pending revisions with their messages, ``at_head``, the lock's holders,
  environment and mode); **200** at head, **503** otherwise, so it serves as a readiness probe.
* ``POST /upgrade`` without a body: what start-up applies (:func:`alembic_autolock.ensure_migrated`
  in upgrade mode: revisions kept for a job, ``autolock_manual``, stay pending and are listed in
  the result with the command that runs them); with ``{"revision": "heads"}`` (or any target)
  :func:`alembic_autolock.upgrade`, which applies those too. ``POST /downgrade`` with
  ``{"revision": "<target>"}``: :func:`alembic_autolock.downgrade`, gated exactly as it is
  (``allow_downgrade``). Each answers ``{"result": {...}}``. They need
  ``Authorization: Bearer <token>``, compared in constant time with the ``web_token`` setting
  (``ALEMBIC_AUTOLOCK_WEB_TOKEN``). Without a configured
  token these routes do not exist (404).

Errors are JSON, ``{"error": {"status": ..., "type": ..., "message": ...}}``: 400 (malformed
body, unknown revision, bad setting), 401 (missing or wrong token), 403 (refused by the
environment policy), 404, 405 (with ``Allow``), 409 (the lock is held by another process, or an
interrupted revision must be resolved first), 413 (body over 64 KiB), 500 (a migration failed,
the lock was lost), 503 (the database or the lock server cannot be reached). Nothing is changed
by a request that gets a 4xx before running.

Settings are resolved once, when the application is made (a bad setting fails then); the
keyword arguments are passed on to every call.

.. versionadded:: 0.2
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import asdict
from typing import Any

from ._config import ConfigLike
from .exceptions import (
    AutolockError,
    ConfigError,
    DatabaseUnavailable,
    GateClosed,
    LockTimeout,
    LockUnavailable,
    MigrationInterrupted,
)

__all__ = ["make_asgi_app", "make_wsgi_app"]

MAX_BODY = 64 * 1024
_JSON = [("Content-Type", "application/json"), ("Cache-Control", "no-store")]
_ROUTES = {"/status": ("GET", "HEAD"), "/upgrade": ("POST",), "/downgrade": ("POST",)}
_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Content Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}

Response = tuple[int, list[tuple[str, str]], bytes]
WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
ASGIApp = Callable[
    [MutableMapping[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
    Awaitable[None],
]


class _HTTPError(Exception):
    def __init__(self, status: int, kind: str, message: str, headers: Iterable[Any] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.headers = list(headers)


def _status_of(exc: AutolockError) -> int:
    if isinstance(exc, GateClosed):
        return 403
    if isinstance(exc, LockTimeout | MigrationInterrupted):
        return 409
    if isinstance(exc, DatabaseUnavailable | LockUnavailable):
        return 503
    if isinstance(exc, ConfigError):
        return 400
    return 500


def _error(status: int, kind: str, message: str, headers: Iterable[Any] = ()) -> Response:
    body = {"error": {"status": status, "type": kind, "message": message}}
    return status, [*_JSON, *headers], json.dumps(body).encode()


def _json(status: int, doc: Any) -> Response:
    return status, list(_JSON), json.dumps(doc, default=str).encode()


class _Endpoints:
    """The routes, independent of the server interface: (method, path, authorization header,
    body) in, (status, headers, body) out. Runs the library's synchronous functions."""

    def __init__(self, engine: Any, config: ConfigLike, settings: dict[str, Any]) -> None:
        from ._plan import prepare

        self.engine = engine
        self.config = config
        self.settings = settings
        self.token = prepare(engine, config, settings).settings.web_token

    def handle(self, method: str, path: str, authorization: str | None, body: bytes) -> Response:
        try:
            return self._route(method, path, authorization, body)
        except _HTTPError as exc:
            return _error(exc.status, exc.kind, str(exc), exc.headers)
        except AutolockError as exc:
            return _error(_status_of(exc), type(exc).__name__, str(exc))
        except Exception as exc:  # one JSON line, never a traceback to the client
            from ._mask import mask_text

            first = (str(exc).strip().splitlines() or [""])[0]
            return _error(500, type(exc).__name__, mask_text(first, self.engine.url))

    def _route(self, method: str, path: str, authorization: str | None, body: bytes) -> Response:
        path = path.rstrip("/") or "/"
        allowed = _ROUTES.get(path)
        if allowed is None or (path != "/status" and self.token is None):
            what = "" if allowed is None else " (no web_token is configured, so writes are off)"
            raise _HTTPError(404, "NotFound", f"no route {path}{what}")
        if method not in allowed:
            raise _HTTPError(
                405,
                "MethodNotAllowed",
                f"{method} is not allowed on {path}; use {', '.join(allowed)}",
                [("Allow", ", ".join(allowed))],
            )
        if path == "/status":
            return self._status()
        self._authorize(authorization)
        request = self._body(body)
        if path == "/upgrade" and "revision" not in request:
            # the trigger as start-up: what ensure_migrated would apply (revisions kept for a
            # job, autolock_manual, stay pending and are listed); an explicit revision runs all
            from ._cold import ensure_migrated

            overrides = {**self.settings, "mode": "upgrade", "cache_ttl": 0}
            result = ensure_migrated(self.engine, config=self.config, **overrides)
            return _json(200, {"result": asdict(result)})
        revision = request.get("revision")
        if not isinstance(revision, str) or not revision.strip():
            raise _HTTPError(
                400,
                "BadRequest",
                'the body must give the target revision: {"revision": "<id>"}'
                if revision is None
                else '"revision" must be a non-empty string',
            )
        from ._runner import downgrade, upgrade

        run = upgrade if path == "/upgrade" else downgrade
        result = run(self.engine, revision.strip(), config=self.config, **self.settings)
        return _json(200, {"result": asdict(result)})

    def _status(self) -> Response:
        from ._runner import status

        st = status(self.engine, config=self.config, **self.settings)
        return _json(200 if st.at_head else 503, st.as_dict())

    def _authorize(self, authorization: str | None) -> None:
        challenge = [("WWW-Authenticate", 'Bearer realm="alembic-autolock"')]
        scheme, _, given = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise _HTTPError(
                401, "Unauthorized", "missing Authorization: Bearer <token>", challenge
            )
        expected = (self.token or "").encode()
        if not hmac.compare_digest(given.strip().encode(), expected):
            raise _HTTPError(401, "Unauthorized", "wrong token", challenge)

    @staticmethod
    def _body(body: bytes) -> dict[str, Any]:
        if not body.strip():
            return {}
        try:
            doc = json.loads(body)
        except (UnicodeDecodeError, ValueError) as exc:
            raise _HTTPError(400, "BadRequest", f"the body is not valid JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise _HTTPError(400, "BadRequest", "the body must be a JSON object")
        return doc


def _is_async_engine(engine: Any) -> bool:
    return type(engine).__name__ == "AsyncEngine" and hasattr(engine, "sync_engine")


def make_wsgi_app(engine: Any, *, config: ConfigLike = None, **settings: Any) -> WSGIApp:
    """A WSGI application serving ``/status``, and ``/upgrade`` and ``/downgrade`` when a
    ``web_token`` is configured, for ``engine`` (an SQLAlchemy Engine)."""
    if _is_async_engine(engine):
        raise ConfigError(
            "make_wsgi_app() takes a synchronous Engine; for an AsyncEngine use make_asgi_app()"
        )
    endpoints = _Endpoints(engine, config, settings)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        method = str(environ.get("REQUEST_METHOD", "GET")).upper()
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        if length > MAX_BODY:
            status, headers, body = _error(
                413, "ContentTooLarge", f"the body is over {MAX_BODY} bytes"
            )
        else:
            data = environ["wsgi.input"].read(length) if length > 0 else b""
            status, headers, body = endpoints.handle(
                method,
                str(environ.get("PATH_INFO") or "/"),
                environ.get("HTTP_AUTHORIZATION"),
                data,
            )
        start_response(
            f"{status} {_REASONS.get(status, '')}".strip(),
            [*headers, ("Content-Length", str(len(body)))],
        )
        return [b"" if method == "HEAD" else body]

    return app


def make_asgi_app(engine: Any, *, config: ConfigLike = None, **settings: Any) -> ASGIApp:
    """An ASGI application with the same routes, for an Engine (each request runs in a worker
    thread) or an AsyncEngine (it awaits the async driver, as ``run_sync`` does)."""
    async_engine = _is_async_engine(engine)
    sync_engine = engine.sync_engine if async_engine else engine
    endpoints = _Endpoints(sync_engine, config, settings)

    async def run(method: str, path: str, authorization: str | None, body: bytes) -> Response:
        if async_engine:
            from ._async import run_in_greenlet

            return await run_in_greenlet(endpoints.handle, method, path, authorization, body)
        return await asyncio.to_thread(endpoints.handle, method, path, authorization, body)

    async def app(
        scope: MutableMapping[str, Any],
        receive: Callable[[], Awaitable[Any]],
        send: Callable[[Any], Awaitable[None]],
    ) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        method = str(scope.get("method", "GET")).upper()
        path = str(scope.get("path") or "/")
        root = str(scope.get("root_path") or "")
        if root and path.startswith(root):  # mounted: the path still carries the mount point
            path = path[len(root) :] or "/"
        authorization = None
        for key, value in scope.get("headers") or ():
            if key.lower() == b"authorization":
                authorization = value.decode("latin-1")
        chunks: list[bytes] = []
        size, too_large = 0, False
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_BODY:
                too_large = True
            elif chunk:
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        if too_large:
            status, headers, body = _error(
                413, "ContentTooLarge", f"the body is over {MAX_BODY} bytes"
            )
        else:
            status, headers, body = await run(method, path, authorization, b"".join(chunks))
        raw = [
            (k.lower().encode(), v.encode())
            for k, v in [*headers, ("Content-Length", str(len(body)))]
        ]
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})

    return app
