"""alembic_autolock.web: the status and trigger endpoints, mounted in a real FastAPI app served
by uvicorn, in a real Flask app, and as a bare WSGI app over a real HTTP server."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import pytest
from support import heads_of, worker_env

from alembic_autolock import migration_lock
from alembic_autolock.exceptions import ConfigError
from alembic_autolock.web import make_asgi_app, make_wsgi_app

TOKEN = "t0ken-for-tests"


class _Quiet(WSGIRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


@contextmanager
def wsgi_server(app: Any) -> Iterator[str]:
    server = make_server("127.0.0.1", 0, app, handler_class=_Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def uvicorn_server(app: Any) -> Iterator[str]:
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(500):
            if server.started:
                break
            threading.Event().wait(0.01)
        assert server.started
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def request(
    base: str,
    method: str,
    path: str,
    *,
    token: str | None = None,
    body: bytes | None = None,
) -> tuple[int, dict[str, str], Any]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(base + path, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            status, got, raw = resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        status, got, raw = exc.code, dict(exc.headers), exc.read()
    return status, got, json.loads(raw) if raw else None


def test_wsgi_over_http_every_status_code(sqlite_url: str, make_ini: Any, make_engine: Any) -> None:
    """The WSGI app over a real HTTP server: 503 then 200 from /status, 401 for a missing or
    wrong token, 400 for a bad body, 404, 405 with Allow, 409 while another holds the lock, 403
    for a gated downgrade, and nothing changed by any of those."""
    ini = make_ini(sqlite_url)
    engine = make_engine(sqlite_url)
    app = make_wsgi_app(engine, config=ini, web_token=TOKEN, timeout=0.2)
    with wsgi_server(app) as base:
        status, _, doc = request(base, "GET", "/status")
        assert (status, doc["at_head"], [p["revision"] for p in doc["pending"]]) == (
            503,
            False,
            ["r1", "r2", "r3", "r4", "r5"],
        )
        assert {"current_heads", "script_heads", "lock", "environment", "mode"} <= set(doc)

        status, headers, doc = request(base, "POST", "/upgrade")
        assert (status, doc["error"]["type"]) == (401, "Unauthorized")
        assert headers["WWW-Authenticate"].startswith("Bearer")
        assert request(base, "POST", "/upgrade", token="wrong")[0] == 401
        status, _, doc = request(base, "POST", "/upgrade", token=TOKEN, body=b"{not json")
        assert (status, doc["error"]["type"]) == (400, "BadRequest")
        assert request(base, "POST", "/upgrade", token=TOKEN, body=b"[1]")[0] == 400
        status, _, doc = request(base, "POST", "/downgrade", token=TOKEN, body=b"{}")
        assert status == 400 and "revision" in doc["error"]["message"]
        status, _, doc = request(
            base, "POST", "/upgrade", token=TOKEN, body=b'{"revision": "nope"}'
        )
        assert (status, doc["error"]["type"]) == (400, "ConfigError")
        assert request(base, "GET", "/nowhere")[0] == 404
        status, headers, _ = request(base, "GET", "/upgrade")
        assert (status, headers["Allow"]) == (405, "POST")
        assert request(base, "DELETE", "/status")[0] == 405
        with migration_lock(engine, config=ini):  # another holder: the trigger cannot wait
            status, _, doc = request(base, "POST", "/upgrade", token=TOKEN)
        assert (status, doc["error"]["type"]) == (409, "LockTimeout")
        assert heads_of(sqlite_url) == set()  # nothing changed so far

        status, _, doc = request(base, "POST", "/upgrade", token=TOKEN, body=b'{"revision": "r4"}')
        assert (status, doc["result"]["action"], doc["result"]["applied"]) == (
            200,
            "upgraded",
            ["r1", "r2", "r3", "r4"],
        )
        status, _, doc = request(base, "POST", "/upgrade", token=TOKEN)
        assert (status, doc["result"]["applied"], doc["result"]["heads"]) == (200, ["r5"], ["r5"])
        assert request(base, "GET", "/status")[0] == 200
        assert request(base, "HEAD", "/status")[0] == 200

    production = make_wsgi_app(engine, config=ini, web_token=TOKEN, environment="production")
    with wsgi_server(production) as base:
        status, _, doc = request(
            base, "POST", "/downgrade", token=TOKEN, body=b'{"revision": "r4"}'
        )
        assert (status, doc["error"]["type"]) == (403, "GateClosed")
        assert heads_of(sqlite_url) == {"r5"}


def test_without_a_token_the_write_routes_do_not_exist(
    sqlite_url: str, make_ini: Any, make_engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No web_token: POST /upgrade is a 404; the token may also come from the environment."""
    ini = make_ini(sqlite_url)
    engine = make_engine(sqlite_url)
    with wsgi_server(make_wsgi_app(engine, config=ini)) as base:
        status, _, doc = request(base, "POST", "/upgrade", token=TOKEN)
        assert status == 404 and "web_token" in doc["error"]["message"]
    monkeypatch.setenv("ALEMBIC_AUTOLOCK_WEB_TOKEN", TOKEN)
    with wsgi_server(make_wsgi_app(engine, config=ini)) as base:
        assert request(base, "POST", "/upgrade", token=TOKEN)[0] == 200
    assert heads_of(sqlite_url) == {"r5"}


