"""The registered model's artifacts: no pickle, no holefill requirement, encoded-image signature; loading the
versions registered before models from code (a pickled wrapper) without unpickling it; re-registering them."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from models.registry import get_architecture
from pipeline.lifecycle.packaging import (
    GENERATOR_SPEC,
    GENERATOR_WEIGHTS,
    LEGACY_FORMAT,
    MODEL_FORMAT,
    PYFUNC_MODEL_FILE,
    load_generator,
    model_format,
    reregister_version,
)
from pipeline.tracking import RunTracker
from support.serving_helpers import TINY_CHAMPION, TINY_RN, decode, encode, hole_mask, photo


@pytest.mark.e2e
def test_registered_artifacts_hold_no_pickle_and_no_holefill_requirement(mlflow_server, tiny_champion, tmp_path,
                                                                         monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    local = mlflow.artifacts.download_artifacts(f"models:/{TINY_CHAMPION}/{tiny_champion}", dst_path=str(tmp_path))
    files = sorted(str(p.relative_to(local)) for p in Path(local).rglob("*") if p.is_file())
    assert not [f for f in files if f.endswith((".pkl", ".pickle"))]
    assert "pyfunc_model.py" in files and "code/models/inpaint.py" in files and "code/models/codec.py" in files
    requirements = (tmp_path / "requirements.txt").read_text().split()
    assert sorted(r.split("=")[0].split(">")[0] for r in requirements) == ["mlflow", "numpy", "pillow", "torch"]
    mlmodel = (tmp_path / "MLmodel").read_text()
    assert "python_model.pkl" not in mlmodel and "holefill_format: holefill-generator/2" in mlmodel
    # The state dict is plain tensors: weights_only loading accepts it.
    state = torch.load(tmp_path / "artifacts" / "generator.pt", weights_only=True)
    assert set(state) == set(get_architecture("rn").generator(**TINY_RN).state_dict())


def test_model_code_file_and_packaging_agree_on_artifact_names():
    source = PYFUNC_MODEL_FILE.read_text()
    assert f'GENERATOR_WEIGHTS = "{GENERATOR_WEIGHTS}"' in source and f'GENERATOR_SPEC = "{GENERATOR_SPEC}"' in source
    assert "from pipeline" not in source and "import pipeline" not in source  # not bundled: it cannot be imported


@pytest.mark.e2e
def test_pyfunc_takes_encoded_images_in_a_frame_and_tensors_in_process(mlflow_server, tiny_champion, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    model = mlflow.pyfunc.load_model(f"models:/{TINY_CHAMPION}/{tiny_champion}")
    pixels, hole = photo(40, 50), hole_mask(40, 50)
    out = model.predict(pd.DataFrame({"image": [encode(pixels, "JPEG")], "mask": [encode(hole)]}))
    result = decode(out["image"][0])
    jpeg_pixels = decode(encode(pixels, "JPEG"))
    assert result.shape == (40, 50, 3) and np.array_equal(result[hole == 0], jpeg_pixels[hole == 0])

    image = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255
    mask = torch.from_numpy(hole > 0).float()[None, None]
    tensor_out = model.unwrap_python_model().predict(None, {"image": image.numpy(), "mask": mask.numpy()})
    assert tensor_out.shape == (1, 3, 40, 50)
    np.testing.assert_array_equal(tensor_out[0][:, hole == 0], image[0].numpy()[:, hole == 0])


_LEGACY_WRAPPER = textwrap.dedent('''
    import mlflow.pyfunc

    class HolefillGenerator(mlflow.pyfunc.PythonModel):
        """Stands in for the wrapper pickled before models from code (pipeline.tracking.HolefillGenerator)."""

        def predict(self, context, model_input, params=None):
            raise AssertionError("never called")
''')


@pytest.mark.e2e
def test_versions_registered_as_pickles_load_without_unpickling_and_re_register_as_models_from_code(
        mlflow_server, tmp_path, monkeypatch):
    # A version in the old format: a cloudpickled wrapper whose class lives in a module that is then gone,
    # with the two artifacts every holefill version has.
    (tmp_path / "legacy_wrapper.py").write_text(_LEGACY_WRAPPER)
    monkeypatch.syspath_prepend(str(tmp_path))
    import legacy_wrapper

    generator = get_architecture("rn").generator(**TINY_RN).eval()
    torch.save(generator.state_dict(), tmp_path / "generator.pt")
    (tmp_path / "generator.json").write_text(json.dumps({"arch": "rn", "generator_kwargs": TINY_RN,
                                                         "format": LEGACY_FORMAT}))
    tracker = RunTracker.start_or_resume(mlflow_server, "serving-test", "legacy")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    with mlflow.start_run(run_id=tracker.run_id):
        mlflow.pyfunc.log_model(name="generator", python_model=legacy_wrapper.HolefillGenerator(),
                                artifacts={GENERATOR_WEIGHTS: str(tmp_path / "generator.pt"),
                                           GENERATOR_SPEC: str(tmp_path / "generator.json")},
                                pip_requirements=["holefill==0.1.0"], registered_model_name="legacy-rn")
    tracker.finish()
    del sys.modules["legacy_wrapper"]
    (tmp_path / "legacy_wrapper.py").unlink()  # unpickling the wrapper would now fail

    assert model_format("models:/legacy-rn/1", mlflow_server) == LEGACY_FORMAT
    loaded, arch = load_generator("models:/legacy-rn/1", mlflow_server)
    image, mask = torch.rand(1, 3, 16, 16), torch.zeros(1, 1, 16, 16)
    mask[..., 4:8, 4:8] = 1
    assert arch == "rn"
    torch.testing.assert_close(loaded(image, mask), generator(image, mask))

    new = reregister_version(mlflow_server, "legacy-rn", 1)
    assert new.version == "2" and new.tags["holefill.reregistered_from"] == "1"
    assert model_format("models:/legacy-rn/2", mlflow_server) == MODEL_FORMAT
    torch.testing.assert_close(load_generator("models:/legacy-rn/2", mlflow_server)[0](image, mask),
                               generator(image, mask))


def test_a_model_folder_that_is_not_a_holefill_generator_is_a_clear_error(tmp_path):
    (tmp_path / "MLmodel").write_text("flavors:\n  python_function:\n    loader_module: x\n")
    with pytest.raises(ValueError, match="is not a holefill generator"):
        load_generator(str(tmp_path))
