"""WebDataset loaders on real tar shards: shapes, joint crop/flip, safe decoding, exact eval, equal train batches."""

from __future__ import annotations

import io
import re
import json
import pickle
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from pipeline.data.imageops import encode_mask_png
from pipeline.data.loaders import make_eval_loader, make_train_loader
from pipeline.data.shard_stream import ShardRef, resolve_shard_urls
from pipeline.data.tario import TarFormatError, tar_members
from pipeline.data.train_geometry import random_crop_flip
from pipeline.fsutil import ReadRetry, TransientReadError
from support.s3_server import s3_endpoint  # noqa: F401  (pytest fixture)


def _jpeg(array: np.ndarray, quality: int = 100) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def _checker_sample(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Image dark where (x < cx) xor (y < cy), bright elsewhere; the mask is a hole exactly where dark.

    Split points are random per sample, so a crop box or flip applied to only one of the two moves the
    boundary in one and not the other, and the exact-match check below fails.
    """
    cy, cx = int(rng.integers(20, height - 20)), int(rng.integers(20, width - 20))
    y, x = np.mgrid[0:height, 0:width]
    dark = (x < cx) ^ (y < cy)
    image = np.where(dark[..., None], 20, 235).astype(np.uint8).repeat(3, axis=2)
    return image, np.where(dark, 255, 0).astype(np.uint8)


def _write_shards(folder, n_shards: int, per_shard: int, *, size=(80, 112), extra=None, seed=0) -> list[str]:
    rng = np.random.default_rng(seed)
    urls = []
    for s in range(n_shards):
        url = str(folder / f"shard-{s:06d}.tar")
        with wds.TarWriter(url) as writer:
            for i in range(per_shard):
                key = f"s{s}_{i:04d}"
                image, mask = _checker_sample(rng, *size)
                sample = {
                    "__key__": key,
                    "jpg": _jpeg(image),
                    "mask.png": encode_mask_png(mask),
                    "json": json.dumps({"key": key, "hole_ratio": float((mask > 0).mean())}).encode(),
                }
                sample.update((extra or {}))
                writer.write(sample)
        urls.append(url)
    return urls


def _assert_aligned(batch: dict) -> None:
    dark = batch["image"].mean(dim=1, keepdim=True) < 0.5
    assert torch.equal(dark, batch["mask"] > 0.5), "image and mask were cropped or flipped differently"


def test_train_batches_have_the_documented_shapes_types_and_ranges(tmp_path):
    urls = _write_shards(tmp_path, 2, 6)
    loader = make_train_loader(urls, batch_size=4, crop_size=64, batches_per_epoch=3, num_workers=0)
    batches = list(loader)
    assert len(batches) == len(loader) == 3
    for batch in batches:
        assert batch["image"].shape == (4, 3, 64, 64) and batch["image"].dtype == torch.float32
        assert batch["mask"].shape == (4, 1, 64, 64) and batch["mask"].dtype == torch.float32
        assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
        assert set(batch["mask"].unique().tolist()) <= {0.0, 1.0}


def test_crop_and_flip_are_applied_jointly_to_image_and_mask(tmp_path):
    urls = _write_shards(tmp_path, 2, 8)
    loader = make_train_loader(urls, batch_size=8, crop_size=48, batches_per_epoch=6, num_workers=0, seed=5)
    for batch in loader:
        _assert_aligned(batch)


def test_random_crop_flip_uses_varied_boxes_and_both_flip_states():
    image = np.arange(40 * 50 * 3, dtype=np.uint32).reshape(40, 50, 3).astype(np.uint8)
    mask = np.zeros((40, 50), np.uint8)
    rng = np.random.default_rng(0)
    corners = set()
    for _ in range(40):
        cropped, _ = random_crop_flip(image, mask, 32, rng)
        corners.add(cropped[0, 0, 0])
    assert len(corners) > 10  # many distinct crop boxes (and mirror images)
    # An image smaller than the crop is up-scaled together with its mask first.
    up_image, up_mask = random_crop_flip(image[:20, :25], mask[:20, :25], 32, rng)
    assert up_image.shape == (32, 32, 3) and up_mask.shape == (32, 32)


class _Exploit:
    """Unpickling this would write a marker file: proof that a loader decoded a pickle member."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_and_torch_members_are_never_unpickled(tmp_path):
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_Exploit(str(marker)))
    urls = _write_shards(tmp_path, 1, 4, extra={"pyd": payload, "pth": payload, "pickle": payload})
    batches = list(make_train_loader(urls, batch_size=2, crop_size=32, batches_per_epoch=3, num_workers=0))
    batches += list(make_eval_loader(urls, batch_size=2, crop_size=32))
    assert len(batches) == 5
    assert all(set(b) <= {"image", "mask", "key", "hole_ratio"} for b in batches)
    assert not marker.exists()


