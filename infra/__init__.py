"""Deployment material for holefill: the local stack (importable), production MLflow, KubeRay, cron."""
