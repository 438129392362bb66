"""Evaluating model references and registered versions: load them, run the evaluation stage, record, cache.

:func:`evaluate_model` takes anything :func:`pipeline.lifecycle.packaging.load_generator_record` reads (an MLflow
URI, a checkpoint folder, a weights file, an official release), hands the evaluation stage the generator's record
(the evaluation stage never loads MLflow models; its workers build the record) and returns its result. :class:`RegistryEvaluator` is what
promotion and retraining use to score ``models:/name/version`` on the pinned eval set; its results are cached
per (model version, eval manifest hash, metric set) on the version's tags, so an unchanged champion is not
evaluated again.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

from pipeline.config import Config
from pipeline.data.manifest import load_manifest, manifest_hash
from pipeline.errors import one_line
from pipeline.evaluation.evaluate import EvaluationResult, EvaluationSettings, Sample
from pipeline.evaluation.perceptual import MetricWeights, load_metric_weights
from pipeline.evaluation.ray_eval import evaluate_on_manifest, metric_set_id
from pipeline.evaluation.records import cache_tag, log_evaluation, read_evaluation
from pipeline.lifecycle.packaging import load_generator_record
from pipeline.paths import PathStr

__all__ = ["EvaluateJobConfig", "RegistryEvaluator", "evaluate_model", "parse_registered_ref", "registry_evaluator"]

log = logging.getLogger(__name__)


def evaluate_model(model_ref: str, eval_manifest: str, settings: EvaluationSettings | None = None,
                   tracking_uri: str | None = None, arch: str | None = None,
                   weights: MetricWeights | None = None, kwargs: Mapping[str, Any] | None = None) -> EvaluationResult:
    """Read ``model_ref`` (any reference, see :func:`load_generator_record`; ``arch`` / ``kwargs`` name a plain
    weights file's network) and evaluate it on ``eval_manifest`` with the Ray evaluation. The metric weights are
    read first (a missing file stops here)."""
    settings = settings or EvaluationSettings()
    weights = weights if weights is not None else load_metric_weights(settings.perceptual)
    record = load_generator_record(model_ref, tracking_uri, arch=arch, kwargs=kwargs,
                                   storage_options=settings.storage_options or None)
    return evaluate_on_manifest(record, model_ref, eval_manifest, settings, weights)


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
    """``jobs/evaluate.py``: which model, which pinned eval set, where to record the result.

    ``reuse_cached``: for a registered version, hand back its recorded evaluation with the same eval set and
    metric set instead of evaluating again.
    """

    model: PathStr = "models:/lbam@champion"
    eval_manifest: PathStr
    arch: str | None = None  # a plain weights file's architecture
    generator_kwargs: dict[str, Any] | None = None  # a plain weights file's generator keywords (when its shapes don't say)
    tracking_uri: str | None = None
    log_to_mlflow: bool = True
    reuse_cached: bool = False
    evaluation: EvaluationSettings = EvaluationSettings()


class RegistryEvaluator:
    """``evaluator(name, version) -> summary`` for :func:`pipeline.lifecycle.promotion.promote`.

    Built once per promotion: reads the eval manifest's hash and the metric weights up front (a missing
    weights file fails before any evaluation). A version already evaluated on this eval set with this metric
    set (tag ``holefill.eval.<hash12>.<metric_set>.run_id``) is read back from its run instead of evaluated
    again (``reuse_cached``); new evaluations are recorded (``log_results``) and become cache entries.
    ``results`` keeps every result of this evaluator; :meth:`samples` gives a version's kept pictures.
    """

    def __init__(self, tracking_uri: str, eval_manifest: str, settings: EvaluationSettings | None = None,
                 log_results: bool = True, reuse_cached: bool = True, weights: MetricWeights | None = None) -> None:
        self.tracking_uri, self.eval_manifest = tracking_uri, eval_manifest
        self.settings = settings or EvaluationSettings()
        self.log_results, self.reuse_cached = log_results, reuse_cached
        self.weights = weights if weights is not None else load_metric_weights(self.settings.perceptual)
        self.manifest_hash = manifest_hash(load_manifest(eval_manifest, self.settings.storage_options or None))
        self.metric_set = metric_set_id(self.settings, self.weights)
        self.results: dict[tuple[str, str], EvaluationResult] = {}

    def cached(self, name: str, version: str) -> EvaluationResult | None:
        """The recorded evaluation of ``name``/``version`` on this eval set and metric set, if any."""
        # lazy: importing MLflow takes seconds, paid only by the callers that talk to a tracking server
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        run_id = client.get_model_version(name, str(version)).tags.get(cache_tag(self.manifest_hash, self.metric_set))
        if not run_id:
            return None
        try:
            return read_evaluation(self.tracking_uri, run_id)
        except MlflowException as exc:  # the run was deleted: evaluate again
            log.warning("cached evaluation run %s of %s/%s is unreadable (%s); evaluating again", run_id, name, version,
                        one_line(exc))
            return None

    def __call__(self, name: str, version: str) -> dict[str, float]:
        version = str(version)
        result = self.cached(name, version) if self.reuse_cached else None
        if result is not None:
            log.info("%s/%s on %s: reusing evaluation run %s (metric set %s)", name, version, self.manifest_hash[:12],
                     result.extra["run_id"], self.metric_set)
        else:
            result = evaluate_model(f"models:/{name}/{version}", self.eval_manifest, self.settings, self.tracking_uri,
                                    weights=self.weights)
            if self.log_results:
                result.extra["run_id"] = log_evaluation(self.tracking_uri, result, name, version, self.settings.experiment)
        log.info("%s/%s on %s:\n%s", name, version, self.manifest_hash[:12], result.table())
        self.results[(name, version)] = result
        return result.summary

    def samples(self, name: str, version: str) -> list[Sample]:
        """The pictures kept by the evaluation of ``name``/``version`` (empty when it was not evaluated here)."""
        result = self.results.get((name, str(version)))
        return result.samples if result else []


def registry_evaluator(tracking_uri: str, eval_manifest: str, settings: EvaluationSettings | None = None,
                       log_results: bool = True, reuse_cached: bool = True) -> RegistryEvaluator:
    """A :class:`RegistryEvaluator` (kept under this name for callers of the function form)."""
    return RegistryEvaluator(tracking_uri, eval_manifest, settings, log_results, reuse_cached)