def test_eval_reads_every_sample_exactly_once_with_two_ranks_and_two_workers(tmp_path):
    urls = _write_shards(tmp_path, 5, 3, size=(64, 64))
    expected = {f"s{s}_{i:04d}" for s in range(5) for i in range(3)}
    seen: list[str] = []
    for rank in range(2):
        loader = make_eval_loader(urls, batch_size=2, rank=rank, world_size=2, num_workers=2, crop_size=None)
        keys = [k for batch in loader for k in batch["key"]]
        again = [k for batch in make_eval_loader(urls, batch_size=2, rank=rank, world_size=2, num_workers=2, crop_size=None) for k in batch["key"]]
        assert keys == again  # stable order
        seen += keys
    assert sorted(seen) == sorted(expected) and len(seen) == len(expected)


def test_eval_batches_carry_keys_and_hole_ratios_of_the_yielded_masks(tmp_path):
    urls = _write_shards(tmp_path, 1, 5)
    batches = list(make_eval_loader(urls, batch_size=2, crop_size=64))
    assert [len(b["key"]) for b in batches] == [2, 2, 1]
    for batch in batches:
        assert batch["image"].shape[1:] == (3, 64, 64)
        _assert_aligned(batch)
        assert torch.allclose(batch["hole_ratio"], batch["mask"].mean(dim=(1, 2, 3)))
        assert batch["hole_ratio"].shape == (len(batch["key"]),)


def test_train_gives_equal_batch_counts_on_every_rank_even_with_uneven_shards(tmp_path):
    urls = _write_shards(tmp_path, 3, 4)  # 3 shards over 2 ranks: a split list would be uneven
    counts = []
    for rank in range(2):
        loader = make_train_loader(urls, batch_size=3, crop_size=32, batches_per_epoch=5, num_workers=2, rank=rank, world_size=2)
        counts.append(sum(1 for _ in loader))
    assert counts == [5, 5]


def test_train_stream_is_seeded_per_rank_and_changes_between_epochs(tmp_path):
    urls = _write_shards(tmp_path, 3, 4)

    def first_batch(rank: int, seed: int = 0, epoch: int = 0) -> torch.Tensor:
        loader = make_train_loader(urls, batch_size=4, crop_size=32, batches_per_epoch=1, num_workers=0, seed=seed, rank=rank, world_size=2)
        for _ in range(epoch):  # each pass after the first moves to the next epoch's seeds
            next(iter(loader))
        return next(iter(loader))["image"]

    assert torch.equal(first_batch(0), first_batch(0))
    assert not torch.equal(first_batch(0), first_batch(1))
    assert not torch.equal(first_batch(0), first_batch(0, seed=1))
    assert not torch.equal(first_batch(0), first_batch(0, epoch=1))
    loader = make_train_loader(urls, batch_size=4, crop_size=32, batches_per_epoch=1, num_workers=0)
    assert not torch.equal(next(iter(loader))["image"], next(iter(loader))["image"])


def test_shard_list_may_be_a_brace_pattern_and_must_not_be_empty(tmp_path):
    _write_shards(tmp_path, 3, 1)
    assert resolve_shard_urls(str(tmp_path / "shard-{000000..000002}.tar")) == [
        str(tmp_path / f"shard-{i:06d}.tar") for i in range(3)
    ]
    with pytest.raises(ValueError, match="shard list is empty"):
        make_eval_loader([], batch_size=1)
    with pytest.raises(ValueError, match="rank must be in"):
        make_train_loader([str(tmp_path / "shard-000000.tar")], batch_size=1, batches_per_epoch=1, rank=2, world_size=2)


