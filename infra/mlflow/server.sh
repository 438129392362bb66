#!/usr/bin/env bash
# Production MLflow tracking server for holefill: PostgreSQL backend store (runs, registry, aliases)
# and S3 artifacts proxied by the server (--artifacts-destination), so training workers and users
# need only the tracking URL, never S3 credentials of the artifact bucket.
#
# Settings come from the environment (see mlflow.env.example; the systemd unit loads it).
#
# Nobody reaches it unauthenticated (whoever can write to the registry can move `champion`, which serving follows):
#  * MLFLOW_AUTH=none (default): the server listens on 127.0.0.1 only, behind a reverse proxy on this host that does
#    TLS and authentication; a non-loopback MLFLOW_HOST is refused.
#  * MLFLOW_AUTH=basic-auth: MLflow's own basic-auth app (--app-name basic-auth: users, passwords, per-experiment and
#    per-model permissions), which may listen on other addresses; needs MLFLOW_AUTH_CONFIG_PATH (basic_auth.ini.example)
#    and MLFLOW_FLASK_SERVER_SECRET_KEY (shared by the --workers). Still put TLS in front.
# Needs: pip install "mlflow>=3.5,<4" psycopg2-binary boto3
# After an MLflow upgrade run `mlflow db upgrade "$MLFLOW_BACKEND_STORE_URI"` once before starting.
set -euo pipefail

: "${MLFLOW_BACKEND_STORE_URI:?postgresql://USER:PASSWORD@HOST:5432/DB}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?s3://BUCKET/PREFIX}"
# Since MLflow 3.5 the server answers 403 to Host headers outside localhost/private IPs unless listed.
: "${MLFLOW_ALLOWED_HOSTS:?comma-separated host[:port] names clients use, e.g. mlflow.example.internal}"

die() { echo "server.sh: $*" >&2; exit 2; }
host="${MLFLOW_HOST:-127.0.0.1}"

args=(
  --backend-store-uri "$MLFLOW_BACKEND_STORE_URI"
  --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION"
  --serve-artifacts
  --host "$host"
  --port "${MLFLOW_PORT:-5000}"
  --workers "${MLFLOW_WORKERS:-4}"
  --allowed-hosts "$MLFLOW_ALLOWED_HOSTS"
)
case "${MLFLOW_AUTH:-none}" in
  none)
    case "$host" in
      127.0.0.1 | localhost | ::1) ;;
      *) die "MLFLOW_HOST=$host without authentication: keep 127.0.0.1 behind the authenticating proxy, or set MLFLOW_AUTH=basic-auth" ;;
    esac
    ;;
  basic-auth)
    [ -n "${MLFLOW_AUTH_CONFIG_PATH:-}" ] || die "MLFLOW_AUTH=basic-auth needs MLFLOW_AUTH_CONFIG_PATH (see basic_auth.ini.example)"
    [ -r "$MLFLOW_AUTH_CONFIG_PATH" ] || die "MLFLOW_AUTH_CONFIG_PATH=$MLFLOW_AUTH_CONFIG_PATH is not a readable file"
    [ -n "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ] || die "MLFLOW_AUTH=basic-auth needs MLFLOW_FLASK_SERVER_SECRET_KEY (one secret for all workers)"
    args+=(--app-name basic-auth)
    ;;
  *) die "MLFLOW_AUTH=${MLFLOW_AUTH}: use none (127.0.0.1 behind a proxy) or basic-auth" ;;
esac
if [ -n "${MLFLOW_CORS_ALLOWED_ORIGINS:-}" ]; then
  args+=(--cors-allowed-origins "$MLFLOW_CORS_ALLOWED_ORIGINS")
fi
exec "${MLFLOW_BIN:-mlflow}" server "${args[@]}"
