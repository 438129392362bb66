"""The shard job on a real local Ray: shards readable by stock tools, masks right, resumable, byte-stable.

One Ray instance serves the whole module (2 CPUs, no dashboard); datasets are 20-40 small real JPEGs.
"""

from __future__ import annotations

import io
import json
import os
import signal
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from pipeline.buckets import BUCKET_NAMES, bucket_of
from pipeline.config import ConfigError, load_config
from pipeline.data.imageops import decode_mask_png
from pipeline.data.manifest import WIDS_INDEX_NAME, load_manifest, manifest_hash, read_keys, verify_shards
from pipeline.data.masks.generators import hole_ratio
from pipeline.data.sample_data import generate_sample_dataset
from pipeline.data.shardjob.run import ShardJobConfig, ShardPlan, derive_mask_seed, plan_shards, run_shard_job, write_shard
from pipeline.data.sources import SourceItem
from support.s3_server import s3_endpoint  # noqa: F401  (pytest fixture)

REPO = Path(__file__).resolve().parents[1]
IMAGE_SIZE = (128, 96)
STORE = 64


@pytest.fixture(scope="module")
def ray_cluster(ray_driver):
    return ray_driver


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return generate_sample_dataset(
        str(tmp_path_factory.mktemp("places")), n_train=20, n_val=40, size=IMAGE_SIZE, include_package_photos=False
    )


def _config(sample, out, **extra) -> ShardJobConfig:
    settings = {
        "source": {"url": sample.train_list, "root": sample.train_root},
        "out": str(out),
        "samples_per_shard": 6,
        "store_size": STORE,
        **extra,
    }
    return ShardJobConfig.model_validate(settings)


def _samples(manifest) -> dict[str, dict]:
    """Every sample of every shard the manifest lists, read with stock webdataset (no holefill code)."""
    dataset = wds.WebDataset(manifest.shard_urls(), shardshuffle=False, empty_check=False)
    samples = {}
    for sample in dataset:
        assert sample["__key__"] not in samples, f"duplicate sample {sample['__key__']}"
        samples[sample["__key__"]] = sample
    return samples


def _manifest_without_time(url: str) -> dict:
    data = json.loads(Path(url).read_text())
    data.pop("created_at")
    return data


