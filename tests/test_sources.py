"""Sources: Places365 file lists, directory trees and streamed tar archives; keys; incremental filtering."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from pipeline.data.manifest import (
    HoleRatioHistogram,
    Manifest,
    SourceDescription,
    Watermark,
    write_keys,
    write_manifest,
)
from pipeline.data.sample_data import generate_sample_dataset
from pipeline.data.sources import SourceReader, SourceSettings, key_for_path, list_source, new_items, parse_file_list
from support.s3_server import s3_endpoint  # noqa: F401  (pytest fixture)


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return generate_sample_dataset(
        str(tmp_path_factory.mktemp("places")), n_train=8, n_val=4, size=(64, 48), include_package_photos=False
    )


def _write(path: Path, data: bytes = b"x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@pytest.mark.parametrize(
    ("path", "key"),
    [
        ("/a/abbey/00000000.jpg", "a_abbey_00000000"),
        ("a/abbey/00000000.jpg", "a_abbey_00000000"),
        ("Places365_val_00000001.jpg", "Places365_val_00000001"),
        ("/f/forest/broadleaf/00000003.jpg", "f_forest_broadleaf_00000003"),
        ("x/photo.v2.final.png", "x_photo_v2_final"),
        ("dir with space/ümlaut.jpg", "dir_with_space__mlaut"),
    ],
)
def test_keys_come_from_the_relative_path_without_dots(path, key):
    assert key_for_path(path) == key
    assert "." not in key_for_path(path)


def test_key_for_a_path_without_a_file_name_is_an_error():
    with pytest.raises(ValueError, match="no file name"):
        key_for_path("/a/abbey/")


def test_file_list_lines_parse_with_and_without_labels():
    text = "/a/abbey/00000000.jpg 0\n\nPlaces365_val_00000001.jpg 165\nnolabel.jpg\n"
    assert parse_file_list(text) == [
        ("/a/abbey/00000000.jpg", 0), ("Places365_val_00000001.jpg", 165), ("nolabel.jpg", None)
    ]
    with pytest.raises(ValueError, match="line 2: label 'x'"):
        parse_file_list("a.jpg 1\nb.jpg x\n")
    with pytest.raises(ValueError, match="line 1: expected 'path \\[label\\]'"):
        parse_file_list("a.jpg 1 2\n")


@pytest.mark.parametrize(
    ("url", "kind"),
    [("s3://b/places365_train_standard.txt", "file_list"), ("/d/val_large.tar", "tar"), ("/d/images/", "directory")],
)
def test_source_kind_is_detected_from_the_url(url, kind):
    assert SourceSettings(url=url).resolved_kind == kind


def test_places365_file_list_gives_sorted_items_with_labels_and_stat(sample):
    listing = list_source(SourceSettings(url=sample.train_list, root=sample.train_root))

    assert [item.key for item in listing.items] == sorted(item.key for item in listing.items)
    assert len(listing.items) == len(sample.train_files)
    by_key = {item.key: item for item in listing.items}
    first = sample.train_files[0]
    item = by_key[key_for_path(first)]
    assert item.label == sample.train_labels[0] and item.path == first.lstrip("/")
    assert Path(item.url) == Path(sample.train_path(first))
    assert item.size == Path(item.url).stat().st_size and item.mtime == pytest.approx(Path(item.url).stat().st_mtime)
    assert listing.description.kind == "file_list" and len(listing.description.list_sha256) == 64
    with SourceReader() as reader:
        assert reader.read(item) == Path(item.url).read_bytes()


def test_missing_listed_file_is_listed_and_fails_only_when_read(tmp_path):
    _write(tmp_path / "img" / "a.jpg")
    (tmp_path / "list.txt").write_text("/a.jpg 1\n/gone.jpg 2\n")

    items = list_source(SourceSettings(url=str(tmp_path / "list.txt"), root=str(tmp_path / "img"))).items

    assert [(i.key, i.size) for i in items] == [("a", 1), ("gone", None)]
    with SourceReader() as reader, pytest.raises(FileNotFoundError):
        reader.read(items[1])


def test_a_key_collision_keeps_the_first_path_in_sorted_order_and_rejects_the_later_naming_both(tmp_path):
    (tmp_path / "list.txt").write_text("/a/b_c.jpg 0\n/a/b.c.jpg 0\n")

    listing = list_source(SourceSettings(url=str(tmp_path / "list.txt"), stat=False))

    assert [(i.key, i.path) for i in listing.items] == [("a_b_c", "a/b.c.jpg")]
    (rejected,) = listing.rejected
    assert (rejected.key, rejected.source, rejected.reason) == ("a_b_c", "a/b_c.jpg", "key collision")
    assert "a/b.c.jpg" in rejected.detail


def test_directory_tree_lists_images_only_and_skips_hidden_and_temporary_files(tmp_path):
    for name in ("b/2.JPG", "a/1.jpg", "a/3.png", "notes.txt", "a/.hidden.jpg", "a/.x.jpg.tmp-0123abcd"):
        _write(tmp_path / "tree" / name)

    listing = list_source(SourceSettings(url=str(tmp_path / "tree")))

    assert [(i.key, i.path) for i in listing.items] == [("a_1", "a/1.jpg"), ("a_3", "a/3.png"), ("b_2", "b/2.JPG")]
    assert all(i.label is None and i.mtime is not None for i in listing.items)


def test_tar_archive_is_indexed_without_extraction_and_members_read_by_offset(sample, tmp_path):
    archive_path = tmp_path / "train_large.tar"
    with tarfile.open(archive_path, "w") as archive:
        archive.add(sample.train_root, arcname="data_large")
        note = b"not an image"
        info = tarfile.TarInfo("data_large/README")
        info.size = len(note)
        archive.addfile(info, io.BytesIO(note))
    before = set(os.listdir(tmp_path))

    listing = list_source(SourceSettings(url=str(archive_path), root="data_large"))
    from_list = list_source(SourceSettings(url=sample.train_list, root=sample.train_root))

    assert set(os.listdir(tmp_path)) == before | {"train_large.tar.index.tsv.gz"}  # nothing extracted; index cached
    assert [i.key for i in listing.items] == [i.key for i in from_list.items]
    assert listing.description.kind == "tar" and listing.description.root == "data_large"
    with SourceReader() as reader:
        for streamed, listed in zip(listing.items, from_list.items):
            assert streamed.offset is not None and streamed.url == str(archive_path)
            assert reader.read(streamed) == Path(listed.url).read_bytes()


def test_file_list_and_images_on_s3(s3_endpoint):
    dataset = generate_sample_dataset(
        s3_endpoint.url("src"), n_train=3, n_val=0, size=(64, 48), include_package_photos=False,
        storage_options=s3_endpoint.s3fs_options,
    )
    options = s3_endpoint.storage_options

    listing = list_source(SourceSettings(url=dataset.train_list, root=dataset.train_root), options)

    assert len(listing.items) == 3
    assert all(i.url.startswith(s3_endpoint.url("src", "data_large")) for i in listing.items)
    assert all(i.size and i.mtime for i in listing.items)
    with SourceReader(options) as reader:
        assert reader.read(listing.items[0])[:2] == b"\xff\xd8"  # a JPEG, over HTTP from the S3 endpoint


def _previous_manifest(folder: Path, keys: list[str], max_mtime: float) -> Manifest:
    manifest = Manifest(
        kind="train",
        dataset_version="1",
        source=SourceDescription(kind="directory", url="x", items=len(keys), list_sha256="0" * 64),
        config={},
        shards=[],
        total_samples=0,
        total_bytes=0,
        hole_ratio_histogram=HoleRatioHistogram.empty(),
        watermark=Watermark(
            keys_count=len(keys), max_mtime=max_mtime, keys_sha256=write_keys(keys, str(folder / "keys.txt.gz"))
        ),
    )
    write_manifest(manifest, str(folder))
    return manifest


def test_new_items_are_those_the_previous_watermark_has_not_seen(tmp_path):
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        _write(tmp_path / "tree" / name)
    os.utime(tmp_path / "tree" / "a.jpg", (1000, 1000))
    os.utime(tmp_path / "tree" / "b.jpg", (2000, 2000))
    os.utime(tmp_path / "tree" / "c.jpg", (3000, 3000))
    items = list_source(SourceSettings(url=str(tmp_path / "tree"))).items
    previous = _previous_manifest(tmp_path / "v1", ["a", "c"], max_mtime=2000.0)

    assert [i.key for i in new_items(items, previous)] == ["b"]
    assert [i.key for i in new_items(items, previous, by="mtime")] == ["c"]
    assert new_items(items, None) == items


# ------------------------------------------------------------------------------ tar archives on S3, at scale


class _GetCounter:
    """Counts the S3 GET requests of one object key, as the S3 client sends them."""

    def __init__(self, fs, key: str):
        self.key, self.count = key, 0
        fs.connect()  # the client exists from here on; events registered on it see every request
        fs.s3.meta.events.register("before-call.s3.GetObject", self._seen)

    def _seen(self, params, **_):
        if params.get("Key") == self.key:
            self.count += 1


def _places_like_archive(members: int, member_bytes: int) -> bytes:
    """A tar in the Places2 layout (data_large/a/abbey/...) of incompressible members."""
    rng = __import__("random").Random(0)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for number in range(members):
            info = tarfile.TarInfo(f"data_large/a/abbey/{number:08d}.jpg")
            info.size, info.mtime = member_bytes, 1_600_000_000
            archive.addfile(info, io.BytesIO(rng.randbytes(member_bytes)))
    return buffer.getvalue()


def test_a_tar_archive_on_s3_is_listed_in_requests_bounded_by_its_size_and_its_index_is_reused(s3_endpoint):
    from pipeline.data.sources import TAR_LIST_BLOCK, index_url_for, scan_tar
    from pipeline.fsutil import url_to_fs

    url = s3_endpoint.url("raw", "train_large.tar")
    data = _places_like_archive(members=400, member_bytes=60 * 1024)  # the 400 x 60 KiB: 201 GETs before
    fs, path = url_to_fs(url, s3_endpoint.storage_options)
    fs.pipe_file(path, data)
    spec = SourceSettings(url=url, root="data_large")
    counter = _GetCounter(fs, path.split("/", 1)[1])

    listing = list_source(spec, s3_endpoint.storage_options)
    assert len(listing.items) == 400 and listing.items[0].key == "a_abbey_00000000"
    assert counter.count <= -(-len(data) // TAR_LIST_BLOCK) + 1  # one pass: size / block, whatever the members

    counter.count = 0
    small_block = 1024 * 1024
    assert len(scan_tar(url, s3_endpoint.storage_options, block_size=small_block)) == 400
    assert counter.count <= -(-len(data) // small_block) + 1 < 400 // 10  # proportional to bytes, not members

    counter.count = 0
    again = list_source(spec, s3_endpoint.storage_options)  # retraining lists the same archive again
    assert again.items == listing.items and counter.count == 0  # the cached index, not the archive
    assert fs.exists(url_to_fs(index_url_for(spec), s3_endpoint.storage_options)[1])
    with SourceReader(s3_endpoint.storage_options) as reader:
        item = listing.items[7]
        assert reader.read(item) == data[item.offset: item.offset + item.size]

    fs.pipe_file(path, _places_like_archive(members=3, member_bytes=1024))  # replaced: new ETag and size
    assert len(list_source(spec, s3_endpoint.storage_options).items) == 3
