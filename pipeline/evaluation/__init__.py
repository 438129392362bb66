"""Evaluation stage: a generator on a pinned eval set → per-bucket metrics, a table, an MLflow record.

Knows generators and manifests, not registered models: loading ``models:/…`` references is the lifecycle
stage's job (:mod:`pipeline.lifecycle.evaluations`).
"""
