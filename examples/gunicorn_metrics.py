"""A WSGI app under gunicorn: migrations at start-up, /migrations/status, and Prometheus metrics
aggregated over all workers (prometheus_client's multiprocess mode).

    mkdir -p /tmp/prom && rm -f /tmp/prom/*
    PROMETHEUS_MULTIPROC_DIR=/tmp/prom DATABASE_URL=postgresql://... \\
        gunicorn -w 4 -c examples/gunicorn_metrics.py examples.gunicorn_metrics:app

Every worker runs ensure_migrated() when it imports this module: one migrates, the others wait
and go on, and /metrics shows all of them, e.g.
``alembic_autolock_checks_total{result="current"} 3.0`` and ``{result="pending"} 1.0``.
PROMETHEUS_MULTIPROC_DIR must be set (and the directory empty) before the workers start.
"""

import os

import prometheus_client  # imported first: the library's metrics start once it is there
from prometheus_client import CollectorRegistry, multiprocess
from sqlalchemy import create_engine

from alembic_autolock import ensure_migrated
from alembic_autolock.web import make_wsgi_app

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "alembic.ini")
engine = create_engine(os.environ.get("DATABASE_URL", "sqlite:///example.db"))
ensure_migrated(engine, config=CONFIG)

migrations = make_wsgi_app(engine, config=CONFIG)


def metrics(environ, start_response):  # type: ignore[no-untyped-def]
    """Every worker's metrics, collected from PROMETHEUS_MULTIPROC_DIR at each scrape."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return prometheus_client.make_wsgi_app(registry)(environ, start_response)


def app(environ, start_response):  # type: ignore[no-untyped-def]
    path = environ.get("PATH_INFO", "/")
    if path == "/metrics":
        return metrics(environ, start_response)
    if path.startswith("/migrations/"):
        environ = {**environ, "PATH_INFO": path[len("/migrations") :]}
        return migrations(environ, start_response)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello\n"]


# gunicorn configuration hooks (this file is also the -c config file)
def child_exit(server, worker):  # type: ignore[no-untyped-def]
    """A dead worker's gauges must not count (prometheus_client's multiprocess mode)."""
    multiprocess.mark_process_dead(worker.pid)
