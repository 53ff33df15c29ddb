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
# Every setting, with its default (generated from the settings definition by
# docs/_hooks/settings_reference.py; a test keeps this list complete).
# ALEMBIC_AUTOLOCK_<KEY> environment variables and keyword arguments override what
# is set here. The reference: docs/configuration.md.
# lock: The lock backend.
# lock = auto
# lock_url: A separate URL for the PostgreSQL or MySQL lock connection.
# lock_url =
# timeout: Seconds to wait for the lock (the process-local lock included); 0 tries once.
# timeout = 30
# cache_ttl: Seconds an "at head" answer is trusted in this process; 0 disables the cache and
# every call reads the database.
# cache_ttl = 300
# mode: What ensure_migrated() and install() may do when revisions are pending: apply them
# (upgrade), raise PendingMigrations (check), or return at once without connecting (off). Default:
# check in production, upgrade elsewhere.
# mode = upgrade
# environment: The deployment environment: decides whether this is production (the defaults of
# mode, allow_downgrade and ddl_lock_timeout) and is reported by status. Default:
# $ALEMBIC_AUTOLOCK_ENV, else the first set of $APP_ENV, $APP_ENVIRONMENT, $ENVIRONMENT, $ENV,
# $DEPLOY_ENV, $FLASK_ENV, else development.
# environment = development
# production_environments: Environment names treated as production, compared case-insensitively;
# glob patterns (prod*) are allowed.
# production_environments = production,prod
# allow_downgrade: Whether downgrade(), alembic-autolock downgrade, POST /downgrade and alembic
# downgrade through the env.py hook may run. Default: false in production, true elsewhere.
# allow_downgrade = true
# transaction: all: every pending revision in one transaction where the database has transactional
# DDL (Alembic's default); per-migration: one transaction per revision.
# transaction = all
# namespace: The lock identity: processes with the same namespace exclude each other.
# namespace =
# version_table: The version table, read by the check and written by run_migrations().
# version_table = alembic_version
# version_table_schema: The schema of the version table (empty: the default schema).
# version_table_schema =
# on_ahead: When the database is at a revision these scripts do not know: warn and return
# action="ahead", or error (raise DatabaseAhead).
# on_ahead = warn
# lock_ttl: Redis only: seconds after its last renewal that the lock key expires (renewed every
# lock_ttl / 3); bounds how long a dead holder blocks the others.
# lock_ttl = 15
# orphan_wait: PostgreSQL and MySQL: seconds a new holder waits for a dead holder's migration
# session to end before terminating it.
# orphan_wait = 10
# empty_database: What an empty database gets: every revision (upgrade), or the target metadata's
# tables created with create_all and the heads stamped (create_all), under the lock.
# empty_database = upgrade
# refresh_pool: After another process changed the schema, replace the engine's connection pool so
# no pooled connection keeps prepared statements of the old schema (not for SQLite).
# refresh_pool = true
# cache_dir: Where the manifest of the script directory is kept, so that a call at head need not
# load every revision file (default: $XDG_CACHE_HOME/alembic-autolock, else ~/.cache/alembic-
# autolock); off disables it.
# cache_dir =
# schema: PostgreSQL schema per tenant: the version table lives in this schema, revisions run with
# it first on the search path, and the lock and the cache belong to it.
# schema =
# ddl_lock_timeout: Seconds a migration statement waits for a table lock before it gives up
# (PostgreSQL lock_timeout, MySQL/MariaDB lock_wait_timeout on the migration session); 0 waits as
# long as the database lets it. Default: 5 in production, 0 elsewhere.
# ddl_lock_timeout = 0
# ddl_retries: How often a revision that failed only on ddl_lock_timeout is tried again, with
# backoff and jitter, when it ran inside a transaction.
# ddl_retries = 5
# time_budget: Seconds: start-up refuses (TimeBudgetExceeded) a run whose revisions are known,
# from earlier runs, to take longer in total; 0 means no limit.
# time_budget = 0
# durations_file: A JSON file of revision durations ({revision: seconds}, as
# alembic_autolock.durations() returns them) counted by time_budget besides the database's own
# journal.
# durations_file =
# metrics: off: this run is not counted by the Prometheus metrics and does not start them; auto:
# they start once the application has imported prometheus_client.
# metrics = auto
# alert_webhook: An http:// or https:// URL each alert is POSTed to.
# alert_webhook =
# alert_format: The webhook's body: the alert as JSON, or Slack's {"text": ...}.
# alert_format = json
# alert_lock_wait: Seconds of waiting for the lock after which a lock_wait alert is raised.
# alert_lock_wait = 10
# alert_timeout: The webhook's timeout per attempt, in seconds (it is tried twice).
# alert_timeout = 3
# web_token: The Bearer token of the web app's POST /upgrade and POST /downgrade; without one
# those routes do not exist.
# web_token =

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
