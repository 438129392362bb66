"""Ingestion that trusts no source: every byte of a file list, a tree, a tar, an index cache is hostile until checked.

Listing-level rules run without Ray (``list_source``, ``SourceReader``); the end-to-end tests run the shard job on
the session's Ray with entries that try to leave their root, credentials in the source URL, a full disk at publish.
"""

from __future__ import annotations

import errno
import functools
import gzip
import http.server
import io
import json
import os
import tarfile
import threading
from pathlib import Path

import pytest
from fsspec.implementations.local import LocalFileOpener
from PIL import Image

from pipeline.data.shardjob.run import ShardJobConfig, ShardJobError, run_shard_job
from pipeline.data.sources import (
    InputTooLargeError,
    OutsideRootError,
    SourceItem,
    SourceReader,
    SourceSettings,
    index_url_for,
    list_source,
)


def _jpeg(path: Path, size=(96, 72), colour=(200, 40, 40)) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG", quality=90)
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


@pytest.fixture
def places(tmp_path):
    """``images/`` with two good photos, and a private photo beside it that no entry may reach."""
    for name in ("a/abbey/00000001.jpg", "a/abbey/00000002.jpg"):
        _jpeg(tmp_path / "data" / "images" / name)
    _jpeg(tmp_path / "private" / "secret_photo.jpg", colour=(0, 255, 0))
    return tmp_path


HOSTILE_ENTRIES = {
    "../../private/secret_photo.jpg": "outside the root",
    "../private/secret_photo.jpg": "outside the root",
    "/a/../../../private/secret_photo.jpg": "outside the root",
    "../../../../../../../etc/hostname": "outside the root",
    "http://169.254.169.254/latest/meta-data/iam.jpg": "a URL",
    "s3://someone-elses-bucket/photo.jpg": "a URL",
    "simplecache::s3://bucket/photo.jpg": "a URL",
}


def test_file_list_entries_resolve_inside_their_root_or_are_refused_with_a_reason_never_read(places, monkeypatch):
    private = places / "private" / "secret_photo.jpg"
    entries = ["/a/abbey/00000001.jpg 0", "a/abbey/./x/../00000002.jpg 1", f"file://{private} 2",
               "/a/abbey/notes.txt 3", *[f"{entry} 4" for entry in HOSTILE_ENTRIES]]
    (places / "data" / "list.txt").write_text("\n".join(entries) + "\n")

    listing = list_source(SourceSettings(url=str(places / "data" / "list.txt"), root=str(places / "data" / "images")))

    assert [i.key for i in listing.items] == ["a_abbey_00000001", "a_abbey___x____00000002"]  # kept as written: keys never change
    root = str(places / "data" / "images") + "/"
    assert all(item.url.startswith(root) and ".." not in item.url for item in listing.items)
    reasons = {entry.source: (entry.reason, entry.detail) for entry in listing.rejected}
    for entry, detail in HOSTILE_ENTRIES.items():
        assert reasons[entry][0] == "outside root" and detail in reasons[entry][1], entry
    assert reasons[f"file://{private}"][0] == "outside root"
    assert reasons["a/abbey/notes.txt"][0] == "not an image file"  # the extension filter applies to lists too
    read = []
    monkeypatch.setattr(SourceReader, "read", lambda self, item: read.append(item.url) or b"")
    with SourceReader() as reader:
        for item in listing.items:
            reader.read(item)
    assert not any("private" in url or "hostname" in url for url in read)


def test_a_directory_source_follows_symlinks_only_inside_its_root(places):
    images = places / "data" / "images"
    (images / "link_to_file.jpg").symlink_to(places / "private" / "secret_photo.jpg")
    (images / "hostname.jpg").symlink_to("/etc/hostname")
    (images / "dangling.jpg").symlink_to(images / "gone.jpg")
    (images / "inside.jpg").symlink_to(images / "a" / "abbey" / "00000001.jpg")
    (images / "linked_folder").symlink_to(places / "private", target_is_directory=True)

    listing = list_source(SourceSettings(url=str(images)))

    assert [i.key for i in listing.items] == ["a_abbey_00000001", "a_abbey_00000002", "inside"]
    inside = listing.items[-1]
    assert inside.size == (images / "a" / "abbey" / "00000001.jpg").stat().st_size
    assert {(e.source, e.reason, e.detail) for e in listing.rejected} == {
        ("link_to_file.jpg", "outside root", "symlink outside the root"),
        ("hostname.jpg", "outside root", "symlink outside the root"),
        ("dangling.jpg", "outside root", "broken symlink"),
    }
    with SourceReader() as reader:
        assert reader.read(inside) == (images / "a" / "abbey" / "00000001.jpg").read_bytes()