def test_mounted_in_fastapi_over_uvicorn(sqlite_url: str, make_ini: Any, make_engine: Any) -> None:
    """make_asgi_app() mounted under /migrations of a FastAPI app served by uvicorn."""
    from fastapi import FastAPI

    ini = make_ini(sqlite_url)
    api = FastAPI()

    @api.get("/hello")
    def hello() -> dict[str, str]:
        return {"hello": "world"}

    api.mount("/migrations", make_asgi_app(make_engine(sqlite_url), config=ini, web_token=TOKEN))
    with uvicorn_server(api) as base:
        assert request(base, "GET", "/hello")[2] == {"hello": "world"}
        assert request(base, "GET", "/migrations/status")[0] == 503
        assert request(base, "POST", "/migrations/upgrade", token="nope")[0] == 401
        assert request(base, "GET", "/migrations/upgrade")[0] == 405
        assert request(base, "GET", "/migrations/other")[0] == 404
        status, _, doc = request(base, "POST", "/migrations/upgrade", token=TOKEN)
        assert (status, doc["result"]["heads"]) == (200, ["r5"])
        status, _, doc = request(base, "GET", "/migrations/status")
        assert (status, doc["at_head"]) == (200, True)


def test_mounted_in_flask(sqlite_url: str, make_ini: Any, make_engine: Any) -> None:
    """make_wsgi_app() mounted under /migrations of a Flask app (DispatcherMiddleware)."""
    from flask import Flask
    from werkzeug.middleware.dispatcher import DispatcherMiddleware

    ini = make_ini(sqlite_url)
    flask_app = Flask(__name__)
    flask_app.add_url_rule("/hello", "hello", lambda: {"hello": "world"})
    flask_app.wsgi_app = DispatcherMiddleware(  # type: ignore[method-assign]
        flask_app.wsgi_app,
        {"/migrations": make_wsgi_app(make_engine(sqlite_url), config=ini, web_token=TOKEN)},
    )
    client = flask_app.test_client()
    assert client.get("/hello").json == {"hello": "world"}
    assert client.get("/migrations/status").status_code == 503
    auth = {"Authorization": f"Bearer {TOKEN}"}
    bad = client.post("/migrations/upgrade", data=b"{", headers=auth)
    assert (bad.status_code, bad.json["error"]["type"]) == (400, "BadRequest")
    done = client.post("/migrations/upgrade", json={"revision": "r2"}, headers=auth)
    assert (done.status_code, done.json["result"]["applied"]) == (200, ["r1", "r2"])
    status = client.get("/migrations/status")
    assert (status.status_code, status.json["current_heads"]) == (503, ["r2"])


