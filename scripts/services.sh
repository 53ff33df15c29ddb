#!/usr/bin/env bash
# Verify that PostgreSQL, Redis and MariaDB answer on their standard local ports, starting any
# that does not (as root, with the commands of ../shared/research/services.md), and make sure
# the tools the tests start themselves (redis-server, pgbouncer) are installed.
# Exits non-zero, loudly, if a server cannot be reached: lock tests never run against fakes.
set -euo pipefail

up() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_up() {  # name port
  for _ in $(seq 1 60); do up "$2" && return 0; sleep 0.5; done
  echo "ERROR: $1 is not reachable on 127.0.0.1:$2" >&2
  return 1
}

is_root() { [ "$(id -u)" = 0 ]; }

need_packages=()
command -v pg_ctlcluster >/dev/null || need_packages+=(postgresql)
command -v redis-server >/dev/null || need_packages+=(redis-server)
command -v mariadbd >/dev/null || [ -x /usr/sbin/mariadbd ] || need_packages+=(mariadb-server)
command -v pgbouncer >/dev/null || [ -x /usr/sbin/pgbouncer ] || need_packages+=(pgbouncer)
if [ ${#need_packages[@]} -gt 0 ]; then
  if is_root; then
    echo "installing: ${need_packages[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_packages[@]}" >/dev/null
  else
    echo "ERROR: missing packages ${need_packages[*]}; install them (apt-get install ...)" >&2
    exit 1
  fi
fi

if ! up 5432; then
  echo "PostgreSQL is not answering on 5432: starting it"
  is_root && pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
fi
if ! up 6379; then
  echo "Redis is not answering on 6379: starting it"
  is_root && mkdir -p /var/lib/redis /var/log/redis && redis-server --daemonize yes \
    --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no --dir /var/lib/redis \
    --logfile /var/log/redis/ci.log || true
fi
if ! up 3306; then
  echo "MariaDB is not answering on 3306: starting it"
  is_root && start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd || true
fi

wait_up PostgreSQL 5432
wait_up Redis 6379
wait_up MariaDB 3306
echo "services: PostgreSQL, Redis and MariaDB are up; redis-server and pgbouncer are installed"