# ------------------------------------------------------------------------------------------- bad inputs


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_bomb(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels: a decompression bomb."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _bad_inputs_dataset(root: Path) -> tuple[Path, dict[str, str | None]]:
    """A file list over good and bad files; maps each key to the expected reject reason (None: accepted)."""
    gradient = np.tile(np.linspace(0, 255, 120, dtype=np.uint8), (80, 1))
    rgb = Image.fromarray(np.stack([gradient, gradient[::-1], gradient.T[:80, :80].repeat(2, 1)[:, :120]], -1))
    good = _encoded(rgb, "JPEG")
    files: dict[str, tuple[bytes | None, str | None]] = {
        "good/a.jpg": (good, None),
        "bad/truncated.jpg": (good[: len(good) // 2], "truncated"),
        "bad/zero.jpg": (b"", "empty file"),
        "bad/text.jpg": (b"definitely not an image\n" * 4, "not an image"),
        "bad/bomb.png": (_png_bomb(60_000, 60_000), "decompression bomb"),
        "bad/missing.jpg": (None, "missing"),
        "odd/alpha.png": (_encoded(rgb.convert("RGBA"), "PNG"), None),
        "odd/gray.jpg": (_encoded(rgb.convert("L"), "JPEG"), None),
        "odd/cmyk.jpg": (_encoded(rgb.convert("CMYK"), "JPEG"), None),
        "odd/deep.png": (_encoded(Image.fromarray(gradient.astype(np.uint16) * 257), "PNG"), None),
    }
    lines = []
    for relative, (data, _) in files.items():
        if data is not None:
            (root / relative).parent.mkdir(parents=True, exist_ok=True)
            (root / relative).write_bytes(data)
        lines.append(f"/{relative} 7\n")
    file_list = root / "list.txt"
    file_list.write_text("".join(lines))
    expected = {relative.rsplit(".", 1)[0].replace("/", "_"): reason for relative, (_, reason) in files.items()}
    return file_list, expected


# ------------------------------------------------------------------------------------------------ tests


def test_shards_are_readable_by_stock_tools_and_samples_are_complete(ray_cluster, sample, tmp_path):
    result = run_shard_job(_config(sample, tmp_path / "out"))
    manifest = load_manifest(str(tmp_path / "out"))

    assert manifest.kind == "train" and manifest.total_samples == len(sample.train_files) == 20
    assert len(manifest.shards) == 4 and [s.samples for s in manifest.shards] == [6, 6, 6, 2]
    assert verify_shards(manifest) == []
    assert result.manifest_hash == manifest_hash(manifest)
    for url in manifest.shard_urls():
        with tarfile.open(url) as archive:
            names = archive.getnames()
        assert len(names) == 3 * len({n.split(".", 1)[0] for n in names})

    samples = _samples(manifest)
    assert len(samples) == 20
    labels = dict(zip((f.lstrip("/").rsplit(".", 1)[0].replace("/", "_") for f in sample.train_files), sample.train_labels))
    for key, member in samples.items():
        assert {"jpg", "mask.png", "json"} <= set(member)
        image = Image.open(io.BytesIO(member["jpg"]))
        mask_image = Image.open(io.BytesIO(member["mask.png"]))
        mask = decode_mask_png(member["mask.png"])
        meta = json.loads(member["json"])
        assert image.mode == "RGB" and image.format == "JPEG" and min(image.size) == STORE
        assert mask_image.mode == "L" and mask_image.size == image.size
        assert set(np.unique(np.asarray(mask_image))) <= {0, 255}
        assert meta["hole_ratio"] == hole_ratio(mask)
        assert (meta["width"], meta["height"]) == image.size
        assert meta["label"] == labels[key] and meta["key"] == key
        assert meta["mask"]["name"] == "lama_train_mix" and meta["mask"]["seed"] == 0 and meta["mask"]["params"]
    assert manifest.hole_ratio_histogram.total == 20
    assert read_keys(manifest.keys_url()) == set(samples)

    # Beside the manifest, webdataset's wids shard index: the same shards, sample counts and sizes, with URLs that
    # resolve (against the index's folder, as wids does) to the manifest's shards.
    index_path = tmp_path / "out" / WIDS_INDEX_NAME
    index = json.loads(index_path.read_text())
    assert index["__kind__"] == "wids-shard-index-v1" and index["wids_version"] == 1 and index["name"] == "1"
    assert [(s["nsamples"], s["filesize"]) for s in index["shardlist"]] == [(s.samples, s.bytes) for s in manifest.shards]
    assert [os.path.normpath(index_path.parent / s["url"]) for s in index["shardlist"]] == \
        [os.path.normpath(url) for url in manifest.shard_urls()]
    try:
        import wids  # webdataset 0.2.x ships it; the 1.0 wheels leave it out
    except ImportError:
        wids = None
    if wids is not None:  # random access by webdataset's own reader, from the index alone
        dataset = wids.ShardListDataset(str(index_path), cache_dir=str(tmp_path / "wids-cache"), transformations=[])
        assert len(dataset) == 20
        assert {dataset[i]["__key__"] for i in range(len(dataset))} == set(samples)
        assert dataset[7][".jpg"].read() == samples[dataset[7]["__key__"]]["jpg"]


def test_rerun_reuses_verified_shards_and_rewrites_a_corrupted_one(ray_cluster, sample, tmp_path):
    out = tmp_path / "out"
    first = run_shard_job(_config(sample, out))
    shard_bytes = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    (out / "shard-000001.tar").write_bytes(b"garbage")

    second = run_shard_job(_config(sample, out))

    assert (second.shards_reused, second.shards_written) == (3, 1)
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == shard_bytes
    assert second.manifest_hash == first.manifest_hash


@pytest.mark.e2e
def test_killed_job_resumes_without_duplicates_and_matches_an_uninterrupted_run(ray_cluster, sample, tmp_path):
    reference = run_shard_job(_config(sample, tmp_path / "reference", samples_per_shard=3))

    # Make one image a FIFO: the task reading it blocks (like a stalled disk) while the other shards publish.
    stalled = Path(sample.train_path(sample.train_files[13]))
    content, stat = stalled.read_bytes(), stalled.stat()
    stalled.unlink()
    os.mkfifo(stalled)
    out = tmp_path / "resumed"
    command = [
        sys.executable, str(REPO / "jobs" / "shard_places2.py"), "--source", sample.train_list,
        "--root", sample.train_root, "--out", str(out), "--samples-per-shard", "3", "--store-size", str(STORE),
    ]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    job = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(list(out.glob("shard-*.tar.json"))) < 4:
            assert job.poll() is None, job.stdout.read()
            assert time.monotonic() < deadline, "shard job published nothing"
            time.sleep(0.05)
    finally:
        job.send_signal(signal.SIGKILL)
        job.wait()
        try:  # release a reader still blocked on the FIFO, if the task outlived its driver
            fd = os.open(stalled, os.O_WRONLY | os.O_NONBLOCK)
            os.close(fd)
        except OSError:
            pass
        stalled.unlink()
        stalled.write_bytes(content)
        os.utime(stalled, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    assert not (out / "manifest.json").exists()
    resumed = run_shard_job(_config(sample, out, samples_per_shard=3))

    assert resumed.shards_reused >= 4
    assert resumed.manifest_hash == reference.manifest_hash
    assert _manifest_without_time(resumed.manifest_url) == _manifest_without_time(reference.manifest_url)
    for name in (s.url for s in reference.manifest.shards):
        assert (out / name).read_bytes() == (tmp_path / "reference" / name).read_bytes()
    assert sorted(_samples(resumed.manifest)) == sorted(_samples(reference.manifest))


def test_bad_inputs_are_rejected_or_converted_and_the_job_succeeds(ray_cluster, tmp_path):
    file_list, expected = _bad_inputs_dataset(tmp_path / "src")
    config = ShardJobConfig.model_validate(
        {"source": {"url": str(file_list)}, "out": str(tmp_path / "out"), "samples_per_shard": 4, "store_size": STORE}
    )
    manifest = run_shard_job(config).manifest

    reasons = {r.key: r.reason for r in manifest.rejected}
    assert reasons == {key: reason for key, reason in expected.items() if reason is not None}
    samples = _samples(manifest)
    assert set(samples) == {key for key, reason in expected.items() if reason is None}
    for member in samples.values():
        image = Image.open(io.BytesIO(member["jpg"]))
        assert image.mode == "RGB" and min(image.size) == STORE
    deep = np.asarray(Image.open(io.BytesIO(samples["odd_deep"]["jpg"])))
    assert deep.max() > 200 and deep.min() < 60  # 16-bit scaled into 8 bits, not clipped to white


@pytest.mark.e2e
def test_source_and_destination_on_s3(ray_cluster, s3_endpoint, tmp_path):
    import fsspec

    dataset = generate_sample_dataset(
        s3_endpoint.url("places"), n_train=8, n_val=0, size=IMAGE_SIZE, include_package_photos=False,
        storage_options=s3_endpoint.s3fs_options,
    )
    config = ShardJobConfig.model_validate(
        {
            "source": {"url": dataset.train_list, "root": dataset.train_root},
            "out": s3_endpoint.url("shards", "v1"),
            "samples_per_shard": 3,
            "store_size": STORE,
            "storage_options": s3_endpoint.storage_options,
        }
    )
    result = run_shard_job(config)

    manifest = load_manifest(s3_endpoint.url("shards", "v1"), config.storage_options)
    assert manifest.total_samples == 8 and len(manifest.shards) == 3
    assert manifest.shard_urls()[0] == s3_endpoint.url("shards", "v1", "shard-000000.tar")
    assert verify_shards(manifest, config.storage_options) == []
    assert "testing" not in json.dumps(manifest.config)  # credentials never reach the manifest
    fs = fsspec.filesystem("s3", **s3_endpoint.s3fs_options)
    with fs.open(manifest.shard_urls()[0], "rb") as handle, tarfile.open(fileobj=handle, mode="r|") as archive:
        assert len([m for m in archive]) == 9
    assert not [p for p in fs.find(s3_endpoint.url("shards")) if ".tmp-" in p]
    assert run_shard_job(config).shards_reused == 3 and result.shards_written == 3


def test_tar_archive_source_gives_the_same_pixels_and_masks_as_the_file_list(ray_cluster, sample, tmp_path):
    archive_path = tmp_path / "train_large.tar"
    with tarfile.open(archive_path, "w") as archive:
        archive.add(sample.train_root, arcname="data_large")
    from_list = run_shard_job(_config(sample, tmp_path / "from_list")).manifest
    from_tar = run_shard_job(
        ShardJobConfig.model_validate(
            {"source": {"url": str(archive_path), "root": "data_large"}, "out": str(tmp_path / "from_tar"),
             "samples_per_shard": 6, "store_size": STORE}
        )
    ).manifest

    assert from_tar.source.kind == "tar" and from_tar.total_samples == from_list.total_samples
    listed, streamed = _samples(from_list), _samples(from_tar)
    assert sorted(listed) == sorted(streamed)
    for key in listed:
        assert listed[key]["jpg"] == streamed[key]["jpg"]
        assert listed[key]["mask.png"] == streamed[key]["mask.png"]


def test_eval_set_is_balanced_over_the_hole_ratio_buckets_and_pinned_by_hash(ray_cluster, sample, tmp_path):
    settings = {
        "source": {"url": sample.val_list, "root": sample.val_root},
        "samples_per_shard": 5,
        "store_size": STORE,
        "eval": {"enabled": True, "per_bucket": 4},
    }
    first = run_shard_job(ShardJobConfig.model_validate({**settings, "out": str(tmp_path / "a")}))
    second = run_shard_job(ShardJobConfig.model_validate({**settings, "out": str(tmp_path / "b")}))

    manifest = first.manifest
    assert manifest.kind == "eval" and manifest.config["center_crop"] is True
    assert manifest.eval_buckets == {name: 4 for name in BUCKET_NAMES}
    counts = dict.fromkeys(BUCKET_NAMES, 0)
    for member in _samples(manifest).values():
        meta = json.loads(member["json"])
        ratio = hole_ratio(decode_mask_png(member["mask.png"]))
        assert bucket_of(ratio) == meta["bucket"] and meta["hole_ratio"] == ratio
        assert Image.open(io.BytesIO(member["jpg"])).size == (STORE, STORE)
        counts[meta["bucket"]] += 1
    assert counts == {name: 4 for name in BUCKET_NAMES}
    # The same data and config give the same eval set wherever it is written: its hash names it.
    assert first.manifest_hash == second.manifest_hash


def test_eval_buckets_short_of_samples_are_topped_up_from_further_items(ray_cluster, sample, tmp_path):
    # Missing files sort first, so the first round loses samples and a second round must fill the gaps.
    file_list = tmp_path / "val_with_holes.txt"
    missing = "".join(f"AAA_missing_{i}.jpg 1\n" for i in range(5))
    file_list.write_text(missing + Path(sample.val_list).read_text())
    config = ShardJobConfig.model_validate(
        {"source": {"url": str(file_list), "root": sample.val_root}, "out": str(tmp_path / "eval"),
         "samples_per_shard": 4, "store_size": STORE, "eval": {"enabled": True, "per_bucket": 2}}
    )
    manifest = run_shard_job(config).manifest

    assert manifest.eval_buckets == {name: 2 for name in BUCKET_NAMES}
    assert manifest.total_samples == 12
    assert sorted(r.reason for r in manifest.rejected) == ["missing"] * 5
    assert manifest.watermark.keys_count == 17  # 12 used + 5 rejected; later val items were never touched


def test_incremental_version_lists_old_and_new_shards_once(ray_cluster, tmp_path):
    dataset = generate_sample_dataset(str(tmp_path / "src"), n_train=6, n_val=0, size=IMAGE_SIZE, include_package_photos=False)
    base = {"source": {"url": dataset.train_list, "root": dataset.train_root}, "samples_per_shard": 4, "store_size": STORE}
    v1 = run_shard_job(ShardJobConfig.model_validate({**base, "out": str(tmp_path / "v1")})).manifest
    from pipeline.data.sample_data import add_new_images

    add_new_images(dataset, 3, seed=5)
    v2 = run_shard_job(
        ShardJobConfig.model_validate(
            {**base, "out": str(tmp_path / "v2"), "dataset_version": "2", "parent": v1.location}
        )
    ).manifest

    assert v2.parent is not None and v2.parent.dataset_version == "1"
    assert v2.shard_urls()[: len(v1.shards)] == v1.shard_urls()
    assert v2.total_samples == 9 and v2.watermark.keys_count == 9
    samples = _samples(v2)
    assert len(samples) == 9
    assert sorted(samples) == sorted(read_keys(v2.keys_url()))


def test_shard_bytes_are_exactly_what_tarfile_writes_for_the_same_members(sample, tmp_path):
    # holefill writes tar headers itself (for speed); the archive must still be tarfile's, byte for
    # byte, long GNU names included, so any tar reader and the recorded sha256 agree.
    source = Path(sample.train_path(sample.train_files[0]))
    keys = ["short", "k" * 120]  # the second one's member names overflow the 100-byte name field
    items = tuple(SourceItem(key=key, path=source.name, url=str(source)) for key in keys)
    config = _config(sample, tmp_path / "out")
    result = write_shard(ShardPlan(index=0, items=items), config)
    written = (tmp_path / "out" / result.name).read_bytes()
    assert result.samples == 2 and result.bytes == len(written)

    rebuilt = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(written)) as original, tarfile.open(
        fileobj=rebuilt, mode="w|", format=tarfile.GNU_FORMAT
    ) as copy:
        for member in original.getmembers():
            info = tarfile.TarInfo(member.name)
            info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = member.size, 0, 0o644, 0, 0, "", ""
            copy.addfile(info, original.extractfile(member))
    assert [m.name for m in tarfile.open(fileobj=io.BytesIO(written)).getmembers()] == [
        f"{key}.{ext}" for key in keys for ext in ("jpg", "mask.png", "json")
    ]
    assert written == rebuilt.getvalue()


def test_shard_plan_is_consecutive_blocks_of_sorted_items_and_retry_seeds_are_derived():
    from pipeline.data.sources import SourceItem

    items = [SourceItem(key=f"k{i}", path=f"k{i}.jpg", url=f"/d/k{i}.jpg") for i in range(7)]
    plans = plan_shards(items, 3, first_index=5)
    assert [p.name for p in plans] == ["shard-000005.tar", "shard-000006.tar", "shard-000007.tar"]
    assert [[i.key for i in p.items] for p in plans] == [["k0", "k1", "k2"], ["k3", "k4", "k5"], ["k6"]]
    assert derive_mask_seed(9, 0) == 9 and derive_mask_seed(9, 1) == derive_mask_seed(9, 1) != derive_mask_seed(9, 2)


def test_config_errors_are_one_line_and_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="samples_per_shard"):
        load_config(ShardJobConfig, overrides=["source.url=x.txt", "out=o", "samples_per_shard=0"])
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(ShardJobConfig, overrides=["source.url=x.txt", "out=o", "masks.name=lama_train_mix", "bogus=1"])
    with pytest.raises(ConfigError, match="centre-cropped"):
        load_config(ShardJobConfig, overrides=["source.url=x.txt", "out=o", "eval.enabled=true", "center_crop=false"])
    with pytest.raises(ConfigError, match="masks"):
        load_config(ShardJobConfig, overrides=["source.url=x.txt", "out=o", "masks.name=nope"])
    job = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "shard_places2.py"), "--out", str(tmp_path), "--source", "x.txt",
         "--set", "seed=-1"],
        capture_output=True, text=True, timeout=120,
    )
    assert job.returncode == 2 and job.stderr.count("\n") == 1 and "seed" in job.stderr


