"""VGG16Features: torchvision-format weights from files and URLs, safe loading, frozen pool1..pool3 features."""

from __future__ import annotations

import logging

import fsspec
import pytest
import torch
import torch.nn.functional as F

from models.vgg import IMAGENET_MEAN, IMAGENET_STD, VGG16Features

# torchvision vgg16 ``features`` conv layers: index -> (out, in) channels.
_CONVS = {0: (64, 3), 2: (64, 64), 5: (128, 64), 7: (128, 128), 10: (256, 128), 12: (256, 256), 14: (256, 256)}
# Deeper convs of the full network, which the extractor must ignore.
_DEEP_CONVS = {17: (512, 256), 19: (512, 512), 21: (512, 512)}


class _NotATensor:
    """Any custom object: saving it makes a file that needs pickle to load."""


def _torchvision_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for index, (out_c, in_c) in {**_CONVS, **_DEEP_CONVS}.items():
        state[f"features.{index}.weight"] = torch.randn(out_c, in_c, 3, 3, generator=generator) * 0.05
        state[f"features.{index}.bias"] = torch.randn(out_c, generator=generator) * 0.05
    # Classifier entries exist in the real file and must be ignored (shrunk here to keep the test small).
    state["classifier.6.weight"] = torch.randn(10, 16, generator=generator)
    state["classifier.6.bias"] = torch.randn(10, generator=generator)
    return state


@pytest.fixture(scope="module")
def torchvision_file(tmp_path_factory) -> tuple[str, dict[str, torch.Tensor]]:
    state = _torchvision_state_dict()
    path = tmp_path_factory.mktemp("vgg") / "vgg16-397923af.pth"
    torch.save(state, path)
    return str(path), state


def _reference_pools(image: torch.Tensor, state: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """pool1..pool3 of torchvision's VGG16, computed directly with the functional API."""
    def conv(x, index):
        return F.relu(F.conv2d(x, state[f"features.{index}.weight"], state[f"features.{index}.bias"], padding=1))

    pool1 = F.max_pool2d(conv(conv(image, 0), 2), 2)
    pool2 = F.max_pool2d(conv(conv(pool1, 5), 7), 2)
    pool3 = F.max_pool2d(conv(conv(conv(pool2, 10), 12), 14), 2)
    return [pool1, pool2, pool3]


def test_loads_a_torchvision_file_and_returns_pool1_to_pool3(torchvision_file):
    path, state = torchvision_file
    vgg = VGG16Features(path)
    image = torch.rand(2, 3, 32, 48)
    pools = vgg(image)
    assert [tuple(p.shape) for p in pools] == [(2, 64, 16, 24), (2, 128, 8, 12), (2, 256, 4, 6)]
    for ours, expected in zip(pools, _reference_pools(image, state)):
        torch.testing.assert_close(ours, expected)


def test_loads_from_an_fsspec_url(torchvision_file):
    path, state = torchvision_file
    url = "memory://holefill-test/vgg16.pth"
    with fsspec.open(path, "rb") as src, fsspec.open(url, "wb") as dst:
        dst.write(src.read())
    try:
        vgg = VGG16Features(url)
    finally:
        fsspec.filesystem("memory").rm(url)
    torch.testing.assert_close(vgg.features[14].weight, state["features.14.weight"])


def test_images_are_not_imagenet_normalised_unless_asked(torchvision_file):
    path, state = torchvision_file
    image = torch.rand(1, 3, 16, 16)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    plain = VGG16Features(path)(image)
    normalised = VGG16Features(path, normalize_input=True)(image)
    torch.testing.assert_close(plain[2], _reference_pools(image, state)[2])
    torch.testing.assert_close(normalised[2], _reference_pools((image - mean) / std, state)[2])


def test_is_frozen_and_stays_in_eval_mode_but_passes_gradients_to_the_input(torchvision_file):
    vgg = VGG16Features(torchvision_file[0])
    assert not any(p.requires_grad for p in vgg.parameters())
    vgg.train()
    assert not any(m.training for m in vgg.modules())
    image = torch.rand(1, 3, 16, 16, requires_grad=True)
    sum(p.sum() for p in vgg(image)).backward()
    assert image.grad is not None and float(image.grad.abs().sum()) > 0
    assert all(p.grad is None for p in vgg.parameters())


def test_refuses_a_file_that_needs_pickle(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({**_torchvision_state_dict(), "extra": _NotATensor()}, path)
    with pytest.raises(ValueError, match="needs pickle"):
        VGG16Features(str(path))


def test_refuses_missing_and_misshaped_entries(tmp_path):
    state = _torchvision_state_dict()
    del state["features.12.bias"]
    torch.save(state, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"missing features\.12\.bias"):
        VGG16Features(str(tmp_path / "missing.pth"))

    state = _torchvision_state_dict()
    state["features.0.weight"] = torch.zeros(64, 1, 3, 3)  # a grey-input network
    torch.save(state, tmp_path / "misshaped.pth")
    with pytest.raises(ValueError, match=r"features\.0\.weight \(64, 1, 3, 3\)"):
        VGG16Features(str(tmp_path / "misshaped.pth"))


def test_refuses_a_missing_file(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        VGG16Features(str(tmp_path / "nowhere.pth"))


def test_requires_weights_unless_random_features_are_allowed_explicitly(caplog):
    with pytest.raises(ValueError, match="allow_random=True"):
        VGG16Features()
    with caplog.at_level(logging.WARNING, logger="models.vgg"):
        vgg = VGG16Features(allow_random=True)
    assert any("random weights" in record.getMessage() for record in caplog.records)
    assert [tuple(p.shape) for p in vgg(torch.rand(1, 3, 8, 8))] == [(1, 64, 4, 4), (1, 128, 2, 2), (1, 256, 1, 1)]


def test_rejects_an_image_that_is_not_three_channel():
    vgg = VGG16Features(allow_random=True)
    with pytest.raises(ValueError, match=r"\(B,3,H,W\)"):
        vgg(torch.rand(1, 1, 16, 16))
