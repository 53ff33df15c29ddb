"""The cold check: a history's heads known without loading it, never a wrong answer.

A full load writes a manifest (the heads, and a digest of every file Alembic read); a fresh
process trusts it only while the files are as recorded. These tests change histories in every
way a deploy can (files added, edited, renamed, removed; merges; depends_on; a second version
location; a file Alembic cannot read) and check that the manifest's answer is either refused or
equal to what Alembic computes from the files as they are now.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine
from support import worker_env

from alembic_autolock import ensure_migrated
from alembic_autolock._config import LightConfig
from alembic_autolock._manifest import lookup
from alembic_autolock._plan import prepare
from alembic_autolock.exceptions import ConfigError

History = dict[str, tuple[tuple[str, ...], tuple[str, ...]]]  # rev -> (down revisions, depends)


def revision_file(rev: str, downs: tuple[str, ...], depends: tuple[str, ...]) -> str:
    down = None if not downs else downs[0] if len(downs) == 1 else downs
    dep = None if not depends else depends[0] if len(depends) == 1 else depends
    return (
        f'"""{rev}"""\n'
        f"revision: str = {rev!r}\n"
        f"down_revision = {down!r}\n"
        "branch_labels = None\n"
        f"depends_on = {dep!r}\n\n\n"
        "def upgrade() -> None:\n    pass\n\n\ndef downgrade() -> None:\n    pass\n"
    )


def write(root: Path, history: History, *, locations: int = 1) -> str:
    """A script directory (``versions`` and, with ``locations=2``, ``more``) and its ini."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "env.py").write_text("")
    for n in range(locations):
        (root / ("versions" if n == 0 else "more")).mkdir(parents=True, exist_ok=True)
    for i, (rev, (downs, depends)) in enumerate(sorted(history.items())):
        where = root / ("more" if locations == 2 and i % 2 else "versions")
        (where / f"{rev}_x.py").write_text(revision_file(rev, downs, depends))
    ini = root / "alembic.ini"
    extra = ""
    if locations == 2:
        extra = f"version_locations = {root / 'versions'} {root / 'more'}\npath_separator = space\n"
    ini.write_text(f"[alembic]\nscript_location = {root}\n{extra}")
    return str(ini)