# ------------------------------------------------------------------------------- rejections, equal shards


def test_a_file_list_without_its_root_fails_in_one_line_naming_the_root_that_finds_the_images(
        ray_cluster, sample, tmp_path, capsys):
    from jobs import shard_places2

    out = tmp_path / "out"
    # As in the Places365 layout: the list sits beside data_large/, and --root was forgotten.
    status = shard_places2.main(["--source", sample.train_list, "--out", str(out), "--store-size", str(STORE)])

    error = capsys.readouterr().err.strip()
    assert status == 1 and len(error.splitlines()) == 1
    assert "20 of 20 inputs rejected (20 missing)" in error
    assert f"--root {sample.train_root} finds them" in error
    assert not (out / "manifest.json").exists() and not list(out.glob("shard-*"))  # nothing published


def test_more_rejected_inputs_than_the_configured_share_fail_the_job_and_publish_nothing(ray_cluster, tmp_path):
    file_list, _ = _bad_inputs_dataset(tmp_path / "src")  # 5 of its 10 inputs are bad
    base = {"source": {"url": str(file_list)}, "samples_per_shard": 4, "store_size": STORE}
    with pytest.raises(ValueError, match=r"^5 of 10 inputs rejected \(.*1 missing.*\), more than "
                                         r"max_rejected_fraction=0.4; no manifest published"):
        run_shard_job(ShardJobConfig.model_validate({**base, "out": str(tmp_path / "strict"), "max_rejected_fraction": 0.4}))
    assert not (tmp_path / "strict" / "manifest.json").exists()
    # The default share (a half) lets the same inputs through: rejects are listed, not fatal.
    assert run_shard_job(ShardJobConfig.model_validate({**base, "out": str(tmp_path / "default")})).manifest.total_samples == 5


