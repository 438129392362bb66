"""Resuming never unpickles: every file of a training checkpoint is read ``weights_only``, and one that needs pickle
is refused in one line naming it before anything of it runs.

Checkpoints live under ``run.storage_path``, often a prefix that jobs and people share. The real checkpoints here
are written and resumed as a worker does (``tests/support/engine_probe.py``, tiny RN on one-rank DeepSpeed engines
in a subprocess), at ZeRO 0 and 2 and in bf16 and fp32; a payload that creates a file when unpickled is planted in
each of their files in turn. End to end on Ray Train (the job ends in that line): ``tests/test_train_local.py``.
"""

from __future__ import annotations

import io
import pickle
import random

import numpy as np
import pytest
import torch

from pipeline.train.checkpoint import RNG_FORMAT, rng_state, set_rng_state
from pipeline.train.safe_checkpoint import CheckpointRefused, checkpoint_refusal, load_checkpoint_file
from support.engine_probe import Payload, run_cases

# Both checkpoint layouts (ZeRO 0: model states only; ZeRO 1 and 2 write the same partitioned optimiser files) and
# both precisions.
CASES = ["planted:rn:0:bf16", "planted:rn:2:fp32"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def probe() -> dict:
    pytest.importorskip("deepspeed")
    return run_cases(*CASES)


@pytest.mark.parametrize("case", CASES)
def test_a_checkpoint_resumes_to_the_same_next_step_with_every_file_read_weights_only(probe, case):
    assert probe[case]["restored"] == probe[case]["original"]


@pytest.mark.parametrize("case", CASES)
def test_a_payload_planted_in_any_checkpoint_file_never_runs_and_the_resume_names_the_file(probe, case):
    files = probe[case]["files"]
    expected = {"rng/rank_0.pt", "generator.pt", "generator/state/mp_rank_00_model_states.pt",
                "discriminator/state/mp_rank_00_model_states.pt"}
    if not case.startswith("planted:rn:0"):
        expected |= {f"{part}/state/zero_pp_rank_0_mp_rank_00_optim_states.pt" for part in ("generator", "discriminator")}
    assert set(files) == expected
    for name, outcome in files.items():
        assert outcome["payload_runs_under_pickle"], name  # the plant is live: pickle would have run it
        assert not outcome["payload_ran"], name
        if name == "generator.pt":
            # A resume never reads it (the engines' own files hold the weights); registration and --model do.
            assert outcome["resume"] is None
            refusal = outcome["generator_record"]
        else:
            refusal = outcome["resume"]
            assert refusal["type"] == "CheckpointRefused"
        assert refusal is not None and "\n" not in refusal["message"], name
        assert name.rsplit("/", 1)[-1] in refusal["message"] and "pickle" in refusal["message"], refusal


def test_rng_states_are_tensors_and_ints_and_restore_every_generator():
    random.gauss(0, 1), np.random.randn()  # a cached Gaussian in both, which the state must carry
    buffer = io.BytesIO()
    torch.save(rng_state(CPU), buffer)
    expected = (random.gauss(0, 1), random.random(), np.random.randn(), np.random.rand(), torch.rand(3).tolist())
    buffer.seek(0)
    set_rng_state(torch.load(buffer, weights_only=True), CPU)  # torch's allow-list alone: no NumPy, no pickle
    assert (random.gauss(0, 1), random.random(), np.random.randn(), np.random.rand(), torch.rand(3).tolist()) == expected


def test_an_rng_file_of_the_pickled_format_is_refused_unread_in_one_line(tmp_path):
    # The format before RNG_FORMAT: NumPy's state as an ndarray inside a tuple; here with a payload beside it.
    old = tmp_path / "rank_0.pt"
    marker = tmp_path / "ran"
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                "extra": Payload(marker)}, old)
    with pytest.raises(CheckpointRefused) as refused:
        load_checkpoint_file(old)
    message = str(refused.value)
    assert str(old) in message and "pickle" in message and "\n" not in message
    assert "numpy" in message  # it names what the file asks for
    assert not marker.exists()


@pytest.mark.parametrize("damage", [
    lambda s: {**s, "format": "holefill.rng/1"},
    lambda s: {**s, "numpy": {**s["numpy"], "pos": 100_000}},
    lambda s: {**s, "numpy": {**s["numpy"], "keys": s["numpy"]["keys"][:10]}},
    lambda s: {**s, "python": {**s["python"], "state": s["python"]["state"] - (1 << 40)}},
    lambda s: {**s, "torch": torch.zeros(7, dtype=torch.uint8)},
    lambda s: {k: v for k, v in s.items() if k != "python"},
])
def test_an_rng_state_that_is_not_what_holefill_writes_is_refused_before_any_generator_changes(damage):
    state = rng_state(CPU)
    before = (random.getstate(), torch.get_rng_state())
    with pytest.raises(ValueError, match=f"not an RNG state of format {RNG_FORMAT}") as refused:
        set_rng_state(damage(state), CPU)
    assert "\n" not in str(refused.value)
    assert (random.getstate(), torch.get_rng_state().tolist()) == (before[0], before[1].tolist())


def test_a_file_that_is_not_a_torch_file_is_refused_naming_it(tmp_path):
    junk = tmp_path / "mp_rank_00_model_states.pt"
    junk.write_bytes(b"not a zip")
    with pytest.raises(CheckpointRefused, match="mp_rank_00_model_states.pt: it cannot be read weights_only"):
        load_checkpoint_file(junk)
    with pytest.raises(CheckpointRefused, match="missing"):
        load_checkpoint_file(tmp_path / "absent.pt")


def test_the_driver_finds_a_workers_refusal_inside_rays_training_error():
    pytest.importorskip("ray")
    from ray.train.v2.api.exceptions import WorkerGroupError

    line = "refusing checkpoint file /ckpt/rng/rank_1.pt: it needs pickle to load (builtins.open), ..."
    error = WorkerGroupError("rank 1 failed", {0: RuntimeError("collective aborted"), 1: CheckpointRefused(line)})
    assert checkpoint_refusal(error) == line
    # Ray may hand the worker's exception back as text only (a RayTaskError's traceback): still found, one line.
    wrapped = RuntimeError(f"Traceback (most recent call last):\n  ...\nCheckpointRefused: {line}\n")
    assert checkpoint_refusal(WorkerGroupError("rank 1 failed", {1: wrapped})) == line
    assert checkpoint_refusal(WorkerGroupError("rank 0 failed", {0: RuntimeError("out of memory")})) is None


def test_pickle_is_what_the_refusal_prevents(tmp_path):
    # The test's own control: the payload is live under pickle, inert under weights_only.
    marker = tmp_path / "ran"
    torch.save({"w": torch.zeros(1), "x": Payload(marker)}, tmp_path / "f.pt")
    with pytest.raises(CheckpointRefused):
        load_checkpoint_file(tmp_path / "f.pt")
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "f.pt", weights_only=True)
    torch.load(tmp_path / "f.pt", weights_only=False)
    assert marker.exists()
