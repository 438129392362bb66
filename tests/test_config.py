"""The config layer: YAML + --set overrides, validated up front, one-line errors naming the key."""

from __future__ import annotations

import argparse
from typing import Annotated, Literal, Union

import pytest
from pydantic import Field, model_validator

from pipeline.config import Config, ConfigError, add_config_arguments, derive, flatten, load_config, parse_job_config


class Data(Config):
    manifest: str
    crop_size: int = 256


class Train(Config):
    max_steps: int = 10
    lr: float = 1e-4
    tags: list[str] = []


class JobConfig(Config):
    data: Data
    train: Train = Train()


def test_yaml_then_overrides_in_order(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("data:\n  manifest: /a/manifest.json\ntrain:\n  max_steps: 5\n")
    cfg = load_config(JobConfig, path, ["train.max_steps=7", "train.lr=3e-4", "train.tags=[a, b]"])
    assert cfg.data.manifest == "/a/manifest.json"
    assert cfg.train.max_steps == 7 and cfg.train.lr == pytest.approx(3e-4)
    assert cfg.train.tags == ["a", "b"]
    assert cfg.data.crop_size == 256


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"^config key train\.max_stepz: unknown key$"):
        load_config(JobConfig, None, ["data.manifest=x", "train.max_stepz=3"])


def test_wrong_type_is_named():
    with pytest.raises(ConfigError) as err:
        load_config(JobConfig, None, ["data.manifest=x", "train.max_steps=many"])
    assert str(err.value).startswith("config key train.max_steps:")
    assert "\n" not in str(err.value)


def test_missing_required_key_is_named():
    with pytest.raises(ConfigError, match=r"config key data: Field required"):
        load_config(JobConfig, None, [])


def test_bad_files_and_assignments_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file .*missing.yaml"):
        load_config(JobConfig, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(JobConfig, bad)
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_config(JobConfig, None, ["data.manifest"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config(JobConfig, None, ["data=x", "data.manifest=y"])


def test_job_arguments_and_flatten(tmp_path):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args = parser.parse_args(["--set", "data.manifest=m.json", "--set", "train.max_steps=2"])
    cfg = parse_job_config(JobConfig, args)
    flat = flatten(cfg)
    assert flat["data.manifest"] == "m.json" and flat["train.max_steps"] == 2
    assert "train.lr" in flat


class Cat(Config):
    kind: Literal["cat"]
    lives: int = 9


class Dog(Config):
    kind: Literal["dog"]
    good: bool = True


class Pets(Config):
    pet: Annotated[Union[Cat, Dog], Field(discriminator="kind")]
    name: str = "rex"

    @model_validator(mode="after")
    def _at_most_nine_lives(self) -> "Pets":
        if isinstance(self.pet, Cat) and self.pet.lives > 9:
            raise ConfigError.at("pet.lives", "a cat has at most 9 lives")
        return self


@pytest.mark.parametrize("overrides, line", [
    (["pet.kind=cat", "pet.good=true"], "config key pet.good: unknown key"),  # no union tag in the key
    (["pet.kind=dog", "pet.good=maybe"], "config key pet.good: Input should be a valid boolean"),
    (["pet.kind=cow"], "config key pet.kind: must be one of 'cat', 'dog', got 'cow'"),
    (["pet.kind=cat", "pet.lives=10"], "config key pet.lives: a cat has at most 9 lives"),  # a validator's own key
])
def test_one_reading_of_every_validation_error(overrides, line):
    with pytest.raises(ConfigError) as err:
        load_config(Pets, None, overrides)
    assert str(err.value).startswith(line)


def test_configs_derive_from_objects_and_stay_validated():
    pets = load_config(Pets, None, ["pet.kind=cat"], updates={"name": "tom"})
    older = derive(pets, {"pet": {"lives": 3}})
    assert (older.pet.lives, older.name, pets.pet.lives) == (3, "tom", 9)
    with pytest.raises(ConfigError, match="^config key pet.lives: a cat has at most 9 lives$"):
        derive(pets, {"pet": {"lives": 10}})