def test_shards_are_filled_to_samples_per_shard_despite_rejections_byte_stable_and_resumable(ray_cluster, sample, tmp_path):
    # Three missing files sort into the first shard and one into the third: round one leaves two short shards.
    file_list = tmp_path / "list.txt"
    lines = Path(sample.train_list).read_text().splitlines()
    missing = ["/a/aaa/missing_0.jpg 1", "/a/aaa/missing_1.jpg 1", "/a/aaa/missing_2.jpg 1", "/z/zzz/missing_3.jpg 1"]
    file_list.write_text("\n".join([*missing, *lines]) + "\n")
    config = {"source": {"url": str(file_list), "root": sample.train_root}, "samples_per_shard": 6, "store_size": STORE}

    first = run_shard_job(ShardJobConfig.model_validate({**config, "out": str(tmp_path / "a")}))
    manifest = first.manifest
    assert [s.samples for s in manifest.shards] == [6, 6, 6, 2]  # 24 inputs, 4 missing: equal counts, last excepted
    assert sorted(r.reason for r in manifest.rejected) == ["missing"] * 4
    assert sorted(_samples(manifest)) == sorted(k.replace("/", "_").lstrip("_")[:-4] for k in
                                                (line.split()[0] for line in lines))
    assert verify_shards(manifest) == []
    assert sorted(p.name for p in (tmp_path / "a").glob("shard-*.tar")) == sorted(s.url for s in manifest.shards)

    again = run_shard_job(ShardJobConfig.model_validate({**config, "out": str(tmp_path / "b")}))
    assert again.manifest_hash == first.manifest_hash  # deterministic: the same shards wherever written
    for entry in manifest.shards:
        assert (tmp_path / "a" / entry.url).read_bytes() == (tmp_path / "b" / entry.url).read_bytes()
    rerun = run_shard_job(ShardJobConfig.model_validate({**config, "out": str(tmp_path / "a")}))
    assert rerun.manifest_hash == first.manifest_hash and rerun.shards_reused >= 2