def alembic_heads(ini: str) -> frozenset[str] | None:
    """What Alembic says the heads are now (None: it cannot read the history)."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    try:
        script = ScriptDirectory.from_config(Config(ini))
        return frozenset(script.get_heads(consider_depends_on=True))
    except Exception:  # the history as it stands does not load
        return None


def load(ini: str, cache: Path) -> frozenset[str]:
    """A full load, as the runner does it (it writes the manifest)."""
    return prepare(create_engine("sqlite://"), ini, {"cache_dir": str(cache)}).script_heads


def cold(ini: str, cache: Path) -> frozenset[str] | None:
    found = lookup(LightConfig(ini, None), str(cache))
    return None if found is None else found[1]


LINEAR: History = {"a1": ((), ()), "a2": (("a1",), ()), "a3": (("a2",), ())}


def test_manifest_answers_while_nothing_changed(tmp_path: Path) -> None:
    """After a full load the cold lookup gives the same heads; then each kind of change makes
    it refuse (and the next full load rebuilds it)."""
    cache = tmp_path / "cache"
    ini = write(tmp_path / "s", LINEAR)
    assert load(ini, cache) == frozenset({"a3"})
    assert cold(ini, cache) == frozenset({"a3"})
    versions = tmp_path / "s" / "versions"
    (versions / "a4_x.py").write_text(revision_file("a4", ("a3",), ()))  # added
    assert cold(ini, cache) is None
    assert load(ini, cache) == cold(ini, cache) == frozenset({"a4"})
    (versions / "a4_x.py").rename(versions / "a4_renamed.py")  # renamed
    assert cold(ini, cache) is None
    assert load(ini, cache) == cold(ini, cache) == frozenset({"a4"})
    (versions / "a4_renamed.py").unlink()  # removed
    assert cold(ini, cache) is None
    assert load(ini, cache) == cold(ini, cache) == frozenset({"a3"})
    (versions / "a3_x.py").write_text(revision_file("a3", ("a1",), ()))  # edited: a branch
    assert cold(ini, cache) is None
    assert load(ini, cache) == cold(ini, cache) == frozenset({"a2", "a3"})
    (versions / "README").write_text("not a revision")  # any other file counts too
    assert cold(ini, cache) is None


def test_merge_depends_on_and_two_locations(tmp_path: Path) -> None:
    """A merge, a depends_on across branches (its target stops being a head in the version
    table), and two version locations: the manifest's heads are Alembic's."""
    history: History = {
        "a1": ((), ()),
        "b1": (("a1",), ()),
        "c1": (("a1",), ()),
        "m1": (("b1", "c1"), ()),
        "x1": ((), ()),
        "y1": ((), ("x1",)),
    }
    cache = tmp_path / "cache"
    ini = write(tmp_path / "s", history, locations=2)
    assert load(ini, cache) == alembic_heads(ini) == frozenset({"m1", "y1"})
    assert cold(ini, cache) == frozenset({"m1", "y1"})
    (tmp_path / "s" / "more" / "z1_x.py").write_text(revision_file("z1", ("m1",), ()))
    assert cold(ini, cache) is None


def test_a_file_alembic_cannot_read_is_never_answered(tmp_path: Path) -> None:
    """A revision file that does not load: the cold lookup refuses, the full load says why."""
    cache = tmp_path / "cache"
    ini = write(tmp_path / "s", LINEAR)
    load(ini, cache)
    (tmp_path / "s" / "versions" / "a4_x.py").write_text("revision = compute(\n")
    assert cold(ini, cache) is None
    with pytest.raises(ConfigError, match="cannot load the migration scripts"):
        load(ini, cache)


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p.write_text(p.read_text()[:20]),  # truncated
        lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "format": 99})),  # newer
        lambda p: p.write_bytes(b"\xff\xfe\x00"),  # not JSON
        lambda p: p.chmod(0),  # unreadable (root reads anyway: then it must still be right)
    ],
    ids=["truncated", "newer-format", "garbage", "unreadable"],
)
def test_a_damaged_manifest_is_ignored_and_rebuilt(tmp_path: Path, damage: Any) -> None:
    """A manifest that is truncated, from a newer format, not JSON or unreadable is never
    trusted; the next full load writes a good one."""
    cache = tmp_path / "cache"
    ini = write(tmp_path / "s", LINEAR)
    load(ini, cache)
    [path] = cache.glob("heads-*.json")
    damage(path)
    assert cold(ini, cache) in (None, frozenset({"a3"}))
    path.chmod(0o644)
    load(ini, cache)
    assert cold(ini, cache) == frozenset({"a3"})


def test_read_only_script_directory_and_no_cache(tmp_path: Path) -> None:
    """A read-only script directory (a container image) works: the manifest lives elsewhere;
    with cache_dir = off nothing is written and every first call loads the history."""
    cache = tmp_path / "cache"
    ini = write(tmp_path / "s", LINEAR)
    for path in (tmp_path / "s").rglob("*"):
        path.chmod(0o555 if path.is_dir() else 0o444)
    assert load(ini, cache) == frozenset({"a3"})
    assert cold(ini, cache) == frozenset({"a3"})
    assert list((tmp_path / "s").rglob("heads-*.json")) == []
    off = tmp_path / "off"
    prepare(create_engine("sqlite://"), ini, {"cache_dir": "off"})
    assert lookup(LightConfig(ini, None), "off") is None
    assert not off.exists()


# --- a history changed at random ------------------------------------------------------------


@st.composite
def histories(draw: st.DrawFn) -> History:
    """A random valid history: linear runs, branches, merges, depends_on."""
    history: History = {}
    for n in range(draw(st.integers(1, 12))):
        rev = f"r{n:02d}"
        existing = sorted(history)
        downs: tuple[str, ...] = ()
        if (existing and draw(st.booleans())) or len(existing) > 3:
            downs = tuple(
                draw(st.lists(st.sampled_from(existing), min_size=1, max_size=2, unique=True))
            )
        depends: tuple[str, ...] = ()
        if existing and draw(st.integers(0, 4)) == 0:
            depends = (draw(st.sampled_from(existing)),)
        history[rev] = (downs, depends)
    return history


MUTATIONS = ["add", "merge", "edit", "rename", "remove", "touch", "other-file", "depends"]


@pytest.mark.filterwarnings("ignore:Revision .* is not present:UserWarning")
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    history=histories(), changes=st.lists(st.sampled_from(MUTATIONS), max_size=3), data=st.data()
)
def test_random_changes_never_give_a_wrong_answer(
    tmp_path_factory: pytest.TempPathFactory,
    history: History,
    changes: list[str],
    data: st.DataObject,
) -> None:
    """Whatever is done to a history after the manifest was written, the cold lookup either
    refuses or gives exactly the heads Alembic computes from the files as they are now."""
    root = tmp_path_factory.mktemp("h")
    cache = root / "cache"
    ini = write(root / "s", history)
    assert load(ini, cache) == alembic_heads(ini)
    assert cold(ini, cache) == alembic_heads(ini)  # unchanged: it answers
    versions = root / "s" / "versions"
    for change in changes:
        files = sorted(versions.glob("*.py"))
        revs = sorted(p.name.split("_")[0] for p in files)
        pick = data.draw(st.sampled_from(files)) if files else None
        if change == "add" and revs:
            down = data.draw(st.sampled_from(revs))
            (versions / f"n{len(files):02d}_x.py").write_text(
                revision_file(f"n{len(files):02d}", (down,), ())
            )
        elif change == "merge" and len(revs) > 1:
            pair = tuple(
                data.draw(st.lists(st.sampled_from(revs), min_size=2, max_size=2, unique=True))
            )
            (versions / f"m{len(files):02d}_x.py").write_text(
                revision_file(f"m{len(files):02d}", pair, ())
            )
        elif change == "edit" and pick is not None:
            rev = pick.name.split("_")[0]
            others = [r for r in revs if r < rev]
            down = (data.draw(st.sampled_from(others)),) if others else ()
            pick.write_text(revision_file(rev, down, ()))
        elif change == "depends" and pick is not None and len(revs) > 1:
            rev = pick.name.split("_")[0]
            target = data.draw(st.sampled_from([r for r in revs if r != rev]))
            text = pick.read_text().replace("depends_on = None", f"depends_on = {target!r}")
            pick.write_text(text)
        elif change == "rename" and pick is not None:
            pick.rename(pick.with_name(pick.stem + "_renamed.py"))
        elif change == "remove" and pick is not None:
            pick.unlink()
        elif change == "touch" and pick is not None:
            os.utime(pick)
        elif change == "other-file":
            (versions / "notes.txt").write_text("x")
    now = alembic_heads(ini)
    answer = cold(ini, cache)
    assert answer is None or (now is not None and answer == now), (history, changes, answer, now)


def test_a_fresh_process_at_head_imports_no_alembic(
    pg_url: str, make_ini: Any, make_engine: Any
) -> None:
    """The first ensure_migrated of a fresh process, at head, with a manifest: 'current',
    without importing Alembic or executing a revision file."""
    ini = make_ini(pg_url)
    assert ensure_migrated(make_engine(pg_url), config=ini).action == "upgraded"
    code = (
        "import sys\n"
        "from sqlalchemy import create_engine\n"
        "from alembic_autolock import ensure_migrated\n"
        f"result = ensure_migrated(create_engine({pg_url!r}), config={ini!r})\n"
        "loaded = sorted(m for m in sys.modules if m == 'alembic' or m.startswith('alembic.'))\n"
        "print(result.action, loaded, 'autolock_test_behaviour' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=worker_env(),
        timeout=60,
        check=True,
    )
    assert out.stdout.split("\n")[0] == "current [] False"
