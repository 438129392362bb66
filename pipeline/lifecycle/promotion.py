"""The model registry's lifecycle: ``champion`` / ``previous_champion`` aliases and the promotion gate.

Rules:

* Aliases only, never stages. ``champion`` is what inference and fine-tuning load; ``previous_champion``
  is where the alias was before the last promotion (one-step rollback: move ``champion`` back to it).
* The alias is read from the registry every time it is needed, so a human moving it (MLflow UI,
  ``MlflowClient.set_registered_model_alias``) is honoured by every job. A promotion re-reads it just
  before moving it and refuses to move it when it changed while the evaluation ran.
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
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Literal, Mapping

from pydantic import Field, field_validator

from pipeline.buckets import BUCKET_NAMES
from pipeline.config import Config
from pipeline.evaluation.evaluate import EvaluationSettings
from pipeline.lifecycle.evidence import bucket_pictures, comparison_markdown, log_evidence
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
    """What ``promote`` did: ``action`` is ``promoted``, ``first_champion``, ``refused``, ``already_champion``
    or ``champion_moved`` (a human moved the alias during evaluation; nothing changed)."""

    model: str
    challenger: str
    champion_before: str | None
    champion_after: str | None
    action: Literal["promoted", "first_champion", "refused", "already_champion", "champion_moved"]
    decision: GateDecision | None = None
    challenger_metrics: dict[str, float] = field(default_factory=dict)
    champion_metrics: dict[str, float] | None = None

    @property
    def promoted(self) -> bool:
        return self.action in ("promoted", "first_champion")


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
    for key, value in tags.items():
        client.set_model_version_tag(outcome.model, outcome.challenger, key, truncate(value, MAX_TAG_VALUE_CHARS))
    client.update_model_version(outcome.model, outcome.challenger, description=_describe(outcome, eval_set, evidence_run))


def promote(client, name: str, challenger: str, evaluator: Evaluator, gate: GateSettings,
            eval_set: str = "", champion_alias: str = CHAMPION,
            evidence_experiment: str = "holefill-promotion") -> PromotionOutcome:
    """Evaluate version ``challenger`` of model ``name`` against the current champion and move the alias
    when the gate passes (``previous_champion`` keeps the old one). The decision is recorded on the
    challenger version whatever it is: tags, a description with the gate's checks and the per-bucket metric
    table, and a run in ``evidence_experiment`` with the table and per-bucket pictures (when ``evaluator`` has
    a ``samples(name, version)`` method, as :class:`pipeline.lifecycle.evaluations.RegistryEvaluator` does).
    ``eval_set`` names the pinned eval set (its manifest hash) in the record.
    """
    challenger = str(challenger)
    client.get_model_version(name, challenger)  # a missing version fails here, before any evaluation
    champion = current_champion(client, name, champion_alias)
    if champion == challenger:
        log.info("%s version %s already is %s: nothing to do", name, challenger, champion_alias)
        return PromotionOutcome(name, challenger, champion, champion, "already_champion")

    log.info("evaluating challenger %s/%s", name, challenger)
    challenger_metrics = dict(evaluator(name, challenger))
    champion_metrics = None
    if champion is not None:
        log.info("evaluating champion %s/%s on the same eval set", name, champion)
        champion_metrics = dict(evaluator(name, champion))
    decision = evaluate_gate(challenger_metrics, champion_metrics, gate)
    action = "refused"
    if decision.passed:
        action = "first_champion" if champion is None else "promoted"
    outcome = PromotionOutcome(name, challenger, champion, champion, action, decision, challenger_metrics,
                               champion_metrics)

    if decision.passed:
        now = current_champion(client, name, champion_alias)
        if now != champion:
            # Someone moved the alias while we evaluated: their choice wins; this comparison is stale.
            outcome.action, outcome.champion_after = "champion_moved", now
            decision.reasons.append(
                f"{champion_alias} moved from {champion or 'none'} to {now or 'none'} during evaluation: "
                "left as is; run promote again to compare against the new champion")
        else:
            if champion is not None:
                client.set_registered_model_alias(name, PREVIOUS_CHAMPION, champion)
            client.set_registered_model_alias(name, champion_alias, challenger)
            outcome.champion_after = challenger
    _record(client, outcome, eval_set, evaluator, evidence_experiment)
    log.info("%s version %s: %s (%s)", name, challenger, outcome.action, "; ".join(decision.reasons))
    return outcome


class PromoteJobConfig(Config):
    """``jobs/promote.py``: the model, the challenger (version number, alias or ``latest``), the gate."""

    registered_model: str
    challenger: str = "latest"
    eval_manifest: PathStr
    tracking_uri: str | None = None
    gate: GateSettings = GateSettings()
    evaluation: EvaluationSettings = EvaluationSettings()


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