def test_a_symlink_planted_after_the_listing_or_reached_through_a_linked_folder_is_never_read(places):
    images = places / "data" / "images"
    (images / "b").symlink_to(places / "private", target_is_directory=True)
    (places / "data" / "list.txt").write_text("/a/abbey/00000001.jpg 0\n/b/secret_photo.jpg 1\n")
    listing = list_source(SourceSettings(url=str(places / "data" / "list.txt"), root=str(images), stat=False))
    through_folder = next(i for i in listing.items if i.key == "b_secret_photo")
    target = images / "a" / "abbey" / "00000001.jpg"
    item = listing.items[0]
    target.unlink()
    target.symlink_to(places / "private" / "secret_photo.jpg")  # swapped after the listing

    with SourceReader() as reader:
        for bad in (item, through_folder):
            with pytest.raises(OutsideRootError, match="outside the source root"):
                reader.read(bad)


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def test_a_member_name_cannot_forge_the_cached_tar_index_and_a_damaged_cache_is_a_miss(tmp_path):
    photo = _jpeg(tmp_path / "p.jpg")
    forged = "img_a.jpg\n0\t999999\t0.0\timg_forged.jpg"
    archive = _tar(tmp_path / "train.tar", {"img_a.jpg": photo, forged: photo, "tab\tname.jpg": photo})
    source = SourceSettings(url=str(archive))

    first = list_source(source)
    second = list_source(source)  # from the cache

    for listing in (first, second):
        assert [(i.key, i.size) for i in listing.items] == [("img_a", len(photo))]
        assert sorted(e.reason for e in listing.rejected) == ["bad name", "bad name"]
    cache = Path(index_url_for(source))
    for damaged in (b"not gzip at all", gzip.compress(b'{"format": "holefill.tar-index.v2"}\n[1, 2'),
                    gzip.compress(cache.read_bytes()[:0] + b"\x00\xff")):
        cache.write_bytes(damaged)
        assert [i.key for i in list_source(source).items] == ["img_a"]  # a miss: listed again, cache rewritten
    header = json.loads(gzip.decompress(cache.read_bytes()).split(b"\n", 1)[0])
    legacy = json.dumps({**header, "format": "holefill.tar-index.v1"}).encode() + b"\n0\t999999\t0.0\timg_forged.jpg\n"
    cache.write_bytes(gzip.compress(legacy))
    assert [i.key for i in list_source(source).items] == ["img_a"]


def test_sparse_and_short_tar_members_are_rejected_at_listing_not_retried_as_storage_faults(tmp_path):
    photo = _jpeg(tmp_path / "p.jpg")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as archive:
        for name in ("ok.jpg", "sparse.jpg", "short.jpg"):
            info = tarfile.TarInfo(name)
            info.size = len(photo)
            if name == "sparse.jpg":
                info.type = tarfile.GNUTYPE_SPARSE
            archive.addfile(info, io.BytesIO(photo))
    data = buffer.getvalue()
    with tarfile.open(fileobj=io.BytesIO(data)) as reference:
        cut = reference.getmember("short.jpg").offset_data + 100
    (tmp_path / "t.tar").write_bytes(data[:cut])

    listing = list_source(SourceSettings(url=str(tmp_path / "t.tar")))

    assert [i.key for i in listing.items] == ["ok"]
    assert {e.source: e.reason for e in listing.rejected} == {"sparse.jpg": "sparse member", "short.jpg": "truncated"}


