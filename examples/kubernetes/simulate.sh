#!/usr/bin/env bash
# Runs locally, with processes, what deployment.yaml and job.yaml make Kubernetes run:
#   1. four pods start at once; each runs its init container (alembic-autolock upgrade heads)
#      and, once that exits 0, its app container (gunicorn, in production: check mode);
#   2. each pod's readiness probe (alembic-autolock check) runs until it exits 0;
#   3. the Job shape: a release job migrates while init containers `wait` for it.
# Usage: DATABASE_URL=postgresql://... examples/kubernetes/simulate.sh   (needs an empty database)
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${DATABASE_URL:?set DATABASE_URL to an empty database}"
export ALEMBIC_AUTOLOCK_TIMEOUT=600 ALEMBIC_AUTOLOCK_ENV=production
PODS=${PODS:-4}
PORT0=${PORT0:-18400}
work=$(mktemp -d)
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

pod() {  # init container, then the app container
  local n=$1
  alembic-autolock -c alembic.ini upgrade heads >"$work/init-$n.log" 2>&1 \
    || { echo "pod $n: init container failed"; cat "$work/init-$n.log"; return 1; }
  exec gunicorn -w "${WORKERS:-2}" -b "127.0.0.1:$((PORT0 + n))" 'examples.flask_app:create_app()' \
    >"$work/app-$n.log" 2>&1
}

echo "== the Deployment: $PODS pods start at once"
for n in $(seq 1 "$PODS"); do pod "$n" & pids+=($!); done

for n in $(seq 1 "$PODS"); do  # the readiness probe, every 0.5 s, up to 60 s
  for _ in $(seq 1 120); do
    if alembic-autolock -q -c alembic.ini check --allow-manual; then break; fi
    sleep 0.5
  done
  for _ in $(seq 1 120); do  # and the app answers
    if python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$((PORT0 + n))/health', timeout=2)" 2>/dev/null; then
      echo "pod $n: ready"; break
    fi
    sleep 0.5
  done
done
migrated=$(grep -l "^upgraded" "$work"/init-*.log | wc -l)
echo "init containers that migrated: $migrated of $PODS"
grep -h "" "$work"/init-*.log | sed 's/^/  init: /'
alembic-autolock -c alembic.ini status
[ "$migrated" -eq 1 ]

echo "== the Job shape: the database is taken back to base, init containers wait, a job migrates"
ALEMBIC_AUTOLOCK_ALLOW_DOWNGRADE=true alembic-autolock -q -c alembic.ini downgrade base
waiters=()
for n in 1 2; do
  alembic-autolock -c alembic.ini wait --timeout 60 --interval 0.2 >"$work/wait-$n.log" 2>&1 &
  waiters+=($!)
done
sleep 1
alembic-autolock -c alembic.ini check && { echo "check should say pending"; exit 1; } || [ $? -eq 1 ]
alembic-autolock -c alembic.ini upgrade heads
for w in "${waiters[@]}"; do wait "$w"; done
echo "waiting init containers: exited 0 once the job had migrated"
alembic-autolock -c alembic.ini check
echo "simulation passed"
