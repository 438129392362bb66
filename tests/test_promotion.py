"""Promotion gate and champion aliases: the gate as a pure decision, then promotion on a real MLflow registry."""

from __future__ import annotations

import math

import pytest

from pipeline.buckets import BUCKET_NAMES
from pipeline.config import ConfigError, load_config
from pipeline.lifecycle.promotion import (
    CHAMPION,
    PREVIOUS_CHAMPION,
    GateSettings,
    GateRule,
    current_champion,
    evaluate_gate,
    promote,
)



def summary(psnr: float, ssim: float = 0.8, l1: float = 0.05, count: int = 60, bucket_psnr: dict | None = None) -> dict:
    """A metrics summary as BucketedMetrics gives it: 10 images per bucket, bucket PSNR = overall unless given."""
    out = {"psnr": psnr, "ssim": ssim, "l1": l1, "count": float(count)}
    for name in BUCKET_NAMES:
        out[f"count/{name}"] = count / len(BUCKET_NAMES)
        out[f"psnr/{name}"] = (bucket_psnr or {}).get(name, psnr)
        out[f"ssim/{name}"], out[f"l1/{name}"] = ssim, l1
    return out


GATE = GateSettings()


# ----------------------------------------------------------------------------------------------------
# The gate as a pure decision


def test_first_valid_model_becomes_champion():
    decision = evaluate_gate(summary(20.0), None, GATE)
    assert decision.passed and "first valid model" in decision.reasons[0]


@pytest.mark.parametrize("bad,why", [
    (summary(20.0, count=0), "fewer than min_samples"),
    (summary(math.nan), "psnr is missing or not finite"),
    ({"count": 5.0, "psnr": 20.0}, "ssim is missing"),
])
def test_an_invalid_model_never_becomes_champion_even_without_one(bad, why):
    decision = evaluate_gate(bad, None, GATE)
    assert not decision.passed and why in " ".join(decision.reasons)


def test_absolute_floor_applies_to_the_first_champion():
    gate = GateSettings(min_values={"psnr": 25.0})
    decision = evaluate_gate(summary(20.0), None, gate)
    assert not decision.passed and "below the floor 25.0" in decision.reasons[0]


def test_worse_challenger_is_refused_with_the_failing_checks_named():
    decision = evaluate_gate(summary(19.0), summary(20.0), GATE)
    assert not decision.passed
    assert any(r.startswith("psnr overall: improvement -1.0000 < required +0.0100") for r in decision.reasons)
    assert "| psnr | overall | 20.0000 | 19.0000 | -1.0000 | +0.0100 | NO |" in decision.markdown()


def test_an_equally_good_challenger_is_refused_by_the_default_gate():
    decision = evaluate_gate(summary(20.0), summary(20.0), GATE)
    assert not decision.passed and decision.reasons == ["psnr overall: improvement +0.0000 < required +0.0100"]


def test_better_overall_but_one_bucket_regressing_past_tolerance_is_refused():
    worse_bucket = {BUCKET_NAMES[-1]: 19.0}
    decision = evaluate_gate(summary(20.5, bucket_psnr=worse_bucket), summary(20.0), GATE)
    assert not decision.passed
    assert decision.reasons == [f"psnr {BUCKET_NAMES[-1]}: improvement -1.0000 < required -0.5000"]


def test_better_challenger_within_tolerances_passes():
    slightly_worse_bucket = {BUCKET_NAMES[0]: 19.8}
    decision = evaluate_gate(summary(20.3, ssim=0.798, bucket_psnr=slightly_worse_bucket), summary(20.0), GATE)
    assert decision.passed, decision.reasons
    assert len(decision.checks) == 1 + len(BUCKET_NAMES) + 1


def test_l1_is_lower_is_better_and_single_bucket_rules_work():
    gate = GateSettings(rules=[GateRule(metric="l1", min_improvement=0.01),
                             GateRule(metric="psnr", scope=BUCKET_NAMES[2], min_improvement=0.2)])
    assert evaluate_gate(summary(20.3, l1=0.03), summary(20.0, l1=0.05), gate).passed
    refused = evaluate_gate(summary(20.3, l1=0.045), summary(20.0, l1=0.05), gate)
    assert not refused.passed and refused.reasons[0].startswith("l1 overall: improvement +0.0050")


def test_gate_config_rejects_unknown_scopes_and_keys_with_one_line(tmp_path):
    path = tmp_path / "gate.yaml"
    path.write_text("rules:\n  - {metric: psnr, scope: 0.70-0.80}\n")
    with pytest.raises(ConfigError, match=r"config key rules\.0\.scope: .*scope must be overall"):
        load_config(GateSettings, path)
    with pytest.raises(ConfigError, match="config key min_psnr: unknown key"):
        load_config(GateSettings, overrides=["min_psnr=3"])


