#!/bin/sh
# PostgreSQL (Debian's, on a Unix socket only, its files in /mlflow/postgres) and MLflow's
# tracking server on it, artifacts in /mlflow/artifacts: both on the compose volume, so a
# `down` / `up` keeps every run. Stopping the container stops both (SIGTERM to this shell).
set -eu
pg=/usr/lib/postgresql/15/bin
data=/mlflow/postgres
if [ ! -s "$data/PG_VERSION" ]; then
    "$pg/initdb" --auth=trust --username=mlflow --encoding=UTF8 -D "$data" >/dev/null
fi
"$pg/pg_ctl" -D "$data" -w -l /mlflow/postgres.log -o "-c listen_addresses='' -k /tmp" start >/dev/null
"$pg/psql" -h /tmp -U mlflow -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'mlflow'" | grep -q 1 \
    || "$pg/createdb" -h /tmp -U mlflow mlflow
stop() { kill -TERM "$mlflow" 2>/dev/null; wait "$mlflow" 2>/dev/null; "$pg/pg_ctl" -D "$data" -m fast stop >/dev/null; exit 0; }
trap stop TERM INT
# no GenAI job consumers (seven huey processes that Bouquet's runs never use)
MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false} /opt/mlflow/venv/bin/mlflow server \
    --backend-store-uri "postgresql+psycopg2://mlflow@/mlflow?host=/tmp" \
    --artifacts-destination /mlflow/artifacts \
    --host 0.0.0.0 --port 5000 --workers 2 \
    --allowed-hosts "${MLFLOW_ALLOWED_HOSTS:-mlflow,mlflow:5000,localhost,localhost:*,127.0.0.1,127.0.0.1:*}" &
mlflow=$!
wait "$mlflow"
