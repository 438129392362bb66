"""The shard job under storage storms: a fault-injecting proxy in front of the test S3 (moto), loopback only.

Short storms (503 SlowDown or connections cut mid-body, 1 to 40 times in a row per object) are absorbed by the
retries: the shards are byte-identical to a clean run and nothing is rejected. A storm longer than the retry
budget fails the job in one line naming the object, publishes nothing and records no rejection; a re-run after
the storm resumes and gives the clean run's bytes. Retry budget per object here: botocore 2 attempts x s3fs 5
x holefill's read retry 3 x Ray task 2 = 60 requests (kept small so a failing storm costs seconds).
"""

from __future__ import annotations

import json

import fsspec
import pytest

from support.fault_proxy import Fault, FaultProxy
from pipeline.data.manifest import load_manifest, verify_shards
from pipeline.data.sample_data import generate_sample_dataset
from pipeline.data.shardjob.run import ShardJobConfig, ShardJobError, run_shard_job
from support.s3_server import s3_endpoint  # noqa: F401  (pytest fixture)

STORE = 48


@pytest.fixture(scope="module")
def ray_cluster(ray_driver):
    return ray_driver


@pytest.fixture(scope="module")
def world(s3_endpoint, ray_cluster):
    dataset = generate_sample_dataset(s3_endpoint.url("places"), n_train=14, n_val=0, size=(64, 48),
                                      include_package_photos=False, storage_options=s3_endpoint.s3fs_options)
    with FaultProxy(s3_endpoint.endpoint_url) as proxy:
        fs = fsspec.filesystem("s3", **s3_endpoint.s3fs_options)
        yield {"dataset": dataset, "proxy": proxy, "endpoint": s3_endpoint, "fs": fs,
               "clean": _shard(proxy, s3_endpoint, dataset, "clean")}


def _config(proxy, endpoint, dataset, out: str) -> ShardJobConfig:
    return ShardJobConfig.model_validate({
        "source": {"url": dataset.train_list, "root": dataset.train_root},
        "out": endpoint.url("shards", out), "samples_per_shard": 4, "store_size": STORE,
        "storage_options": {**endpoint.storage_options, "endpoint_url": proxy.url, "max_attempts": 2},
        "read_retry": {"attempts": 3, "backoff_s": 0.05, "max_backoff_s": 0.2},
        "task_retries": 1,
    })


def _shard(proxy, endpoint, dataset, out: str):
    return run_shard_job(_config(proxy, endpoint, dataset, out))


def _object(world, index: int) -> str:
    """The proxy-side path of train image ``index``."""
    dataset = world["dataset"]
    return "/" + dataset.train_path(dataset.train_files[index]).split("://", 1)[1]


def _only(path: str):
    return lambda method, seen: method == "GET" and seen == path


def _shard_bytes(world, manifest) -> dict[str, bytes]:
    world["fs"].invalidate_cache()  # s3fs caches listings: ask the store
    return {entry.url: world["fs"].cat_file(url) for entry, url in zip(manifest.shards, manifest.shard_urls())}


def _report(name: str, stats, objects: dict[str, str]) -> None:
    """The fault figures of one run (shown with ``pytest -s``)."""
    print(f"\n[{name}] injected {dict(stats.injected)}; requests per faulted object: "
          + ", ".join(f"{label}={stats.requests[path]}" for label, path in objects.items()))


@pytest.mark.e2e
def test_short_storms_are_retried_and_give_the_clean_runs_bytes(world):
    # (The storm, 40 SlowDowns in a row, is absorbed too; it costs ~20 s of backoff, so it is not run here.)
    storms = {0: ("503", 1), 2: ("503", 3), 4: ("503", 8), 6: ("cut", 1), 8: ("cut", 3), 10: ("cut", 8)}
    objects = {f"{kind}x{times}": _object(world, index) for index, (kind, times) in storms.items()}
    stats = world["proxy"].set_faults(*(Fault(kind, times, _only(_object(world, index)))
                                        for index, (kind, times) in storms.items()))

    result = _shard(world["proxy"], world["endpoint"], world["dataset"], "stormy")

    _report("short storms", stats, objects)
    assert sum(stats.injected.values()) == sum(times for _, times in storms.values())
    for label, path in objects.items():
        assert stats.requests[path] > stats.faulted[path], f"{label} never got through"
    clean = world["clean"].manifest
    assert result.manifest.rejected == [] and result.manifest.total_samples == clean.total_samples == 14
    assert [s.sha256 for s in result.manifest.shards] == [s.sha256 for s in clean.shards]
    assert _shard_bytes(world, result.manifest) == _shard_bytes(world, clean)


@pytest.mark.e2e
def test_a_storm_longer_than_the_retry_budget_fails_in_one_line_publishes_nothing_and_a_rerun_resumes(world, capsys):
    from jobs.shard_places2 import shard

    endless = {1: "503", 5: "cut"}
    objects = {f"{kind}-forever": _object(world, index) for index, kind in endless.items()}
    stats = world["proxy"].set_faults(*(Fault(kind, 10**9, _only(_object(world, index)))
                                        for index, kind in endless.items()))
    config = _config(world["proxy"], world["endpoint"], world["dataset"], "storm")

    status = shard(config)

    error = capsys.readouterr().err.strip()
    _report("endless storm", stats, objects)
    assert status == 1 and len(error.splitlines()) == 1, error
    assert "re-run resumes" in error and "nothing published" in error
    assert any(world["dataset"].train_files[index].lstrip("/") in error for index in endless), error
    assert "SlowDown" in error or "503" in error or "Payload" in error or "EOF" in error, error
    fs, out = world["fs"], config.out
    fs.invalidate_cache()
    written = fs.find(out) if fs.exists(out) else []
    assert not [path for path in written if path.endswith(("manifest.json", "keys.txt.gz"))]
    sidecars = [path for path in written if path.endswith(".tar.json")]
    for sidecar in sidecars:
        assert json.loads(fs.cat_file(sidecar))["rejected"] == []  # no failed read became a rejection

    world["proxy"].clear()
    resumed = run_shard_job(config)
    assert resumed.manifest.rejected == [] and resumed.shards_reused == len(sidecars)  # finished shards are kept
    assert verify_shards(load_manifest(config.out, config.storage_options), config.storage_options) == []
    assert _shard_bytes(world, resumed.manifest) == _shard_bytes(world, world["clean"].manifest)
    print(f"[endless storm] failed run left {len(sidecars)} finished shards; re-run: {resumed.shards_reused} shards reused, {resumed.shards_written} written, "
          f"{resumed.manifest.total_samples} samples, 0 rejected")
