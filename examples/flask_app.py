"""A Flask app factory under gunicorn with several workers.

    DATABASE_URL=postgresql://user@host/db gunicorn -w 4 'examples.flask_app:create_app()'
    DATABASE_URL=... gunicorn --preload -w 4 'examples.flask_app:create_app()'

Without ``--preload`` every worker runs ``create_app()``: one migrates, the others wait for the
lock and go on. With ``--preload`` gunicorn's master runs it once, before forking the workers;
the library then gives each forked worker fresh connection pools (it registers an after-fork
hook), so no worker ever talks on a connection the master opened. ``GET /health`` reads a table
the migrations create; ``/migrations/status`` is the readiness endpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

from flask import Flask, jsonify
from sqlalchemy import create_engine, text
from werkzeug.middleware.dispatcher import DispatcherMiddleware

from alembic_autolock import ensure_migrated
from alembic_autolock.web import make_wsgi_app

CONFIG = str(Path(__file__).resolve().parent.parent / "alembic.ini")


def create_app() -> Flask:
    engine = create_engine(os.environ["DATABASE_URL"], pool_pre_ping=True)
    result = ensure_migrated(engine, config=CONFIG)

    app = Flask(__name__)

    @app.get("/health")
    def health():  # type: ignore[no-untyped-def]
        with engine.connect() as conn:
            count = conn.execute(text("SELECT count(*) FROM tasks")).scalar_one()
        return jsonify(pid=os.getpid(), tasks=count, migration=result.action)

    app.wsgi_app = DispatcherMiddleware(  # type: ignore[method-assign]
        app.wsgi_app, {"/migrations": make_wsgi_app(engine, config=CONFIG)}
    )
    return app
