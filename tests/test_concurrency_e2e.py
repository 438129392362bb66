"""Jobs beside other jobs, as real processes: two shard jobs of different plans into one `out` (the lock on `out`),
and a shard job starting its own embedded Ray while two CPU-heavy processes load the machine (promotion and
retraining: tests/test_promotion.py, tests/test_lifecycle_e2e.py; the lock itself: tests/test_locks.py)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import Config
from pipeline.data.sample_data import generate_sample_dataset
from pipeline.jobcli import run_job
from pipeline.raycluster import RAY_START_EXIT_STATUS, RayStartError

REPO = Path(__file__).resolve().parents[1]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _job(source: str, out: Path, seed: int) -> list[str]:
    return [sys.executable, "jobs/shard_places2.py", "--source", source, "--out", str(out),
            "--samples-per-shard", "4", "--store-size", "64", "--seed", str(seed)]


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory):
    return generate_sample_dataset(str(tmp_path_factory.mktemp("places")), n_train=8, n_val=0, size=(96, 80),
                                   include_package_photos=False)


@pytest.mark.e2e
def test_two_shard_jobs_into_one_out_one_publishes_the_other_skips_and_the_published_version_never_changes(
        tmp_path, sample, ray_head):
    out = tmp_path / "shards"
    env = {**os.environ, "RAY_ADDRESS": ray_head.address}  # the point here is the lock, not Ray's start-up

    # Started together: one takes <out>/.shardjob.lock for the whole job, the other finds it held and skips, or
    # (when the first finished before the second came to the lock) writes beside it.
    first, second = (subprocess.Popen(_job(sample.train_root, out, seed), cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True) for seed in (1, 2))
    outputs = [p.communicate(timeout=300) for p in (first, second)]
    results = [(p.returncode, out_, err) for p, (out_, err) in zip((first, second), outputs)]
    assert all(code == 0 for code, _, _ in results), [err[-2000:] for _, _, err in results]
    published = [r for r in results if "manifest_hash:" in r[1]]
    skipped = [r for r in results if "skipped: another shard job holds" in r[1]]
    assert published and (len(published) == 2 or len(skipped) == 1), results
    if len(published) == 2:  # one after the other: the later plan went beside the published version
        assert sum("/version-" in r[1] for r in published) == 1, results
    manifest = json.loads((out / "manifest.json").read_text())
    shard_hashes = {s["url"]: s["sha256"] for s in manifest["shards"]}
    keys_hash = _sha256(out / "keys.txt.gz")
    assert shard_hashes and all(_sha256(out / url) == digest for url, digest in shard_hashes.items())

    # The other plan, run again now: it goes beside the published version and changes none of its bytes.
    rerun = subprocess.run(_job(sample.train_root, out, 2 if manifest["config"]["seed"] == 1 else 1), cwd=REPO,
                           env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "/version-" in rerun.stdout
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert all(_sha256(out / url) == digest for url, digest in shard_hashes.items())
    assert _sha256(out / "keys.txt.gz") == keys_hash
    assert not (out / ".shardjob.lock").exists()


@pytest.mark.e2e
def test_a_shard_job_starts_its_embedded_ray_while_two_cpu_heavy_processes_load_the_machine(tmp_path, sample):
    """Issue 28 point 8: a plain ray.init() died here ("The current node timed out during startup": the raylet's
    fixed 15 s wait for the dashboard agent's port files); pipeline.raycluster starts a private head that does not
    wait for the agents."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        job = subprocess.run(_job(sample.train_root, tmp_path / "shards", 1), cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=500)
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
    assert job.returncode == 0, job.stderr[-3000:]
    assert "manifest_hash:" in job.stdout
    assert (tmp_path / "shards" / "manifest.json").is_file()


class _NoSettings(Config):
    pass


def test_a_ray_that_does_not_start_is_one_line_and_its_own_exit_status_not_bad_input(capsys):
    def work(config: _NoSettings) -> int:
        raise RayStartError("the job's local Ray did not start 2 times in a row (no Ray node within 300 s)")

    status = run_job("somejob", None, _NoSettings, work, argv=[])
    assert status == RAY_START_EXIT_STATUS != 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "somejob: the job's local Ray did not start 2 times in a row (no Ray node within 300 s)"]
