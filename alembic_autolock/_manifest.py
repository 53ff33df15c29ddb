"""The heads of a history without loading it: a manifest checked against the files.

Learning a history's heads the way Alembic does means importing Alembic and executing every
revision file (~0.25 ms each without bytecode caching: 125 ms at 500 revisions), on every fresh
process, though the database is usually at head already. So after each full load the library
writes a small manifest: the heads, and a digest of what Alembic read to find them (for every
file of every version location: its relative path, size and modification time). A fresh
process computes the same digest from the file system alone (a ``stat`` per file, no read) and
trusts the manifest's heads only if it matches; anything else (a file added, edited, renamed or
removed, another version location, another configuration, a truncated or unreadable manifest,
one written by another format version) means the manifest is ignored and rebuilt from a full
load. The digest is taken *before* the load it describes, so a file changed during the load
cannot be recorded as unchanged.

The manifest lives in ``cache_dir`` (``$XDG_CACHE_HOME/alembic-autolock``, else
``~/.cache/alembic-autolock``, else a directory of this user under the temporary directory),
named by a hash of the configuration that decides which files Alembic reads (the config files,
``script_location``, ``version_locations``, the path separators, ``recursive_version_locations``,
the working directory), so a read-only script directory (a container image) needs nothing
written beside it. ``cache_dir = off`` disables it. ``sourceless`` histories are always loaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

FORMAT = 1
_OPTIONS = (
    "script_location",
    "version_locations",
    "path_separator",
    "version_path_separator",
    "recursive_version_locations",
    "sourceless",
)


def cache_dir(setting: str | None) -> Path | None:
    """Where manifests live; None when disabled (``cache_dir = off``)."""
    if setting is not None:
        return None if setting.lower() in ("off", "none", "false") else Path(setting)
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg) / "alembic-autolock"
    home = os.environ.get("HOME")
    if home and os.access(home, os.W_OK):
        return Path(home) / ".cache" / "alembic-autolock"
    return Path(tempfile.gettempdir()) / f"alembic-autolock-{os.getuid()}"


def signature(cfg: Any) -> str | None:
    """What decides which files Alembic reads for ``cfg`` (a LightConfig or an Alembic Config
    read from files); None when it cannot be told (a Config built in code, ``sourceless``)."""
    if cfg.config_file_name is None and cfg.toml_file_name is None:
        return None
    values = {}
    for name in _OPTIONS:
        value = cfg.get_alembic_option(name)
        values[name] = (
            value if value is None or isinstance(value, str | bool | list) else str(value)
        )
    if str(values["sourceless"]).lower() == "true":
        return None
    ini = os.path.abspath(cfg.config_file_name) if cfg.config_file_name else None
    toml = os.path.abspath(cfg.toml_file_name) if cfg.toml_file_name else None
    return json.dumps(
        {"format": FORMAT, "ini": ini, "toml": toml, "cwd": os.getcwd(), "options": values},
        sort_keys=True,
    )


def digest(dirs: list[str], recursive: bool) -> str:
    """A digest of every file under ``dirs`` (path, size, modification time), as Alembic walks
    them (``__pycache__`` skipped; subdirectories only when ``recursive``)."""
    h = hashlib.blake2b(digest_size=16)
    for top in dirs:
        h.update(top.encode() + b"\0")
        pending = [top]
        while pending:
            directory = pending.pop(0)
            try:
                entries = sorted(os.scandir(directory), key=lambda e: e.name)
            except FileNotFoundError:
                h.update(b"\0missing\0")
                continue
            subdirs = []
            for entry in entries:
                if entry.is_dir():
                    if recursive and entry.name != "__pycache__":
                        subdirs.append(entry.path)
                    continue
                try:
                    st = entry.stat()
                except FileNotFoundError:  # removed meanwhile: certainly not the recorded state
                    h.update(b"\0vanished\0")
                    continue
                h.update(f"{entry.path}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
            pending[:0] = subdirs
    return h.hexdigest()


def _path(directory: Path, sig: str) -> Path:
    name = hashlib.blake2b(sig.encode(), digest_size=12).hexdigest()
    return directory / f"heads-{name}.json"


Settled = dict[frozenset[str], tuple[tuple[str, str | None], ...]]


def lookup(cfg: Any, setting: str | None) -> tuple[str, frozenset[str], Settled] | None:
    """(script directory, heads, settled) from a manifest that still matches the files, or
    None. ``settled`` maps database heads at which start-up has nothing to apply, though
    revisions kept for a job (``autolock_manual``) are pending, to those revisions."""
    directory = cache_dir(setting)
    sig = signature(cfg)
    if directory is None or sig is None:
        return None
    try:
        with _path(directory, sig).open("rb") as f:
            data = json.load(f)
        if data.get("format") != FORMAT or data.get("signature") != sig:
            return None
        if digest(data["dirs"], data["recursive"]) != data["digest"]:
            return None
        return str(data["script_dir"]), frozenset(data["heads"]), _settled(data)
    except (OSError, ValueError, KeyError, TypeError):  # missing, truncated, foreign: rebuild
        return None


def _settled(data: dict[str, Any]) -> Settled:
    return {
        frozenset(item["heads"]): tuple((rev, msg) for rev, msg in item["pending"])
        for item in data.get("settled", [])
    }


# The key, in an Alembic Config's ``attributes``, that says it was read from its files and not
# changed since (the command line's Config), so that a full load may write the manifest.
FROM_FILES = "alembic_autolock.from_files"


class Recorder:
    """Takes the digest before a full load, and writes the manifest after it."""

    def __init__(self, cfg: Any, setting: str | None, dirs: list[str], recursive: bool) -> None:
        self.directory = cache_dir(setting)
        self.sig = signature(cfg)
        self.dirs = dirs
        self.recursive = recursive
        self.digest = digest(dirs, recursive) if self.enabled else ""

    @property
    def enabled(self) -> bool:
        return self.directory is not None and self.sig is not None

    MAX_SETTLED = 16

    def write(self, script_dir: str, heads: frozenset[str]) -> None:
        """Best effort: a cache that cannot be written only costs the next process a load."""
        self._data = {
            "format": FORMAT,
            "signature": self.sig,
            "script_dir": script_dir,
            "dirs": self.dirs,
            "recursive": self.recursive,
            "digest": self.digest,
            "heads": sorted(heads),
            "settled": [],
        }
        self._save()

    def settle(self, heads: tuple[str, ...], pending: list[tuple[str, str | None]]) -> None:
        """Add: at database ``heads`` start-up has nothing to apply; ``pending`` waits for a
        job. (A fact about the files the digest describes, whatever the database.)"""
        data = getattr(self, "_data", None)
        if data is None:
            return
        entry = {"heads": sorted(heads), "pending": [[rev, msg] for rev, msg in pending]}
        if entry in data["settled"]:
            return
        data["settled"] = [*data["settled"], entry][-self.MAX_SETTLED :]
        self._save()

    def _save(self) -> None:
        if not self.enabled or self.directory is None or self.sig is None:
            return
        data = self._data
        target = _path(self.directory, self.sig)
        with contextlib.suppress(OSError):
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".heads-", suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(data, f)
                os.replace(tmp, target)  # atomic: readers see the old or the new, never half
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
