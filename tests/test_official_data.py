"""Official data options: each paper's training geometry, masks drawn anew per load from a seeded pool, NVIDIA
masks importable for training (with the leakage warning), and the official training configs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.data.loaders import make_train_loader
from pipeline.data.masks.importer import TRAINING_LEAKAGE_WARNING, import_training_pool
from pipeline.data.masks.pool import MaskPool, generated_masks, write_mask_pool
from pipeline.data.train_geometry import lbam_geometry, random_crop_flip, rn_geometry, train_sample
from test_loaders import _write_shards

CONFIGS = Path(__file__).resolve().parents[1] / "jobs" / "configs"


def _ramp(height: int, width: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // (width - 1), y * 255 // (height - 1), (x + y) % 256], axis=-1).astype(np.uint8)


def test_lbam_geometry_is_a_crop_of_the_350_bicubic_resize_with_the_mask_following():
    image = _ramp(512, 683)
    mask = np.zeros((512, 683), np.uint8)
    mask[100:300, 200:400] = 255
    out, out_mask = lbam_geometry(image, mask, 256, np.random.default_rng(3))
    assert out.shape == (256, 256, 3) and out_mask.shape == (256, 256)
    # Same draws by hand: offsets, then the flip.
    rng = np.random.default_rng(3)
    y0, x0 = int(rng.integers(0, 95)), int(rng.integers(0, 95))
    flip = rng.random() < 0.5
    resized = np.asarray(Image.fromarray(image).resize((350, 350), Image.Resampling.BICUBIC))[y0 : y0 + 256, x0 : x0 + 256]
    resized_mask = np.asarray(Image.fromarray(mask).resize((350, 350), Image.Resampling.NEAREST))[y0 : y0 + 256, x0 : x0 + 256]
    if flip:
        resized, resized_mask = resized[:, ::-1], resized_mask[:, ::-1]
    assert np.array_equal(out, resized) and np.array_equal(out_mask, resized_mask)
    # Aspect ratio not kept: a 512x683 image's content is squeezed horizontally by 683/512 more than vertically.


def test_lbam_pool_masks_are_resized_to_the_crop_and_never_cropped_or_flipped():
    pool_mask = np.zeros((512, 512), np.uint8)
    pool_mask[:, :100] = 255  # a hole on the left edge only
    for seed in range(6):
        _, mask = lbam_geometry(_ramp(300, 400), pool_mask, 256, np.random.default_rng(seed), pooled=True)
        assert mask[:, :50].all() and not mask[:, -50:].any()


def test_rn_geometry_is_the_centre_square_resized_bilinearly_without_antialiasing():
    image = _ramp(300, 400)  # centre square: columns 50..349
    mask = np.zeros((300, 400), np.uint8)
    mask[:, 50:60] = 255
    rng = np.random.default_rng(0)
    flip = np.random.default_rng(0).random() < 0.5
    out, out_mask = rn_geometry(image, mask, 256, rng)
    square = torch.from_numpy(image[:, 50:350].copy()).permute(2, 0, 1)[None].float()
    expected = F.interpolate(square, size=(256, 256), mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
    expected = expected.round().clamp(0, 255).to(torch.uint8).numpy()
    if flip:
        expected = expected[:, ::-1]
    assert np.array_equal(out, expected)
    # The mask's hole (the square's first 10 columns) lands on the same side as the image's (flipped) left edge.
    left = out_mask[:, :8].all() if not flip else out_mask[:, -8:].all()
    assert left and out_mask.mean() < 0.06 * 255


def test_rn_pool_masks_are_thresholded_after_bilinear_resizing_as_rn_does():
    pool_mask = np.zeros((512, 512), np.uint8)
    pool_mask[::2, ::2] = 255  # sparse dots: bilinear + (> 0) dilates them
    _, mask = rn_geometry(_ramp(256, 256), pool_mask, 256, np.random.default_rng(0), pooled=True)
    assert set(np.unique(mask)) <= {0, 255} and (mask > 0).mean() > 0.9


def test_crop_geometry_is_unchanged_random_crop_and_flip():
    image, mask = _ramp(80, 112), np.zeros((80, 112), np.uint8)
    a = train_sample(image, mask, 64, np.random.default_rng(5))
    b = random_crop_flip(image, mask, 64, np.random.default_rng(5))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def _pool(tmp_path: Path, count: int = 16) -> str:
    return write_mask_pool(generated_masks("lama_thick_256", count, seed=1, size=64), str(tmp_path / "pool"),
                           source="test")


def _masks_by_key(loader) -> dict:
    """Per-pass mask of each image (images are told apart by their content)."""
    out = {}
    for batch in loader:
        for image, mask in zip(batch["image"], batch["mask"]):
            out[image.float().mean().item()] = mask.clone()
    return out


def test_pool_masks_are_drawn_anew_each_epoch_and_reproducibly_for_a_seed(tmp_path):
    urls = _write_shards(tmp_path, 1, 4, size=(64, 64))
    pool = _pool(tmp_path)

    def loader(seed):
        return make_train_loader(urls, batch_size=4, crop_size=64, batches_per_epoch=1, num_workers=0, seed=seed,
                                 shuffle_buffer=0, mask_pool=[pool], geometry="rn")

    first = loader(7)
    epoch0 = list(first)[0]
    epoch1 = list(first)[0]  # the next pass: same images (one shard, no shuffle), new draws
    again = list(loader(7))[0]
    means = lambda batch: batch["image"].float().mean(dim=(1, 2, 3))  # noqa: E731  (flip-invariant identity)
    assert torch.equal(means(epoch0), means(epoch1))
    assert not torch.equal(epoch0["mask"], epoch1["mask"]), "masks must be redrawn every epoch"
    assert torch.equal(epoch0["mask"], again["mask"]), "the same seed must give the same masks"
    # The masks come from the pool, not from the shard (whose masks are the checkerboard's dark quadrants).
    assert not torch.equal(epoch0["mask"][:, 0] > 0, epoch0["image"].float().mean(dim=1) < 128)


def test_nvidia_masks_import_for_training_with_the_leakage_warning(tmp_path, caplog):
    folder = tmp_path / "irregular_mask" / "disocclusion_img_mask"
    folder.mkdir(parents=True)
    for i in range(3):
        white = np.zeros((512, 512), np.uint8)
        white[: 100 * (i + 1), :200] = 255  # NVIDIA files: white = hole
        Image.fromarray(white).save(folder / f"{i:05d}.png")
    with caplog.at_level(logging.WARNING):
        index_url = import_training_pool(str(tmp_path / "irregular_mask"), str(tmp_path / "pool"))
    assert TRAINING_LEAKAGE_WARNING in caplog.text
    index = json.loads(Path(index_url).read_text())
    assert index["count"] == 3 and index["warning"] == TRAINING_LEAKAGE_WARNING
    pool = MaskPool.load([index_url])
    ratios = sorted(float((pool.draw(np.random.default_rng(i)) > 0).mean()) for i in range(30))
    assert {round(r, 3) for r in ratios} <= {round(100 * (k + 1) * 200 / 512**2, 3) for k in range(3)}


@pytest.mark.parametrize("name", ["train_rn_official.yaml", "train_lbam_official.yaml"])
def test_official_configs_load_with_the_official_recipe(name):
    from pipeline.train.config import load_train_config

    config = load_train_config(str(CONFIGS / name))
    assert config.model.options.official is True
    assert config.deepspeed.precision == "fp32" and config.deepspeed.gradient_accumulation_steps == 1
    assert config.data.mask_pool and config.data.train_geometry == config.model.arch
    expected_batch = {"rn": 14, "lbam": 16}[config.model.arch]
    assert config.train.batch_size * config.scaling.num_workers == expected_batch


def test_official_mode_refuses_gradient_accumulation():
    from pipeline.config import ConfigError
    from pipeline.train.config import load_train_config

    with pytest.raises(ConfigError, match="deepspeed.gradient_accumulation_steps"):
        load_train_config(str(CONFIGS / "train_rn_official.yaml"), ["deepspeed.gradient_accumulation_steps=2"])