# ----------------------------------------------------------------------------------------------------
# Promotion on a real registry


@pytest.fixture(scope="module")
def client(mlflow_server):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)


_model_counter = iter(range(1000))


@pytest.fixture
def model(client):
    """A fresh registered model with five versions (artifacts are not needed: evaluation is table-driven)."""
    name = f"gate-model-{next(_model_counter)}"
    experiment = client.get_experiment_by_name("registry-test") or client.get_experiment(
        client.create_experiment("registry-test"))
    run = client.create_run(experiment.experiment_id)
    client.create_registered_model(name)
    for _ in range(5):
        client.create_model_version(name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id,
                                    await_creation_for=0)
    return name


class TableEvaluator:
    """Evaluates versions by table lookup and remembers the calls (the gate logic is what is under test)."""

    def __init__(self, scores: dict[str, dict], side_effect=None):
        self.scores, self.calls, self.side_effect = scores, [], side_effect

    def __call__(self, name: str, version: str) -> dict:
        self.calls.append(version)
        if self.side_effect:
            self.side_effect(name, version)
        return self.scores[version]


def test_first_champion_then_worse_refused_then_better_promoted_keeping_previous(client, model):
    scores = {"1": summary(20.0), "2": summary(19.0), "3": summary(21.0)}
    evaluator = TableEvaluator(scores)

    first = promote(client, model, "1", evaluator, GATE, eval_set="sha-eval")
    assert first.action == "first_champion" and current_champion(client, model) == "1"
    assert current_champion(client, model, PREVIOUS_CHAMPION) is None

    worse = promote(client, model, "2", evaluator, GATE, eval_set="sha-eval")
    assert worse.action == "refused" and current_champion(client, model) == "1"
    assert evaluator.calls == ["1", "2", "1"]  # challenger and champion, both evaluated now
    refused = client.get_model_version(model, "2")
    assert refused.tags["holefill.promotion.decision"] == "refused"
    assert refused.tags["holefill.promotion.compared_to"] == "1"
    assert refused.tags["holefill.promotion.eval_set"] == "sha-eval"
    assert refused.tags["holefill.promotion.challenger_psnr"] == "19"
    assert "psnr overall: improvement -1.0000" in refused.description
    assert "| psnr | overall | 20.0000 | 19.0000 |" in refused.description

    better = promote(client, model, "3", evaluator, GATE, eval_set="sha-eval")
    assert better.action == "promoted" and better.promoted
    assert current_champion(client, model) == "3" and current_champion(client, model, PREVIOUS_CHAMPION) == "1"
    assert client.get_model_version(model, "3").tags["holefill.promotion.decision"] == "promoted"
    # Aliases only: no version was ever moved to a stage.
    assert {v.current_stage for v in client.search_model_versions(f"name='{model}'")} == {"None"}


def test_an_alias_moved_by_hand_is_the_champion_every_promotion_compares_against(client, model):
    scores = {"1": summary(20.0), "2": summary(22.0), "3": summary(21.0)}
    evaluator = TableEvaluator(scores)
    promote(client, model, "1", evaluator, GATE)
    client.set_registered_model_alias(model, CHAMPION, "2")  # what the MLflow UI does

    outcome = promote(client, model, "3", evaluator, GATE)
    assert outcome.champion_before == "2" and outcome.action == "refused"
    assert current_champion(client, model) == "2"
    assert promote(client, model, "2", evaluator, GATE).action == "already_champion"


def test_a_champion_moved_during_evaluation_is_left_alone(client, model):
    scores = {"1": summary(20.0), "4": summary(23.0), "5": summary(25.0)}
    promote(client, model, "1", TableEvaluator(scores), GATE)

    def human_moves_alias(name, version):
        if version == "1":  # while the champion is being evaluated, someone picks version 4 by hand
            client.set_registered_model_alias(name, CHAMPION, "4")

    outcome = promote(client, model, "5", TableEvaluator(scores, human_moves_alias), GATE)
    assert outcome.action == "champion_moved" and not outcome.promoted
    assert current_champion(client, model) == "4"
    assert current_champion(client, model, PREVIOUS_CHAMPION) is None
    assert client.get_model_version(model, "5").tags["holefill.promotion.decision"] == "champion_moved"


def test_unknown_version_fails_before_any_evaluation(client, model):
    from mlflow.exceptions import MlflowException

    evaluator = TableEvaluator({})
    with pytest.raises(MlflowException):
        promote(client, model, "99", evaluator, GATE)
    assert evaluator.calls == []
