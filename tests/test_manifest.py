"""The manifest schema, its hash, URL resolution, key lists, verification, and atomic publication."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.fsutil import StorageSettings, atomic_write, join_url, parent_url, sha256_of_url, url_to_fs
from pipeline.data.manifest import (
    HoleRatioHistogram,
    Manifest,
    ManifestError,
    ShardEntry,
    SourceDescription,
    Watermark,
    keys_digest,
    load_manifest,
    manifest_hash,
    read_keys,
    verify_shards,
    write_keys,
    write_manifest,
)

SHA = "ab" * 32


def _manifest(**changes) -> Manifest:
    fields = dict(
        kind="train",
        dataset_version="1",
        source=SourceDescription(kind="file_list", url="/data/list.txt", root="/data", items=3, list_sha256=SHA),
        config={"seed": 0, "samples_per_shard": 2},
        shards=[
            ShardEntry(url="shard-000000.tar", samples=2, bytes=20, sha256=SHA),
            ShardEntry(url="../v1/shard-000000.tar", samples=1, bytes=10, sha256=SHA),
        ],
        total_samples=3,
        total_bytes=30,
        hole_ratio_histogram=HoleRatioHistogram.of([0.05, 0.3, 0.55]),
        watermark=Watermark(keys_count=3, max_mtime=12.5, keys_sha256=keys_digest(["a", "b", "c"])),
    )
    fields.update(changes)
    return Manifest(**fields)


def test_written_manifest_reads_back_equal_and_resolves_shard_urls(tmp_path):
    manifest = _manifest()
    location = write_manifest(manifest, str(tmp_path / "v2"))

    loaded = load_manifest(str(tmp_path / "v2"))

    assert location == str(tmp_path / "v2" / "manifest.json") == loaded.location
    assert loaded == manifest
    assert loaded.shard_urls() == [str(tmp_path / "v2" / "shard-000000.tar"), str(tmp_path / "v1" / "shard-000000.tar")]
    assert load_manifest(location).shard_urls() == loaded.shard_urls()
    assert loaded.total_samples == 3
    data = json.loads(Path(location).read_text())
    assert data["format"] == "holefill.shards" and data["schema_version"] == 1


def test_shard_urls_resolve_against_an_object_store_folder():
    manifest = _manifest().with_location("s3://bucket/places/v2/manifest.json")
    assert manifest.shard_urls() == ["s3://bucket/places/v2/shard-000000.tar", "s3://bucket/places/v1/shard-000000.tar"]
    absolute = _manifest(shards=[ShardEntry(url="s3://other/x.tar", samples=3, bytes=30, sha256=SHA)])
    assert absolute.with_location("/local/manifest.json").shard_urls() == ["s3://other/x.tar"]


def test_unsaved_manifest_has_no_shard_urls():
    with pytest.raises(ManifestError, match="no location"):
        _manifest().shard_urls()


def test_hash_ignores_creation_time_and_follows_content():
    a = _manifest(created_at="2020-01-01T00:00:00+00:00")
    b = _manifest(created_at="2030-01-01T00:00:00+00:00")
    assert manifest_hash(a) == manifest_hash(b) == a.hash
    assert manifest_hash(_manifest(config={"seed": 1, "samples_per_shard": 2})) != manifest_hash(a)


def test_totals_must_agree_with_the_shards():
    with pytest.raises(ValueError, match="total_samples 4 != sum of shard samples 3"):
        _manifest(total_samples=4)
    with pytest.raises(ValueError, match="listed twice"):
        _manifest(shards=[ShardEntry(url="s.tar", samples=1, bytes=15, sha256=SHA)] * 2, total_samples=2)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(format="other"), "format must be 'holefill.shards'"),
        (lambda d: d.update(schema_version=2), "schema_version 2 is not supported"),
        (lambda d: d.update(surprise=1), "surprise"),
        (lambda d: d["shards"][0].update(sha256="xyz"), "shards.0.sha256"),
    ],
)
def test_reading_rejects_foreign_or_broken_manifests(tmp_path, edit, message):
    location = write_manifest(_manifest(), str(tmp_path))
    data = json.loads(Path(location).read_text())
    edit(data)
    Path(location).write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=message):
        load_manifest(location)


def test_missing_or_non_json_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(ManifestError, match="no manifest at"):
        load_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_manifest(str(tmp_path))


def test_hole_ratio_histogram_uses_the_paper_buckets_with_open_lower_edges():
    histogram = HoleRatioHistogram.of([0.0, 0.01, 0.0100001, 0.1, 0.6, 0.61, 1.0])
    assert histogram.buckets == {
        "below": 2, "0.01-0.10": 2, "0.10-0.20": 0, "0.20-0.30": 0, "0.30-0.40": 0, "0.40-0.50": 0,
        "0.50-0.60": 1, "above": 2,
    }
    assert histogram.fine_counts[0] == 3 and histogram.fine_counts[-1] == 1 and histogram.total == 7
    assert (histogram + histogram).buckets["above"] == 4
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        HoleRatioHistogram.of([1.5])


def test_key_list_round_trips_and_is_byte_identical_across_writes(tmp_path):
    first = write_keys(["b", "a", "c", "a"], str(tmp_path / "k1.gz"))
    second = write_keys(["c", "b", "a"], str(tmp_path / "k2.gz"))
    assert first == second == keys_digest(["a", "b", "c"])
    assert (tmp_path / "k1.gz").read_bytes() == (tmp_path / "k2.gz").read_bytes()
    assert read_keys(str(tmp_path / "k1.gz")) == {"a", "b", "c"}


def test_verify_shards_reports_missing_resized_and_altered_shards(tmp_path):
    payload = b"0123456789"
    (tmp_path / "a.tar").write_bytes(payload)
    (tmp_path / "b.tar").write_bytes(payload)
    digest = sha256_of_url(str(tmp_path / "a.tar"))
    shards = [ShardEntry(url=f"{n}.tar", samples=1, bytes=10, sha256=digest) for n in "abcd"]
    manifest = _manifest(shards=shards, total_samples=4, total_bytes=40).with_location(str(tmp_path / "m.json"))
    (tmp_path / "b.tar").write_bytes(b"9123456789")
    (tmp_path / "c.tar").write_bytes(b"short")

    problems = verify_shards(manifest)

    assert problems == [
        f"{tmp_path / 'b.tar'}: sha256 differs from the manifest",
        f"{tmp_path / 'c.tar'}: 5 bytes, manifest says 10",
        f"{tmp_path / 'd.tar'}: missing",
    ]
    assert verify_shards(manifest, check_sha256=False) == problems[1:]


def test_atomic_write_leaves_the_old_file_and_no_temporary_when_writing_fails(tmp_path):
    target = tmp_path / "manifest.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(str(target)) as handle:
            handle.write(b"partial new content")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]
    with atomic_write(str(target)) as handle:
        handle.write(b"new")
        assert target.read_text() == "old"  # invisible until the block ends
    assert target.read_text() == "new"


@pytest.mark.parametrize(
    ("base", "part", "joined"),
    [
        ("s3://b/data/v2", "../v1/s.tar", "s3://b/data/v1/s.tar"),
        ("/data/v2", "s.tar", "/data/v2/s.tar"),
        ("data", "s.tar", "data/s.tar"),
        ("file:///data/v2", "s.tar", "file:///data/v2/s.tar"),
        ("/data/v2", "s3://other/s.tar", "s3://other/s.tar"),
    ],
)
def test_join_url_resolves_relative_parts(base, part, joined):
    assert join_url(base, part) == joined


def test_parent_url_keeps_the_protocol():
    assert parent_url("s3://b/data/manifest.json") == "s3://b/data"
    assert parent_url("/x/manifest.json") == "/x"


def test_storage_options_reach_s3_only_and_never_print_the_secret():
    options = StorageSettings(endpoint_url="http://127.0.0.1:9", key="id", secret="hunter2")
    assert "hunter2" not in repr(options) and "hunter2" not in options.model_dump_json()
    assert options.for_s3fs() == {"key": "id", "secret": "hunter2", "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"},
                                  "config_kwargs": {"retries": {"mode": "adaptive", "max_attempts": 8}}}
    fs, path = url_to_fs("/tmp/x", options)  # a local path gets no S3 credentials
    assert fs.protocol[0] in ("file", "local") and path == "/tmp/x"
