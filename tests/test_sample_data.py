"""The sample dataset: real JPEGs in the Places365 layout, its file lists, determinism, appended images."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.imageops import BadImageError, prepare_image
from pipeline.data.sample_data import (
    CATEGORIES,
    add_new_images,
    find_package_photos,
    generate_sample_dataset,
    load_sample_dataset,
)


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("places")
    return generate_sample_dataset(str(root), n_train=10, n_val=4, seed=3, size=(128, 96), n_defective=3)


def test_layout_and_file_lists_follow_places365(dataset):
    root = Path(dataset.root)
    train_lines = (root / "places365_train_standard.txt").read_text().splitlines()
    val_lines = (root / "places365_val.txt").read_text().splitlines()
    categories = (root / "categories_places365.txt").read_text().splitlines()
    assert train_lines[0] == "/a/abbey/00000001.jpg 0"
    assert val_lines[0].startswith("Places365_val_00000001.jpg ")
    assert categories == [f"{c} {i}" for c, i in CATEGORIES]
    assert len(train_lines) == len(dataset.train_files) and len(val_lines) == 4
    for line in train_lines:
        entry, label = line.split()
        assert (root / "data_large" / entry.lstrip("/")).is_file()
        assert f"{entry.rsplit('/', 1)[0]} {label}" in categories
    for line in val_lines:
        assert (root / "val_large" / line.split()[0]).is_file()


def test_images_are_real_rgb_jpegs_with_structure(dataset):
    good = [e for e in dataset.train_files if e not in dataset.defective][:10]
    for entry in good:
        with Image.open(dataset.train_path(entry)) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            assert min(im.size) == 96
            pixels = np.asarray(im, np.float32)
        assert pixels.std() > 20  # not a flat colour
        assert np.abs(np.diff(pixels, axis=0)).mean() < 25  # mostly smooth regions: not noise


def test_package_photos_are_added_when_installed(dataset):
    photos = find_package_photos()
    assert len(dataset.train_files) == 10 + len(photos) + 3


def test_defective_files_are_listed_and_rejected_by_prepare_image(dataset):
    assert len(dataset.defective) == 3
    reasons = set()
    for entry in dataset.defective:
        with pytest.raises(BadImageError) as info:
            prepare_image(Path(dataset.train_path(entry)).read_bytes())
        reasons.add(info.value.reason)
    assert reasons == {"truncated", "empty file", "not an image"}


def test_generation_is_deterministic_for_a_seed(tmp_path):
    a = generate_sample_dataset(str(tmp_path / "a"), n_train=4, n_val=2, seed=1, size=(64, 48), include_package_photos=False)
    b = generate_sample_dataset(str(tmp_path / "b"), n_train=4, n_val=2, seed=1, size=(64, 48), include_package_photos=False)
    c = generate_sample_dataset(str(tmp_path / "c"), n_train=4, n_val=2, seed=2, size=(64, 48), include_package_photos=False)
    assert _digest(Path(a.root)) == _digest(Path(b.root))
    assert _digest(Path(a.root)) != _digest(Path(c.root))


def test_add_new_images_appends_files_and_list_lines(tmp_path):
    ds = generate_sample_dataset(str(tmp_path / "d"), n_train=5, n_val=1, size=(64, 48), include_package_photos=False)
    before = Path(ds.train_list).read_text()
    old_files = _digest(Path(ds.train_root))
    added = add_new_images(ds, 3, seed=9)
    after = Path(ds.train_list).read_text()
    assert after.startswith(before) and len(after.splitlines()) == 8
    assert [line.split()[0] for line in after.splitlines()[-3:]] == added
    assert all(e.lstrip("/") not in old_files for e in added) and len(set(added)) == 3
    assert _digest(Path(ds.train_root)).items() >= old_files.items()  # old images untouched
    assert load_sample_dataset(ds.root).train_files == ds.train_files


def test_bad_arguments_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="n_train"):
        generate_sample_dataset(str(tmp_path), n_train=-1)
    with pytest.raises(ValueError, match="size"):
        generate_sample_dataset(str(tmp_path), size=(10, 10))