def test_asgi_with_an_async_engine(sqlite_url: str, make_ini: Any) -> None:
    """An AsyncEngine (aiosqlite) is served by awaiting its driver."""
    from sqlalchemy.ext.asyncio import create_async_engine

    ini = make_ini(sqlite_url)
    engine = create_async_engine(sqlite_url.replace("sqlite://", "sqlite+aiosqlite://"))
    app = make_asgi_app(engine, config=ini, web_token=TOKEN)

    async def call(method: str, path: str, headers: list[tuple[bytes, bytes]]) -> tuple[int, Any]:
        sent: list[dict[str, Any]] = []
        incoming = [{"type": "http.request", "body": b"", "more_body": False}]

        async def receive() -> dict[str, Any]:
            return incoming.pop(0)

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "method": method, "path": path, "headers": headers}
        await app(scope, receive, send)
        return sent[0]["status"], json.loads(sent[1]["body"])

    async def scenario() -> list[int]:
        try:
            auth = [(b"authorization", f"Bearer {TOKEN}".encode())]
            first = (await call("GET", "/status", []))[0]
            upgraded = (await call("POST", "/upgrade", auth))[0]
            after = (await call("GET", "/status", []))[0]
            return [first, upgraded, after]
        finally:
            await engine.dispose()

    assert asyncio.run(scenario()) == [503, 200, 200]
    with pytest.raises(ConfigError, match="make_asgi_app"):
        make_wsgi_app(engine, config=ini)


def test_importing_the_library_imports_nothing_web(sqlite_url: str, make_ini: Any) -> None:
    """`import alembic_autolock` and a run at head import neither the operator surfaces nor
    prometheus_client, a web framework or an HTTP client."""
    code = (
        "import sys\n"
        "import alembic_autolock\n"
        "from sqlalchemy import create_engine\n"
        f"alembic_autolock.ensure_migrated(create_engine({sqlite_url!r}), "
        f"config={make_ini(sqlite_url)!r})\n"
        "heavy = ['prometheus_client', 'starlette', 'fastapi', 'flask', 'werkzeug', 'uvicorn',\n"
        "         'jsonschema', 'urllib.request', 'http.server', 'wsgiref',\n"
        "         'alembic_autolock.web', 'alembic_autolock.metrics', 'alembic_autolock.cli']\n"
        "print([name for name in heavy if name in sys.modules])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=worker_env(),
        timeout=60,
        check=False,
    )
    assert (out.returncode, out.stdout.strip()) == (0, "[]"), out.stderr


def test_asgi_lifespan_large_bodies_and_unexpected_errors(
    sqlite_url: str, make_ini: Any, make_engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ASGI app answers the lifespan protocol; a body over 64 KiB is a 413 (ASGI and
    WSGI); an unexpected error is a 500 with one masked line, never a traceback."""
    ini = make_ini(sqlite_url)
    engine = make_engine(sqlite_url)
    app = make_asgi_app(engine, config=ini, web_token=TOKEN)

    async def drive(scope: dict[str, Any], incoming: list[dict[str, Any]]) -> list[Any]:
        sent: list[Any] = []

        async def receive() -> dict[str, Any]:
            return incoming.pop(0)

        async def send(message: Any) -> None:
            sent.append(message)

        await app(scope, receive, send)
        return sent

    lifespan = asyncio.run(
        drive({"type": "lifespan"}, [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    )
    assert [m["type"] for m in lifespan] == [
        "lifespan.startup.complete",
        "lifespan.shutdown.complete",
    ]
    big = [
        {"type": "http.request", "body": b"x" * 40000, "more_body": True},
        {"type": "http.request", "body": b"x" * 40000, "more_body": False},
    ]
    auth = [(b"authorization", f"Bearer {TOKEN}".encode())]
    sent = asyncio.run(
        drive({"type": "http", "method": "POST", "path": "/upgrade", "headers": auth}, big)
    )
    assert sent[0]["status"] == 413
    with wsgi_server(make_wsgi_app(engine, config=ini, web_token=TOKEN)) as base:
        status, _, doc = request(base, "POST", "/upgrade", token=TOKEN, body=b"x" * 70000)
        assert (status, doc["error"]["type"]) == (413, "ContentTooLarge")

    def boom(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("driver exploded near postgresql://u:S3cr3t@h/db\nsecond line")

    monkeypatch.setattr("alembic_autolock._runner.status", boom)
    with wsgi_server(make_wsgi_app(engine, config=ini)) as base:
        status, _, doc = request(base, "GET", "/status")
    assert (status, doc["error"]) == (
        500,
        {
            "status": 500,
            "type": "RuntimeError",
            "message": "driver exploded near postgresql://u:***@h/db",
        },
    )
    assert heads_of(sqlite_url) == set()
