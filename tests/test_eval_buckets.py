"""Hole-ratio buckets: one value and one function decide a sample's bucket in the shard job and in evaluation
(samples exactly on an edge stay where the shard job filed them); custom buckets are checked, and evaluation uses
the eval set's own."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from support.eval_helpers import mask_with_holes, picture, write_eval_set
from pipeline.buckets import bucket_of, check_buckets, hole_ratios
from pipeline.data.masks.generators import hole_ratio
from pipeline.evaluation.evaluate import EvaluationSettings, evaluate_slice, merge_slices
from pipeline.evaluation.perceptual import MetricWeights


class Blank(nn.Module):
    """A generator that predicts grey: evaluation's loop without a network's cost."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(()))

    def forward(self, image, mask):
        return torch.full_like(image, 0.5) + self.scale


def _evaluate(manifest: str, crop_size: int | None, batch_size: int = 2) -> dict[str, float]:
    settings = EvaluationSettings(batch_size=batch_size, crop_size=crop_size, samples_per_bucket=1)
    part = evaluate_slice(Blank(), "rn", manifest, settings, MetricWeights(()))
    return merge_slices([part], (), 1)[0]


# 320x320 = 102,400 pixels: 10,240 holes is 0.1 exactly, 20,480 is 0.2, 61,440 is 0.6 (float32 means exceed all three).
EDGES = [(10_240, "0.01-0.10"), (20_480, "0.10-0.20"), (61_440, "0.50-0.60")]


def test_samples_on_bucket_edges_are_filed_alike_by_the_shard_job_and_by_evaluation(tmp_path):
    masks = [mask_with_holes(320, 320, holes) for holes, _ in EDGES]
    # The shard job's value (recorded in the sample's json) and bucket ...
    assert [bucket_of(hole_ratio(m)) for m in masks] == [name for _, name in EDGES]
    # ... and evaluation's, from the masks as it reads them, agree (a float32 mean filed them one bucket up).
    assert [bucket_of(float(r)) for r in hole_ratios(torch.from_numpy(masks[0] > 0).float()[None, None])] == ["0.01-0.10"]
    assert bucket_of(float(torch.from_numpy(masks[0] > 0).float().mean())) == "0.10-0.20"  # the old way
    manifest = write_eval_set(tmp_path, [(f"k{i}", picture(320, 320, i), m) for i, m in enumerate(masks)])
    summary = _evaluate(manifest, crop_size=None)
    assert {name: summary[f"count/{name}"] for _, name in EDGES} == {name: 1.0 for _, name in EDGES}
    assert summary["count"] == 3.0


def test_edge_samples_read_at_480_pixels_stay_in_their_bucket():
    mask = mask_with_holes(480, 480, 46_080)  # 0.2 exactly
    evaluated = hole_ratios(torch.from_numpy(mask > 0).float()[None, None])
    assert float(evaluated[0]) == hole_ratio(mask) == 0.2
    assert bucket_of(float(evaluated[0])) == bucket_of(hole_ratio(mask)) == "0.10-0.20"


@pytest.mark.parametrize("buckets, message", [
    ([], "at least one bucket"),
    ([(0.1, 0.3), (0.2, 0.4)], r"buckets \(0.1, 0.3\] and \(0.2, 0.4\] overlap"),
    ([(0.3, 0.4), (0.1, 0.2)], "overlap or are out of order"),
    ([(0.011, 0.013), (0.013, 0.015)], "share the label 0.01-0.01"),
    ([(0.2, 0.1)], r"0 <= lo < hi <= 1"),
])
def test_invalid_custom_buckets_are_refused_in_one_line(buckets, message):
    with pytest.raises(ValueError, match=message) as caught:
        check_buckets(buckets)
    assert "\n" not in str(caught.value)


def test_the_shard_job_refuses_invalid_custom_buckets_naming_the_key():
    from pipeline.config import ConfigError, load_config
    from pipeline.data.shardjob.run import ShardJobConfig

    base = ["source.url=/data/list.txt", "out=/tmp/out", "eval.enabled=true"]
    with pytest.raises(ConfigError, match=r"eval\.buckets.*share the label 0\.01-0\.01"):
        load_config(ShardJobConfig, None, [*base, "eval.buckets=[[0.011,0.013],[0.013,0.015]]"])
    with pytest.raises(ConfigError, match=r"eval\.buckets.*overlap"):
        load_config(ShardJobConfig, None, [*base, "eval.buckets=[[0.1,0.3],[0.2,0.4]]"])
    config = load_config(ShardJobConfig, None, [*base, "eval.buckets=[[0.0,0.15],[0.15,0.7]]"])
    assert config.eval.buckets == ((0.0, 0.15), (0.15, 0.7))


def test_evaluation_uses_the_buckets_the_eval_manifest_records(tmp_path):
    holes = [410, 1230, 2460]  # of 4096 pixels: 0.10, 0.30, 0.60
    samples = [(f"k{i}", picture(64, 64, i), mask_with_holes(64, 64, n)) for i, n in enumerate(holes)]
    manifest = write_eval_set(tmp_path, samples, buckets=[(0.0, 0.15), (0.15, 0.7)])
    summary = _evaluate(manifest, crop_size=64)
    assert {k: v for k, v in summary.items() if k.startswith("count")} == \
        {"count": 3.0, "count/0.00-0.15": 1.0, "count/0.15-0.70": 2.0}
    assert "psnr/0.15-0.70" in summary and not any("0.10-0.20" in key for key in summary)
