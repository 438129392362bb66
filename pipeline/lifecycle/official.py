"""The papers' released generators into the registry: ``jobs/register_official.py``.

:func:`read_official` reads the authors' released generator file (any fsspec URL; the forms their code saves: a
plain state dict, a DataParallel ``module.``-prefixed one, one wrapped in a dict such as ``{"iteration": ...,
"generator": ...}``), converts it with :func:`models.convert.from_official` (strict keys and shapes) and returns a
:class:`~models.record.GeneratorRecord` whose provenance says where it came from (``official release``, the source
URL, the file's sha256, the paper). :func:`register_official` registers it as a version with the same serving
bundle as a trained version (so ``mlflow models serve`` runs it), after checking that the built record computes
what the converter's output computes, and, read back from the registry, still does (a pattern forward, bit for
bit). A file already registered under the model (same sha256) is not registered again.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field

from models.convert import extract_state_dict, from_official, load_weights_bytes
from models.record import GeneratorRecord
from models.registry import get_architecture
from pipeline.config import Config
from pipeline.errors import one_line
from pipeline.evaluation.evaluate import EvaluationSettings
from pipeline.fsutil import StorageSettings, read_bytes
from pipeline.lifecycle.packaging import (PROVENANCE_TAG, ServingDefaults, load_generator_record,
                                          log_and_register_generator)
from pipeline.lifecycle.promotion import DEFAULT_LOCK_ROOT, GateSettings, PromoteJobConfig
from pipeline.paths import PathStr
from pipeline.redaction import redact
from pipeline.tracking import RunTracker

__all__ = ["PAPERS", "RELEASES", "OfficialRegistration", "RegisterOfficialConfig", "pattern_forward", "read_official",
           "register_official"]

log = logging.getLogger(__name__)

PAPERS = {
    "rn": "Region Normalization for Image Inpainting (Yu et al., AAAI 2020)",
    "lbam": "Image Inpainting with Learnable Bidirectional Attention Maps (Xie et al., ICCV 2019)",
}
RELEASES = {"rn": "https://github.com/geekyutao/RN", "lbam": "https://github.com/Vious/LBAM_Pytorch"}


class RegisterOfficialConfig(Config):
    """``jobs/register_official.py``: the released file, where it goes, and optionally the gate.

    ``weights``: the authors' generator file (local path or fsspec URL, ``storage_options`` for it);
    ``registered_model`` defaults to the architecture's name. ``promote``: evaluate the new version on
    ``eval_manifest`` and run it through the gate against the champion, as ``jobs/promote.py`` does.
    """

    arch: Literal["rn", "lbam"]
    weights: PathStr
    registered_model: str | None = None
    tracking_uri: str | None = None
    experiment: str = "holefill-official"
    storage_options: StorageSettings = Field(default_factory=StorageSettings)
    serving: ServingDefaults = ServingDefaults()
    promote: bool = False
    eval_manifest: PathStr | None = None
    gate: GateSettings = GateSettings()
    evaluation: EvaluationSettings = EvaluationSettings()
    lock_root: str = Field(DEFAULT_LOCK_ROOT, min_length=1)
    lock_wait_s: float = Field(default=1800.0, ge=0)

    def model_name(self) -> str:
        """The registered model's name: ``registered_model``, else the architecture's."""
        return self.registered_model or self.arch

    def promote_config(self, version: str) -> PromoteJobConfig:
        """What ``jobs/promote.py`` runs for the new version (``promote``; needs ``eval_manifest``)."""
        if self.eval_manifest is None:
            raise ValueError("config key eval_manifest: --promote evaluates the version on the pinned eval set; "
                             "pass --eval-manifest")
        return PromoteJobConfig(registered_model=self.model_name(), challenger=version, eval_manifest=self.eval_manifest,
                                tracking_uri=self.tracking_uri, gate=self.gate, evaluation=self.evaluation,
                                lock_root=self.lock_root, lock_wait_s=self.lock_wait_s,
                                storage_options=self.storage_options)


def read_official(arch: str, url: str, storage_options: StorageSettings | None = None) -> tuple[GeneratorRecord, dict]:
    """The record of an official ``arch`` generator file and the converter's output it was made from.

    One-line ``ValueError`` when the file is missing, needs pickle, holds no state dict, or its keys or shapes are
    not the official network's."""
    try:
        payload = read_bytes(url, storage_options)
    except (FileNotFoundError, IsADirectoryError):
        raise ValueError(f"official {arch} weights {redact(url)}: no such file") from None
    except OSError as exc:
        raise ValueError(f"official {arch} weights {redact(url)}: {one_line(exc)}") from None
    try:
        converted = from_official(arch, "generator", extract_state_dict(load_weights_bytes(payload, str(redact(url)))))
    except ValueError as exc:
        raise ValueError(f"official {arch} weights {redact(url)}: {one_line(exc)}") from None
    provenance = {"kind": "official release", "source": str(redact(url)), "sha256": hashlib.sha256(payload).hexdigest(),
                  "paper": PAPERS[arch], "release": RELEASES[arch]}
    return GeneratorRecord(arch, {}, converted, provenance), converted