def _archive(tar_format: int) -> bytes:
    """A tar with the member kinds shards meet in the wild: files, a directory, a symlink, long and
    non-ASCII names (pax only), an empty file and a member the whitelist rejects."""
    names = ["a.jpg", "deep/" + "k" * 90 + "/" + "m" * 60 + ".mask.png", "c.jpg", "skip.pyd", "z.json"]
    if tar_format == tarfile.PAX_FORMAT:
        names.append("ünïcode/é.json")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tar_format) as archive:
        folder = tarfile.TarInfo("deep")
        folder.type = tarfile.DIRTYPE
        archive.addfile(folder)
        for index, name in enumerate(names):
            data = bytes([index]) * (0 if name == "c.jpg" else 700 * index + 3)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "a.jpg"
        archive.addfile(link)
    return buffer.getvalue()


@pytest.mark.parametrize("tar_format", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT], ids=["ustar", "gnu", "pax"])
def test_tar_member_reader_gives_the_regular_files_tarfile_sees(tar_format):
    data = _archive(tar_format)
    with tarfile.open(fileobj=io.BytesIO(data)) as reference:
        expected = [
            (m.name, reference.extractfile(m).read())
            for m in reference.getmembers()
            if m.isreg() and not m.name.endswith(".pyd")
        ]
    assert list(tar_members(io.BytesIO(data), lambda name: not name.endswith(".pyd"))) == expected


class _ForwardOnly(io.RawIOBase):
    """A stream that cannot seek (like an HTTP body): skipped members must be read past."""

    def __init__(self, data: bytes) -> None:
        self._inner = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        return self._inner.readinto(buffer)


def test_tar_member_reader_skips_unselected_members_on_streams_that_cannot_seek():
    data = _archive(tarfile.GNU_FORMAT)
    got = list(tar_members(io.BufferedReader(_ForwardOnly(data)), lambda name: name.endswith(".json")))
    assert [name for name, _ in got] == ["z.json"] and got[0][1] == bytes([4]) * 2803


def test_tar_member_reader_rejects_corrupt_headers_and_truncated_members():
    data = bytearray(_archive(tarfile.GNU_FORMAT))
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as reference:
        inside_last_file = reference.getmember("z.json").offset_data + 100
    with pytest.raises(ValueError, match="ends inside a member"):
        list(tar_members(io.BytesIO(bytes(data[:inside_last_file])), lambda name: True))
    data[512 + 3] ^= 0x55  # a byte of the first file header's name: the checksum no longer matches
    with pytest.raises(ValueError, match="checksum"):
        list(tar_members(io.BytesIO(bytes(data)), lambda name: True))


def test_a_truncated_shard_ends_training_and_evaluation_with_one_error_naming_the_shard_and_offset(tmp_path):
    good, broken = _write_shards(tmp_path, 2, 4)
    with tarfile.open(broken) as archive:
        member = archive.getmembers()[7]
        inside_third_sample = member.offset_data + 10
    with open(broken, "r+b") as handle:
        handle.truncate(inside_third_sample)
    loader = make_train_loader([good, broken], batch_size=4, crop_size=48, batches_per_epoch=4, num_workers=0, shuffle_buffer=0)
    expected = rf"shard {re.escape(broken)}: damaged tar at offset {member.offset_data}: stream ends inside a member"
    with pytest.raises(TarFormatError, match=expected):
        list(loader)
    with pytest.raises(TarFormatError, match=expected):
        list(make_eval_loader([broken], batch_size=2, crop_size=48))


# ------------------------------------------------------------------------------------- storage faults


class _FlakyStream(io.RawIOBase):
    """A file that raises ``ConnectionResetError`` once ``fail_after`` bytes were read (a cut connection)."""

    def __init__(self, data: bytes, fail_after: int) -> None:
        self._data, self._pos, self._fail_after = data, 0, fail_after

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self._pos >= self._fail_after:
            raise ConnectionResetError("connection reset by peer (injected)")
        n = min(len(buffer), len(self._data) - self._pos, self._fail_after - self._pos)
        buffer[:n] = self._data[self._pos: self._pos + n]
        self._pos += n
        return n


def _flaky_opener(monkeypatch, flaky_url: str, failures: int):
    """Make the shard stream's ``open_url`` cut ``flaky_url`` part way, ``failures`` times, then read it whole."""
    from pipeline.data import shard_stream

    real = shard_stream.open_url
    opened = {"count": 0}

    def open_url(url, mode="rb", storage_options=None, **kwargs):
        if url != flaky_url:
            return real(url, mode, storage_options, **kwargs)
        opened["count"] += 1
        data = open(url, "rb").read()
        fail_after = len(data) // 2 if opened["count"] <= failures else len(data) + 1
        return io.BufferedReader(_FlakyStream(data, fail_after), buffer_size=1024)

    monkeypatch.setattr(shard_stream, "open_url", open_url)
    return opened


