"""Evaluating model references and registered versions: load them, run the evaluation stage, record it.

:func:`evaluate_model` takes anything :func:`pipeline.lifecycle.inference.load_model_ref` loads (an MLflow
URI, a checkpoint, a weights file); :func:`registry_evaluator` is what promotion and retraining use to score
``models:/name/version`` on the pinned eval set.
"""

from __future__ import annotations

import logging

from pipeline.config import Config
from pipeline.evaluation.evaluate import EvaluationResult, EvaluationSettings, evaluate_on_manifest, log_evaluation
from pipeline.lifecycle.inference import load_model_ref

__all__ = ["EvaluateJobConfig", "evaluate_model", "parse_registered_ref", "registry_evaluator"]

log = logging.getLogger(__name__)


def evaluate_model(model_ref: str, eval_manifest: str, settings: EvaluationSettings | None = None,
                   tracking_uri: str | None = None, arch: str | None = None) -> EvaluationResult:
    """Load ``model_ref`` (MLflow URI or local checkpoint, see :func:`load_model_ref`) and evaluate it on
    ``eval_manifest``."""
    generator, arch = load_model_ref(model_ref, tracking_uri, arch)
    return evaluate_on_manifest(generator, arch, model_ref, eval_manifest, settings)


def parse_registered_ref(model_ref: str, client) -> tuple[str, str] | None:
    """``(name, version)`` of a ``models:/name/version`` or ``models:/name@alias`` reference, else ``None``."""
    if not model_ref.startswith("models:/"):
        return None
    body = model_ref[len("models:/"):]
    if "@" in body:
        name, alias = body.split("@", 1)
        return name, str(client.get_model_version_by_alias(name, alias).version)
    name, _, version = body.partition("/")
    if name.startswith("m-") and not version:  # a logged model id, not a registered version
        return None
    if not version.isdigit():
        raise ValueError(f"model reference {model_ref!r} must be models:/name/<version number> or models:/name@alias")
    return name, version


class EvaluateJobConfig(Config):
    """``jobs/evaluate.py``: which model, which pinned eval set, where to record the result."""

    model: str = "models:/lbam@champion"
    eval_manifest: str
    arch: str | None = None
    tracking_uri: str | None = None
    log_to_mlflow: bool = True
    evaluation: EvaluationSettings = EvaluationSettings()


def registry_evaluator(tracking_uri: str, eval_manifest: str, settings: EvaluationSettings | None = None,
                       log_results: bool = True):
    """An ``evaluator(name, version) -> summary`` for :func:`pipeline.lifecycle.promotion.promote` that loads
    ``models:/name/version``, evaluates it on ``eval_manifest`` and (by default) records the evaluation."""
    settings = settings or EvaluationSettings()

    def evaluate_version(name: str, version: str) -> dict[str, float]:
        result = evaluate_model(f"models:/{name}/{version}", eval_manifest, settings, tracking_uri)
        log.info("%s/%s on %s:\n%s", name, version, result.eval_manifest_hash[:12], result.table())
        if log_results:
            log_evaluation(tracking_uri, result, name, version, settings.experiment)
        return result.summary

    return evaluate_version