def _pattern(arch: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed (image, mask) pair at the architecture's smallest comfortable size: a gradient and a square hole."""
    size = max(64, get_architecture(arch).size_multiple)
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    image = torch.stack([xs, ys, (xs + ys) / 2])[None]
    mask = torch.zeros(1, 1, size, size)
    mask[..., size // 4: 3 * size // 4, size // 3: 2 * size // 3] = 1.0
    return image, mask


def pattern_forward(record: GeneratorRecord) -> torch.Tensor:
    """The record's built generator on the fixed pattern input (raw output)."""
    image, mask = _pattern(record.arch)
    with torch.no_grad():
        return record.build()(image, mask)


@dataclass(frozen=True)
class OfficialRegistration:
    """What :func:`register_official` did: the version, whether it was already there, the record's provenance."""

    registered_model: str
    version: str
    already_registered: bool
    provenance: dict


def _registered_version(client, name: str, sha256: str) -> str | None:
    # lazy: importing MLflow takes seconds, paid only by the callers that talk to a tracking server
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException:
        return None
    for version in versions:
        if version.tags.get(f"{PROVENANCE_TAG}sha256") == sha256 and \
                version.tags.get(f"{PROVENANCE_TAG}kind") == "official release":
            return str(version.version)
    return None


def register_official(config: RegisterOfficialConfig, tracking_uri: str) -> OfficialRegistration:
    """Read, convert, check and register ``config.weights`` (see the module docstring)."""
    # lazy: importing MLflow takes seconds, paid only by the callers that talk to a tracking server
    from mlflow import MlflowClient

    record, converted = read_official(config.arch, config.weights, config.storage_options)
    name = config.model_name()
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    known = _registered_version(client, name, record.provenance["sha256"])
    if known is not None:
        return OfficialRegistration(name, known, True, record.provenance)
    for key, tensor in converted.items():  # the record holds the converter's output, unchanged
        if not torch.equal(record.state_dict[key], tensor.float() if tensor.is_floating_point() else tensor):
            raise ValueError(f"official {config.arch} weights: entry {key} changed on its way into the record")
    expected = pattern_forward(record)
    tracker = RunTracker.start_or_resume(tracking_uri, config.experiment,
                                         f"official-{config.arch}-{record.provenance['sha256'][:12]}",
                                         {"holefill.arch": config.arch, "holefill.provenance.kind": "official release"})
    try:
        tracker.log_params({"source": record.provenance["source"], "sha256": record.provenance["sha256"],
                            "paper": PAPERS[config.arch]})
        image, mask = _pattern(config.arch)
        version = str(log_and_register_generator(tracking_uri, tracker.run_id, record, image, mask, name,
                                                 serving=config.serving).version)
        back = load_generator_record(f"models:/{name}/{version}", tracking_uri)
        if not torch.equal(pattern_forward(back), expected):
            raise ValueError(f"{name} version {version} read back from the registry computes something else than "
                             "the converted official weights")
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish("FINISHED")
    log.info("registered the official %s release %s as %s version %s", config.arch, record.provenance["source"], name,
             version)
    return OfficialRegistration(name, version, False, record.provenance)
