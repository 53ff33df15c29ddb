"""Finding and loading the Alembic configuration, the way Alembic's own CLI finds it."""

from __future__ import annotations

import configparser
import os
import tomllib
from pathlib import Path
from typing import Any

from alembic.config import Config

from .exceptions import ConfigError

ConfigLike = str | os.PathLike[str] | Config | None


def tool_tables(path: Path) -> dict[str, Any] | None:
    """The ``[tool]`` table of a TOML file (None if there is no such file), parsed once per
    process for each version of the file. A file that is not valid TOML is an error rather than
    silently ignored settings."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    key = (str(path.absolute()), stat.st_mtime_ns, stat.st_size)
    cached = _toml_cache.get(key)
    if cached is None:
        try:
            with path.open("rb") as f:
                tool = tomllib.load(f).get("tool", {})
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML ({exc}); fix it, or move it away") from exc
        cached = _toml_cache[key] = tool if isinstance(tool, dict) else {}
    return cached


_toml_cache: dict[tuple[str, int, int], dict[str, Any]] = {}


def _has_tool_table(path: Path) -> bool:
    tool = tool_tables(path)
    return tool is not None and ("alembic" in tool or "alembic_autolock" in tool)


def load_config(config: ConfigLike, *, environ: os._Environ[str] | dict[str, str]) -> Config:
    """Return an Alembic ``Config`` for ``config`` (a path, a Config or None).

    None means what the ``alembic`` command does: ``$ALEMBIC_CONFIG``, else ``./alembic.ini``,
    else ``./pyproject.toml`` (with a ``[tool.alembic]`` table). An ini file picks up a
    ``pyproject.toml`` beside it, as the CLI does.
    """
    if isinstance(config, Config):
        return config
    looked: list[str] = []
    if config is None:
        env_path = environ.get("ALEMBIC_CONFIG")
        if env_path:
            candidates = [Path(env_path)]
            looked.append(f"$ALEMBIC_CONFIG={env_path}")
        else:
            candidates = [Path("alembic.ini"), Path("pyproject.toml")]
            looked.extend(str(Path.cwd() / c) for c in candidates)
    else:
        candidates = [Path(config)]
        looked.append(str(Path(config).absolute()))
    for path in candidates:
        if not path.is_file():
            continue
        if path.suffix == ".toml":
            if not _has_tool_table(path):
                looked[-1] += " (no [tool.alembic] table)"
                continue
            return Config(toml_file=str(path))
        toml = path.with_name("pyproject.toml")
        return Config(str(path), toml_file=str(toml) if _has_tool_table(toml) else None)
    raise ConfigError(
        "no Alembic configuration found; looked for: "
        + ", ".join(looked)
        + ". Pass config='path/to/alembic.ini', set ALEMBIC_CONFIG, or run from the directory "
        "that holds alembic.ini."
    )


def ini_error(cfg: Config, exc: configparser.InterpolationError) -> ConfigError:
    """A ConfigError for a value configparser cannot interpolate (a bare % in alembic.ini).

    configparser's own message quotes the raw value, which may be a URL with its password:
    this one names the file, the section and the key, never the value.
    """
    where = cfg.config_file_name or "the Alembic configuration"
    return ConfigError(
        f"{where}: the value of {exc.option!r} in section [{exc.section}] cannot be read, "
        "because a % in an ini value starts a substitution. Write a literal % as %% (a "
        "URL-encoded password such as p%40ss becomes p%%40ss); %(name)s may only name another "
        f"key of [{exc.section}] or of [DEFAULT].",
        key=exc.option,
        source=f"{where} [{exc.section}]",
    )


def main_option(cfg: Config, name: str) -> str | None:
    """``cfg.get_main_option(name)``, with an interpolation error turned into ConfigError."""
    try:
        return cfg.get_main_option(name)
    except configparser.InterpolationError as exc:
        raise ini_error(cfg, exc) from None


def ini_section(cfg: Config, name: str) -> dict[str, str]:
    """``cfg.get_section(name, {})`` as a dict, with an interpolation error turned into
    ConfigError."""
    try:
        return dict(cfg.get_section(name, {}))
    except configparser.InterpolationError as exc:
        raise ini_error(cfg, exc) from None


def config_sections(cfg: Config) -> tuple[dict[str, Any], str | None, dict[str, Any], str | None]:
    """The ``[alembic_autolock]`` ini section and ``[tool.alembic_autolock]`` toml table.

    Returns (ini values, ini source label, toml values, toml source label).
    """
    ini: dict[str, Any] = {}
    ini_label = None
    if cfg.config_file_name is not None:
        parser = cfg.file_config
        if parser.has_section("alembic_autolock"):
            defaults = set(parser.defaults())
            try:
                ini = {
                    k: parser.get("alembic_autolock", k)
                    for k in parser.options("alembic_autolock")
                    if k not in defaults
                }
            except configparser.InterpolationError as exc:
                raise ini_error(cfg, exc) from None
            ini_label = f"{cfg.config_file_name} [alembic_autolock]"
    toml: dict[str, Any] = {}
    toml_label = None
    if cfg.toml_file_name is not None:
        path = Path(cfg.toml_file_name)
        tool = tool_tables(path)
        if tool is not None:
            table = tool.get("alembic_autolock", {})
            if not isinstance(table, dict):
                raise ConfigError(f"{path}: [tool.alembic_autolock] must be a table")
            toml = dict(table)
            toml_label = f"{path} [tool.alembic_autolock]"
    return ini, ini_label, toml, toml_label


def script_location(cfg: Config) -> str:
    """The configured script location, or a ConfigError that says where to set it."""
    try:
        location = cfg.get_alembic_option("script_location")
    except configparser.InterpolationError as exc:
        raise ini_error(cfg, exc) from None
    if not location:
        where = cfg.config_file_name or cfg.toml_file_name or "the Config object"
        raise ConfigError(
            f"no script_location in {where}: set script_location in the [alembic] section "
            "(or [tool.alembic] in pyproject.toml) to the directory that holds env.py."
        )
    return str(location)
