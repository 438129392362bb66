"""The model registry's lifecycle: ``champion`` / ``previous_champion`` aliases and the promotion gate.

Rules:

* Aliases only, never stages. ``champion`` is what inference and fine-tuning load; ``previous_champion``
  is where the alias was before the last promotion (one-step rollback: move ``champion`` back to it).
* The alias is read from the registry every time it is needed, so a human moving it (MLflow UI,
  ``MlflowClient.set_registered_model_alias``) is honoured by every job. A promotion re-reads it just
  before moving it and refuses to move it when it changed while the evaluation ran; it reads both aliases back
  after moving them and records a mismatch as a ``conflict`` (never moving them back: the human wins).
* Promotions of one registered model are serialised by one lock (:func:`promotion_lock`, :mod:`pipeline.locks`):
  each compares against the champion the previous one left. Its decision is recorded as pending before the
  aliases move and completed after; a re-run completes a pending record.
* A challenger is promoted only when the gate passes: every rule compares challenger and champion,
  evaluated in the same call on the same pinned eval set. With no champion yet, the first valid model
  (evaluated on a non-empty set, finite metrics, above the optional absolute floors) becomes champion.
* The gate's metrics, directions and thresholds are configurable; unset, it uses FID and LPIPS when both
  models were measured on them (PSNR alone rewards blur), PSNR/SSIM otherwise, and says which.
* Every decision is recorded on the challenger version: ``holefill.promotion.*`` tags, a description holding
  the gate's checks, the reasons and the champion-vs-challenger table per hole bucket, and a run with the
  per-bucket pictures (:mod:`pipeline.lifecycle.evidence`).
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Literal, Mapping

from pydantic import Field, field_validator

from pipeline.buckets import BUCKET_NAMES
from pipeline.config import Config
from pipeline.evaluation.evaluate import EvaluationSettings
from pipeline.fsutil import StorageOptionsLike, StorageSettings
from pipeline.lifecycle.evidence import bucket_pictures, comparison_markdown, log_evidence
from pipeline.locks import Lock, LockSettings, lock_url
from pipeline.paths import PathStr
from pipeline.tracking import MAX_TAG_VALUE_CHARS, truncate

__all__ = [
    "CHAMPION",
    "PREVIOUS_CHAMPION",
    "CHALLENGER",
    "GateSettings",
    "GateDecision",
    "GateRule",
    "PromotionOutcome",
    "current_champion",
    "evaluate_gate",
    "promote",
    "promotion_lock",
]

log = logging.getLogger(__name__)

CHAMPION = "champion"
PREVIOUS_CHAMPION = "previous_champion"
CHALLENGER = "challenger"
TAG = "holefill.promotion"
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "l1": False, "fid": False, "lpips": False, "p_ids": True,
                    "u_ids": True}

Evaluator = Callable[[str, str], Mapping[str, float]]
"""``evaluator(model_name, version) -> metrics summary`` (keys ``psnr``, ``psnr/0.01-0.10``, ``count``, …); one
that also has ``samples(model_name, version) -> list[Sample]`` gets its pictures into the decision record."""


class GateRule(Config):
    """One comparison: ``improvement(metric, scope) >= min_improvement``.

    Improvement is ``challenger - champion`` for higher-is-better metrics (PSNR, SSIM, P-IDS, U-IDS) and
    ``champion - challenger`` for lower-is-better ones (L1, FID, LPIPS), so a positive number always means
    "better". ``scope``: ``overall``, ``each_bucket`` (every bucket both models have the metric for) or one
    bucket name such as ``0.30-0.40``. A negative ``min_improvement`` is a tolerated regression.
    """

    metric: Literal["psnr", "ssim", "l1", "fid", "lpips", "p_ids", "u_ids"]
    scope: str = "overall"
    min_improvement: float = 0.0

    @field_validator("scope")
    @classmethod
    def _known_scope(cls, scope: str) -> str:
        if scope not in ("overall", "each_bucket", *BUCKET_NAMES):
            raise ValueError(f"scope must be overall, each_bucket or one of {', '.join(BUCKET_NAMES)}")
        return scope


# PSNR alone rewards blur (a blurry fill has a lower squared error than a sharp, slightly misplaced one), so the
# default gate uses FID and LPIPS whenever both models were measured on them (their weights are configured).
PSNR_RULES = (
    GateRule(metric="psnr", scope="overall", min_improvement=0.01),
    GateRule(metric="psnr", scope="each_bucket", min_improvement=-0.5),
    GateRule(metric="ssim", scope="overall", min_improvement=-0.005),
)
PERCEPTUAL_RULES = (
    GateRule(metric="fid", scope="overall", min_improvement=0.1),
    GateRule(metric="fid", scope="each_bucket", min_improvement=-2.0),
    GateRule(metric="lpips", scope="overall", min_improvement=0.0),
)


class GateSettings(Config):
    """The promotion gate: every rule must pass; ``min_values`` are absolute floors (first champion too).

    ``rules`` unset (``null``): FID and LPIPS rules (:data:`PERCEPTUAL_RULES`) when both models have FID and
    LPIPS, PSNR rules (:data:`PSNR_RULES`) otherwise; the decision says which.
    """

    rules: list[GateRule] | None = None
    min_values: dict[Literal["psnr", "ssim", "p_ids", "u_ids"], float] = Field(default_factory=dict)
    max_values: dict[Literal["l1", "fid", "lpips"], float] = Field(default_factory=dict)
    min_samples: int = Field(default=1, ge=1)

    def resolve(self, champion: Mapping[str, float] | None, challenger: Mapping[str, float]) -> tuple[list[GateRule], str]:
        """The rules to apply to this pair and a sentence saying which (for the decision record)."""
        if self.rules is not None:
            return list(self.rules), "configured rules: " + ", ".join(f"{r.metric} {r.scope} >= {r.min_improvement:+g}" for r in self.rules)
        both = [challenger] + ([champion] if champion is not None else [])
        if all("fid" in s and "lpips" in s for s in both):
            return list(PERCEPTUAL_RULES), "default FID + LPIPS rules (their weights are configured)"
        return list(PSNR_RULES), ("default PSNR rules: FID/LPIPS weights are not configured "
                                  "(PSNR alone rewards blur; configure evaluation.perceptual)")


@dataclass
class Check:
    """One evaluated comparison of the gate."""

    metric: str
    scope: str
    champion: float | None
    challenger: float | None
    improvement: float | None
    required: float
    passed: bool


@dataclass
class GateDecision:
    """Outcome of the gate: ``passed`` and why, plus every check made (for the version's description)."""

    passed: bool
    reasons: list[str]
    checks: list[Check] = field(default_factory=list)
    basis: str = ""

    def markdown(self) -> str:
        """The comparison as a Markdown table (MLflow renders version descriptions as Markdown)."""
        lines = ["| metric | scope | champion | challenger | improvement | required | ok |", "|---|---|---|---|---|---|---|"]

        def cell(value: float | None) -> str:
            return "-" if value is None else f"{value:.4f}"

        for c in self.checks:
            lines.append(f"| {c.metric} | {c.scope} | {cell(c.champion)} | {cell(c.challenger)} | "
                         f"{cell(c.improvement)} | {c.required:+.4f} | {'yes' if c.passed else 'NO'} |")
        return "\n".join(lines)


def _valid(summary: Mapping[str, float], gate: GateSettings) -> list[str]:
    """Reasons a single model's evaluation is not acceptable at all (empty when it is)."""
    problems = []
    count = summary.get("count", 0)
    if count < gate.min_samples:
        problems.append(f"evaluated on {int(count)} images, fewer than min_samples={gate.min_samples}")
    for metric in ("psnr", "ssim", "l1"):
        value = summary.get(metric)
        if value is None or not math.isfinite(value):
            problems.append(f"{metric} is missing or not finite ({value})")
    for metric, floor in gate.min_values.items():
        value = summary.get(metric)
        if value is not None and value < floor:
            problems.append(f"{metric} {value:.4f} is below the floor {floor}")
    for metric, ceiling in gate.max_values.items():
        value = summary.get(metric)
        if value is not None and value > ceiling:
            problems.append(f"{metric} {value:.4f} is above the ceiling {ceiling}")
    return problems


def _scopes(rule: GateRule, champion: Mapping[str, float], challenger: Mapping[str, float]) -> list[str]:
    if rule.scope == "overall":
        return ["overall"]
    if rule.scope == "each_bucket":
        # Buckets both models were measured in (FID needs >= 2 images in a bucket, so it may skip some).
        return [b for b in BUCKET_NAMES if champion.get(f"count/{b}", 0) > 0 and challenger.get(f"count/{b}", 0) > 0
                and f"{rule.metric}/{b}" in champion and f"{rule.metric}/{b}" in challenger]
    return [rule.scope]


def evaluate_gate(challenger: Mapping[str, float], champion: Mapping[str, float] | None,
                  gate: GateSettings) -> GateDecision:
    """Decide whether ``challenger`` may replace ``champion`` (``None``: there is no champion yet)."""
    rules, basis = gate.resolve(champion, challenger)
    problems = _valid(challenger, gate)
    if problems:
        return GateDecision(False, [f"challenger is not a valid model: {p}" for p in problems], basis=basis)
    if champion is None:
        return GateDecision(True, ["no champion yet: the first valid model becomes champion"], basis=basis)
    checks: list[Check] = []
    for rule in rules:
        for scope in _scopes(rule, champion, challenger):
            key = rule.metric if scope == "overall" else f"{rule.metric}/{scope}"
            old, new = champion.get(key), challenger.get(key)
            if old is None or new is None:
                checks.append(Check(rule.metric, scope, old, new, None, rule.min_improvement, False))
                continue
            improvement = (new - old) if HIGHER_IS_BETTER[rule.metric] else (old - new)
            checks.append(Check(rule.metric, scope, old, new, improvement, rule.min_improvement,
                                improvement >= rule.min_improvement))
    failed = [c for c in checks if not c.passed]
    if failed:
        reasons = [
            f"{c.metric} {c.scope}: " + (f"improvement {c.improvement:+.4f} < required {c.required:+.4f}"
                                         if c.improvement is not None else "not measured for both models")
            for c in failed
        ]
        return GateDecision(False, reasons, checks, basis)
    return GateDecision(True, [f"all {len(checks)} gate checks passed"], checks, basis)


# ----------------------------------------------------------------------------------------------------
# Registry operations


def current_champion(client, name: str, alias: str = CHAMPION) -> str | None:
    """Version number ``alias`` points at right now, or ``None`` (no such model or alias)."""
    # lazy: importing MLflow takes seconds, paid only by the callers that talk to a tracking server
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


@dataclass
class PromotionOutcome:
    """What ``promote`` did: ``action`` is ``promoted``, ``first_champion``, ``refused``, ``already_champion``,
    ``champion_moved`` (a human moved the alias during evaluation; nothing changed) or ``conflict`` (the aliases
    read back after the move are not what this promotion set: someone moved them at the same moment; left as
    they are)."""

    model: str
    challenger: str
    champion_before: str | None
    champion_after: str | None
    action: Literal["promoted", "first_champion", "refused", "already_champion", "champion_moved", "conflict"]
    decision: GateDecision | None = None
    challenger_metrics: dict[str, float] = field(default_factory=dict)
    champion_metrics: dict[str, float] | None = None
    completed_pending: bool = False

    @property
    def promoted(self) -> bool:
        return self.action in ("promoted", "first_champion")


def promotion_lock(lock_root: str, name: str, settings: LockSettings | None = None,
                   storage_options: StorageOptionsLike = None) -> Lock:
    """The lock serialising every promotion of registered model ``name`` (``<lock_root>/.promotion-<name>.lock``);
    ``jobs/promote.py`` and retraining take the same one."""
    settings = settings or LockSettings()
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    return Lock(lock_url(os.path.expanduser(lock_root), f"promotion-{safe}"), f"promotion of {name}",
                stale_after_s=settings.stale_after_s, heartbeat_s=settings.heartbeat_s, storage_options=storage_options)


def _describe(outcome: PromotionOutcome, eval_set: str, evidence_run: str | None = None) -> str:
    decision = outcome.decision
    head = (f"**Promotion gate: {outcome.action.replace('_', ' ')}** "
            f"({datetime.now(timezone.utc).isoformat(timespec='seconds')}, eval set `{eval_set}`)\n\n"
            f"Compared with champion: {('version ' + outcome.champion_before) if outcome.champion_before else 'none'}\n")
    basis = f"Gate: {decision.basis}\n" if decision and decision.basis else ""
    reasons = "\n".join(f"* {r}" for r in (decision.reasons if decision else []))
    table = decision.markdown() if decision and decision.checks else ""
    metrics = ("\n**Champion vs challenger per hole bucket**\n\n" + comparison_markdown(outcome.champion_metrics,
                                                                                          outcome.challenger_metrics)
               if outcome.challenger_metrics else "")
    pictures = (f"\nPictures per bucket (input | champion | challenger | truth): run `{evidence_run}`, "
                "artifacts `pictures/`" if evidence_run else "")
    return "\n".join(part for part in (head, basis, reasons, table, metrics, pictures) if part)


def _set_tags(client, outcome: PromotionOutcome, tags: Mapping[str, str]) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(outcome.model, outcome.challenger, key, truncate(value, MAX_TAG_VALUE_CHARS))


def _record_pending(client, outcome: PromotionOutcome, eval_set: str) -> None:
    """Before the aliases move: the decision about to take effect, marked pending (a crash leaves it findable)."""
    _set_tags(client, outcome, {
        f"{TAG}.state": "pending",
        f"{TAG}.decision": outcome.action,
        f"{TAG}.compared_to": outcome.champion_before or "none",
        f"{TAG}.eval_set": eval_set,
        f"{TAG}.started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })


def _record(client, outcome: PromotionOutcome, eval_set: str, evaluator: Evaluator | None = None,
            evidence_experiment: str = "holefill-promotion") -> None:
    evidence_run = None
    if outcome.decision is not None:
        # Pictures come from evaluators that keep samples (the registry evaluator does); table-driven ones give none.
        samples = getattr(evaluator, "samples", None)
        pictures = {}
        if samples is not None:
            pictures = bucket_pictures(samples(outcome.model, outcome.champion_before) if outcome.champion_before else [],
                                       samples(outcome.model, outcome.challenger))
        evidence_run = log_evidence(client, evidence_experiment, outcome.model, outcome.challenger,
                                    outcome.champion_before,
                                    comparison_markdown(outcome.champion_metrics, outcome.challenger_metrics), pictures)

    # Tags are for searching and at-a-glance columns (one REST call each, so few); the description holds
    # the full comparison table.
    tags = {
        f"{TAG}.decision": outcome.action,
        f"{TAG}.compared_to": outcome.champion_before or "none",
        f"{TAG}.eval_set": eval_set,
        f"{TAG}.reasons": "; ".join(outcome.decision.reasons) if outcome.decision else "",
        f"{TAG}.gate": outcome.decision.basis if outcome.decision else "",
    }
    if evidence_run:
        tags[f"{TAG}.evidence_run"] = evidence_run
    for metric in ("psnr", "fid", "lpips"):
        if metric in outcome.challenger_metrics:
            tags[f"{TAG}.challenger_{metric}"] = f"{outcome.challenger_metrics[metric]:.6g}"
        if outcome.champion_metrics and metric in outcome.champion_metrics:
            tags[f"{TAG}.champion_{metric}"] = f"{outcome.champion_metrics[metric]:.6g}"
    _set_tags(client, outcome, tags)
    client.update_model_version(outcome.model, outcome.challenger, description=_describe(outcome, eval_set, evidence_run))
    _set_tags(client, outcome, {f"{TAG}.state": "completed"})  # last: the record is whole


def _evaluate(name: str, challenger: str, champion: str | None, evaluator: Evaluator,
              gate: GateSettings) -> tuple[dict[str, float], dict[str, float] | None, GateDecision]:
    log.info("evaluating challenger %s/%s", name, challenger)
    challenger_metrics = dict(evaluator(name, challenger))
    champion_metrics = None
    if champion is not None:
        log.info("evaluating champion %s/%s on the same eval set", name, champion)
        champion_metrics = dict(evaluator(name, champion))
    return challenger_metrics, champion_metrics, evaluate_gate(challenger_metrics, champion_metrics, gate)


def _complete_pending(client, name: str, challenger: str, tags: Mapping[str, str], evaluator: Evaluator,
                      gate: GateSettings, eval_set: str, champion_alias: str,
                      evidence_experiment: str) -> PromotionOutcome:
    """A promotion that moved the alias and died before its record was whole: write the record now."""
    compared = tags.get(f"{TAG}.compared_to", "none")
    champion_before = None if compared == "none" else compared
    challenger_metrics, champion_metrics, decision = _evaluate(name, challenger, champion_before, evaluator, gate)
    action = tags.get(f"{TAG}.decision") or ("first_champion" if champion_before is None else "promoted")
    decision.reasons.append(f"record completed by a later run (the promotion that moved {champion_alias} "
                            f"stopped before recording its decision)")
    outcome = PromotionOutcome(name, challenger, champion_before, challenger, action, decision, challenger_metrics,
                               champion_metrics, completed_pending=True)
    _record(client, outcome, tags.get(f"{TAG}.eval_set") or eval_set, evaluator, evidence_experiment)
    log.info("%s version %s: completed the pending %s record", name, challenger, action)
    return outcome


def promote(client, name: str, challenger: str, evaluator: Evaluator, gate: GateSettings,
            eval_set: str = "", champion_alias: str = CHAMPION,
            evidence_experiment: str = "holefill-promotion", lock: Lock | None = None) -> PromotionOutcome:
    """Evaluate version ``challenger`` of model ``name`` against the current champion and move the alias
    when the gate passes (``previous_champion`` keeps the old one). The decision is recorded on the
    challenger version whatever it is: tags, a description with the gate's checks and the per-bucket metric
    table, and a run in ``evidence_experiment`` with the table and per-bucket pictures (when ``evaluator`` has
    a ``samples(name, version)`` method, as :class:`pipeline.lifecycle.evaluations.RegistryEvaluator` does).
    ``eval_set`` names the pinned eval set (its manifest hash) in the record.

    Compare-and-set: call it holding ``lock`` (:func:`promotion_lock`, checked again before the aliases move), so
    promotions of one model run one after the other, each against the champion its predecessor left. The decision
    is recorded as ``holefill.promotion.state=pending`` before the aliases move and ``completed`` after; a re-run
    on a version whose record is pending and which is champion completes that record. After the move both aliases
    are read back: a mismatch (someone moved them at that moment) is recorded as ``conflict`` and left as it is,
    so a human's choice in the MLflow UI always wins.
    """
    challenger = str(challenger)
    version = client.get_model_version(name, challenger)  # a missing version fails here, before any evaluation
    champion = current_champion(client, name, champion_alias)
    if champion == challenger:
        tags = dict(version.tags or {})
        if tags.get(f"{TAG}.state") == "pending":
            return _complete_pending(client, name, challenger, tags, evaluator, gate, eval_set, champion_alias,
                                     evidence_experiment)
        log.info("%s version %s already is %s: nothing to do", name, challenger, champion_alias)
        return PromotionOutcome(name, challenger, champion, champion, "already_champion")

    challenger_metrics, champion_metrics, decision = _evaluate(name, challenger, champion, evaluator, gate)
    action = "refused"
    if decision.passed:
        action = "first_champion" if champion is None else "promoted"
    outcome = PromotionOutcome(name, challenger, champion, champion, action, decision, challenger_metrics,
                               champion_metrics)

    if decision.passed:
        if lock is not None:
            lock.check()
        now = current_champion(client, name, champion_alias)
        if now != champion:
            # Someone moved the alias while we evaluated: their choice wins; this comparison is stale.
            outcome.action, outcome.champion_after = "champion_moved", now
            decision.reasons.append(
                f"{champion_alias} moved from {champion or 'none'} to {now or 'none'} during evaluation: "
                "left as is; run promote again to compare against the new champion")
        else:
            _record_pending(client, outcome, eval_set)
            if champion is not None:
                client.set_registered_model_alias(name, PREVIOUS_CHAMPION, champion)
            client.set_registered_model_alias(name, champion_alias, challenger)
            # Compare-and-set: read both back; whatever differs was set by someone else at this moment and stays.
            after = current_champion(client, name, champion_alias)
            previous_after = current_champion(client, name, PREVIOUS_CHAMPION)
            outcome.champion_after = after
            if after != challenger or (champion is not None and previous_after != champion):
                outcome.action = "conflict"
                decision.reasons.append(
                    f"after moving the aliases {champion_alias} is {after or 'none'} and {PREVIOUS_CHAMPION} "
                    f"{previous_after or 'none'} (expected {challenger} and {champion or 'none'}): someone moved them "
                    "at the same time; left as they are")
    _record(client, outcome, eval_set, evaluator, evidence_experiment)
    log.info("%s version %s: %s (%s)", name, challenger, outcome.action, "; ".join(decision.reasons))
    return outcome


DEFAULT_LOCK_ROOT = "~/.holefill/locks"


class PromoteJobConfig(Config):
    """``jobs/promote.py``: the model, the challenger (version number, alias or ``latest``), the gate, and the
    lock serialising promotions of the model (``lock_root``: a folder every promoting job sees, ``s3://…`` on a
    cluster; ``lock_wait_s``: how long to wait for another promotion of the model before skipping, exit 0)."""

    registered_model: str
    challenger: str = "latest"
    eval_manifest: PathStr
    tracking_uri: str | None = None
    gate: GateSettings = GateSettings()
    evaluation: EvaluationSettings = EvaluationSettings()
    lock_root: str = Field(DEFAULT_LOCK_ROOT, min_length=1)
    lock_wait_s: float = Field(default=1800.0, ge=0)
    lock: LockSettings = Field(default_factory=LockSettings)
    storage_options: StorageSettings = Field(default_factory=StorageSettings)


def resolve_version(client, name: str, ref: str) -> str:
    """A version number from ``ref``: digits as given, ``latest`` (highest number), else an alias name."""
    # lazy: importing MLflow takes seconds, paid only by the callers that talk to a tracking server
    from mlflow.exceptions import MlflowException

    if ref.isdigit():
        return ref
    if ref == "latest":
        versions = client.search_model_versions(f"name='{name}'")
        if not versions:
            raise ValueError(f"registered model {name!r} has no versions")
        return str(max(int(v.version) for v in versions))
    try:
        return str(client.get_model_version_by_alias(name, ref).version)
    except MlflowException:
        raise ValueError(f"registered model {name!r} has no alias {ref!r}") from None