def test_reads_are_bounded_before_and_while_reading_even_when_the_listing_lied(tmp_path):
    big = tmp_path / "images" / "huge.jpg"
    big.parent.mkdir()
    with open(big, "wb") as handle:  # 1 GiB, sparse on disk: costs nothing to create
        handle.truncate(1 << 30)
    listing = list_source(SourceSettings(url=str(tmp_path / "images")))
    (item,) = listing.items
    assert item.size == 1 << 30

    with SourceReader(max_bytes=1 << 20) as reader:
        with pytest.raises(InputTooLargeError, match="listed at 1073741824 bytes, over max_input_bytes=1048576"):
            reader.read(item)
        lying = SourceItem(key=item.key, path=item.path, url=item.url, size=10, root=item.root)
        with pytest.raises(InputTooLargeError, match="at least 1048577 bytes"):
            reader.read(lying)
        archive = _tar(tmp_path / "t.tar", {"m.jpg": b"x" * (2 << 20)})
        (member,) = list_source(SourceSettings(url=str(archive))).items
        with pytest.raises(InputTooLargeError, match="listed at 2097152"):
            reader.read(member)


# -------------------------------------------------------------------------------------------- through the job


@pytest.fixture(scope="module")
def ray_cluster(ray_driver):
    return ray_driver


@pytest.fixture
def http_root(places):
    """``places/`` served over HTTP on 127.0.0.1 (a source whose URL carries credentials)."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(places))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join()


def test_the_job_lists_refusals_in_its_manifest_and_records_and_logs_no_credential(ray_cluster, places, http_root,
                                                                                    tmp_path, caplog):
    (places / "data" / "images" / "a_abbey_00000001.jpg").write_bytes((places / "data" / "images" / "a" / "abbey" /
                                                                       "00000001.jpg").read_bytes())
    entries = ["/a/abbey/00000001.jpg 0", "/a/abbey/00000002.jpg 1", "/a_abbey_00000001.jpg 2",
               *[f"{entry} 3" for entry in HOSTILE_ENTRIES]]
    (places / "data" / "images" / "list.txt").write_text("\n".join(entries) + "\n")
    secret = "X-Amz-Signature=0123456789abcdef&X-Amz-Credential=AKIAEXAMPLE%2F20240101"
    url = f"http://bob:p4ssw0rd@{http_root}/data/images/list.txt?{secret}"
    config = ShardJobConfig.model_validate({"source": {"url": url, "stat": False}, "out": str(tmp_path / "out"),
                                            "samples_per_shard": 4, "store_size": 32, "max_rejected_fraction": 0.9})
    lines: list[str] = []

    result = run_shard_job(config, emit=lines.append)

    assert result.manifest.total_samples == 2
    refused = {entry.source: entry.reason for entry in result.manifest.rejected}
    assert refused == {**{entry: "outside root" for entry in HOSTILE_ENTRIES}, "a_abbey_00000001.jpg": "key collision"}
    recorded = Path(result.manifest_url).read_text() + "\n".join(lines) + caplog.text
    for leaked in ("p4ssw0rd", "0123456789abcdef", "AKIAEXAMPLE"):
        assert leaked not in recorded
    assert "bob:***@" in result.manifest.config["source"]["url"]
    assert "X-Amz-Signature=***" in result.manifest.source.url


def test_a_full_disk_at_publish_fails_in_one_line_and_publishes_nothing(ray_cluster, places, tmp_path, monkeypatch):
    (places / "data" / "list.txt").write_text("/a/abbey/00000001.jpg 0\n/a/abbey/00000002.jpg 1\n")
    out = tmp_path / "out"
    config = ShardJobConfig.model_validate({"source": {"url": str(places / "data" / "list.txt"),
                                                       "root": str(places / "data" / "images")},
                                            "out": str(out), "samples_per_shard": 4, "store_size": 32})
    real_write = LocalFileOpener.write  # fsspec's local file: every holefill write goes through it
    for target in ("manifest.json", "keys.txt.gz"):
        def write(self, data, target=target):  # the driver's own publish writes only: shards come from Ray workers
            if f".{target}.tmp-" in str(self.path):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_write(self, data)

        monkeypatch.setattr(LocalFileOpener, "write", write)
        with pytest.raises(ShardJobError) as failure:
            run_shard_job(config, emit=lambda line: None)
        message = str(failure.value)
        assert "\n" not in message and "No space left on device" in message and "nothing published" in message
        assert not (out / "manifest.json").exists() and not (out / "keys.txt.gz").exists()
        assert not [p for p in out.iterdir() if ".tmp-" in p.name]
        monkeypatch.setattr(LocalFileOpener, "write", real_write)
    assert run_shard_job(config, emit=lambda line: None).manifest.total_samples == 2  # the re-run publishes
