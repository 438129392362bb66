"""Training-config validation: every broken rule is a one-line ConfigError naming the key, before any Ray work."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.config import ConfigError
from pipeline.train.config import load_train_config
from pipeline.train.engines import deepspeed_config

CONFIGS = Path(__file__).resolve().parents[1] / "jobs" / "configs"


@pytest.mark.parametrize("name", ["train_rn", "train_lbam", "train_rn_cpu_tiny", "train_lbam_cpu_tiny"])
def test_shipped_configs_are_valid(name):
    config = load_train_config(CONFIGS / f"{name}.yaml")
    assert config.registered_model == config.model.arch


def test_official_gpu_configs_keep_the_papers_global_batch():
    rn = load_train_config(CONFIGS / "train_rn.yaml")
    lbam = load_train_config(CONFIGS / "train_lbam.yaml")
    assert rn.train.batch_size * rn.scaling.num_workers == 14 and rn.train.seed == 67454
    assert lbam.train.batch_size * lbam.scaling.num_workers == 16 and lbam.data.crop_size == 256


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["deepspeed.zero_stage=3"], "deepspeed.zero_stage"),
        (["deepspeed.precision=fp16"], "deepspeed.precision"),  # CPU config
        (["scaling.use_gpu=true", "deepspeed.precision=fp16"], "deepspeed.precision"),  # refused: needs loss scaling
        (["data.crop_size=256"], "data.crop_size"),  # this LBAM D is built for 128x128 only
        (["model.discriminator_options.input_size=96"], "model.discriminator_options"),
        (["model.discriminator_options.use_sigmoid=true"], "model.discriminator_options.use_sigmoid"),  # fixed
        (["train.max_steps=0"], "train.max_steps"),
        (["scaling.num_workers=0"], "scaling.num_workers"),
        (["model.options.vgg_wieghts=x.pth"], "model.options.vgg_wieghts"),
        (["model.options.allow_random_vgg=false"], "model.options.vgg_weights"),
        (["model.arch=gan"], "model.arch"),
        (["train.ckpt_every=100"], "train.ckpt_every"),
        (["run.name=has space"], "run.name"),
        (["mlflow.unknown=1"], "mlflow.unknown"),
        (["model.generator_options.per_sample_stats=true"], "model.generator_options"),  # RN's option, not LBAM's
    ],
)
def test_bad_values_name_the_key_in_one_line(overrides, key):
    with pytest.raises(ConfigError) as info:
        load_train_config(CONFIGS / "train_lbam_cpu_tiny.yaml", overrides)
    message = str(info.value)
    assert key in message and "\n" not in message


@pytest.mark.parametrize("missing", ["data.train_manifest", "train.max_steps", "scaling.use_gpu", "mlflow.tracking_uri", "run.name"])  # run.storage_path has a default
def test_required_keys_are_required(tmp_path, missing):
    import yaml

    tree = yaml.safe_load((CONFIGS / "train_rn_cpu_tiny.yaml").read_text())
    section, key = missing.split(".")
    del tree[section][key]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tree))
    with pytest.raises(ConfigError, match=missing.replace(".", r"\.")):
        load_train_config(path)


def test_rn_accepts_small_crops_that_lbam_refuses():
    assert load_train_config(CONFIGS / "train_rn_cpu_tiny.yaml", ["data.crop_size=96"]).data.crop_size == 96


def test_deepspeed_config_per_engine_carries_batch_accumulation_clipping_and_precision():
    config = load_train_config(CONFIGS / "train_rn_cpu_tiny.yaml", [
        "deepspeed.gradient_accumulation_steps=3", "deepspeed.gradient_clipping=1.5", "deepspeed.precision=bf16",
        "deepspeed.zero_stage=2", "scaling.use_gpu=true",
    ])
    ds = deepspeed_config(config.deepspeed, micro_batch_size=2, world_size=4)
    assert ds["train_batch_size"] == 2 * 3 * 4 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_clipping"] == 1.5
    assert ds["zero_optimization"] == {"stage": 2, "compute_grad_norm": True, "overlap_comm": False}
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert "bf16" not in ds and "fp16" not in ds


def test_deepspeed_config_turns_off_every_per_step_sync_it_can():
    config = load_train_config(CONFIGS / "train_rn_cpu_tiny.yaml", ["deepspeed.zero_stage=1"])
    ds = deepspeed_config(config.deepspeed, micro_batch_size=2, world_size=1)
    # The throughput timer synchronises in every forward and step unless disabled.
    assert ds["timers"]["throughput"]["enabled"] is False and ds["wall_clock_breakdown"] is False
    # DeepSpeed 0.19 defaults gradient_clipping to 1.0: "off" must be written out, and with it the grad norm.
    assert ds["gradient_clipping"] == 0.0 and ds["zero_optimization"]["compute_grad_norm"] is False
    zero0 = deepspeed_config(load_train_config(CONFIGS / "train_rn_cpu_tiny.yaml").deepspeed, 2, 1)
    assert zero0["zero_optimization"] == {"stage": 0} and zero0["gradient_clipping"] == 0.0


def test_rn_generator_options_reach_the_constructor_check():
    config = load_train_config(CONFIGS / "train_rn_cpu_tiny.yaml", ["model.generator_options.per_sample_stats=true"])
    assert config.model.generator_options.per_sample_stats is True
    assert config.model.init_weights is None
    with pytest.raises(ConfigError, match="model.generator_options.residual_blocks"):
        load_train_config(CONFIGS / "train_rn_cpu_tiny.yaml", ["model.generator_options.residual_blocks=many"])


def test_model_is_a_union_on_arch_whose_typed_options_carry_every_default():
    from pipeline.train.architectures.lbam import LBAMSettings
    from pipeline.train.architectures.rn import RNSettings

    rn = load_train_config(CONFIGS / "train_rn.yaml").model
    lbam = load_train_config(CONFIGS / "train_lbam_cpu_tiny.yaml", ["model.options.style=60"]).model
    assert rn.options == RNSettings(l1_weight=1.0, gan_weight=0.1)
    assert isinstance(lbam.options, LBAMSettings) and lbam.options.style == 60.0 and lbam.options.hole == 6.0
    with pytest.raises(ConfigError, match="model.options.style: unknown key"):  # LBAM's option, not RN's
        load_train_config(CONFIGS / "train_rn_cpu_tiny.yaml", ["model.options.style=60"])


def test_a_config_object_is_valid_by_construction_and_derives_without_strings():
    from pipeline.config import derive

    config = load_train_config(CONFIGS / "train_rn_cpu_tiny.yaml", updates={"train": {"max_steps": 8}})
    assert config.train.max_steps == 8
    longer = derive(config, {"train": {"max_steps": 20}, "model": {"init_weights": "/w/g.pt"}})
    assert (longer.train.max_steps, longer.model.init_weights, config.train.max_steps) == (20, "/w/g.pt", 8)
    with pytest.raises(ConfigError, match="train.ckpt_every"):  # cross-section rules hold for derived configs too
        derive(config, {"train": {"max_steps": 1}})


def test_cpu_workers_get_one_malloc_arena_unless_the_user_sets_it_and_gpu_workers_are_left_alone():
    from pipeline.train.launch import worker_runtime_env

    cpu = load_train_config(CONFIGS / "train_rn_cpu_tiny.yaml")
    assert worker_runtime_env(cpu.scaling) == {"env_vars": {"MALLOC_ARENA_MAX": "1"}}
    mine = load_train_config(CONFIGS / "train_rn_cpu_tiny.yaml", ["scaling.worker_env.MALLOC_ARENA_MAX=4",
                                                                  "scaling.worker_env.FOO=bar"])
    assert worker_runtime_env(mine.scaling) == {"env_vars": {"MALLOC_ARENA_MAX": "4", "FOO": "bar"}}
    gpu = load_train_config(CONFIGS / "train_rn.yaml")
    assert worker_runtime_env(gpu.scaling) == {"env_vars": {}}


def test_lr_scale_must_be_positive():
    with pytest.raises(ConfigError, match="train.lr_scale"):
        load_train_config(CONFIGS / "train_rn_cpu_tiny.yaml", ["train.lr_scale=0"])


def test_cpu_workers_never_build_deepspeeds_shared_memory_op():
    # Building it is a ~30 s JIT compile under a file lock that a killed worker leaves behind for ever;
    # training all-reduces through gloo and never uses it.
    from deepspeed.comm.torch import build_shm_op

    from pipeline.train.engines import skip_cpu_shm_op

    skip_cpu_shm_op()
    assert build_shm_op() is None


def _cpu(native: bool):
    from pipeline.train.cpu_precision import CpuBf16Support

    return lambda: CpuBf16Support(capability="AVX512" if native else "AVX2", native=native)


def test_bf16_on_a_cpu_without_native_bf16_is_refused_in_one_line_naming_the_key_and_the_fixes(monkeypatch):
    monkeypatch.setattr("pipeline.train.cpu_precision.cpu_bf16_support", _cpu(native=False))
    with pytest.raises(ConfigError) as refused:
        load_train_config(CONFIGS / "train_rn_cpu_tiny.yaml", ["deepspeed.precision=bf16"])
    message = str(refused.value)
    assert "\n" not in message and message.startswith("config key deepspeed.precision:")
    assert "AVX2" in message and "240x" in message and "deepspeed.precision=fp32" in message
    assert "deepspeed.allow_slow_cpu_bf16=true" in message


@pytest.mark.parametrize("overrides", [
    ["deepspeed.allow_slow_cpu_bf16=true"],  # the user's explicit choice
    ["scaling.use_gpu=true"],  # GPU workers compute bf16 on the GPU
])
def test_bf16_on_such_a_cpu_runs_when_overridden_or_on_gpu_workers(monkeypatch, overrides):
    monkeypatch.setattr("pipeline.train.cpu_precision.cpu_bf16_support", _cpu(native=False))
    config = load_train_config(CONFIGS / "train_rn_cpu_tiny.yaml", ["deepspeed.precision=bf16", *overrides])
    assert config.deepspeed.precision == "bf16"


def test_bf16_on_a_cpu_with_native_bf16_needs_no_override(monkeypatch):
    monkeypatch.setattr("pipeline.train.cpu_precision.cpu_bf16_support", _cpu(native=True))
    assert load_train_config(CONFIGS / "train_rn_cpu_tiny.yaml", ["deepspeed.precision=bf16"]).deepspeed.precision == "bf16"


def test_this_machines_bf16_support_is_read_from_atens_dispatch_and_the_cpu_flags():
    from pipeline.train.cpu_precision import cpu_bf16_support

    support = cpu_bf16_support()
    assert support.capability == torch.backends.cpu.get_cpu_capability()
    if not support.capability.startswith("AVX512"):  # e.g. ATEN_CPU_CAPABILITY=avx2, or an AVX2-only CPU
        assert support.native is False


def test_paths_inside_typed_options_are_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_train_config(CONFIGS / "train_lbam_cpu_tiny.yaml", ["model.options.vgg_weights=weights/vgg16.pth"])
    assert config.model.options.vgg_weights == str(tmp_path / "weights" / "vgg16.pth")
