"""Local stack on 127.0.0.1: a Ray head with dashboard and an MLflow server, started and stopped safely."""
