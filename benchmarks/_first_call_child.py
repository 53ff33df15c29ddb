"""One fresh process for bench_first_call.py: time the imports, then the first call.

Usage: ``_first_call_child.py VARIANT URL INI [NAMESPACE]``; prints one JSON object of
nanosecond timings on stdout. Only the standard library is imported before the clock starts.

Variants:
  ours              engine created (not connected), then ensure_migrated(engine, config=INI)
  ours_pooled       the same, after one engine.connect().close() (a pooled connection waits)
  plain_shared      engine created (not connected), then the cookbook: engine.begin() as conn,
                    cfg.attributes["connection"] = conn, command.upgrade(cfg, "head")
  plain_shared_pooled  the same, after one engine.connect().close()
  plain_cli         command.upgrade(cfg, "head") with env.py making its own NullPool engine
                    from sqlalchemy.url (what ``alembic upgrade head`` runs)
  ours_parts        the stages of ours' first call, timed one by one through private functions
                    (_plan.prepare, the first connect, _plan.read_heads)
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    """Run one variant and print its timings."""
    variant, url, ini = sys.argv[1], sys.argv[2], sys.argv[3]
    namespace = sys.argv[4] if len(sys.argv) > 4 else None
    clock = time.perf_counter_ns
    out: dict[str, object] = {"variant": variant}

    t0 = clock()
    import sqlalchemy

    import alembic

    t1 = clock()
    out["import_alembic_ns"] = t1 - t0
    _ = (alembic, sqlalchemy)

    if variant == "ours_parts":
        parts(out, url, ini, namespace)
    elif variant.startswith("ours"):
        import alembic_autolock

        t2 = clock()
        out["import_extra_ns"] = t2 - t1
        engine = sqlalchemy.create_engine(url)
        t3 = clock()
        out["create_engine_ns"] = t3 - t2
        if variant == "ours_pooled":
            engine.connect().close()
        settings = {"namespace": namespace} if namespace else {}
        t4 = clock()
        result = alembic_autolock.ensure_migrated(engine, config=ini, **settings)
        t5 = clock()
        out["call_ns"] = t5 - t4
        out["action"] = result.action
        engine.dispose()
    else:
        from alembic.config import Config

        from alembic import command

        t2 = clock()
        out["import_extra_ns"] = t2 - t1
        cfg = Config(ini)
        if variant == "plain_cli":
            out["create_engine_ns"] = 0
            t4 = clock()
            command.upgrade(cfg, "head")
            t5 = clock()
        else:
            engine = sqlalchemy.create_engine(url)
            t3 = clock()
            out["create_engine_ns"] = t3 - t2
            if variant == "plain_shared_pooled":
                engine.connect().close()
            t4 = clock()
            with engine.begin() as conn:
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
            t5 = clock()
            engine.dispose()
        out["call_ns"] = t5 - t4
        out["action"] = "upgrade no-op"
    out["total_in_process_ns"] = clock() - t0
    print(json.dumps(out))


def parts(out: dict[str, object], url: str, ini: str, namespace: str | None) -> None:
    """The first call's stages, timed one by one (private API: the plan, then the heads)."""
    import sqlalchemy

    from alembic_autolock import _db, _plan

    clock = time.perf_counter_ns
    engine = sqlalchemy.create_engine(url)
    settings = {"namespace": namespace} if namespace else {}
    t0 = clock()
    plan = _plan.prepare(engine, ini, settings)
    t1 = clock()
    engine.connect().close()
    t2 = clock()
    heads = _db.read_heads(engine, plan.settings, plan.masked_url)
    t3 = clock()
    out.update(
        prepare_ns=t1 - t0,
        connect_ns=t2 - t1,
        read_heads_ns=t3 - t2,
        action="current" if frozenset(heads) == plan.script_heads else "not at head",
    )
    engine.dispose()


if __name__ == "__main__":
    main()
