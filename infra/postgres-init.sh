#!/bin/bash
# The databases of the MLflow and Prefect servers, on one PostgreSQL 15 server, owned by
# POSTGRES_USER. The postgres image runs this once, on an empty data volume (it is mounted
# into /docker-entrypoint-initdb.d/ by infra/compose.yaml); running it again keeps what exists.
# Env: POSTGRES_USER, POSTGRES_DB (set by the image), SKYEYE_DATABASES (default "mlflow prefect").
set -euo pipefail
for db in ${SKYEYE_DATABASES:-mlflow prefect}; do
  psql -v ON_ERROR_STOP=1 --no-psqlrc --username "$POSTGRES_USER" --dbname "${POSTGRES_DB:-postgres}" \
    --set db="$db" <<'SQL'
SELECT format('CREATE DATABASE %I OWNER %I', :'db', current_user)
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'db')\gexec
SQL
  echo "database $db ready"
done
