"""Finding and loading the Alembic configuration, the way Alembic's own CLI finds it.

Two readers of the same files: Alembic's own ``Config`` (for running env.py), and
:class:`LightConfig`, which reads the same ini and toml the same way with the standard library
only, for the at-head check of a fresh process (Alembic is not imported there).
"""

from __future__ import annotations

import configparser
import functools
import os
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from .exceptions import ConfigError

if TYPE_CHECKING:
    from alembic.config import Config

ConfigLike = Union[str, os.PathLike[str], "Config", None]


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
    from alembic.config import Config

    if isinstance(config, Config):
        return config
    ini, toml = find_config(config, environ=environ)
    if ini is None:
        return Config(toml_file=toml)
    return Config(ini, toml_file=toml)


def find_config(
    config: str | os.PathLike[str] | None, *, environ: os._Environ[str] | dict[str, str]
) -> tuple[str | None, str | None]:
    """(ini file, toml file) as load_config finds them; ConfigError if there is none."""
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
            return None, str(path)
        toml = path.with_name("pyproject.toml")
        return str(path), str(toml) if _has_tool_table(toml) else None
    raise ConfigError(
        "no Alembic configuration found; looked for: "
        + ", ".join(looked)
        + ". Pass config='path/to/alembic.ini', set ALEMBIC_CONFIG, or run from the directory "
        "that holds alembic.ini."
    )


class LightConfig:
    """The parts of an Alembic ``Config`` the library reads (options, sections, file names),
    read as Alembic reads them (ConfigParser with ``here``, the ini before
    ``[tool.alembic]``), without importing Alembic."""

    config_ini_section = "alembic"
    cmd_opts = None

    def __init__(self, ini: str | None, toml: str | None) -> None:
        self.config_file_name = ini
        self.toml_file_name = toml

    @functools.cached_property
    def file_config(self) -> configparser.ConfigParser:
        here = Path(self.config_file_name).absolute().parent if self.config_file_name else Path()
        parser = configparser.ConfigParser({"here": here.as_posix()})
        if self.config_file_name:
            parser.read([self.config_file_name], encoding="locale")
        else:
            parser.add_section(self.config_ini_section)
        return parser

    @functools.cached_property
    def toml_alembic_config(self) -> dict[str, Any]:
        if self.toml_file_name is None:
            return {}
        table = (tool_tables(Path(self.toml_file_name)) or {}).get("alembic", {})
        return table if isinstance(table, dict) else {}

    def get_main_option(self, name: str, default: str | None = None) -> str | None:
        return self.file_config.get(self.config_ini_section, name, fallback=default)

    def get_alembic_option(self, name: str, default: Any = None) -> Any:
        if self.file_config.has_option(self.config_ini_section, name):
            return self.file_config.get(self.config_ini_section, name)
        value = self.toml_alembic_config.get(name, default)
        if isinstance(value, str) and self.toml_file_name:  # Alembic's %(here)s in toml
            here = Path(self.toml_file_name).absolute().parent.as_posix()
            value = value.replace("%(here)s", here)
        return value


def light_config(
    config: ConfigLike, *, environ: os._Environ[str] | dict[str, str]
) -> LightConfig | None:
    """The configuration as LightConfig, or None when ``config`` is an Alembic ``Config``
    object (the caller built it; Alembic is imported already)."""
    if config is not None and not isinstance(config, str | os.PathLike):
        return None
    ini, toml = find_config(config, environ=environ)
    return LightConfig(ini, toml)


def ini_error(cfg: Any, exc: configparser.InterpolationError) -> ConfigError:
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


def main_option(cfg: Any, name: str) -> str | None:
    """``cfg.get_main_option(name)``, with an interpolation error turned into ConfigError."""
    try:
        value = cfg.get_main_option(name)
    except configparser.InterpolationError as exc:
        raise ini_error(cfg, exc) from None
    return None if value is None else str(value)


def ini_section(cfg: Any, name: str) -> dict[str, str]:
    """``cfg.get_section(name, {})`` as a dict, with an interpolation error turned into
    ConfigError."""
    try:
        return dict(cfg.get_section(name, {}))
    except configparser.InterpolationError as exc:
        raise ini_error(cfg, exc) from None


def config_sections(cfg: Any) -> tuple[dict[str, Any], str | None, dict[str, Any], str | None]:
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


def script_location(cfg: Any) -> str:
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
