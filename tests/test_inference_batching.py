"""An inference answer depends only on its own input: every inference entry point (inpaint_tensor, the registered
pyfunc model, serving's batches, evaluation, training's validation, TorchScript and ONNX exports) gives each RN
image exactly what the official model gives it in a batch of one, whatever it is batched with.

The official RN pools its normalisation statistics over the batch; at inference holefill normalises each image
with its own (``models/rn.py``), which for a batch of one is the official computation. The batch-mates here are
a white and a black image, which moved a batched image's fill by up to 6/255 before.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from support.eval_helpers import picture, write_eval_set
from models.codec import encode_png
from models.inpaint import composite, inpaint_tensor
from models.rn import RNGenerator, init_rn_weights
from pipeline.evaluation.evaluate import EvaluationSettings, evaluate_slice
from pipeline.evaluation.perceptual import MetricWeights
from pipeline.lifecycle.exporting import _runner, export_program, write_export
from pipeline.lifecycle.packaging import MODEL_FORMAT, PYFUNC_MODEL_FILE, LoadedModel, ServingDefaults
from pipeline.lifecycle.serving import AliasFollowingInpainter, ServeJobConfig
from support.serving_helpers import encode

# 64 px: bit-exactness also needs convolution kernels that do not change with the batch size, which oneDNN's
# are at these shapes (not at every shape: see tests/test_rn.py).
SIZE = 64


@pytest.fixture(scope="module")
def rn() -> RNGenerator:
    """A tiny RN with the official (batch-pooled) statistics; constant biases, so no output saturates and a
    batch-mate's influence would show."""
    torch.manual_seed(3)
    return init_rn_weights(RNGenerator(residual_blocks=1), bias_std=0.0).eval()


@pytest.fixture(scope="module")
def pixels() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Three (image, mask) requests: a picture, a white and a black image, each with its own hole."""
    images = [picture(SIZE, SIZE, 0), np.full((SIZE, SIZE, 3), 255, np.uint8), np.zeros((SIZE, SIZE, 3), np.uint8)]
    masks = []
    for index in range(3):
        mask = np.zeros((SIZE, SIZE), np.uint8)
        mask[8 + 4 * index: 30 + 6 * index, 10: 40 - 3 * index] = 255
        masks.append(mask)
    return images, masks


def _tensors(images, masks) -> tuple[torch.Tensor, torch.Tensor]:
    # As models.codec decodes them, in the one memory layout inpaint_tensor hands every generator (kernels differ
    # between layouts, and the white image's flat features turn their last-bit differences into visible ones).
    image = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous().float().div_(255.0)
    return image, torch.from_numpy(np.stack(masks) > 127).float()[:, None]


def _official_alone(rn: RNGenerator, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The official computation, one image at a time: batch statistics of a batch of one, composited."""
    official = copy.deepcopy(rn).train()
    with torch.no_grad():
        return torch.cat([composite(official(image[i:i + 1], mask[i:i + 1]).clamp(0, 1), image[i:i + 1], mask[i:i + 1])
                          for i in range(image.shape[0])])


@pytest.fixture(scope="module")
def expected(rn, pixels) -> torch.Tensor:
    return _official_alone(rn, *_tensors(*pixels))


def test_inpaint_tensor(rn, pixels, expected):
    assert torch.equal(inpaint_tensor(rn, "rn", *_tensors(*pixels)), expected)


