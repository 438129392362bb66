#!/usr/bin/env bash
# Production MLflow tracking server for holefill: PostgreSQL backend store (runs, registry, aliases)
# and S3 artifacts proxied by the server (--artifacts-destination), so training workers and users
# need only the tracking URL, never S3 credentials of the artifact bucket.
#
# Settings come from the environment (see mlflow.env.example; the systemd unit loads it).
# Needs: pip install "mlflow>=3.5,<4" psycopg2-binary boto3
# After an MLflow upgrade run `mlflow db upgrade "$MLFLOW_BACKEND_STORE_URI"` once before starting.
set -euo pipefail

: "${MLFLOW_BACKEND_STORE_URI:?postgresql://USER:PASSWORD@HOST:5432/DB}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?s3://BUCKET/PREFIX}"
# Since MLflow 3.5 the server answers 403 to Host headers outside localhost/private IPs unless listed.
: "${MLFLOW_ALLOWED_HOSTS:?comma-separated host[:port] names clients use, e.g. mlflow.example.internal}"

args=(
  --backend-store-uri "$MLFLOW_BACKEND_STORE_URI"
  --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION"
  --serve-artifacts
  --host "${MLFLOW_HOST:-0.0.0.0}"
  --port "${MLFLOW_PORT:-5000}"
  --workers "${MLFLOW_WORKERS:-4}"
  --allowed-hosts "$MLFLOW_ALLOWED_HOSTS"
)
if [ -n "${MLFLOW_CORS_ALLOWED_ORIGINS:-}" ]; then
  args+=(--cors-allowed-origins "$MLFLOW_CORS_ALLOWED_ORIGINS")
fi
exec "${MLFLOW_BIN:-mlflow}" server "${args[@]}"
