"""A generator at rest is one record (``models.record.GeneratorRecord``), read from every reference form by one
reader (``pipeline.generators.read_generator``), and every ``--model`` / ``model.init_weights`` accepts a
checkpoint folder of the non-default networks the shipped configs train (make learn's RN with 2 residual blocks
and LBAM at width 0.25, the tiny configs' LBAM at 1/16)."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import models  # noqa: F401  (registers the architectures)
from jobs import evaluate as evaluate_job
from jobs import inpaint as inpaint_job
from models.record import RECORD_FORMAT, GeneratorRecord, kwargs_for_weights
from models.registry import get_architecture
from pipeline.generators import read_generator, write_generator
from pipeline.train.config import load_train_config
from pipeline.train.loop import initial_generator
from support.eval_helpers import mask_with_holes, picture, write_eval_set

CONFIGS = Path(__file__).resolve().parents[1] / "jobs" / "configs"
# (arch, generator keywords, the shipped config training that network)
NETWORKS = [("rn", {"residual_blocks": 2}, "train_rn_cpu_learn.yaml"),
            ("lbam", {"width": 0.25}, "train_lbam_cpu_learn.yaml"),
            ("lbam", {"width": 0.0625}, "train_lbam_cpu_tiny.yaml")]
IDS = ["rn-2-blocks", "lbam-0.25", "lbam-1/16"]


def _generator(arch: str, kwargs: dict, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return get_architecture(arch).generator(**kwargs).eval()


def _checkpoint(folder: Path, arch: str, kwargs: dict, module: torch.nn.Module, *, old: bool = False) -> Path:
    """A checkpoint folder as ``pipeline.train.checkpoint.save_checkpoint`` writes it (``old``: as it wrote it before
    records: a plain state dict and no keywords in state.json)."""
    folder.mkdir(parents=True)
    state = {"step": 3, "world_size": 1, "zero_stage": 0, "precision": "fp32", "arch": arch}
    if old:
        torch.save(module.state_dict(), folder / "generator.pt")
    else:
        state["generator_kwargs"] = kwargs
        record = GeneratorRecord.from_module(module, arch, kwargs, {"kind": "training run", "step": "3"})
        torch.save(record.to_payload(), folder / "generator.pt")
    (folder / "state.json").write_text(json.dumps(state))
    return folder


def _assert_same_network(record: GeneratorRecord, module: torch.nn.Module, arch: str) -> None:
    size = 128 if arch == "lbam" else 16
    torch.manual_seed(1)
    image, mask = torch.rand(1, 3, size, size), torch.zeros(1, 1, size, size)
    mask[..., size // 4: size // 2, size // 4: size // 2] = 1
    with torch.no_grad():
        torch.testing.assert_close(record.build()(image, mask), module(image, mask), rtol=0, atol=0)


def test_a_record_round_trips_through_a_weights_only_file_and_keeps_only_non_default_keywords(tmp_path):
    module = _generator("rn", {"residual_blocks": 2, "threshold": 0.8})
    record = GeneratorRecord.from_module(module, "rn", provenance={"kind": "training run", "step": "7"})
    assert record.kwargs == {"residual_blocks": 2}  # threshold 0.8 is the default
    path = tmp_path / "record.pt"
    torch.save(record.to_payload(), path)
    payload = torch.load(path, weights_only=True)  # plain data: no class is unpickled
    assert payload["format"] == RECORD_FORMAT
    back = GeneratorRecord.from_payload(payload)
    assert (back.arch, back.kwargs, back.provenance) == ("rn", {"residual_blocks": 2},
                                                         {"kind": "training run", "step": "7"})
    built = back.build()
    assert not built.training and all(p.dtype == torch.float32 for p in built.parameters())
    _assert_same_network(back, module, "rn")


def test_a_record_refuses_wrong_keywords_and_weights_that_do_not_fit_in_one_line():
    module = _generator("rn", {"residual_blocks": 2})
    with pytest.raises(ValueError, match="unknown rn generator keyword.*depth") as info:
        GeneratorRecord("rn", {"depth": 3}, module.state_dict())
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="weights do not fit: rn generator defaults: missing middle.2") as info:
        GeneratorRecord("rn", {}, module.state_dict()).build()
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="unknown architecture 'gan'"):
        GeneratorRecord("gan", {}, module.state_dict())


@pytest.mark.parametrize("arch, kwargs, _config", NETWORKS, ids=IDS)
def test_the_keywords_of_a_plain_state_dict_are_read_off_its_shapes(arch, kwargs, _config):
    assert kwargs_for_weights(arch, _generator(arch, kwargs).state_dict()) == kwargs


def test_weights_whose_keywords_their_shapes_do_not_show_are_refused_naming_the_option():
    state = _generator("rn", {"residual_blocks": 2}).state_dict()
    state["middle.1.conv_block.1.weight"] = torch.zeros(3, 3, 3, 3)  # no RN network has this shape
    with pytest.raises(ValueError, match=r"cannot be read off their shapes: pass them with --set generator_kwargs"):
        kwargs_for_weights("rn", state)


@pytest.mark.parametrize("arch, kwargs, _config", NETWORKS, ids=IDS)
def test_every_form_of_a_non_default_network_reads_as_its_record(tmp_path, arch, kwargs, _config):
    module = _generator(arch, kwargs)
    state = module.state_dict()
    new = read_generator(str(_checkpoint(tmp_path / "new", arch, kwargs, module)))
    old = read_generator(str(_checkpoint(tmp_path / "old", arch, kwargs, module, old=True)))
    torch.save(state, tmp_path / "plain.pt")
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "data_parallel.pt")
    torch.save({"arch": arch, "generator_kwargs": kwargs, "state_dict": state}, tmp_path / "wrapped.pt")
    torch.save({"iteration": 5, "netG": state}, tmp_path / "netG.pt")
    write_generator(new, str(tmp_path / "record.pt"))
    files = [read_generator(str(tmp_path / name), arch=arch)
             for name in ("plain.pt", "data_parallel.pt", "netG.pt")]
    files += [read_generator(str(tmp_path / "wrapped.pt")), read_generator(str(tmp_path / "record.pt"))]
    for record in (new, old, *files):
        assert (record.arch, record.kwargs) == (arch, kwargs)
    assert new.provenance["kind"] == "training run" and files[0].provenance["kind"] == "weights file"
    assert len(files[0].provenance["sha256"]) == 64
    _assert_same_network(old, module, arch)


def test_a_reference_that_cannot_be_read_says_which_forms_it_tried_in_one_line(tmp_path):
    state = _generator("rn", {"residual_blocks": 2}).state_dict()
    torch.save(state, tmp_path / "plain.pt")
    cases = [
        (tmp_path / "missing.pt", {}, r"tried a checkpoint folder \(no state.json\) and a weights file \(no such file\)"),
        (tmp_path, {}, r"tried a checkpoint folder \(no state.json\) and a weights file \(a folder, not a file\)"),
        (tmp_path / "plain.pt", {}, r"does not say its architecture: pass --arch \(one of lbam, rn\)"),
        (tmp_path / "plain.pt", {"arch": "lbam"}, r"holefill lbam layout: .*; official lbam release: "),
        (tmp_path / "plain.pt", {"arch": "rn", "kwargs": {"residual_blocks": 3}},
         r"holefill rn layout: .*missing middle.2"),
    ]
    for ref, kwargs, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            read_generator(str(ref), **kwargs)
        assert "\n" not in str(info.value), str(info.value)
    (tmp_path / "evil.pt").write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(ValueError, match="needs pickle|not a readable torch weights file"):
        read_generator(str(tmp_path / "evil.pt"), arch="rn")
    with pytest.raises(ValueError, match="an MLflow reference is read by the lifecycle stage"):
        read_generator("models:/rn/3")


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def _write_photo(path: Path, size: int) -> None:
    Image.fromarray(picture(size, size, 3)).save(path)


@pytest.mark.parametrize("arch, kwargs, _config", NETWORKS, ids=IDS)
def test_inpaint_job_accepts_a_checkpoint_folder_of_a_non_default_network(tmp_path, arch, kwargs, _config):
    module = _generator(arch, kwargs)
    checkpoint = _checkpoint(tmp_path / "checkpoint_000003", arch, kwargs, module)
    old = _checkpoint(tmp_path / "old_checkpoint", arch, kwargs, module, old=True)
    _write_photo(tmp_path / "photo.png", 96)
    for ref, out in ((checkpoint, "new.png"), (old, "old.png")):
        assert inpaint_job.main(["--model", str(ref), "--image", str(tmp_path / "photo.png"),
                                 "--out", str(tmp_path / out)]) == 0
    new_pixels = np.asarray(Image.open(tmp_path / "new.png"))
    assert new_pixels.shape == (96, 96, 3)
    assert np.array_equal(new_pixels, np.asarray(Image.open(tmp_path / "old.png")))


def test_inpaint_job_takes_the_keywords_of_a_plain_file_from_set_and_refuses_in_one_line(tmp_path, capsys):
    state = _generator("lbam", {"width": 0.0625}).state_dict()
    torch.save(state, tmp_path / "plain.pt")
    _write_photo(tmp_path / "photo.png", 64)
    args = ["--model", str(tmp_path / "plain.pt"), "--arch", "lbam", "--image", str(tmp_path / "photo.png"),
            "--out", str(tmp_path / "out.png")]
    assert inpaint_job.main(args + ["--set", "generator_kwargs.width=0.0625"]) == 0
    assert inpaint_job.main(args + ["--set", "generator_kwargs.width=0.25"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holefill lbam layout" in err[0], err


@pytest.mark.parametrize("arch, kwargs, config_name", NETWORKS, ids=IDS)
def test_init_weights_accepts_a_checkpoint_folder_of_the_network_the_config_trains(tmp_path, arch, kwargs, config_name):
    module = _generator(arch, kwargs, seed=4)
    checkpoint = _checkpoint(tmp_path / "checkpoint", arch, kwargs, module, old=arch == "rn")
    config = load_train_config(CONFIGS / config_name, [f"model.init_weights={checkpoint}"])
    record = initial_generator(config)
    assert (record.arch, record.kwargs) == (arch, kwargs)
    for name, tensor in module.state_dict().items():
        assert torch.equal(record.state_dict[name], tensor), name
    other = "train_lbam_cpu_tiny.yaml" if config_name != "train_lbam_cpu_tiny.yaml" else "train_lbam_cpu_learn.yaml"
    with pytest.raises(ValueError, match=r"^model.init_weights: cannot read a generator from checkpoint folder .*: "
                                         r"it holds a|^model.init_weights: .*generator keywords") as info:
        initial_generator(load_train_config(CONFIGS / other, [f"model.init_weights={checkpoint}"]))
    assert "\n" not in str(info.value)


@pytest.mark.e2e
def test_evaluate_job_accepts_checkpoint_folders_of_non_default_networks(tmp_path, ray_driver, capsys):
    samples = [(f"k{i}", picture(64, 64, i), mask_with_holes(64, 64, 400 * (i + 1))) for i in range(2)]
    manifest = write_eval_set(tmp_path / "eval", samples, per_shard=1)
    for (arch, kwargs, _config), name in zip(NETWORKS, IDS):
        checkpoint = _checkpoint(tmp_path / name.replace("/", "_"), arch, kwargs, _generator(arch, kwargs))
        assert evaluate_job.main(["--model", str(checkpoint), "--eval-manifest", manifest, "--no-log",
                                  "--set", "evaluation.num_workers=1", "--set", "evaluation.crop_size=64",
                                  "--set", "evaluation.samples_per_bucket=0"]) == 0
        out = capsys.readouterr().out
        assert f"({arch}) on eval set" in out and "(2 images" in out, out
