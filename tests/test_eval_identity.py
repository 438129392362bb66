"""The cached metric set's identity: everything that changes an evaluation's numbers, and nothing else."""

from __future__ import annotations

import contextlib

import torch

from pipeline.evaluation.evaluate import EvaluationSettings
from pipeline.evaluation.feature_cache import truth_cache_url
from pipeline.evaluation.perceptual import MetricWeights
from pipeline.evaluation.ray_eval import metric_set_id, numerics_class

WEIGHTS = MetricWeights(("fid",), hashes={"inception": "a" * 64})


def test_batch_size_and_worker_count_are_not_in_it():
    # An image's output no longer depends on what it is batched with (models/rn.py), so neither do the numbers.
    base = metric_set_id(EvaluationSettings(), WEIGHTS)
    assert metric_set_id(EvaluationSettings(batch_size=1, num_workers=7, samples_per_bucket=0), WEIGHTS) == base


@contextlib.contextmanager
def tf32(matmul: bool, cudnn: bool):
    """Set torch's TF32 switches for a block (they are process-wide), then put them back."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_crop_fit_and_the_workers_numerics_are():
    base = metric_set_id(EvaluationSettings(), WEIGHTS)
    assert metric_set_id(EvaluationSettings(crop_size=128), WEIGHTS) != base
    assert metric_set_id(EvaluationSettings(fit="crop"), WEIGHTS) != base
    gpu = EvaluationSettings(use_gpu=True)
    with tf32(matmul=False, cudnn=True):  # torch's defaults
        assert numerics_class(gpu) == "cuda-tf32-matmul0-cudnn1"
        with_tf32_convs = metric_set_id(gpu, WEIGHTS)
    assert with_tf32_convs != base  # GPU features differ from CPU ones (TF32 convolutions by default)
    with tf32(matmul=False, cudnn=False):
        assert metric_set_id(gpu, WEIGHTS) not in (base, with_tf32_convs)


def test_truth_features_are_cached_per_numerics_class():
    cpu = truth_cache_url("/cache", "m" * 64, "i" * 64, 256)
    assert cpu.endswith("crop256.npz")  # as before: CPU caches stay valid
    assert truth_cache_url("/cache", "m" * 64, "i" * 64, 256, "cuda-tf32-matmul0-cudnn1") != cpu