FAST_RETRY = ReadRetry(attempts=4, backoff_s=0.01, max_backoff_s=0.02)


def test_a_shard_read_cut_part_way_is_retried_resumed_and_logged_and_eval_stays_exact(tmp_path, monkeypatch, caplog):
    urls = _write_shards(tmp_path, 2, 6, size=(48, 48))
    clean = sorted(k for batch in make_eval_loader(urls, batch_size=4, crop_size=None) for k in batch["key"])
    opened = _flaky_opener(monkeypatch, urls[1], failures=2)

    keys = [k for batch in make_eval_loader(urls, batch_size=4, crop_size=None, read_retry=FAST_RETRY)
            for k in batch["key"]]

    assert sorted(keys) == clean and len(keys) == len(set(keys)) == 12  # every sample once, none twice
    assert opened["count"] == 3 and caplog.text.count("retry ") == 2 and urls[1] in caplog.text
    assert "resuming after" in caplog.text


def test_training_goes_on_past_a_shard_that_stays_unreadable_and_evaluation_names_it(tmp_path, monkeypatch, caplog):
    urls = _write_shards(tmp_path, 2, 4, size=(48, 48))
    _flaky_opener(monkeypatch, urls[0], failures=10**6)
    retry = ReadRetry(attempts=2, backoff_s=0.01, max_backoff_s=0.01)

    loader = make_train_loader(urls, batch_size=4, crop_size=32, batches_per_epoch=3, num_workers=0,
                               shuffle_buffer=0, read_retry=retry)
    assert len(list(loader)) == 3
    assert f"reading {urls[0]} failed 2 times" in caplog.text
    with pytest.raises(TransientReadError, match="shard-000000.tar failed 2 times"):
        list(make_eval_loader(urls, batch_size=2, crop_size=None, read_retry=retry))


def test_a_shard_that_is_not_the_one_its_manifest_lists_is_named(tmp_path):
    url = _write_shards(tmp_path, 1, 3, size=(48, 48))[0]
    size = len(open(url, "rb").read())
    with pytest.raises(ValueError, match=rf"shard {url} is {size} bytes, its manifest says {size + 512}"):
        list(make_eval_loader([ShardRef(url, size + 512, "0" * 64)], batch_size=2, crop_size=None))
    with pytest.raises(ValueError, match="sha256 differs from its manifest"):
        list(make_eval_loader([ShardRef(url, size, "0" * 64)], batch_size=2, crop_size=None, verify="sha256"))
    assert len(list(make_eval_loader([ShardRef(url, size, "0" * 64)], batch_size=3, crop_size=None))) == 1  # size only


def test_shard_reads_from_s3_survive_connection_cuts_past_the_clients_own_retries(tmp_path, s3_endpoint, caplog):
    import fsspec

    from support.fault_proxy import Fault, FaultProxy

    local = _write_shards(tmp_path, 2, 4, size=(48, 48))
    fs = fsspec.filesystem("s3", **s3_endpoint.s3fs_options)
    remote = [s3_endpoint.url("loader", f"shard-{i:06d}.tar") for i in range(2)]
    for path, url in zip(local, remote):
        fs.put_file(path, url)
    clean = sorted(k for batch in make_eval_loader(local, batch_size=4, crop_size=None) for k in batch["key"])
    with FaultProxy(s3_endpoint.endpoint_url) as proxy:
        target = "/" + remote[1].split("://", 1)[1]
        stats = proxy.set_faults(Fault("cut", 7, lambda method, path: method == "GET" and path == target))
        options = {**s3_endpoint.storage_options, "endpoint_url": proxy.url, "max_attempts": 2}
        keys = [k for batch in make_eval_loader(remote, batch_size=4, crop_size=None, storage_options=options,
                                                read_retry=FAST_RETRY) for k in batch["key"]]
    assert sorted(keys) == clean and len(keys) == 8
    assert stats.injected["cut"] == 7 and "retry 1/" in caplog.text  # s3fs absorbed 5 cuts, holefill the rest