def test_the_registered_pyfunc_model(rn, pixels, expected, tmp_path):
    torch.save(rn.state_dict(), tmp_path / "generator.pt")
    (tmp_path / "generator.json").write_text(json.dumps({"arch": "rn", "generator_kwargs": {"residual_blocks": 1}}))
    spec = importlib.util.spec_from_file_location("holefill_pyfunc_model", PYFUNC_MODEL_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # what MLflow executes for a model from code
    model = module.HolefillInpainter()
    model.load_context(SimpleNamespace(artifacts={"generator_weights": str(tmp_path / "generator.pt"),
                                                  "generator_spec": str(tmp_path / "generator.json")},
                                       model_config=ServingDefaults().model_config_dict()))
    image, mask = _tensors(*pixels)
    out = model.predict(None, {"image": image.numpy(), "mask": mask.numpy()})
    assert np.array_equal(out, expected.numpy())


def test_a_serving_batch(rn, pixels, expected):
    loaded = LoadedModel(copy.deepcopy(rn), "rn", {"arch": "rn"}, MODEL_FORMAT, ServingDefaults())
    inpainter = AliasFollowingInpainter(ServeJobConfig(model="m"), loader=lambda uri, _: loaded, resolver=lambda: "1")
    import base64

    items = [inpainter.decode({"image": base64.b64encode(encode(image)).decode(),
                               "mask": base64.b64encode(encode(mask)).decode()}) for image, mask in zip(*pixels)]
    answers = inpainter.run_batch(items)  # one generator call for the three
    assert [a.png for a in answers] == [encode_png(expected[i:i + 1]) for i in range(3)]


@pytest.fixture(scope="module")
def eval_set(pixels, tmp_path_factory) -> str:
    images, masks = pixels
    return write_eval_set(tmp_path_factory.mktemp("eval"), [(f"k{i}", images[i], masks[i]) for i in range(3)],
                          per_shard=3)


def _slice(rn, eval_set, batch_size):
    settings = EvaluationSettings(batch_size=batch_size, crop_size=SIZE, samples_per_bucket=3)
    return evaluate_slice(copy.deepcopy(rn), "rn", eval_set, settings, MetricWeights(()))


def test_evaluation_numbers_and_pictures_do_not_depend_on_the_batch_size(rn, eval_set):
    alone, batched = _slice(rn, eval_set, 1), _slice(rn, eval_set, 3)
    assert torch.equal(batched.table, alone.table) and batched.table[:, -1].sum() == 3
    assert [s.key for s in batched.samples] == [s.key for s in alone.samples]
    assert all(np.array_equal(b.output, a.output) for b, a in zip(batched.samples, alone.samples))


def test_validation_during_training(rn, eval_set):
    from pipeline.train.loop import validate

    def config(batch_size: int) -> SimpleNamespace:
        data = SimpleNamespace(eval_manifest=eval_set, eval_batch_size=batch_size, crop_size=SIZE, loader_workers=0,
                               storage_options=None)
        return SimpleNamespace(data=data, deepspeed=SimpleNamespace(precision="fp32"))

    generator = copy.deepcopy(rn).train()  # as training hands it over
    alone = validate(generator, "rn", config(1), 0, 1, torch.device("cpu"))
    batched = validate(generator, "rn", config(3), 0, 1, torch.device("cpu"))
    assert batched == alone and alone["val/count"] == 3
    assert generator.training  # handed back in the mode it came in


@pytest.fixture(scope="module")
def rn_program(rn):
    """One torch.export of the RN for both formats (the slow step; saving and loading are tested in test_export)."""
    return export_program(copy.deepcopy(rn), "rn")


@pytest.mark.parametrize("fmt", ["exported_program", "onnx"])
def test_exported_models(rn_program, pixels, expected, tmp_path, fmt):
    if fmt == "exported_program":
        run = rn_program.module()
    else:
        run = _runner(write_export(rn_program, fmt, tmp_path / "rn.onnx"), fmt)
    image, mask = _tensors(*pixels)
    with torch.no_grad():
        batched = run(image, mask)
        alone = torch.cat([run(image[i:i + 1], mask[i:i + 1]) for i in range(3)])
    if fmt == "exported_program":  # the same aten kernels as eager: bit for bit
        assert torch.equal(batched, alone) and torch.equal(batched, expected)
        return
    # onnxruntime's own kernels: its batch equals its batch of one up to its vectorised float rounding (before,
    # the white batch-mate moved the first image by up to 6/255) ...
    torch.testing.assert_close(batched, alone, atol=1e-6, rtol=0)
    # ... and eager up to rounding, except on the flat white image: zero-variance features make RN-L's thresholded
    # regions flip on last-bit differences, so any other runtime's rounding shows there (not a batching effect).
    torch.testing.assert_close(batched[[0, 2]], expected[[0, 2]], atol=1e-5, rtol=0)
