# An Alembic configuration written by `alembic-autolock init`.

[alembic]
# path to the migration scripts; %(here)s is the directory of this file
script_location = ${script_location}

# sys.path entries prepended when running migrations (the project root)
prepend_sys_path = .
path_separator = os

# The database. `alembic -x url=...` and `alembic-autolock --url ...` override it.
sqlalchemy.url = driver://user:pass@localhost/dbname

[alembic_autolock]
# Every setting, with its default. ALEMBIC_AUTOLOCK_<KEY> environment variables and keyword
# arguments to ensure_migrated() override what is here.
# lock: auto (by dialect), postgresql, mysql, file, none, or redis://host:6379/0
# lock = auto
# timeout: seconds to wait for the lock
# timeout = 30
# cache_ttl: seconds an "at head" answer is trusted in-process (0 disables the cache)
# cache_ttl = 300
# mode: off, check or upgrade (what ensure_migrated may do)
# mode = upgrade
# transaction: all (one transaction where the database allows it, as Alembic), or per-migration
# transaction = all
# version_table = alembic_version
# version_table_schema =

[post_write_hooks]

[loggers]
keys = root,sqlalchemy,alembic

[handlers]
keys = console

[formatters]
keys = generic

[logger_root]
level = WARNING
handlers = console
qualname =

[logger_sqlalchemy]
level = WARNING
handlers =
qualname = sqlalchemy.engine

[logger_alembic]
level = INFO
handlers =
qualname = alembic

[handler_console]
class = StreamHandler
args = (sys.stderr,)
level = NOTSET
formatter = generic

[formatter_generic]
format = %(levelname)-5.5s [%(name)s] %(message)s
datefmt = %H:%M:%S