def test_relative_paths_are_resolved_against_the_callers_directory_not_the_workers(ray_cluster, sample, tmp_path,
                                                                                    monkeypatch):
    # The Ray workers were started from another directory (the module's Ray came up before this chdir).
    (tmp_path / "places").symlink_to(Path(sample.root))
    monkeypatch.chdir(tmp_path)
    config = _config(sample, "shards/v1")
    config = config.model_copy(update={"source": config.source.model_copy(
        update={"url": "places/places365_train_standard.txt", "root": "places/data_large"})})

    result = run_shard_job(config)

    assert result.manifest_url == str(tmp_path / "shards" / "v1" / "manifest.json")
    assert result.manifest.total_samples == 20 and verify_shards(result.manifest) == []


# --------------------------------------------------------------------------------- published is immutable


def test_a_failing_rerun_into_a_published_folder_leaves_it_verifiable_and_a_changed_config_writes_beside_it(
        ray_cluster, tmp_path):
    """The issue-17 case: version published (seed 3), source then half-truncated, re-run with another seed fails."""
    from pipeline.data.manifest import manifest_keys

    dataset = generate_sample_dataset(str(tmp_path / "src"), n_train=12, n_val=0, size=IMAGE_SIZE,
                                      include_package_photos=False)
    base = {"source": {"url": dataset.train_list, "root": dataset.train_root}, "out": str(tmp_path / "out"),
            "samples_per_shard": 4, "store_size": STORE}
    first = run_shard_job(ShardJobConfig.model_validate({**base, "seed": 3}))
    out = tmp_path / "out"
    published = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    originals = {}
    for name in dataset.train_files[:8]:  # 8 of 12 truncated, as a half-synced bucket would look
        path = Path(dataset.train_path(name))
        originals[path] = (path.read_bytes(), path.stat())
        path.write_bytes(originals[path][0][: len(originals[path][0]) // 3])

    with pytest.raises(ValueError, match="inputs rejected"):
        run_shard_job(ShardJobConfig.model_validate({**base, "seed": 4}))

    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == published  # not a byte changed
    manifest = load_manifest(str(out))
    assert verify_shards(manifest) == [] and len(manifest_keys(manifest)) == 12

    for path, (data, stat) in originals.items():  # the sync completes: the same files, the same times
        path.write_bytes(data)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    second = run_shard_job(ShardJobConfig.model_validate({**base, "seed": 4}))
    assert Path(second.manifest_url).parent.parent == out and Path(second.manifest_url).parent.name.startswith("version-")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == published
    for version in (load_manifest(str(out)), load_manifest(second.manifest_url)):
        assert verify_shards(version) == [] and version.total_samples == 12 and len(manifest_keys(version)) == 12
    assert second.manifest.config["seed"] == 4 and first.manifest.config["seed"] == 3
    # Either version re-run resumes exactly itself.
    assert run_shard_job(ShardJobConfig.model_validate({**base, "seed": 3})).manifest_hash == first.manifest_hash
    again = run_shard_job(ShardJobConfig.model_validate({**base, "seed": 4}))
    assert again.manifest_url == second.manifest_url and again.shards_reused == len(second.manifest.shards)


def test_a_key_list_that_does_not_match_its_manifest_is_refused_by_name(ray_cluster, sample, tmp_path):
    from pipeline.data.manifest import ManifestError, write_keys
    from pipeline.data.sources import list_source, new_items

    config = _config(sample, tmp_path / "out")
    manifest = run_shard_job(config).manifest
    write_keys(["only", "these"], manifest.keys_url())  # rewritten behind the manifest's back
    with pytest.raises(ManifestError, match=r"keys.txt.gz does not match its manifest's keys_sha256"):
        new_items(list_source(config.source).items, load_manifest(str(tmp_path / "out")))


def test_an_empty_source_publishes_an_empty_version_and_an_all_rejected_one_fails_in_one_line(ray_cluster, tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_shard_job(ShardJobConfig.model_validate(
        {"source": {"url": str(tmp_path / "empty")}, "out": str(tmp_path / "a"), "store_size": STORE}))
    assert result.manifest.total_samples == 0 and result.manifest.shards == []
    bad = tmp_path / "bad"
    bad.mkdir()
    for index in range(5):
        (bad / f"x{index}.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"^5 of 5 inputs rejected \(5 not an image\)"):
        run_shard_job(ShardJobConfig.model_validate(
            {"source": {"url": str(bad)}, "out": str(tmp_path / "b"), "samples_per_shard": 2, "store_size": STORE}))
    assert not (tmp_path / "b" / "manifest.json").exists()
