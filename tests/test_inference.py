"""Inference: any image size in, the same size out, untouched outside the hole; model references; the job."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from models.registry import get_architecture
from pipeline.lifecycle.inference import inpaint_paths, inpaint_tensor, load_model_ref

REPO = Path(__file__).resolve().parents[1]


class Recording(nn.Module):
    """The real generator, remembering the input sizes it was called with."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.sizes = inner, []

    def forward(self, image, mask):
        self.sizes.append(tuple(image.shape[-2:]))
        return self.inner(image, mask)


@pytest.fixture(scope="module")
def rn():
    torch.manual_seed(0)
    return get_architecture("rn").generator().eval()


def _inputs(h: int, w: int):
    image = torch.rand(1, 3, h, w)
    mask = torch.zeros(1, 1, h, w)
    mask[..., h // 3: h // 2, w // 4: w // 2] = 1
    return image, mask


def _assert_same_outside_hole(out, image, mask):
    assert out.shape == image.shape and out.dtype == torch.float32
    outside = (mask == 0).expand_as(image)
    assert torch.equal(out[outside], image[outside])
    assert not torch.equal(out, image)  # the hole was filled


def test_lbam_300x451_image_comes_back_300x451_and_equal_outside_the_hole():
    torch.manual_seed(0)
    generator = Recording(get_architecture("lbam").generator().eval())
    image, mask = _inputs(300, 451)
    out = inpaint_tensor(generator, "lbam", image, mask)
    assert generator.sizes == [(384, 512)]  # reflect-padded to LBAM's multiple of 128
    _assert_same_outside_hole(out, image, mask)
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0


def test_crop_mode_covers_every_pixel_with_corner_windows(rn):
    generator = Recording(rn)
    image, mask = _inputs(30, 45)
    mask[..., -3:, -3:] = 1  # a hole in the corner only the last window sees
    out = inpaint_tensor(generator, "rn", image, mask, fit="crop")
    assert sorted(set(generator.sizes)) == [(28, 44)] and len(generator.sizes) == 4
    _assert_same_outside_hole(out, image, mask)
    assert not torch.equal(out[..., -3:, -3:], image[..., -3:, -3:])


def test_crop_mode_refuses_images_smaller_than_one_multiple():
    image, mask = _inputs(100, 300)
    with pytest.raises(ValueError, match="fit='crop' needs an image of at least 128x128"):
        inpaint_tensor(nn.Identity(), "lbam", image, mask, fit="crop")


class MeanColour(nn.Module):
    """A size-agnostic stand-in generator: predicts each image's mean colour everywhere."""

    def forward(self, image, mask):
        return image.mean(dim=(2, 3), keepdim=True).expand_as(image)


def test_tiny_images_fall_back_from_reflect_to_replicate_padding():
    image, mask = _inputs(1, 6)
    mask[..., 0, 2] = 1
    generator = Recording(MeanColour())
    out = inpaint_tensor(generator, "rn", image, mask)
    assert generator.sizes == [(4, 8)] and out.shape == (1, 3, 1, 6)
    _assert_same_outside_hole(out, image, mask)


def test_bad_inputs_are_one_line_value_errors(rn):
    image, mask = _inputs(8, 8)
    with pytest.raises(ValueError, match="does not match image shape"):
        inpaint_tensor(rn, "rn", image, mask[..., :4])
    with pytest.raises(ValueError, match=r"must be a \(B,3,H,W\) tensor"):
        inpaint_tensor(rn, "rn", image[:, :1], mask)
    with pytest.raises(ValueError, match="fit must be 'pad' or 'crop'"):
        inpaint_tensor(rn, "rn", image, mask, fit="stretch")


def test_model_references_checkpoint_folder_and_weights_files(rn, tmp_path):
    checkpoint = tmp_path / "checkpoint_000003"
    checkpoint.mkdir()
    (checkpoint / "state.json").write_text(json.dumps({"step": 3, "arch": "rn"}))
    torch.save(rn.state_dict(), checkpoint / "generator.pt")
    loaded, arch = load_model_ref(str(checkpoint))
    image, mask = _inputs(16, 16)
    assert arch == "rn" and not loaded.training
    torch.testing.assert_close(loaded(image, mask), rn(image, mask))

    with pytest.raises(ValueError, match="does not say its architecture: pass --arch"):
        load_model_ref(str(checkpoint / "generator.pt"))
    assert load_model_ref(str(checkpoint / "generator.pt"), arch="rn")[1] == "rn"
    torch.save({"arch": "rn", "state_dict": rn.state_dict()}, tmp_path / "wrapped.pt")
    assert load_model_ref(str(tmp_path / "wrapped.pt"))[1] == "rn"
    with pytest.raises(ValueError, match="holefill lbam layout: .*; official lbam release: "):
        load_model_ref(str(checkpoint / "generator.pt"), arch="lbam")
    with pytest.raises(ValueError, match=r"tried a checkpoint folder \(no state.json\) and a weights file \(a folder, not a file\)"):
        load_model_ref(str(tmp_path))


def _write_image(path: Path, h: int, w: int, seed: int) -> np.ndarray:
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


def test_folder_mode_uses_masks_by_name_and_generates_missing_ones(rn, tmp_path):
    images, masks, out = tmp_path / "images", tmp_path / "masks", tmp_path / "out"
    images.mkdir(), masks.mkdir()
    first = _write_image(images / "a.png", 30, 41, 1)
    _write_image(images / "b.png", 25, 20, 2)
    hole = np.zeros((30, 41), np.uint8)
    hole[10:20, 5:15] = 255
    Image.fromarray(hole).save(masks / "a.png")

    written = inpaint_paths(rn, "rn", images, out, masks)
    assert [p.name for p in written] == ["a.png", "b.png"]
    result = np.asarray(Image.open(out / "a.png"))
    assert result.shape == (30, 41, 3)
    assert np.array_equal(result[hole == 0], first[hole == 0])
    generated = np.asarray(Image.open(out / "b.mask.png"))
    assert generated.shape == (25, 20) and set(np.unique(generated)) <= {0, 255} and generated.any()
    assert not (out / "a.mask.png").exists()


def test_inpaint_job_writes_a_same_size_result_and_reports_bad_input(rn, tmp_path):
    torch.save(rn.state_dict(), tmp_path / "rn.pt")
    pixels = _write_image(tmp_path / "photo.png", 33, 50, 3)
    hole = np.zeros((33, 50), np.uint8)
    hole[5:15, 20:40] = 255
    Image.fromarray(hole).save(tmp_path / "hole.png")
    job = [sys.executable, str(REPO / "jobs" / "inpaint.py"), "--model", str(tmp_path / "rn.pt"), "--arch", "rn"]
    done = subprocess.run([*job, "--image", str(tmp_path / "photo.png"), "--mask", str(tmp_path / "hole.png"),
                           "--out", str(tmp_path / "filled.png")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = np.asarray(Image.open(tmp_path / "filled.png"))
    assert result.shape == pixels.shape and np.array_equal(result[hole == 0], pixels[hole == 0])

    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "small.png")
    bad = subprocess.run([*job, "--image", str(tmp_path / "photo.png"), "--mask", str(tmp_path / "small.png"),
                          "--out", str(tmp_path / "x.png")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "sizes must match" in bad.stderr.strip().splitlines()[-1]


# ----------------------------------------------------------------------------------------------------
# High-resolution strategy: windows around the holes


def test_a_3000x2000_photo_with_two_small_holes_only_sends_two_bounded_windows_through_the_network(rn):
    from models.inpaint import CropStrategy

    generator = Recording(rn)
    image = torch.rand(1, 3, 2000, 3000)
    mask = torch.zeros(1, 1, 2000, 3000)
    mask[..., 100:140, 200:260] = 1  # near the top-left corner
    mask[..., 1500:1900, 2000:2900] = 1  # a larger hole: its window exceeds the limit and is downscaled
    out = inpaint_tensor(generator, "rn", image, mask, strategy=CropStrategy(margin=64, trigger=1024, limit=128))
    assert len(generator.sizes) == 2
    assert all(max(size) <= 128 for size in generator.sizes)  # memory bounded by the window, not the photo
    _assert_same_outside_hole(out, image, mask)
    for hole in ((slice(100, 140), slice(200, 260)), (slice(1500, 1900), slice(2000, 2900))):
        assert not torch.equal(out[..., hole[0], hole[1]], image[..., hole[0], hole[1]])


def test_small_images_and_no_strategy_take_the_whole_image_path(rn):
    from models.inpaint import CropStrategy

    generator = Recording(rn)
    image, mask = _inputs(30, 45)
    whole = inpaint_tensor(generator, "rn", image, mask)
    same = inpaint_tensor(generator, "rn", image, mask, strategy=CropStrategy(trigger=45))
    assert generator.sizes == [(32, 48), (32, 48)] and torch.equal(whole, same)


def test_hole_windows_are_disjoint_clipped_and_grown_by_the_margin():
    from models.inpaint import hole_windows

    mask = torch.zeros(600, 800)
    mask[10:20, 10:20] = 1
    mask[30:40, 30:40] = 1  # within a margin of the first: one merged window
    mask[500:510, 700:790] = 1
    windows = hole_windows(mask, margin=32)
    assert windows == [(0, 0, 72, 72), (464, 664, 544, 800)]  # cell-aligned (8 px cells), clipped at the right edge


def test_crop_strategy_settings_are_checked():
    from models.inpaint import CropStrategy

    with pytest.raises(ValueError, match="CropStrategy.limit must be a positive integer"):
        CropStrategy(limit=0)
    with pytest.raises(ValueError, match="CropStrategy.margin must be a non-negative integer"):
        CropStrategy(margin=-1)


def test_inpaint_paths_and_the_job_config_use_the_high_resolution_strategy(rn, tmp_path):
    from models.inpaint import CropStrategy
    from pipeline.config import ConfigError, load_config
    from pipeline.lifecycle.inference import InpaintJobConfig

    pixels = _write_image(tmp_path / "photo.png", 60, 90, 4)
    hole = np.zeros((60, 90), np.uint8)
    hole[10:16, 70:80] = 255
    Image.fromarray(hole).save(tmp_path / "hole.png")
    generator = Recording(rn)
    inpaint_paths(generator, "rn", tmp_path / "photo.png", tmp_path / "out.png", tmp_path / "hole.png",
                  strategy=CropStrategy(margin=4, trigger=32, limit=16))
    assert len(generator.sizes) == 1 and max(generator.sizes[0]) <= 16
    result = np.asarray(Image.open(tmp_path / "out.png"))
    assert np.array_equal(result[hole == 0], pixels[hole == 0])

    required = ["image=a.png", "out=b.png"]
    assert load_config(InpaintJobConfig, None, required).hires.crop_strategy() == CropStrategy()
    assert load_config(InpaintJobConfig, None, [*required, "hires.strategy=whole"]).hires.crop_strategy() is None
    with pytest.raises(ConfigError, match="hires.limit"):
        load_config(InpaintJobConfig, None, [*required, "hires.limit=0"])
